"""The environment of a run: GPU, driver, CUDA, cuDNN, torch, git commit, every precision flag.

`environment()` adds a `fingerprint` (GPU models, driver, torch, CUDA, CPU
model) so a report never mixes machines in one ratio. Nothing here changes a
torch flag: it only reads.

The module is `env` (what `env.json` holds), not `environment`: the package
re-exports the function `environment`, which would hide a submodule of that name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from bench.collectors.memory import GIB

try:
    import pynvml
except ImportError:  # nvidia-ml-py missing: not fatal, `nvml_status` says so
    pynvml = None

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
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[2]
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
        if pynvml is None:
            raise ModuleNotFoundError("No module named 'pynvml'")
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
