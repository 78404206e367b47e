"""Tests of bench.collectors.memory: RSS, NVML and allocator peaks, each named for what it measures."""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch

from bench.collectors import GIB, MemoryCollector, memory

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rss_gib() -> float:
    return psutil.Process().memory_info().rss / GIB


def test_memory_collector_cpu_sees_a_200mb_spike() -> None:
    with MemoryCollector(CPU, interval_s=0.02) as mc:
        mc.epoch_begin()
        before = _rss_gib()
        big = np.ones(200 * (1 << 20) // 8)  # 200 MiB, every page touched
        time.sleep(0.1)  # lets the sampler see it too where VmHWM cannot be reset
        del big
        row = mc.epoch_end()
        summary = mc.summary()
    assert row["mem_source"] == "rss"
    assert row["mem_rss_peak_gib"] - before >= 0.15
    assert None not in row.values()
    assert not any(k.startswith(("mem_nvml", "mem_allocator")) for k in row)
    assert summary["mem_rss_peak_gib"] >= row["mem_rss_peak_gib"] - 1e-9
    assert summary["mem_nvml_status"] == "not a CUDA device"
    # A second, quiet epoch gets its own (lower) peak.
    with MemoryCollector(CPU) as mc2:
        mc2.epoch_begin()
        mc2_row_peak = mc2.epoch_end()["mem_rss_peak_gib"]
    if row["mem_rss_method"] == "VmHWM":
        assert mc2_row_peak < row["mem_rss_peak_gib"] - 0.1


def _samplers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mem-sampler"]


def _spike_200mb() -> None:
    big = np.ones(200 * (1 << 20) // 8)  # 200 MiB, every page touched
    del big


def test_memory_collector_cpu_linux_polls_nothing() -> None:
    """With VmHWM (Linux) a CPU run's RSS peak is exact without a sampler thread, which would take the
    GIL and a core from the training loop; the default period is half a second where one runs."""
    mc = MemoryCollector(CPU)
    assert mc.interval_s == memory.DEFAULT_INTERVAL_S == 0.5
    with mc:
        mc.epoch_begin()
        row = mc.epoch_end()
        if row["mem_rss_method"] != "VmHWM":
            pytest.skip("VmHWM cannot be reset here (not Linux): the RSS is sampled")
        assert _samplers() == []


def test_memory_collector_run_peak_covers_time_between_epochs() -> None:
    """A spike between two epochs (validation, a checkpoint) is in the run's peak, not in either epoch's."""
    with MemoryCollector(CPU) as mc:
        mc.epoch_begin()
        first = mc.epoch_end()
        _spike_200mb()
        mc.epoch_begin()
        second = mc.epoch_end()
        s = mc.summary()
    if first["mem_rss_method"] != "VmHWM":
        pytest.skip("VmHWM cannot be reset here (not Linux): a sampler would have to catch the spike")
    assert s["mem_rss_peak_gib"] - max(first["mem_rss_peak_gib"], second["mem_rss_peak_gib"]) >= 0.15


def test_memory_collector_samples_rss_without_vmhwm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where VmHWM cannot be reset, a thread samples the RSS and the record says so."""
    monkeypatch.setattr(memory, "_reset_vm_hwm", lambda: False)
    with MemoryCollector(CPU, interval_s=0.02) as mc:
        assert len(_samplers()) == 1
        mc.epoch_begin()
        before = _rss_gib()
        big = np.ones(200 * (1 << 20) // 8)
        time.sleep(0.3)  # about 15 sampling periods
        del big
        row = mc.epoch_end()
    assert _samplers() == []
    assert row["mem_rss_method"] == "sampled every 0.02s"
    assert row["mem_rss_peak_gib"] - before >= 0.15


def test_memory_collector_summary_is_frozen_after_exit() -> None:
    with MemoryCollector(CPU) as mc:
        mc.epoch_begin()
        mc.epoch_end()
    s = mc.summary()
    big = np.ones(200 * (1 << 20) // 8)  # after the run: not the run's
    assert mc.summary() == s
    del big


@pytest.fixture
def stub_cuda_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda's allocator queries, stubbed so the CUDA branch runs on a CPU-only machine."""
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 1 << 30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: 2 << 30)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)


