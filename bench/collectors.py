"""Measurement collectors: time, data movement, memory and the environment.

Each collector returns flat dicts with the unit in every key (`time_s`,
`copies_HtoD_bytes`, `mem_rss_peak_gib`) so the trainer can merge them into one
epoch row. The rules they implement (DESIGN.md, "Measurement rules"):

- time with a device sync or CUDA events, keep the raw per-step values, mark
  warm-up epochs;
- profile copies (HtoD, DtoH, DtoD, memset) in a dedicated profiled window,
  never inside the timed epochs (`profile_copies`);
- memory from NVML (device and this process) and the torch allocator peaks on
  a GPU, the process's peak RSS everywhere, each figure named for what it is;
- the environment (GPU, driver, CUDA, cuDNN, torch, git commit, every precision
  flag) with a fingerprint so a report never mixes machines in one ratio.

Nothing here changes a torch flag: the collectors only read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddnet.errors import UserError

GIB = float(1 << 30)

# --------------------------------------------------------------------------- time


class TimeCollector:
    """Per-epoch wall time with a device sync; per-step times; data wait vs compute.

    Call order per epoch: `epoch_begin`, then per step `batch_ready` (the batch
    is in hand: the data wait ends) and `step_end` (the optimizer step was
    issued), then `epoch_end`. `batch_ready` may be skipped (e.g. DoLL has no
    wait): the step then starts where the previous one ended.

    On a CPU the per-step times are `time.perf_counter` differences. On a GPU
    each step is bracketed by a pair of CUDA events recorded on the current
    stream and resolved only at `epoch_end` (one synchronize per epoch, none in
    the loop). There the step time is device time between the events, while the
    data wait is host time from `step_end` to the next `batch_ready`; when the
    host runs ahead of the device the two overlap, so on a GPU
    `data_wait_s + compute_s` need not add up to `time_s`.

    Warm-up: the first `warmup_epochs` epochs that *this collector* sees are
    marked `warmup=True`, whatever their number: a resumed run starts a fresh
    process that pays autotuning and compilation again. `mark_warmup_next`
    marks one more (the epoch after a recompile).
    """

    def __init__(self, device: torch.device, warmup_epochs: int = 1) -> None:
        self.device = torch.device(device)
        self.warmup_epochs = int(warmup_epochs)
        self._cuda = self.device.type == "cuda"
        self._epochs_seen = 0
        self._extra_warmup = 0
        self._in_epoch = False
        self.last_step_times_ms: list[float] = []
        """Raw per-step times of the last finished epoch, in milliseconds."""
        self.last_data_wait_ms: list[float] = []
        """Raw per-step host data waits of the last finished epoch, in milliseconds."""

    # Events are recorded on the stream the training step runs on.
    def _event(self) -> torch.cuda.Event:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)

    def mark_warmup_next(self) -> None:
        """Mark the next epoch warm-up too (e.g. torch.compile recompiles after the hybrid switch)."""
        self._extra_warmup += 1

    def epoch_begin(self, epoch: int) -> None:
        """Sync the device (earlier work must not leak into this epoch) and start the epoch clock."""
        self._sync()
        self._epoch = epoch
        self._epochs_seen += 1
        self._this_warmup = self._epochs_seen <= self.warmup_epochs or self._extra_warmup > 0
        self._extra_warmup = max(0, self._extra_warmup - 1)
        self._in_epoch = True
        self._waits_s: list[float] = []
        self._host_steps_s: list[float] = []
        self._event_pairs: list[tuple[Any, Any]] = []
        self._t0 = time.perf_counter()
        self._last_mark = self._t0  # host time the previous step ended
        self._step_start_host = self._t0
        self._step_start_event = self._event() if self._cuda else None
        self._waited = False

    def batch_ready(self) -> None:
        """A batch is in hand: the data wait since the last step ended is over; the step starts."""
        self._check_in_epoch("batch_ready")
        now = time.perf_counter()
        self._waits_s.append(now - self._last_mark)
        self._waited = True
        self._step_start_host = now
        if self._cuda:
            self._step_start_event = self._event()

    def step_end(self) -> None:
        """The optimizer step was issued. On a GPU this only records an event (no host sync)."""
        self._check_in_epoch("step_end")
        now = time.perf_counter()
        if not self._waited:
            self._waits_s.append(0.0)
        if self._cuda:
            end = self._event()
            self._event_pairs.append((self._step_start_event, end))
            self._step_start_event = end  # the next step starts here unless batch_ready says later
        else:
            self._host_steps_s.append(now - self._step_start_host)
        self._last_mark = now
        self._step_start_host = now
        self._waited = False

    def epoch_end(self) -> dict[str, Any]:
        """Sync once and return the epoch's flat timing fields."""
        self._check_in_epoch("epoch_end")
        self._sync()  # note: the one host-device sync of the epoch
        time_s = time.perf_counter() - self._t0
        self._in_epoch = False
        if self._cuda:
            steps_ms = [float(a.elapsed_time(b)) for a, b in self._event_pairs]
        else:
            steps_ms = [s * 1e3 for s in self._host_steps_s]
        self.last_step_times_ms = steps_ms
        self.last_data_wait_ms = [w * 1e3 for w in self._waits_s]
        row: dict[str, Any] = {
            "time_s": time_s,
            "steps": len(steps_ms),
            "data_wait_s": float(sum(self._waits_s)),
            "compute_s": float(sum(steps_ms)) / 1e3,
            **_spread_ms("step_time_ms", steps_ms),
            "warmup": self._this_warmup,
            "timer": "cuda-events" if self._cuda else "perf_counter",
        }
        return row

    def _check_in_epoch(self, what: str) -> None:
        if not self._in_epoch:
            raise RuntimeError(f"TimeCollector.{what}() called outside epoch_begin()/epoch_end()")


