"""Memory: NVML (device and this process), torch allocator peaks, the process's peak RSS.

Each figure is named for what it measures (`mem_nvml_device_used_peak_gib`,
`mem_allocator_peak_allocated_gib`, `mem_rss_peak_gib`); on a CPU only the RSS
is measured. `MemoryCollector` is a context manager: between enter and exit a
sampler thread polls what cannot be read as a peak (NVML's device and process
use; the RSS only where Linux's VmHWM cannot be reset), every half second.

Why so seldom, and no RSS polling on Linux: the harness must not perturb what
it measures (DESIGN.md: at most 2 % per epoch over a bare loop). Every wake-up
takes the GIL from the training loop and, on a small CPU box, a core from the
intra-op threads; VmHWM gives the exact RSS peak with no thread at all.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
from typing import Any

import psutil
import torch

try:
    import pynvml
except ImportError:  # nvidia-ml-py missing: not fatal, the NVML figures are recorded as unavailable
    pynvml = None

GIB = float(1 << 30)
DEFAULT_INTERVAL_S = 0.5
"""Sampler period: NVML's figures (and the RSS where VmHWM cannot be reset) are polled this often."""


_PEAK_FIELDS = {"nvml_device": "mem_nvml_device_used_peak_gib", "nvml_process": "mem_nvml_process_used_peak_gib",
                "rss": "mem_rss_peak_gib"}
"""Sampled or kernel-kept peaks (bytes) -> the record's field (GiB), for an epoch row and the run summary alike."""


def _in_gib(peaks: dict[str, float]) -> dict[str, float]:
    return {field: peaks[key] / GIB for key, field in _PEAK_FIELDS.items() if key in peaks}


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


def _current_rss_bytes(proc: psutil.Process | None = None) -> int | None:
    try:
        return int((proc or psutil.Process()).memory_info().rss)
    except Exception:  # the platform refuses: RSS sampling is then off
        return None


def _ru_maxrss_bytes() -> int:
    """The process's lifetime RSS peak from getrusage (kB on Linux, bytes on macOS)."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(ru) if sys.platform == "darwin" else int(ru) * 1024


def _nvml_handle(device: torch.device) -> tuple[Any, Any, str]:
    """Init NVML and find the handle of `device`; returns (pynvml, handle, how it was matched).

    Torch's index is not NVML's index under CUDA_VISIBLE_DEVICES, so match by UUID first.
    Raises on any failure; the caller records why.
    """
    if pynvml is None:
        raise ModuleNotFoundError("No module named 'pynvml'")
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
      from VmHWM where Linux lets us reset it (per epoch, and read again before
      each reset, so the run's peak covers the time between epochs too), else
      sampled every `interval_s`.

    NVML missing is not an error: `summary()['mem_nvml_status']` says why.
    Use as a context manager; the sampler thread runs between enter and exit,
    and only where there is something to poll (NVML on a CUDA device, the RSS
    without VmHWM): on a Linux CPU run there is no thread. After exit the
    figures are frozen: `summary()` reads no new value.
    """

    def __init__(self, device: torch.device, interval_s: float = DEFAULT_INTERVAL_S) -> None:
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
        self._sample_rss = True  # poll the RSS: only where VmHWM cannot be reset (decided at enter)
        self._closed = False  # exited: no new readings
        self._proc: psutil.Process | None = None
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
        with contextlib.suppress(Exception):
            self._proc = psutil.Process()
        # VmHWM reset now: from here on it holds the run's exact RSS peak, and no thread polls the RSS
        self._hwm_resettable = _reset_vm_hwm() and _read_vm_hwm_bytes() is not None
        self._sample_rss = not self._hwm_resettable
        self._closed = False
        self._stop.clear()
        rss = _current_rss_bytes(self._proc)
        if rss is not None:
            with self._lock:
                self._peaks.update("rss", rss)
        self._sample()
        if self._sample_rss or self._handle is not None:
            self._thread = threading.Thread(target=self._run, name="mem-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval_s + 1.0)
            self._thread = None
        self._sample()
        self._fold_kernel_peaks()
        self._closed = True
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
        self._nvml = self._handle = None  # figures gathered so far stay; no NVML calls after exit

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    # -- sampling ----------------------------------------------------------
    def _sample(self) -> None:
        """Poll what has no exact peak: NVML's figures and, without VmHWM, the RSS (cheap when neither)."""
        rss = _current_rss_bytes(self._proc) if self._sample_rss else None
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
        self._fold_kernel_peaks()  # the peak since the last reset (e.g. validation) still counts for the run
        self._hwm_resettable = _reset_vm_hwm() and _read_vm_hwm_bytes() is not None
        self._sample_rss = self._sample_rss or not self._hwm_resettable  # lost VmHWM: sample at least here
        with self._lock:
            self._peaks.epoch = {}
        self._sample()

    def epoch_end(self) -> dict[str, Any]:
        """Peaks since `epoch_begin`, only figures that were measured (no None values)."""
        self._sample()
        self._fold_kernel_peaks()
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
        row.update(_in_gib(peaks))
        if "rss" in peaks:
            row["mem_rss_method"] = "VmHWM" if self._hwm_resettable else f"sampled every {self.interval_s:g}s"
        row["mem_source"] = self._source()
        return row

    def summary(self) -> dict[str, Any]:
        """Whole-run peaks (same naming as `epoch_end`) plus why NVML figures are missing, if they are."""
        if not self._closed:
            self._sample()
            self._fold_kernel_peaks()
        with self._lock:
            peaks = dict(self._peaks.run)
        out: dict[str, Any] = {}
        if self._cuda:
            self._fold_allocator_run_peak()
            out["mem_allocator_peak_allocated_gib"] = self._alloc_run_peak["allocated"] / GIB
            out["mem_allocator_peak_reserved_gib"] = self._alloc_run_peak["reserved"] / GIB
            out["mem_allocator_peak_allocated_source"] = (
                "max(epochs, CUDA-graph captures)" if self._graph_peak else "epochs")
        out.update(_in_gib(peaks))
        out["mem_source"] = self._source()
        out["mem_nvml_status"] = self.nvml_status
        if self._cuda:
            out["mem_nvml_process_status"] = self.nvml_process_status
            if self.nvml_match:
                out["mem_nvml_device_match"] = self.nvml_match
        return out

    def _fold_kernel_peaks(self) -> None:
        """Fold the RSS peaks the kernel kept into ours: VmHWM (exact since its last reset) into the
        epoch's and the run's; without it, getrusage's lifetime peak into the run's (the samples may
        have missed a spike it holds; ru_maxrss is reset with VmHWM, so only then)."""
        hwm = _read_vm_hwm_bytes() if self._hwm_resettable else None
        with self._lock:
            if hwm is not None:
                self._peaks.update("rss", hwm)
            elif "rss" in self._peaks.run:
                self._peaks.run["rss"] = max(self._peaks.run["rss"], _ru_maxrss_bytes())

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