@pytest.mark.usefixtures("stub_cuda_allocator")
def test_memory_collector_records_missing_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CUDA device without NVML the collector records why and carries on."""

    def no_nvml(device: torch.device) -> None:
        raise OSError("NVML Shared Library Not Found")

    monkeypatch.setattr(memory, "_nvml_handle", no_nvml)
    with MemoryCollector(torch.device("cuda", 0)) as mc:
        mc.epoch_begin()
        row = mc.epoch_end()
    s = mc.summary()
    assert s["mem_nvml_status"].startswith("unavailable: OSError")
    assert row["mem_source"] == s["mem_source"] == "allocator"
    assert row["mem_allocator_peak_allocated_gib"] == pytest.approx(1.0)
    assert row["mem_allocator_peak_reserved_gib"] == pytest.approx(2.0)
    assert "mem_nvml_device_used_peak_gib" not in row and None not in row.values()


class _FakeNVML:
    """Just the NVML calls the sampler makes, with fixed answers."""

    def __init__(self, per_process: bool) -> None:
        self.per_process = per_process
        self.shut_down = False

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> SimpleNamespace:
        return SimpleNamespace(used=3 << 30, total=80 << 30, free=77 << 30)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> list[SimpleNamespace]:
        if not self.per_process:
            raise RuntimeError("Not Supported")  # stands in for pynvml.NVMLError_NotSupported
        return [
            SimpleNamespace(pid=os.getpid(), usedGpuMemory=1 << 30),
            SimpleNamespace(pid=os.getpid() + 1, usedGpuMemory=5 << 30),  # someone else's
        ]

    def nvmlShutdown(self) -> None:
        self.shut_down = True


@pytest.mark.usefixtures("stub_cuda_allocator")
@pytest.mark.parametrize("per_process", [True, False])
def test_memory_collector_nvml_figures(monkeypatch: pytest.MonkeyPatch, per_process: bool) -> None:
    fake = _FakeNVML(per_process)
    monkeypatch.setattr(memory, "_nvml_handle", lambda device: (fake, object(), "uuid"))
    with MemoryCollector(torch.device("cuda", 0), interval_s=0.01) as mc:
        mc.epoch_begin()
        time.sleep(0.05)
        row = mc.epoch_end()
    s = mc.summary()  # after exit: no NVML call may overwrite the status
    assert fake.shut_down
    assert row["mem_source"] == s["mem_source"] == "nvml+allocator"
    assert row["mem_nvml_device_used_peak_gib"] == pytest.approx(3.0)
    assert s["mem_nvml_status"] == "ok" and s["mem_nvml_device_match"] == "uuid"
    if per_process:
        assert row["mem_nvml_process_used_peak_gib"] == pytest.approx(1.0)  # only our PID
        assert s["mem_nvml_process_status"] == "ok"
    else:
        assert "mem_nvml_process_used_peak_gib" not in row
        assert s["mem_nvml_process_status"].startswith("per-process query failed: RuntimeError")



@pytest.mark.gpu
@needs_cuda
def test_memory_collector_cuda_allocator_peak() -> None:
    dev = torch.device("cuda")
    with MemoryCollector(dev) as mc:
        mc.epoch_begin()
        x = torch.empty(256 * (1 << 20), dtype=torch.uint8, device=dev)  # 256 MiB
        del x
        row = mc.epoch_end()
        s = mc.summary()
    assert row["mem_allocator_peak_allocated_gib"] >= 0.25
    assert row["mem_allocator_peak_reserved_gib"] >= row["mem_allocator_peak_allocated_gib"]
    assert s["mem_source"] in ("nvml+allocator", "allocator")
    if s["mem_nvml_status"] == "ok":
        assert row["mem_nvml_device_used_peak_gib"] >= 0.25