def _spread_ms(prefix: str, values_ms: list[float]) -> dict[str, float | None]:
    """p50, p90, mean and sample std of raw values (None when there are none)."""
    if not values_ms:
        return {f"{prefix}_p50": None, f"{prefix}_p90": None, f"{prefix}_mean": None, f"{prefix}_std": None}
    arr = np.asarray(values_ms, dtype=np.float64)
    return {
        f"{prefix}_p50": float(np.percentile(arr, 50)),
        f"{prefix}_p90": float(np.percentile(arr, 90)),
        f"{prefix}_mean": float(arr.mean()),
        f"{prefix}_std": float(statistics.stdev(values_ms)) if len(values_ms) > 1 else 0.0,
    }


# ------------------------------------------------------------------------- memory


def _read_vm_hwm_bytes() -> int | None:
    """Linux: the process's RSS high-water mark (VmHWM) from /proc/self/status."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def _reset_vm_hwm() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS (per-epoch peaks)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _current_rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or the platform refuses: RSS sampling is then off
        return None


def _nvml_handle(device: torch.device) -> tuple[Any, Any, str]:
    """Init NVML and find the handle of `device`; returns (pynvml, handle, how it was matched).

    Torch's index is not NVML's index under CUDA_VISIBLE_DEVICES, so match by UUID first.
    Raises on any failure; the caller records why.
    """
    import pynvml

    pynvml.nvmlInit()
    index = device.index if device.index is not None else torch.cuda.current_device()
    # torch prints the UUID bare; NVML wants it prefixed (GPU- for a board, MIG- for a MIG slice).
    uuid = ""
    with contextlib.suppress(Exception):
        uuid = str(torch.cuda.get_device_properties(index).uuid)
    candidates = [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
    for cand in candidates if uuid else []:
        with contextlib.suppress(Exception):
            return pynvml, pynvml.nvmlDeviceGetHandleByUUID(cand), "uuid"
    # Fallback: torch's own mapping (private helper, hence guarded), then the bare index.
    with contextlib.suppress(Exception):
        nvml_index = torch.cuda._get_nvml_device_index(index)
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(nvml_index), "cuda-visible-devices"
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index), "index"


class _Peaks:
    """Max-trackers for the current epoch and the whole run, keyed by figure name."""

    def __init__(self) -> None:
        self.epoch: dict[str, float] = {}
        self.run: dict[str, float] = {}

    def update(self, key: str, value: float) -> None:
        self.epoch[key] = max(value, self.epoch.get(key, value))
        self.run[key] = max(value, self.run.get(key, value))


class MemoryCollector:
    """Peak memory per epoch and per run, each figure named for what it measures.

    - `mem_nvml_device_used_peak_gib`: NVML used memory of the whole device
      (every process on it, plus the CUDA context), sampled by a thread.
    - `mem_nvml_process_used_peak_gib`: NVML's figure for this process only,
      where the driver gives it (not on some drivers, nor when the container's
      PID namespace hides our host PID).
    - `mem_allocator_peak_allocated_gib` / `mem_allocator_peak_reserved_gib`:
      torch's caching allocator (tensors alive / memory held from the driver).
      Under CUDA graphs the allocated peak includes the capture's peak
      (`note_graph_peak`; `mem_allocator_peak_allocated_source` says so),
      because replays hold the activations without allocating them.
    - `mem_rss_peak_gib`: the process's peak resident set (host memory), exact
      from VmHWM where Linux lets us reset it per epoch, else sampled.

    NVML missing is not an error: `summary()['mem_nvml_status']` says why.
    Use as a context manager; the sampler thread runs between enter and exit.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.05) -> None:
        self.device = torch.device(device)
        self.interval_s = float(interval_s)
        self._cuda = self.device.type == "cuda"
        self._peaks = _Peaks()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None
        self._handle: Any = None
        self.nvml_status = "not a CUDA device" if not self._cuda else "not started"
        self.nvml_process_status = self.nvml_status
        self.nvml_match = ""
        self._ask_processes = False  # per-process NVML queries; off for good once the driver refuses
        self._hwm_resettable = False
        self._alloc_run_peak = {"allocated": 0, "reserved": 0}
        self._graph_peak = 0  # allocator peak of the current CUDA graph's capture (0: no graph)

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> MemoryCollector:
        if self._cuda:
            try:
                self._nvml, self._handle, self.nvml_match = _nvml_handle(self.device)
                self.nvml_status = "ok"
                self.nvml_process_status = "ok"
                self._ask_processes = True
            except Exception as exc:  # library missing, no driver, no permission: record, go on
                self._nvml = self._handle = None
                self.nvml_match = ""
                self.nvml_status = f"unavailable: {type(exc).__name__}: {exc}".strip()
                self.nvml_process_status = self.nvml_status
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="mem-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval_s + 1.0)
            self._thread = None
        self._sample()
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
        self._nvml = self._handle = None  # figures gathered so far stay; no NVML calls after exit

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    # -- sampling ----------------------------------------------------------
    def _sample(self) -> None:
        rss = _current_rss_bytes()
        dev_used = proc_used = None
        if self._handle is not None:
            try:
                dev_used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            except Exception as exc:
                self.nvml_status = f"nvmlDeviceGetMemoryInfo failed: {type(exc).__name__}: {exc}"
            if self._ask_processes:
                proc_used = self._nvml_process_used()
        with self._lock:
            if rss is not None:
                self._peaks.update("rss", rss)
            if dev_used is not None:
                self._peaks.update("nvml_device", dev_used)
            if proc_used is not None:
                self._peaks.update("nvml_process", proc_used)

    def _nvml_process_used(self) -> int | None:
        pid = os.getpid()
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception as exc:  # NVMLError_NotSupported on some drivers / vGPU: stop asking
            self.nvml_process_status = f"per-process query failed: {type(exc).__name__}: {exc}"
            self._ask_processes = False
            return None
        mine = [p for p in procs if int(p.pid) == pid]
        if not mine:
            # Not fatal: the context may not exist yet, or a PID namespace hides us. Keep asking.
            if "nvml_process" not in self._peaks.run:
                self.nvml_process_status = "this PID is not in NVML's process list (container PID namespace?)"
            return None
        used = [p.usedGpuMemory for p in mine if p.usedGpuMemory is not None]
        if not used:
            self.nvml_process_status = "driver does not report per-process memory (usedGpuMemory N/A)"
            self._ask_processes = False
            return None
        self.nvml_process_status = "ok"
        return int(sum(used))

    # -- CUDA graphs --------------------------------------------------------
    def fold_run_peak(self) -> None:
        """Keep the allocator's run peak so far (call before something resets the peak statistics)."""
        self._fold_allocator_run_peak()

    def note_graph_peak(self, peak_allocated_bytes: int) -> None:
        """The allocator peak of a CUDA-graph capture, folded into every later allocated peak.

        A graph's activations are allocated in its private pool at capture and
        reused by every replay without an allocator call, so the per-epoch
        `max_memory_allocated` of a graphed run misses them; the capture peak
        is what a replay really holds. A recapture replaces it.
        """
        self._graph_peak = int(peak_allocated_bytes)
        self._alloc_run_peak["allocated"] = max(self._alloc_run_peak["allocated"], self._graph_peak)

    # -- epochs ------------------------------------------------------------
    def epoch_begin(self) -> None:
        """Start per-epoch peaks: reset the torch peak stats (CUDA) and the RSS high-water mark."""
        if self._cuda:
            self._fold_allocator_run_peak()
            torch.cuda.reset_peak_memory_stats(self.device)
        self._hwm_resettable = _reset_vm_hwm()
        with self._lock:
            self._peaks.epoch = {}
        self._sample()

    def epoch_end(self) -> dict[str, Any]:
        """Peaks since `epoch_begin`, only figures that were measured (no None values)."""
        self._sample()
        with self._lock:
            peaks = dict(self._peaks.epoch)
        row: dict[str, Any] = {}
        if self._cuda:
            torch.cuda.synchronize(self.device)  # frees of finished kernels are then accounted
            allocated = torch.cuda.max_memory_allocated(self.device)
            row["mem_allocator_peak_allocated_gib"] = max(allocated, self._graph_peak) / GIB
            row["mem_allocator_peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / GIB
            row["mem_allocator_peak_allocated_source"] = (
                "max(epoch, CUDA-graph capture)" if self._graph_peak else "epoch")
            self._fold_allocator_run_peak()
        if "nvml_device" in peaks:
            row["mem_nvml_device_used_peak_gib"] = peaks["nvml_device"] / GIB
        if "nvml_process" in peaks:
            row["mem_nvml_process_used_peak_gib"] = peaks["nvml_process"] / GIB
        rss, how = self._rss_epoch_peak(peaks.get("rss"))
        if rss is not None:
            row["mem_rss_peak_gib"] = rss / GIB
            row["mem_rss_method"] = how
        row["mem_source"] = self._source()
        return row

    def summary(self) -> dict[str, Any]:
        """Whole-run peaks (same naming as `epoch_end`) plus why NVML figures are missing, if they are."""
        self._sample()
        with self._lock:
            peaks = dict(self._peaks.run)
        out: dict[str, Any] = {}
        if self._cuda:
            self._fold_allocator_run_peak()
            out["mem_allocator_peak_allocated_gib"] = self._alloc_run_peak["allocated"] / GIB
            out["mem_allocator_peak_reserved_gib"] = self._alloc_run_peak["reserved"] / GIB
            out["mem_allocator_peak_allocated_source"] = (
                "max(epochs, CUDA-graph captures)" if self._graph_peak else "epochs")
        if "nvml_device" in peaks:
            out["mem_nvml_device_used_peak_gib"] = peaks["nvml_device"] / GIB
        if "nvml_process" in peaks:
            out["mem_nvml_process_used_peak_gib"] = peaks["nvml_process"] / GIB
        if "rss" in peaks:
            # ru_maxrss (kB on Linux) may have been reset with VmHWM; take the larger of it and the samples.
            ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            out["mem_rss_peak_gib"] = max(peaks["rss"], ru if not self._hwm_resettable else 0) / GIB
        out["mem_source"] = self._source()
        out["mem_nvml_status"] = self.nvml_status
        if self._cuda:
            out["mem_nvml_process_status"] = self.nvml_process_status
            if self.nvml_match:
                out["mem_nvml_device_match"] = self.nvml_match
        return out

    def _rss_epoch_peak(self, sampled: float | None) -> tuple[float | None, str]:
        hwm = _read_vm_hwm_bytes() if self._hwm_resettable else None
        if hwm is not None:
            with self._lock:  # VmHWM catches spikes the sampler missed; keep the run peak honest
                self._peaks.run["rss"] = max(hwm, self._peaks.run.get("rss", hwm))
            return float(max(hwm, sampled or 0)), "VmHWM"
        if sampled is not None:
            return float(sampled), f"sampled every {self.interval_s:g}s"
        return None, ""

    def _fold_allocator_run_peak(self) -> None:
        if self._cuda:
            a = torch.cuda.max_memory_allocated(self.device)
            r = torch.cuda.max_memory_reserved(self.device)
            self._alloc_run_peak["allocated"] = max(self._alloc_run_peak["allocated"], a)
            self._alloc_run_peak["reserved"] = max(self._alloc_run_peak["reserved"], r)

    def _source(self) -> str:
        if not self._cuda:
            return "rss"
        return "nvml+allocator" if self.nvml_match else "allocator"


# ------------------------------------------------------------------ data movement

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

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        run_steps(n_steps)
        if cuda:
            torch.cuda.synchronize(device)  # every queued copy must land inside the window

    with contextlib.ExitStack() as stack:
        if out_dir is not None:
            trace = Path(out_dir) / "trace.json"
            trace.parent.mkdir(parents=True, exist_ok=True)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="ddnet-prof-"))
            trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        if cuda:
            totals, unsized = _gpu_copies_from_trace(trace)
        else:
            totals, unsized = _cpu_copies_from_events(prof.events())

    kinds = GPU_COPY_KINDS if cuda else CPU_COPY_KINDS
    out = _copy_row(totals, kinds)
    out.update(
        copies_steps=int(n_steps),
        copies_device="cuda" if cuda else "cpu",
        copies_unsized_count=unsized,
        copies_trace=str(trace) if out_dir is not None else None,
    )
    return out


