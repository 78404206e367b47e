"""Run a grid's cells as Slurm job arrays through submitit: the parts of `bench run --executor slurm`.

Each cell is the same command the local runner starts (`python -m bench.cli train --config
<cell>/config.request.json --out <cell> [--resume]`), run on a compute node by `CellCommand`, with its
output appended to `<cell>/train.log`. The run-folder contract does not change: `bench status` and
`bench report` read the same folders whichever executor filled them.

    jobs = [CellJob(folder, argv, nproc=1), ...]
    ids = submit(jobs, SlurmOptions(partition="gpu", time_min=240), log_dir=out / "slurm")
    grid = record_jobs(grid, dict(zip((j.folder.name for j in jobs), ids)))   # stored in grid.json

Re-running `bench run --executor slurm` resubmits only what `pending_cells` picks: never a cell that
is finished or whose job is queued or running; a cell whose job died (failed, cancelled, gone) is
submitted again and continues from its checkpoint. A preempted or timed-out job is requeued by
submitit itself (`CellCommand.checkpoint`), with `--resume`.

submitit is imported lazily: this module (and `bench status`) works without it. On a cluster, the
virtualenv (with submitit and this package), the grid's out folder and the log folder must be on a
filesystem the compute nodes share: the node unpickles `CellCommand` and runs the cell from there.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.store import read_json, rewrite_jsonl, write_json
from ddnet.errors import UserError

RESUME_FLAG = "--resume"
JOBS_KEY = "jobs"
"""grid.json key: {cell folder: [{"executor": "slurm", "job_id", "submitted_at"}, ...]}, latest last."""

CELL_LOCK = ".bench-cell.lock"
"""Held by the process running a cell: a second job for the same folder refuses to start."""

LOG_TAIL_LINES = 20
"""Lines of train.log stored in the summary of a cell that failed without recording why."""

CLUSTERS = ("slurm", "local", "debug")

# keys an extra directive may not set: each has its own SlurmOptions field (or submitit owns it)
_OWNED = {
    "partition": "partition", "p": "partition", "account": "account", "A": "account", "qos": "qos",
    "q": "qos", "time": "time_min", "t": "time_min", "gpus-per-node": "gpus_per_node",
    "cpus-per-task": "cpus_per_task", "c": "cpus_per_task", "mem": "mem_gb", "nodes": "nodes", "N": "nodes",
    "array": "array_parallelism", "a": "array_parallelism", "job-name": "job_name", "J": "job_name",
    "output": None, "o": None, "error": None, "e": None, "signal": "signal_delay_s",
}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------ options


@dataclass
class SlurmOptions:
    """Where and how the cells run on a Slurm cluster (one sbatch job array per resource shape)."""

    partition: str | None = None
    """Slurm partition (`--partition`); None: the cluster's default."""
    account: str | None = None
    """Account charged (`--account`); None: your default account."""
    qos: str | None = None
    """Quality of service (`--qos`); None: the partition's default."""
    time_min: int = 240
    """Time limit of one job, in minutes (`--time`). A job that reaches it is checkpointed and requeued
    (up to `max_requeues` times) and continues from the cell's last epoch."""
    gpus_per_node: int | None = None
    """GPUs per job (`--gpus-per-node`); None: the cell's `nproc` (its replica count), 0 for CPU cells."""
    cpus_per_task: int | None = None
    """CPU cores per job (`--cpus-per-task`): trainer, replicas and DataLoader workers; None: default."""
    mem_gb: float | None = None
    """Host memory per node in GB (`--mem`); None: the partition's default."""
    nodes: int = 1
    """Nodes per job. Must be 1: `bench train --nproc N` starts its N replicas on one node."""
    array_parallelism: int | None = None
    """Most array tasks running at once (`--array=0-N%K`); None: submitit's cap (256)."""
    extra_sbatch: list[str] | dict[str, Any] = field(default_factory=list)
    """More sbatch directives: raw `--key=value` / `--flag` strings, or a dict {key: value} (True for a
    bare flag), passed as submitit's `slurm_additional_parameters`, e.g. ["--constraint=a100"]."""
    job_name: str = "ddnet-bench"
    """Job name shown by squeue (`--job-name`)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the batch script before the job (e.g. "module load cuda/12.4")."""
    max_requeues: int = 3
    """Time-limit requeues allowed per job (submitit's `slurm_max_num_timeout`); preemptions do not count."""
    signal_delay_s: int = 90
    """Seconds before the time limit at which Slurm signals the job to checkpoint and requeue itself."""
    cluster: str = "slurm"
    """submitit executor: 'slurm', or 'local' / 'debug' to try the same path on this machine."""

    def __post_init__(self) -> None:
        def whole(name: str, least: int, none_ok: bool = False) -> None:
            v = getattr(self, name)
            if v is None and none_ok:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise UserError(f"SlurmOptions.{name}={v!r}: give a whole number >= {least}.")

        for name in ("partition", "account", "qos"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip() or any(c.isspace() for c in v)):
                raise UserError(f"SlurmOptions.{name}={v!r}: give a Slurm {name} name (no spaces), "
                                "or leave it unset.")
        whole("time_min", 1)
        whole("gpus_per_node", 0, none_ok=True)
        whole("cpus_per_task", 1, none_ok=True)
        whole("array_parallelism", 1, none_ok=True)
        whole("max_requeues", 0)
        whole("signal_delay_s", 1)
        whole("nodes", 1)
        if self.nodes != 1:
            raise UserError(f"SlurmOptions.nodes={self.nodes}: a cell runs on one node (bench train --nproc "
                            "starts its replicas there); set nodes=1.")
        mem = self.mem_gb
        if mem is not None and (isinstance(mem, bool) or not isinstance(mem, int | float) or not mem > 0):
            raise UserError(f"SlurmOptions.mem_gb={mem!r}: give the memory per node in GB (> 0), "
                            "or leave it unset.")
        if self.signal_delay_s >= self.time_min * 60:
            raise UserError(f"SlurmOptions.signal_delay_s={self.signal_delay_s} is not shorter than the "
                            f"{self.time_min}-minute limit; lower it or raise time_min.")
        if not isinstance(self.job_name, str) or not self.job_name or any(c.isspace() for c in self.job_name):
            raise UserError(f"SlurmOptions.job_name={self.job_name!r}: give a name without spaces.")
        if self.cluster not in CLUSTERS:
            raise UserError(f"SlurmOptions.cluster={self.cluster!r}: choose one of {', '.join(CLUSTERS)}.")
        if not isinstance(self.setup, list) or not all(isinstance(s, str) for s in self.setup):
            raise UserError("SlurmOptions.setup must be a list of shell lines, e.g. ['module load cuda'].")
        self.additional_parameters()  # validates extra_sbatch

    def additional_parameters(self) -> dict[str, Any]:
        """`extra_sbatch` as submitit's `slurm_additional_parameters`, e.g. {"constraint": "a100"}."""
        extra = self.extra_sbatch
        if isinstance(extra, Mapping):
            items = [(str(k).lstrip("-"), v) for k, v in extra.items()]
        elif isinstance(extra, list | tuple):
            items = []
            for d in extra:
                m = re.fullmatch(r"--([A-Za-z][\w-]*)(?:=(.+))?", d.strip()) if isinstance(d, str) else None
                if m is None:
                    raise UserError(f"SlurmOptions.extra_sbatch entry {d!r}: write it as --key=value "
                                    "or --flag.")
                items.append((m.group(1), m.group(2) if m.group(2) is not None else True))
        else:
            raise UserError("SlurmOptions.extra_sbatch: give a list of '--key=value' strings or a dict.")
        out: dict[str, Any] = {}
        for key, value in items:
            if not re.fullmatch(r"[A-Za-z][\w-]*", key):
                raise UserError(f"SlurmOptions.extra_sbatch key {key!r}: use a sbatch option name "
                                "such as 'constraint'.")
            norm = key.replace("_", "-")
            if norm in _OWNED:
                owner = _OWNED[norm]
                fix = (f"set SlurmOptions.{owner} instead" if owner
                       else "submitit sets it (logs go to the log folder)")
                raise UserError(f"SlurmOptions.extra_sbatch sets --{norm}: {fix}.")
            out[norm] = value
        return out


