"""Tests of bench.collectors.memory: RSS, NVML and allocator peaks, each named for what it measures."""

from __future__ import annotations

import os
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

