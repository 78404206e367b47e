"""Tests of bench.collectors.copies: data movement in a dedicated profiled window."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bench.collectors import copies, profile_copies
from ddnet.errors import UserError

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

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


def test_cpu_trace_parser_counts_outermost_ops_per_thread() -> None:
    """The CPU view reads the trace's 'Input Dims'/'Input type' (torch 2.11's FunctionEvents lack dtypes):
    an op enclosed by another data-moving op on its thread is not counted again; another thread's is."""
    def op(name, ts, dur, tid, dims=((64, 64),), types=("float",)):
        return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid,
                "args": {"Input Dims": [list(d) for d in dims], "Input type": list(types)}}
    events = [
        op("aten::copy_", 100.0, 50.0, tid=1, types=("float", "double")),  # a dtype-converting copy_ ...
        op("aten::copy_", 110.0, 20.0, tid=1),  # ... calling another: counted once
        op("aten::copy_", 120.0, 10.0, tid=2, types=("c10::BFloat16",)),  # same time, other thread: counted
        op("aten::zero_", 200.0, 5.0, tid=1, dims=((8,),), types=("double",)),
        op("aten::fill_", 201.0, 2.0, tid=1, dims=((8,),), types=("double",)),  # inside zero_
        op("aten::copy_", 300.0, 4.0, tid=1, types=("c10::Float8_e4m3fn",)),
        op("aten::copy_", 400.0, 4.0, tid=1, types=("SomeNewType",)),  # size unknown: unsized
        op("aten::add_", 500.0, 4.0, tid=1),  # not data movement
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "dur": 9.0,
         "args": {"bytes": 4096}},  # device activities are the GPU view's
    ]
    totals, unsized = copies._cpu_copies(events)
    row = copies._copy_row(totals, copies.CPU_COPY_KINDS)
    assert row["copies_HtoH_count"] == 4 and unsized == 1
    assert row["copies_HtoH_bytes"] == 64 * 64 * 4 + 64 * 64 * 2 + 64 * 64 * 1
    assert row["copies_HtoH_time_ms"] == pytest.approx((50 + 10 + 4 + 4) / 1e3)
    assert row["copies_Memset_count"] == 1 and row["copies_Memset_bytes"] == 8 * 8


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
    totals, unsized = copies._gpu_copies(copies._trace_events(trace))
    row = copies._copy_row(totals, copies.GPU_COPY_KINDS)
    assert row["copies_HtoD_count"] == 2 and row["copies_HtoD_bytes"] == 8192
    assert row["copies_HtoD_time_ms"] == pytest.approx(0.15)
    assert row["copies_DtoD_bytes"] == 2048 and row["copies_DtoH_bytes"] == 1024
    assert row["copies_Memset_count"] == 1 and row["copies_Other_count"] == 1
    assert unsized == 1  # the PtoP event had no bytes
    assert row["copies_total_time_ms"] == pytest.approx(0.2)
    assert row["copies_HtoD_share_time"] == pytest.approx(0.75)
    assert row["copies_HtoD_share_bytes"] == pytest.approx(8192 / (8192 + 2048 + 1024 + 1024))



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


def test_kineto_status_lines_are_dropped_and_its_errors_kept(capfd) -> None:
    """torch 2.13 printed 'USDT:... profiler_start' and '... profiler_stop' into every profiled run's log."""
    with copies.kineto_chatter_dropped():
        os.write(2, b"USDT:2026-11-28 08:47:01 4937:4937 SyncActivityProfilerHandler.cpp:52] profiler_start\n"
                    b"STAGE:2026-11-28 08:47:09 4995:4995 SyncActivityProfilerHandler.cpp:51] Completed Stage\n"
                    b"ERROR:2026-11-28 08:47:09 4995:4995 CuptiActivityApi.cpp:7] CUPTI refused\n"
                    b"a line of ours\n")
    err = capfd.readouterr().err
    assert err == "ERROR:2026-11-28 08:47:09 4995:4995 CuptiActivityApi.cpp:7] CUPTI refused\na line of ours\n"
    os.write(2, b"after\n")  # standard error is itself again
    assert capfd.readouterr().err == "after\n"

    x = torch.randn(64)
    totals = profile_copies(lambda n: [x.clone() for _ in range(n)], 2, None, CPU)
    assert totals["copies_HtoH_count"] >= 2  # the profile itself still works
    assert "USDT:" not in capfd.readouterr().err