@dataclass
class CellJob:
    """One cell to run as one array task: the exact command the local runner would start for it."""

    folder: Path
    """The cell's run folder (`<out>/<slug>-<hash>`); relative paths are taken from `cwd`."""
    argv: list[str]
    """The command, e.g. [sys.executable, '-m', 'bench.cli', 'train', '--config', ..., '--out', ...].
    `--resume` is added or dropped at start from whether the folder holds ckpt.pt (as the local runner)."""
    nproc: int = 1
    """GPUs the cell needs (its replica count; 0 for a CPU cell)."""
    nodes: int = 1
    """Nodes the cell needs (only 1 is supported)."""
    cwd: Path = field(default_factory=Path.cwd)
    """Working directory of the command (captured at submission: argv may hold relative paths)."""

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.cwd = Path(self.cwd).absolute()
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise UserError(f"CellJob {self.folder}: argv must be a non-empty list of strings.")
        if not isinstance(self.nproc, int) or self.nproc < 0:
            raise UserError(f"CellJob {self.folder}: nproc={self.nproc!r} must be a whole number >= 0.")
        if not isinstance(self.nodes, int) or self.nodes != 1:
            raise UserError(f"CellJob {self.folder}: nodes={self.nodes!r}; a cell runs on one node, "
                            "set nodes=1.")

    @property
    def path(self) -> Path:
        """The folder as an absolute path."""
        return self.cwd / self.folder

    def command(self) -> list[str]:
        """The argv to start now: `--resume` exactly when the folder holds a checkpoint."""
        base = [a for a in self.argv if a != RESUME_FLAG]
        return base + [RESUME_FLAG] if (self.path / "ckpt.pt").exists() else base