def _new_totals(kinds: tuple[str, ...]) -> dict[str, dict[str, float]]:
    return {k: {"time_ms": 0.0, "bytes": 0, "count": 0} for k in kinds}


def _gpu_copies_from_trace(trace: Path) -> tuple[dict[str, dict[str, float]], int]:
    """Sum device memcpy/memset activities of a kineto Chrome trace, by kind."""
    try:
        data = json.loads(Path(trace).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RuntimeError(f"cannot read the profiler trace {trace}: {exc}") from exc
    events = data["traceEvents"] if isinstance(data, dict) else data
    totals = _new_totals(GPU_COPY_KINDS)
    unsized = 0
    for ev in events:
        if ev.get("ph") != "X":
            continue
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


def _cpu_copies_from_events(events: Any) -> tuple[dict[str, dict[str, float]], int]:
    """Sum the outermost data-moving aten ops (copy_, fill_, zero_) of a CPU profile."""
    totals = _new_totals(CPU_COPY_KINDS)
    unsized = 0
    for ev in events:
        kind = _CPU_OPS.get(ev.name)
        if kind is None or _has_ancestor_in(ev, _CPU_OPS):
            continue
        t = totals[kind]
        t["time_ms"] += float(ev.cpu_time_total) / 1e3  # FunctionEvent times are in microseconds
        t["count"] += 1
        nbytes = _dest_bytes(ev)
        if nbytes is None:
            unsized += 1
        else:
            t["bytes"] += nbytes
    return totals, unsized


def _has_ancestor_in(ev: Any, names: dict[str, str]) -> bool:
    parent = ev.cpu_parent
    while parent is not None:
        if parent.name in names:
            return True
        parent = parent.cpu_parent
    return False


def _dest_bytes(ev: Any) -> int | None:
    """Bytes written by an in-place op: its first input (the destination) numel x element size."""
    shapes = getattr(ev, "input_shapes", None) or []
    dtypes = getattr(ev, "input_dtypes", None) or []
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


# -------------------------------------------------------------------- environment

_FINGERPRINT_KEYS = ("gpu_models", "gpu_driver", "torch_version", "cuda_version", "cpu_model")


def _read_flag(get: Callable[[], Any]) -> Any:
    """Read one torch flag; a missing API or a refusal (mixed legacy/new TF32 APIs) is recorded, not raised."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy-API deprecation warnings are noise here
            value = get()
    except Exception as exc:
        return f"unreadable: {type(exc).__name__}"
    return value if isinstance(value, bool | int | float | str) or value is None else str(value)


def precision_flags() -> dict[str, Any]:
    """Every precision/determinism flag in force, read only (never set here)."""
    b = torch.backends
    getters: dict[str, Callable[[], Any]] = {
        "flag_float32_matmul_precision": torch.get_float32_matmul_precision,
        "flag_cuda_matmul_allow_fp16_reduced_precision_reduction": lambda: (
            b.cuda.matmul.allow_fp16_reduced_precision_reduction
        ),
        "flag_cuda_matmul_allow_bf16_reduced_precision_reduction": lambda: (
            b.cuda.matmul.allow_bf16_reduced_precision_reduction
        ),
        "flag_cudnn_enabled": lambda: b.cudnn.enabled,
        "flag_cudnn_benchmark": lambda: b.cudnn.benchmark,
        "flag_cudnn_deterministic": lambda: b.cudnn.deterministic,
        "flag_deterministic_algorithms": torch.are_deterministic_algorithms_enabled,
        "flag_deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled,
    }
    # The fp32_precision API (torch >= 2.9) supersedes allow_tf32. Where it exists only it is read:
    # once it has been set, the legacy getters raise ("a mix of the legacy and new APIs").
    if not hasattr(b, "fp32_precision"):
        getters["flag_cuda_matmul_allow_tf32"] = lambda: b.cuda.matmul.allow_tf32
        getters["flag_cudnn_allow_tf32"] = lambda: b.cudnn.allow_tf32
    else:
        getters.update(
            {
                "flag_fp32_precision": lambda: b.fp32_precision,
                "flag_cuda_matmul_fp32_precision": lambda: b.cuda.matmul.fp32_precision,
                "flag_cudnn_fp32_precision": lambda: b.cudnn.fp32_precision,
                "flag_cudnn_conv_fp32_precision": lambda: b.cudnn.conv.fp32_precision,
                "flag_cudnn_rnn_fp32_precision": lambda: b.cudnn.rnn.fp32_precision,
                "flag_mkldnn_fp32_precision": lambda: b.mkldnn.fp32_precision,
            }
        )
    flags = {k: _read_flag(g) for k, g in getters.items()}
    # Environment variables that override the flags above behind torch's back.
    for var in (
        "NVIDIA_TF32_OVERRIDE",
        "CUBLAS_WORKSPACE_CONFIG",
        "CUDA_VISIBLE_DEVICES",
        "PYTORCH_CUDA_ALLOC_CONF",
    ):
        flags[f"env_{var}"] = os.environ.get(var)
    return flags


def _git(repo: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def git_state(repo: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the checkout this package lives in; None values if it is not one."""
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[1]
    state: dict[str, Any] = {"git_commit": None, "git_dirty": None, "git_dirty_files": None,
                             "git_commit_source": None}
    top = _git(repo, "rev-parse", "--show-toplevel")
    # An installed (non-editable) copy may sit inside some unrelated repository: only trust our own.
    if top is None or Path(top.strip()).resolve() != repo.resolve():
        # a copy of the tree without .git (a GPU box, a cluster's scratch): the caller may say which commit
        state["git_commit"] = os.environ.get("DDNET_BENCH_GIT_COMMIT") or None
        state["git_commit_source"] = "DDNET_BENCH_GIT_COMMIT" if state["git_commit"] else None
        return state
    commit = _git(repo, "rev-parse", "HEAD")
    # --no-optional-locks: never take index.lock (a concurrent commit must not fail because of us).
    status = _git(repo, "--no-optional-locks", "status", "--porcelain")
    if commit is None:
        return state
    state["git_commit"] = commit.strip()
    state["git_commit_source"] = "git"
    if status is not None:
        # Untracked, non-ignored files count: new code that the commit does not hold.
        lines = [ln[3:] for ln in status.splitlines() if ln.strip()]
        state["git_dirty"] = bool(lines)
        state["git_dirty_files"] = lines[:50]
    return state


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _gpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {"gpu_models": [], "gpu_memory_gib": [], "gpu_capability": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpu_models"].append(p.name)
            info["gpu_memory_gib"].append(round(p.total_memory / GIB, 2))
            info["gpu_capability"].append(f"{p.major}.{p.minor}")
    info["gpu_count"] = len(info["gpu_models"])
    info["gpu_driver"] = None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            drv = pynvml.nvmlSystemGetDriverVersion()
            info["gpu_driver"] = drv.decode() if isinstance(drv, bytes) else str(drv)
        finally:
            pynvml.nvmlShutdown()
        info["nvml_status"] = "ok"
    except Exception as exc:  # no NVML on CPU-only machines: say so
        info["nvml_status"] = f"unavailable: {type(exc).__name__}: {exc}".strip()
    return info


def environment(extra_flags: dict | None = None) -> dict[str, Any]:
    """The machine, software and flags of this run, with a stable `fingerprint`.

    Never fails for a missing piece (no GPU, no NVML, not a git checkout): the
    field is None and, for NVML, `nvml_status` says why. `extra_flags` (e.g.
    the trainer's resolved precision settings) are merged in last; the
    fingerprint hashes GPU models, driver, torch, CUDA and CPU model only, so
    it is equal for two runs on the same machine and software.
    """
    import psutil

    env: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": _read_flag(torch.backends.cudnn.version)
        if torch.backends.cudnn.is_available()
        else None,
        "cuda_available": torch.cuda.is_available(),
        "cpu_model": _cpu_model(),
        "cpu_count_logical": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_affinity_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_num_threads": torch.get_num_threads(),
        "host_memory_gib": round(psutil.virtual_memory().total / GIB, 2),
        "recorded_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    env.update(_gpu_info())
    env.update(git_state())
    env.update(precision_flags())
    fp_src = json.dumps([env[k] for k in _FINGERPRINT_KEYS], sort_keys=True)
    env["fingerprint"] = hashlib.sha256(fp_src.encode()).hexdigest()[:16]
    if extra_flags:
        env.update({k: v for k, v in extra_flags.items() if k != "fingerprint"})
    return env
