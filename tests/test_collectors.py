"""Tests of bench.collectors: time, data movement, memory, environment."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import collectors
from bench.collectors import MemoryCollector, TimeCollector, environment, profile_copies
from ddnet.errors import UserError

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --------------------------------------------------------------------------- time


def _scripted_epoch(tc: TimeCollector, epoch: int, steps: int, wait_s: float, compute_s: float) -> dict:
    tc.epoch_begin(epoch)
    for _ in range(steps):
        time.sleep(wait_s)  # the "loader"
        tc.batch_ready()
        time.sleep(compute_s)  # the "step"
        tc.step_end()
    return tc.epoch_end()


def test_time_collector_cpu_scripted_epoch() -> None:
    tc = TimeCollector(CPU, warmup_epochs=1)
    r1 = _scripted_epoch(tc, 1, steps=3, wait_s=0.02, compute_s=0.03)
    assert r1["steps"] == 3
    assert r1["timer"] == "perf_counter"
    assert r1["warmup"] is True
    # sleep never returns early; the upper bounds are loose because the machine is shared.
    assert 0.09 - 1e-3 <= r1["compute_s"] < 0.09 + 0.5
    assert 0.06 - 1e-3 <= r1["data_wait_s"] < 0.06 + 0.5
    assert r1["time_s"] >= r1["data_wait_s"] + r1["compute_s"] - 1e-3
    assert r1["time_s"] < r1["data_wait_s"] + r1["compute_s"] + 0.2
    assert len(tc.last_step_times_ms) == 3 and all(t >= 29.0 for t in tc.last_step_times_ms)
    assert len(tc.last_data_wait_ms) == 3 and all(w >= 19.0 for w in tc.last_data_wait_ms)
    assert r1["step_time_ms_p50"] == pytest.approx(float(np.median(tc.last_step_times_ms)))
    assert r1["step_time_ms_p50"] <= r1["step_time_ms_p90"] <= max(tc.last_step_times_ms)
    assert r1["step_time_ms_std"] >= 0.0

    r2 = _scripted_epoch(tc, 2, steps=2, wait_s=0.0, compute_s=0.01)
    assert r2["warmup"] is False and r2["steps"] == 2
    assert len(tc.last_step_times_ms) == 2  # raw values belong to the last epoch only


def test_time_collector_without_batch_ready_and_misuse() -> None:
    tc = TimeCollector(CPU, warmup_epochs=0)
    tc.epoch_begin(0)
    time.sleep(0.02)
    tc.step_end()  # no batch_ready: everything since the epoch began is the step
    r = tc.epoch_end()
    assert r["warmup"] is False and r["steps"] == 1
    assert r["data_wait_s"] == 0.0 and r["compute_s"] >= 0.019
    with pytest.raises(RuntimeError, match="outside epoch_begin"):
        tc.step_end()
    empty = TimeCollector(CPU)
    empty.epoch_begin(0)
    r0 = empty.epoch_end()
    assert r0["steps"] == 0 and r0["step_time_ms_p50"] is None and r0["compute_s"] == 0.0


# ------------------------------------------------------------------ data movement

MIB_F32 = (1 << 20) // 4  # elements in 1 MiB of float32


def test_profile_copies_cpu_counts_copies_and_bytes(tmp_path: Path) -> None:
    k = 3
    src = [torch.randn(MIB_F32) for _ in range(k)]
    dst = [torch.empty(MIB_F32) for _ in range(k)]
    small = torch.empty(256, dtype=torch.float64)
    calls: list[int] = []

    def run_steps(n: int) -> None:
        calls.append(n)
        for _ in range(n):
            for s, d in zip(src, dst, strict=True):
                d.copy_(s)
            small.zero_()  # one "memset" of 2 KiB per step
            _ = src[0].clone()  # clone -> aten::copy_ inside: one more copy, counted once

    n_steps = 4
    r = profile_copies(run_steps, n_steps=n_steps, out_dir=tmp_path, device=CPU, warmup_steps=1)
    assert calls == [1, n_steps]  # warm-up outside the profiled window
    assert r["copies_device"] == "cpu" and r["copies_steps"] == n_steps
    assert r["copies_HtoH_count"] == n_steps * (k + 1)
    assert r["copies_HtoH_bytes"] == n_steps * (k + 1) * (1 << 20)
    assert r["copies_Memset_count"] == n_steps
    assert r["copies_Memset_bytes"] == n_steps * 256 * 8
    assert r["copies_unsized_count"] == 0
    assert r["copies_total_bytes"] == r["copies_HtoH_bytes"] + r["copies_Memset_bytes"]
    assert r["copies_HtoH_share_bytes"] == pytest.approx(r["copies_HtoH_bytes"] / r["copies_total_bytes"])
    assert r["copies_HtoH_share_time"] + r["copies_Memset_share_time"] == pytest.approx(1.0)
    assert r["copies_total_time_ms"] > 0
    assert "copies_HtoD_bytes" not in r  # no device copies claimed on a CPU
    trace = tmp_path / "trace.json"
    assert trace.exists() and r["copies_trace"] == str(trace)
    data = json.loads(trace.read_text())
    names = [e.get("name") for e in data["traceEvents"]]
    assert names.count("aten::copy_") == n_steps * (k + 1)


def test_profile_copies_no_out_dir_and_bad_steps() -> None:
    a, b = torch.ones(10), torch.ones(10)

    def run_steps(n: int) -> None:
        for _ in range(n):
            a.add_(b)  # no data movement (a Python-scalar operand would be copied into a 0-d tensor)

    r = profile_copies(run_steps, n_steps=2, out_dir=None, device=CPU, warmup_steps=0)
    assert r["copies_total_bytes"] == 0 and r["copies_HtoH_count"] == 0
    assert r["copies_HtoH_share_time"] is None and r["copies_trace"] is None
    with pytest.raises(UserError, match="at least 1 step"):
        profile_copies(run_steps, n_steps=0, out_dir=None, device=CPU)


def test_gpu_trace_parser_on_a_kineto_shaped_trace(tmp_path: Path) -> None:
    """The GPU path parses kineto's trace; check it on events shaped like kineto's output."""
    events = [
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "dur": 100.0,
         "args": {"bytes": 4096, "memory bandwidth (GB/s)": 1.0}},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "dur": 50.0,
         "args": {"bytes": 4096}},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "dur": 25.0,
         "args": {"bytes": 2048}},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pageable)", "dur": 25.0,
         "args": {"bytes": 1024}},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "dur": 0.0, "args": {"bytes": 1024}},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy PtoP (Device -> Device)", "dur": 0.0, "args": {}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "dur": 999.0, "args": {}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "dur": 999.0, "args": {}},
    ]  # fmt: skip
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    totals, unsized = collectors._gpu_copies_from_trace(trace)
    row = collectors._copy_row(totals, collectors.GPU_COPY_KINDS)
    assert row["copies_HtoD_count"] == 2 and row["copies_HtoD_bytes"] == 8192
    assert row["copies_HtoD_time_ms"] == pytest.approx(0.15)
    assert row["copies_DtoD_bytes"] == 2048 and row["copies_DtoH_bytes"] == 1024
    assert row["copies_Memset_count"] == 1 and row["copies_Other_count"] == 1
    assert unsized == 1  # the PtoP event had no bytes
    assert row["copies_total_time_ms"] == pytest.approx(0.2)
    assert row["copies_HtoD_share_time"] == pytest.approx(0.75)
    assert row["copies_HtoD_share_bytes"] == pytest.approx(8192 / (8192 + 2048 + 1024 + 1024))


# ------------------------------------------------------------------------- memory


def _rss_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / collectors.GIB


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

    monkeypatch.setattr(collectors, "_nvml_handle", no_nvml)
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
    monkeypatch.setattr(collectors, "_nvml_handle", lambda device: (fake, object(), "uuid"))
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


# -------------------------------------------------------------------- environment


def test_environment_fields_and_fingerprint() -> None:
    env = environment(extra_flags={"precision": "fp32", "fingerprint": "ignored"})
    assert env["torch_version"] == torch.__version__
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert env["git_commit"] == head
    assert isinstance(env["git_dirty"], bool)
    assert env["flag_float32_matmul_precision"] == torch.get_float32_matmul_precision()
    if hasattr(torch.backends, "fp32_precision"):  # new API only: legacy getters may raise once it is set
        assert env["flag_cudnn_conv_fp32_precision"] == torch.backends.cudnn.conv.fp32_precision
        assert env["flag_cuda_matmul_fp32_precision"] == torch.backends.cuda.matmul.fp32_precision
        assert "flag_cudnn_allow_tf32" not in env
    else:
        assert env["flag_cudnn_allow_tf32"] == torch.backends.cudnn.allow_tf32
        assert isinstance(env["flag_cuda_matmul_allow_tf32"], bool)
    assert env["flag_cudnn_benchmark"] == torch.backends.cudnn.benchmark
    assert env["flag_cudnn_deterministic"] == torch.backends.cudnn.deterministic
    assert env["flag_deterministic_algorithms"] == torch.are_deterministic_algorithms_enabled()
    assert env["precision"] == "fp32"
    assert env["cpu_count_logical"] >= 1 and env["cpu_model"]
    assert env["numpy_version"] == np.__version__
    if not torch.cuda.is_available():
        assert env["gpu_models"] == [] and env["gpu_count"] == 0
    json.dumps(env)  # storable as env.json
    again = environment()
    assert len(env["fingerprint"]) == 16 and env["fingerprint"] == again["fingerprint"]


def test_environment_reads_flags_without_setting_them() -> None:
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
    environment()
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == before
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert environment()["flag_float32_matmul_precision"] == "high"
    finally:
        torch.set_float32_matmul_precision(old)


def test_git_state_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DDNET_BENCH_GIT_COMMIT", raising=False)
    s = collectors.git_state(tmp_path)
    assert s == {"git_commit": None, "git_dirty": None, "git_dirty_files": None, "git_commit_source": None}
    # a copy of the tree without .git (a GPU box, a cluster's scratch) can be told its commit
    monkeypatch.setenv("DDNET_BENCH_GIT_COMMIT", "abc123")
    s = collectors.git_state(tmp_path)
    assert s["git_commit"] == "abc123" and s["git_commit_source"] == "DDNET_BENCH_GIT_COMMIT"
    assert s["git_dirty"] is None


def test_fingerprint_changes_with_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    fp = environment()["fingerprint"]
    monkeypatch.setattr(collectors, "_cpu_model", lambda: "Some Other CPU")
    assert environment()["fingerprint"] != fp


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_cuda
def test_time_collector_cuda_events() -> None:
    dev = torch.device("cuda")
    a = torch.randn(2048, 2048, device=dev)
    tc = TimeCollector(dev)
    tc.epoch_begin(1)
    for _ in range(3):
        time.sleep(0.01)
        tc.batch_ready()
        for _ in range(5):
            a = a @ a
            a = a / a.norm()
        tc.step_end()
    r = tc.epoch_end()
    assert r["timer"] == "cuda-events" and r["steps"] == 3
    assert all(t > 0 for t in tc.last_step_times_ms)
    assert r["data_wait_s"] >= 0.025
    assert r["time_s"] >= r["compute_s"] - 1e-3


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


@pytest.mark.gpu
@needs_cuda
def test_profile_copies_cuda_counts_htod(tmp_path: Path) -> None:
    dev = torch.device("cuda")
    host = torch.randn(MIB_F32).pin_memory()
    dst = torch.empty(MIB_F32, device=dev)

    def run_steps(n: int) -> None:
        for _ in range(n):
            dst.copy_(host, non_blocking=True)

    r = profile_copies(run_steps, n_steps=5, out_dir=tmp_path, device=dev)
    assert r["copies_device"] == "cuda"
    assert r["copies_HtoD_count"] == 5
    assert r["copies_HtoD_bytes"] == 5 * (1 << 20)
    assert r["copies_HtoD_share_bytes"] == pytest.approx(1.0)
    assert (tmp_path / "trace.json").exists()