# ------------------------------------------------------------------ the job on the node


class CellFailed(RuntimeError):
    """The cell's process did not finish with summary status 'ok' (the array task is marked failed)."""


def _summary(folder: Path) -> dict[str, Any] | None:
    try:
        s = read_json(folder / "summary.json")
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) else None


def _log_tail(log: Path, n: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(log, errors="replace") as f:
            return [line.rstrip("\n") for line in f.readlines()[-n:]]
    except OSError:
        return []


def _error_line(tail: list[str]) -> str:
    for line in reversed(tail):
        if line.startswith("error:"):
            return line
    return next((line.strip() for line in reversed(tail) if line.strip()), "")


def _child_setup() -> Callable[[], None]:
    """Pre-exec hook for the cell's process (runs in the child between fork and exec).

    - It ignores submitit's checkpoint signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise): Slurm
      sends `--signal` to every process of the job, and the signal's default action would kill the
      trainer mid-epoch; `CellCommand.checkpoint` stops it instead. An ignored signal stays ignored
      across exec, in the trainer's replicas too.
    - Linux: it gets SIGTERM if the job process dies (SIGKILL included), so no orphan keeps the GPU.
    """
    usr_sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
    prctl = None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # looked up here, not in the child
    parent = os.getpid()

    def hook() -> None:  # pragma: no cover - runs in the child
        signal.signal(usr_sig, signal.SIG_IGN)
        if prctl is not None:
            prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:
                os._exit(1)

    return hook


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the process has ended, without reaping it and without Popen's lock.

    `_stop` can run inside a signal handler that interrupted `proc.wait()` in `CellCommand.__call__`;
    that wait holds Popen's waitpid lock, so `proc.wait(timeout)` / `proc.poll()` there never see the exit.
    """
    if proc.returncode is not None:
        return True
    waitid = getattr(os, "waitid", None)
    if waitid is None:  # pragma: no cover - no waitid (macOS)
        return proc.poll() is not None
    try:
        return waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


@contextlib.contextmanager
def _cell_lock(folder: Path) -> Iterator[None]:
    """One process per cell folder (an flock dies with its holder, even on SIGKILL)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(folder / CELL_LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CellFailed(f"{folder} is being run by another process (its {CELL_LOCK} is held); "
                             "not starting a second one.") from None
        yield


class CellCommand:
    """What submitit runs on the node for one cell: the cell's command, output appended to train.log.

    Picklable (only the CellJob is kept). Implements submitit's checkpoint protocol
    (`submitit.helpers.Checkpointable`, duck-typed so that importing this module does not need
    submitit): on preemption or at the time limit `checkpoint()` stops the process and returns a
    DelayedSubmission of a fresh CellCommand with `--resume`, which submitit requeues.
    """

    STOP_STEPS: tuple[tuple[signal.Signals, float], ...] = (
        (signal.SIGINT, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))
    """(signal, seconds to wait for the exit): SIGINT first, so the trainer leaves its summary 'running'
    (resumable), well inside Slurm's `signal_delay_s` before the hard kill."""

    def __init__(self, job: CellJob) -> None:
        self.job = job
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"job": self.job}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.job = state["job"]
        self._proc = None

    def __repr__(self) -> str:
        return f"CellCommand({self.job.folder})"

    def __call__(self) -> dict[str, Any]:
        folder = self.job.path
        s = _summary(folder)
        if s is not None and s.get("status") == "ok":
            print(f"{folder}: already finished; nothing to run", flush=True)
            return {"folder": str(folder), "status": "ok", "exit_code": None}
        folder.mkdir(parents=True, exist_ok=True)
        with _cell_lock(folder):
            argv = self.job.command()
            epochs = folder / "epochs.jsonl"
            if RESUME_FLAG not in argv and epochs.exists() and epochs.stat().st_size > 0:
                # rows written before the first checkpoint have no model state behind them: start over,
                # as the local runner does (the trainer refuses to start fresh over existing rows)
                rewrite_jsonl(epochs, [])
            log_path = folder / "train.log"
            job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or "?"
            print(f"{folder}: {shlex.join(argv)}", flush=True)
            with open(log_path, "a") as log:
                host = os.uname().nodename
                log.write(f"=== bench slurm {_now()} job {job_id} on {host}: {shlex.join(argv)}\n")
                log.flush()
                self._proc = subprocess.Popen(
                    argv, cwd=self.job.cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    # own process group: a stop reaches the trainer's spawned replicas too
                    start_new_session=True, preexec_fn=_child_setup(),
                )
                try:
                    rc = self._proc.wait()
                except BaseException:  # submitit's requeue (SystemExit), Ctrl-C: never leave it running
                    self._stop()
                    raise
                finally:
                    self._proc = None
        return self._outcome(folder, rc, log_path)

    def _outcome(self, folder: Path, rc: int, log_path: Path) -> dict[str, Any]:
        s = _summary(folder) or {}
        if rc == 0 and s.get("status") == "ok":
            return {"folder": str(folder), "status": "ok", "exit_code": 0}
        if rc < 0:
            # killed by a signal: scancel, preemption without requeue, the OOM killer, node trouble. The
            # folder stays resumable; the next `bench run --executor slurm` resubmits it.
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = str(-rc)
            raise CellFailed(f"{folder}: the cell process was killed by signal {name}; it stays resumable "
                             f"(see {log_path})")
        tail = _log_tail(log_path)
        if s.get("status") != "failed":
            # the process ended without recording its failure: record it, as the local runner does
            why = (f"exited with code {rc}" if rc
                   else f"exited 0 but summary.json status is {s.get('status')!r}")
            line = _error_line(tail)
            rows = 0
            with contextlib.suppress(OSError):
                rows = sum(1 for ln in (folder / "epochs.jsonl").read_text().splitlines() if ln.strip())
            s = {**s, "status": "failed", "error": f"cell process {why}" + (f": {line}" if line else ""),
                 "exit_code": rc, "log_tail": tail, "epochs_completed": rows}
            write_json(folder / "summary.json", s)
        raise CellFailed(f"{folder}: {s.get('error')} (see {log_path})")

    def _stop(self) -> None:
        """Stop the running cell and its children (its process group): SIGINT, then SIGTERM, then SIGKILL."""
        proc = self._proc
        if proc is None:
            return
        for sig, wait_s in self.STOP_STEPS:
            if _exited(proc):
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if _exited(proc):
                    return
                time.sleep(0.05)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook on preemption / time limit: stop the cell, requeue it with `--resume`.

        The trainer checkpoints after every epoch, so the requeued job loses at most the epoch in flight.
        """
        from submitit.helpers import DelayedSubmission

        self._stop()
        argv = [a for a in self.job.argv if a != RESUME_FLAG]
        if (self.job.path / "ckpt.pt").exists():
            argv.append(RESUME_FLAG)
        print(f"{self.job.path}: checkpoint -> requeued with {shlex.join(argv)}", flush=True)
        return DelayedSubmission(CellCommand(replace(self.job, argv=argv)))


# ------------------------------------------------------------------ submission


def _gpus(job: CellJob, options: SlurmOptions) -> int:
    return options.gpus_per_node if options.gpus_per_node is not None else math.ceil(job.nproc / job.nodes)


def executor_parameters(options: SlurmOptions, gpus: int, nodes: int = 1) -> dict[str, Any]:
    """AutoExecutor `update_parameters` arguments (generic names and `slurm_` ones) for one job array."""
    params: dict[str, Any] = {
        "name": options.job_name, "timeout_min": options.time_min, "nodes": nodes, "tasks_per_node": 1,
        "gpus_per_node": gpus or None, "cpus_per_task": options.cpus_per_task, "mem_gb": options.mem_gb,
        "slurm_partition": options.partition, "slurm_account": options.account, "slurm_qos": options.qos,
        "slurm_array_parallelism": options.array_parallelism,
        "slurm_additional_parameters": options.additional_parameters() or None,
        "slurm_setup": list(options.setup) or None, "slurm_signal_delay_s": options.signal_delay_s,
    }
    return {k: v for k, v in params.items() if v is not None}


# AutoExecutor's generic names -> SlurmExecutor's (submitit's SlurmExecutor._equivalence_dict)
_SLURM_NAMES = {"name": "job_name", "timeout_min": "time", "mem_gb": "mem",
                "tasks_per_node": "ntasks_per_node"}


def _sbatch_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """`executor_parameters` as SlurmExecutor parameters (what AutoExecutor hands it)."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if k.startswith("slurm_"):
            out[k[len("slurm_"):]] = v
        elif k == "mem_gb":
            out["mem"] = f"{int(v)}GB" if v == int(v) else f"{int(v * 1024)}MB"  # submitit's _convert_mem
        else:
            out[_SLURM_NAMES.get(k, k)] = v
    return out


def _groups(jobs: Sequence[CellJob], options: SlurmOptions) -> dict[tuple[int, int], list[int]]:
    """Indices of `jobs` by resource shape (GPUs, nodes): one job array each, in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, j in enumerate(jobs):
        groups.setdefault((_gpus(j, options), j.nodes), []).append(i)
    return groups


def _default_executor(options: SlurmOptions) -> Callable[[Path], Any]:
    def make(folder: Path) -> Any:
        try:
            import submitit
        except ImportError:
            raise UserError("the slurm executor needs submitit: pip install submitit") from None
        try:
            return submitit.AutoExecutor(folder=folder, cluster=options.cluster,
                                         slurm_max_num_timeout=options.max_requeues)
        except RuntimeError as e:  # SlurmExecutor: 'Could not detect "srun"'
            raise UserError(f"cannot submit to Slurm here ({e}); run on a Slurm login node, "
                            "or use --executor local.") from None

    return make


def _is_auto(executor: Any) -> bool:
    try:
        from submitit import AutoExecutor
    except ImportError:
        return False
    return isinstance(executor, AutoExecutor)


def submit_jobs(
    jobs: Sequence[CellJob],
    options: SlurmOptions,
    log_dir: Path,
    executor_factory: Callable[[Path], Any] | None = None,
) -> list[Any]:
    """Submit `jobs` as one array per resource shape; returns submitit Job objects in the order of `jobs`.

    `executor_factory(folder)` makes the executor (default: `submitit.AutoExecutor(folder,
    cluster=options.cluster)`); tests pass submitit's LocalExecutor or DebugExecutor. An executor that
    is not an AutoExecutor gets the generic parameters only (timeout_min, gpus_per_node, ...).
    """
    if not jobs:
        return []
    make = executor_factory or _default_executor(options)
    folder = Path(log_dir).absolute() / "%j"  # submitit replaces %j with each job's id
    out: list[Any] = [None] * len(jobs)
    for (gpus, nodes), idx in _groups(jobs, options).items():
        executor = make(folder)
        params = executor_parameters(options, gpus, nodes)
        if not _is_auto(executor):
            params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        executor.update_parameters(**params)
        with executor.batch():  # one sbatch --array for the group
            submitted = [executor.submit(CellCommand(jobs[i])) for i in idx]
        for i, job in zip(idx, submitted, strict=True):
            out[i] = job
    return out


def submit(
    jobs: Sequence[CellJob],
    options: SlurmOptions,
    log_dir: Path,
    executor_factory: Callable[[Path], Any] | None = None,
) -> list[str]:
    """Submit `jobs` (one Slurm job array per distinct (GPUs, nodes)); returns their job ids in order.

    Slurm ids look like '4242_3' (array 4242, task 3); record them with `record_jobs`.
    """
    return [str(j.job_id) for j in submit_jobs(jobs, options, log_dir, executor_factory)]


def _submit_command_text(folder: Path) -> str:
    # what SlurmExecutor._submitit_command_str runs on the node (submitit 1.5)
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def _fallback_sbatch(command: str, params: dict[str, Any], map_count: int | None) -> str:
    """Approximate script when submitit's renderer is unavailable: the directives, sorted, and the command."""
    flags = dict(params)
    setup = flags.pop("setup", None) or []
    extra = flags.pop("additional_parameters", None) or {}
    parallel = flags.pop("array_parallelism", 256)
    flags.pop("signal_delay_s", None)
    if map_count:
        flags["array"] = f"0-{map_count - 1}%{min(map_count, parallel)}"
    flags.update(extra)
    lines = ["#!/bin/bash", "", "# Parameters"]
    for k in sorted(flags):
        v = flags[k]
        key = k.replace("_", "-")
        lines.append(f"#SBATCH --{key}" if v is True else f"#SBATCH --{key}={shlex.quote(str(v))}")
    return "\n".join(lines + ([""] + setup if setup else []) + ["", command, ""])


def sbatch_text(gpus: int, nodes: int, n_tasks: int, options: SlurmOptions, log_dir: Path) -> str:
    """The sbatch script submitit writes for one array of `n_tasks` cells, without submitting it.

    Uses submitit's private `submitit.slurm.slurm._make_sbatch_string` (the only way to render the
    script without srun on PATH; the same function SlurmExecutor calls). If a submitit release drops
    or changes it, an approximate script is rendered instead and says so in its first comment.
    """
    folder = Path(log_dir).absolute() / "%j"
    params = _sbatch_parameters(executor_parameters(options, gpus, nodes))
    command = _submit_command_text(folder)
    map_count = n_tasks if n_tasks > 1 else None
    try:
        from submitit.slurm.slurm import _make_sbatch_string  # private: guarded below

        return _make_sbatch_string(command=command, folder=folder, map_count=map_count, **params)
    except (ImportError, TypeError, ValueError) as e:
        text = _fallback_sbatch(command, params, map_count)
        note = f"# approximate (submitit's renderer unavailable: {e})"
        return text.replace("#!/bin/bash\n", f"#!/bin/bash\n{note}\n", 1)


def sbatch_preview(jobs: Sequence[CellJob], options: SlurmOptions, log_dir: Path) -> str:
    """For `--dry-run`: each array's sbatch script and, per array task, its cell folder and command."""
    parts: list[str] = []
    groups = _groups(jobs, options)
    for n, ((gpus, nodes), idx) in enumerate(groups.items(), start=1):
        head = f"# ---- job array {n}/{len(groups)}: {len(idx)} cell(s), {gpus} GPU(s) x {nodes} node(s)"
        parts.append(head)
        parts.append(sbatch_text(gpus, nodes, len(idx), options, log_dir).rstrip("\n"))
        parts.append("# array tasks (cell folder: command; --resume is added at start when ckpt.pt exists)")
        for task, i in enumerate(idx):
            parts.append(f"#  [{task}] {jobs[i].folder}: {shlex.join(jobs[i].command())}")
        parts.append("")
    return "\n".join(parts)


# ------------------------------------------------------------------ job states

# Slurm job states (sacct / squeue long names) -> what the harness needs to know
_STATES = {
    "queued": ("PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "CONFIGURING",
               "POWER_UP_NODE"),
    "running": ("RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING", "STAGE_OUT"),
    "finished": ("COMPLETED",),
    "failed": ("FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"),
    "cancelled": ("CANCELLED", "PREEMPTED", "REVOKED"),
}
_STATE_OF = {raw: mine for mine, raws in _STATES.items() for raw in raws}
STATES = (*_STATES, "unknown")
"""What `job_states` reports: queued, running, finished, failed, cancelled, unknown."""


def slurm_state(raw: str) -> str:
    """A Slurm state ('PENDING', 'CANCELLED by 1234', 'OUT_OF_MEMORY') as one of `STATES`."""
    word = raw.strip().split(" ")[0].rstrip("+").upper() if raw.strip() else ""
    return _STATE_OF.get(word, "unknown")


def _expand(job_id: str) -> list[str]:
    """'4242_[3-5,7%2]' -> ['4242_3', '4242_4', '4242_5', '4242_7']; other ids unchanged."""
    m = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", job_id)
    if m is None:
        return [job_id]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (hi.isdigit() or not hi):
            out += [f"{m.group(1)}_{k}" for k in range(int(lo), int(hi or lo) + 1)]
    return out


def _run(cmd: list[str], timeout_s: float) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def _parse(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in text.splitlines():
        jid, _, raw = line.strip().partition("|")
        if not jid or "." in jid:  # job steps (4242_3.batch) are not the job
            continue
        for one in _expand(jid):
            found[one] = raw
    return found


def job_states(job_ids: Sequence[str], timeout_s: float = 30.0) -> dict[str, str]:
    """{job id: queued | running | finished | failed | cancelled | unknown} for the given Slurm job ids.

    Live jobs come from squeue (authoritative and immediate), ended ones from sacct (when accounting
    is enabled). A job neither lists is 'unknown'. Without Slurm (no squeue or sacct on PATH) this
    returns {} and raises nothing.
    """
    wanted = list(dict.fromkeys(str(j) for j in job_ids))
    squeue, sacct = shutil.which("squeue"), shutil.which("sacct")
    if not wanted or (squeue is None and sacct is None):
        return {}
    raw: dict[str, str] = {}
    if squeue is not None:
        import getpass

        # this user's live jobs, arrays expanded (-j with an id Slurm forgot is an error for squeue)
        cmd = [squeue, "--noheader", "--array", "--format=%i|%T"]
        with contextlib.suppress(Exception):  # no user name: list everyone's, the filter below still holds
            cmd += ["--user", getpass.getuser()]
        text = _run(cmd, timeout_s)
        raw.update({k: v for k, v in _parse(text or "").items() if k in wanted})
    rest = [j for j in wanted if j not in raw]
    if rest and sacct is not None:
        mains = sorted({j.split("_")[0] for j in rest})
        text = _run([sacct, "--noheader", "--parsable2", "--allocations", "--format=JobID,State",
                     "--jobs=" + ",".join(mains)], timeout_s)
        raw.update({k: v for k, v in _parse(text or "").items() if k in rest})
    return {j: slurm_state(raw[j]) if j in raw else "unknown" for j in wanted}


# ------------------------------------------------------------------ bookkeeping in grid.json


def record_jobs(grid_json: Mapping[str, Any], folder_to_job: Mapping[str, str],
                submitted_at: str | None = None) -> dict[str, Any]:
    """A copy of `grid_json` with one job record appended per cell under "jobs" (latest last).

    Each record is {"executor": "slurm", "job_id": ..., "submitted_at": ISO time}; earlier submissions
    of a cell are kept (a requeue keeps its id, a resubmission adds a record).
    """
    stamp = submitted_at or _now()
    old = grid_json.get(JOBS_KEY)
    jobs = {k: list(v) for k, v in old.items() if isinstance(v, list)} if isinstance(old, Mapping) else {}
    for folder, job_id in folder_to_job.items():
        record = {"executor": "slurm", "job_id": str(job_id), "submitted_at": stamp}
        jobs.setdefault(str(folder), []).append(record)
    return {**grid_json, JOBS_KEY: jobs}


def latest_job_records(grid_json: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{cell folder: its latest job record} from a grid.json dict (malformed entries are ignored)."""
    jobs = grid_json.get(JOBS_KEY) if isinstance(grid_json, Mapping) else None
    out: dict[str, dict[str, Any]] = {}
    if isinstance(jobs, Mapping):
        for folder, records in jobs.items():
            if not isinstance(records, list):
                continue
            good = [r for r in records if isinstance(r, Mapping) and r.get("job_id")]
            if good:
                out[str(folder)] = dict(good[-1])
    return out


def latest_jobs(grid_json: Mapping[str, Any]) -> dict[str, str]:
    """{cell folder: latest job id} from a grid.json dict."""
    return {f: str(r["job_id"]) for f, r in latest_job_records(grid_json).items()}


def _age_s(stamp: Any, now: float) -> float | None:
    try:
        return now - datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return None


def submission_decisions(
    statuses: Mapping[str, str | None],
    grid_json: Mapping[str, Any],
    states: Mapping[str, str],
    retry_failed: bool = False,
    unknown_grace_s: float = 300.0,
    now: float | None = None,
) -> dict[str, tuple[bool, str]]:
    """{cell folder: (submit?, why)} for each cell in `statuses` (folder -> summary.json status or None).

    Never submits a finished or skipped cell, nor one whose latest job is queued or running. Submits a
    cell never submitted, or whose job died (failed, cancelled, ended without an 'ok' summary, or
    unknown to Slurm for longer than `unknown_grace_s`: accounting can lag a fresh submission). A cell
    whose summary says 'failed' is submitted again only with `retry_failed` (as the local runner).
    """
    now = time.time() if now is None else now
    records = latest_job_records(grid_json)
    out: dict[str, tuple[bool, str]] = {}
    for folder, status in statuses.items():
        rec = records.get(folder)
        job = str(rec["job_id"]) if rec else None
        state = states.get(job, "unknown") if job else None
        if status == "ok":
            out[folder] = (False, "finished")
        elif status == "skipped":
            out[folder] = (False, "skipped")
        elif state in ("queued", "running"):
            out[folder] = (False, f"job {job} {state}")
        elif status == "failed":
            out[folder] = (retry_failed, f"failed (job {job} {state})" if job else "failed")
        elif job is None:
            out[folder] = (True, "not submitted yet")
        elif state == "unknown":
            age = _age_s(rec.get("submitted_at"), now) if rec else None
            if age is not None and age < unknown_grace_s:
                out[folder] = (False, f"job {job} submitted {age:.0f} s ago, not listed by Slurm yet")
            else:
                out[folder] = (True, f"job {job} unknown to Slurm and the cell is unfinished")
        else:
            out[folder] = (True, f"job {job} {state} and the cell is unfinished")
    return out


def pending_cells(
    statuses: Mapping[str, str | None],
    grid_json: Mapping[str, Any],
    states: Mapping[str, str],
    retry_failed: bool = False,
    unknown_grace_s: float = 300.0,
    now: float | None = None,
) -> list[str]:
    """The cell folders to submit now, in the order of `statuses` (see `submission_decisions`)."""
    decisions = submission_decisions(statuses, grid_json, states, retry_failed, unknown_grace_s, now)
    return [folder for folder, (go, _) in decisions.items() if go]
