"""Data movement: HtoD, DtoH, DtoD and memset (time and bytes) in a dedicated profiled window.

Never inside the timed epochs (DESIGN.md, "Measurement rules"): `profile_copies`
runs its own steps under torch.profiler and reads the copies from the trace.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from ddnet.errors import UserError

GPU_COPY_KINDS = ("HtoD", "DtoH", "DtoD", "Memset", "Other")
"""Kinds reported on a GPU ('Other': HtoH, PtoP, array copies)."""
CPU_COPY_KINDS = ("HtoH", "Memset")
"""Kinds reported on a CPU: aten::copy_ (HtoH) and aten::fill_/zero_ (Memset)."""

# C++ type names as the profiler writes them (record_shapes) -> bytes per element.
_ITEMSIZE = {
    "float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2,
    "long int": 8, "int": 4, "short int": 2, "signed char": 1, "unsigned char": 1, "bool": 1,
    "long unsigned int": 8, "unsigned int": 4, "short unsigned int": 2,
    "c10::complex<float>": 8, "c10::complex<double>": 16, "c10::complex<c10::Half>": 4,
}  # fmt: skip
_CPU_OPS = {"aten::copy_": "HtoH", "aten::fill_": "Memset", "aten::zero_": "Memset"}


def _itemsize(type_name: str) -> int | None:
    if type_name in _ITEMSIZE:
        return _ITEMSIZE[type_name]
    if type_name.startswith("c10::Float8"):
        return 1
    return None


def profile_copies(
    run_steps: Callable[[int], None],
    n_steps: int,
    out_dir: Path | None,
    device: torch.device,
    warmup_steps: int = 1,
) -> dict[str, Any]:
    """Profile data movement in a dedicated window, outside the timed epochs.

    Runs `run_steps(warmup_steps)` unprofiled (allocator, cuDNN autotuning and
    lazy init stay out of the window), then `run_steps(n_steps)` under
    torch.profiler (CPU activity, plus CUDA on a GPU). The Chrome trace goes to
    `out_dir/'trace.json'` when `out_dir` is given.

    On a GPU the figures are the device's memcpy/memset activities from the
    trace (kineto names them 'Memcpy HtoD (Pageable -> Device)', 'Memset
    (Device)', with `args.bytes`), in kinds HtoD, DtoH, DtoD, Memset and Other.
    Copies done by kernels (strided or dtype-converting `copy_`) are compute
    kernels, not memcpy activities, and are not counted, as in Nsight's view.

    On a CPU there are no memcpy activities; the figures are the aten ops that
    move data: `aten::copy_` (kind HtoH: `.to`, `.clone`, `.contiguous` all end
    in it, so only the outermost call is counted) and `aten::fill_`/`zero_`
    (kind Memset); bytes are the destination's elements times element size,
    time is the op's inclusive CPU time. `copies_device` says which view it is.

    Returns flat totals: per kind `copies_<kind>_{time_ms,bytes,count,share_time,share_bytes}`
    (shares are fractions of all data movement, None when there was none),
    `copies_total_time_ms`, `copies_total_bytes`, `copies_steps`, `copies_device`,
    `copies_unsized_count` (events whose bytes could not be read) and `copies_trace`.
    """
    if n_steps < 1:
        raise UserError(
            f"the profiled window needs at least 1 step (got {n_steps}); set --profile-steps >= 1."
        )
    device = torch.device(device)
    cuda = device.type == "cuda"
    if warmup_steps > 0:
        run_steps(warmup_steps)
    if cuda:
        torch.cuda.synchronize(device)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, record_shapes=True)
    with kineto_chatter_dropped():
        prof.start()
    try:
        run_steps(n_steps)
        if cuda:
            torch.cuda.synchronize(device)  # every queued copy must land inside the window
    finally:
        with kineto_chatter_dropped():
            prof.stop()

    with contextlib.ExitStack() as stack:
        if out_dir is not None:
            trace = Path(out_dir) / "trace.json"
            trace.parent.mkdir(parents=True, exist_ok=True)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="ddnet-prof-"))
            trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = _trace_events(trace)
        totals, unsized = _gpu_copies(events) if cuda else _cpu_copies(events)

    kinds = GPU_COPY_KINDS if cuda else CPU_COPY_KINDS
    out = _copy_row(totals, kinds)
    out.update(
        copies_steps=int(n_steps),
        copies_device="cuda" if cuda else "cpu",
        copies_unsized_count=unsized,
        copies_trace=str(trace) if out_dir is not None else None,
    )
    return out


_KINETO_CHATTER = re.compile(rb"(?:USDT|STAGE|INFO|VERBOSE):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+:\d+\] ")
"""A kineto status line ('USDT:2026-11-28 08:47:01 4937:4937 SyncActivityProfilerHandler.cpp:52] profiler_start');
its WARNING and ERROR lines are not matched."""


@contextlib.contextmanager
def kineto_chatter_dropped() -> Iterator[None]:
    """Drop kineto's status lines from standard error (file descriptor 2, where its C++ logger writes them)
    while the block runs; anything else written there meanwhile (kineto's warnings and errors) is kept.

    torch 2.13's build prints two such lines at every profiler start and stop (earlier builds print none);
    they would land in every profiled run's train.log. Setting KINETO_LOG_LEVEL high enough to hide them
    would hide kineto's errors (CUPTI refused, say) too.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 here: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = b"".join(line for line in held.read().splitlines(keepends=True)
                            if not _KINETO_CHATTER.match(line))
            if kept:
                os.write(2, kept)


def _new_totals(kinds: tuple[str, ...]) -> dict[str, dict[str, float]]:
    return {k: {"time_ms": 0.0, "bytes": 0, "count": 0} for k in kinds}


def _trace_events(trace: Path) -> list[dict[str, Any]]:
    """The complete ('ph': 'X') events of a kineto Chrome trace."""
    try:
        data = json.loads(Path(trace).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RuntimeError(f"cannot read the profiler trace {trace}: {exc}") from exc
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [ev for ev in events if isinstance(ev, dict) and ev.get("ph") == "X"]


def _gpu_copies(events: list[dict[str, Any]]) -> tuple[dict[str, dict[str, float]], int]:
    """Sum device memcpy/memset activities of a kineto trace's events, by kind."""
    totals = _new_totals(GPU_COPY_KINDS)
    unsized = 0
    for ev in events:
        name = str(ev.get("name", ""))
        cat = str(ev.get("cat", "")).lower()
        if name.startswith("Memset") and cat in ("gpu_memset", "memset", ""):
            kind = "Memset"
        elif name.startswith("Memcpy") and cat in ("gpu_memcpy", "memcpy", ""):
            parts = name.split()
            kind = parts[1] if len(parts) > 1 and parts[1] in GPU_COPY_KINDS else "Other"
        else:
            continue
        t = totals[kind]
        t["time_ms"] += float(ev.get("dur", 0.0)) / 1e3  # chrome trace durations are in microseconds
        t["count"] += 1
        nbytes = (ev.get("args") or {}).get("bytes")
        if isinstance(nbytes, int | float):
            t["bytes"] += int(nbytes)
        else:
            unsized += 1
    return totals, unsized


def _cpu_copies(events: list[dict[str, Any]]) -> tuple[dict[str, dict[str, float]], int]:
    """Sum the outermost data-moving aten ops (copy_, fill_, zero_) of a kineto trace's CPU events.

    Read from the trace, not from `prof.events()`: torch 2.11's FunctionEvents carry no input dtypes,
    while the trace's 'Input type' and 'Input Dims' are there in every version (2.6 to 2.13 checked).
    An op is outermost when no other data-moving op on its thread encloses it in time (a `.to` or
    `.clone` ends in one copy_; a dtype-converting copy_ may call another).
    """
    totals = _new_totals(CPU_COPY_KINDS)
    unsized = 0
    ops = sorted((ev for ev in events if ev.get("name") in _CPU_OPS and ev.get("cat", "cpu_op") == "cpu_op"),
                 key=lambda ev: (ev.get("pid"), ev.get("tid"), float(ev.get("ts", 0.0)), -float(ev.get("dur", 0.0))))
    thread, outer_end = None, float("-inf")
    for ev in ops:
        start, dur = float(ev.get("ts", 0.0)), float(ev.get("dur", 0.0))
        if (ev.get("pid"), ev.get("tid")) != thread:
            thread, outer_end = (ev.get("pid"), ev.get("tid")), float("-inf")
        if start < outer_end:
            continue  # inside an outer copy_/fill_ on this thread, counted there
        outer_end = start + dur
        t = totals[_CPU_OPS[ev["name"]]]
        t["time_ms"] += dur / 1e3  # chrome trace durations are in microseconds (inclusive)
        t["count"] += 1
        nbytes = _dest_bytes(ev.get("args") or {})
        if nbytes is None:
            unsized += 1
        else:
            t["bytes"] += nbytes
    return totals, unsized


def _dest_bytes(args: dict[str, Any]) -> int | None:
    """Bytes written by an in-place op: its first input (the destination) numel x element size."""
    shapes, dtypes = args.get("Input Dims") or [], args.get("Input type") or []
    if not shapes or not dtypes or not isinstance(shapes[0], list | tuple):
        return None
    size = _itemsize(str(dtypes[0]))
    if size is None:
        return None
    return int(np.prod(shapes[0], dtype=np.int64)) * size


def _copy_row(totals: dict[str, dict[str, float]], kinds: tuple[str, ...]) -> dict[str, Any]:
    total_ms = sum(totals[k]["time_ms"] for k in kinds)
    total_bytes = sum(totals[k]["bytes"] for k in kinds)
    row: dict[str, Any] = {}
    for k in kinds:
        t = totals[k]
        row[f"copies_{k}_time_ms"] = float(t["time_ms"])
        row[f"copies_{k}_bytes"] = int(t["bytes"])
        row[f"copies_{k}_count"] = int(t["count"])
        row[f"copies_{k}_share_time"] = t["time_ms"] / total_ms if total_ms > 0 else None
        row[f"copies_{k}_share_bytes"] = t["bytes"] / total_bytes if total_bytes > 0 else None
    row["copies_total_time_ms"] = float(total_ms)
    row["copies_total_bytes"] = int(total_bytes)
    return row
