"""Scheduler options and the cells to submit (validated, one line naming the fix)."""


from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.cell_log import check_stall_timeout
from ddnet.errors import UserError

RESUME_FLAG = "--resume"
JOBS_KEY = "jobs"
"""grid.json key: {cell folder: [{"executor": "slurm", "job_id", "submitted_at"}, ...]}, latest last."""

CELL_LOCK = ".bench-cell.lock"
"""Held by the process running a cell: a second job for the same folder refuses to start."""


CLUSTERS = ("slurm", "local", "debug")

# keys an extra directive may not set: each has its own SlurmOptions field (or submitit owns it)
_OWNED = {
    "partition": "partition", "p": "partition", "account": "account", "A": "account", "qos": "qos",
    "q": "qos", "time": "time_min", "t": "time_min",
    "cpus-per-task": "cpus_per_task", "c": "cpus_per_task", "mem": "mem_gb", "nodes": "nodes", "N": "nodes",
    "array": "array_parallelism", "a": "array_parallelism", "job-name": "job_name", "J": "job_name",
    "output": None, "o": None, "error": None, "e": None, "signal": "signal_delay_s",
    "ntasks": None, "n": None, "ntasks-per-node": None,
}
# owned keys that `bench run` has no option for: the fix is not "set another option"
_BENCH_SETS = {"job_name": "every job is named 'ddnet-bench'",
               "signal_delay_s": "the signal that requeues a job before its time limit (90 s before it by default)"}
_NO_OWNER = {"ntasks": "each cell runs as one task per node (its replicas are that task's processes)",
             "n": "each cell runs as one task per node (its replicas are that task's processes)",
             "ntasks-per-node": "each cell runs as one task per node (its replicas are that task's processes)"}

# GPU requests: bench asks each node for the cell's GPUs itself (--gpus-per-node, or SlurmOptions.gpus_per_node)
_GPU_KEYS = ("gpus-per-node", "gpus", "G", "gpus-per-task", "gpus-per-socket")
_GPU_GRES = re.compile(r"(?:^|[,/])gpu(?:[:=,]|$)", re.IGNORECASE)  # gpu:2, gpu:a100:1,nvme:1, gres/gpu:1
_SHORT = re.compile(r"-([A-Za-z])(?:[= ]?(.+))?")  # '-G 2', '-G2', '-n4': read only to name the fix


def _asks_gpus(key: str, value: Any) -> bool:
    return key in _GPU_KEYS or (key in ("gres", "tres-per-task") and bool(_GPU_GRES.search(str(value))))


_SLURM_TIME = re.compile(r"(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)")


def slurm_minutes(value: int | str) -> int:
    """A time limit in whole minutes from minutes (240, '240') or any of sbatch's `--time` formats: 'MM:SS',
    'HH:MM:SS', 'D-HH', 'D-HH:MM', 'D-HH:MM:SS' (seconds round up, as Slurm does). Raises ValueError."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SLURM_TIME.fullmatch(value.strip()) if isinstance(value, str) else None
    if m is None:
        raise ValueError(value)
    days, hours, d_min, d_sec, plain, p2, p3 = (int(g) if g else 0 for g in m.groups())
    if m.group(1) is not None:  # D-HH[:MM[:SS]]
        seconds = ((days * 24 + hours) * 60 + d_min) * 60 + d_sec
    elif m.group(7) is not None:  # HH:MM:SS
        seconds = (plain * 60 + p2) * 60 + p3
    else:  # MM or MM:SS
        seconds = plain * 60 + p2
    return -(-seconds // 60)


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
    time_min: int | str = 240
    """Time limit of one job, in minutes (`--time`), or a string in sbatch's `--time` formats ('4:00:00',
    '1-12:00'; made minutes). A job that reaches it is checkpointed and requeued
    (up to `max_requeues` times) and continues from the cell's last epoch."""
    gpus_per_node: int | None = None
    """GPUs per node (`--gpus-per-node`); None: the cell's `nproc` (its replica count) / `nodes`, 0 for CPU
    cells."""
    cpus_per_task: int | None = None
    """CPU cores per node (`--cpus-per-task`, one task per node): trainer, its replicas there and their
    DataLoader workers; None: the partition's default."""
    mem_gb: float | None = None
    """Host memory per node in GB (`--mem`); None: the partition's default."""
    nodes: int = 1
    """Nodes per cell (`--nodes`). 1: the cell's `bench train` starts its `nproc` replicas on one node. N > 1:
    the cell's replicas (its `nproc`, which N must divide) are split evenly over N nodes, one torchrun
    each, `nproc / N` replicas per node; the cell's config, folder and global batch stay the same."""
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
    stall_timeout_s: float | None = None
    """Stop a cell that writes no new epoch for this long (once it has written one) and record it as failed,
    as the local runner does (`bench.cell_log.stall_limit_s`); None: its default limit, 0: never."""

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
            if v is not None and v.startswith("-"):  # `--slurm-partition --slurm-qos x` took the next option
                raise UserError(f"SlurmOptions.{name}={v!r} is an option, not a Slurm {name} name: give the "
                                "name right after it.")
        if isinstance(self.time_min, str):
            try:
                self.time_min = slurm_minutes(self.time_min)
            except ValueError:
                raise UserError(f"SlurmOptions.time_min={self.time_min!r}: give minutes (e.g. 240) or Slurm's "
                                "[days-]hours:minutes:seconds (e.g. 4:00:00, 1-12:00; 'MM:SS' is minutes and "
                                "seconds, as for sbatch).") from None
        whole("time_min", 1)
        whole("gpus_per_node", 0, none_ok=True)
        whole("cpus_per_task", 1, none_ok=True)
        whole("array_parallelism", 1, none_ok=True)
        whole("max_requeues", 0)
        whole("signal_delay_s", 1)
        whole("nodes", 1)
        if self.nodes > 1 and self.cluster != "slurm":
            raise UserError(f"SlurmOptions.nodes={self.nodes} needs cluster='slurm' (submitit's {self.cluster} "
                            "executor runs one node); use one node to try the path here.")
        check_stall_timeout(self.stall_timeout_s, "SlurmOptions.stall_timeout_s")  # as the local runner
        mem = self.mem_gb
        # submitit writes int(GB * 1024) MB: under 1 MB that is --mem=0, which Slurm reads as all of a node's memory
        if mem is not None and (isinstance(mem, bool) or not isinstance(mem, int | float) or not math.isfinite(mem)
                                or not mem * 1024 >= 1):
            raise UserError(f"SlurmOptions.mem_gb={mem!r}: give the memory per node in GB (at least 0.001, "
                            "finite), or leave it unset.")
        if self.signal_delay_s >= self.time_min * 60:
            least = self.signal_delay_s // 60 + 1
            raise UserError(f"SlurmOptions.time_min={self.time_min} is too short: Slurm signals the job "
                            f"{self.signal_delay_s} s before its limit to requeue it; give at least {least} "
                            "minutes.")
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
                short = _SHORT.fullmatch(d.strip()) if isinstance(d, str) and m is None else None
                if short is not None and (short.group(1) in _OWNED or short.group(1) in _GPU_KEYS):
                    m = short  # a short option bench refuses anyway: say why, not how to spell it
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
            flag = f"-{norm}" if len(norm) == 1 else f"--{norm}"
            if _asks_gpus(norm, value):
                given = flag if value is True else f"{flag} {value}" if len(norm) == 1 else f"{flag}={value}"
                raise UserError(f"SlurmOptions.extra_sbatch sets {given}, a second GPU request: bench asks each node "
                                "for the cell's GPUs itself (--gpus-per-node); set SlurmOptions.gpus_per_node "
                                "instead.")
            if norm in _OWNED:
                owner = _OWNED[norm]
                fix = (f"bench sets it: {_BENCH_SETS[owner]}" if owner in _BENCH_SETS
                       else f"set SlurmOptions.{owner} instead" if owner
                       else f"bench sets it: {_NO_OWNER[norm]}" if norm in _NO_OWNER
                       else "submitit sets it (logs go to the log folder)")
                raise UserError(f"SlurmOptions.extra_sbatch sets {flag}: {fix}.")
            if norm in ("mem-per-cpu", "mem-per-gpu") and self.mem_gb is not None:  # sbatch takes one of them
                raise UserError(f"SlurmOptions.extra_sbatch sets --{norm} and SlurmOptions.mem_gb sets --mem: "
                                "sbatch takes only one; drop one of them.")
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
    """GPUs the cell needs in all (its replica count; 0 for a CPU cell), `nproc / nodes` on each node."""
    nodes: int = 1
    """Nodes the cell runs on; above 1, one torchrun per node (`bench.slurm.node.torchrun_command`)."""
    cwd: Path = field(default_factory=Path.cwd)
    """Working directory of the command (captured at submission: argv may hold relative paths)."""
    replicas: int | None = None
    """Replicas the cell trains with (its config's nproc, the DDP world size); None: `nproc`, or 1 for a
    CPU cell. Only a multi-node cell reads it: each node starts `replicas / nodes` of them."""
    stall_timeout_s: float | None = None
    """Node 0 stops the cell when it writes no new epoch for this long (`bench.cell_log.stall_limit_s`: None,
    the default limit; 0, never) and records it failed."""

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.cwd = Path(self.cwd).absolute()
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise UserError(f"CellJob {self.folder}: argv must be a non-empty list of strings.")
        if not isinstance(self.nproc, int) or self.nproc < 0:
            raise UserError(f"CellJob {self.folder}: nproc={self.nproc!r} must be a whole number >= 0.")
        if not isinstance(self.nodes, int) or isinstance(self.nodes, bool) or self.nodes < 1:
            raise UserError(f"CellJob {self.folder}: nodes={self.nodes!r} must be a whole number >= 1.")
        if self.replicas is not None and (not isinstance(self.replicas, int) or self.replicas < 1):
            raise UserError(f"CellJob {self.folder}: replicas={self.replicas!r} must be a whole number >= 1.")
        if self.nodes > 1 and (self.world % self.nodes or self.nproc % self.nodes):
            raise UserError(f"CellJob {self.folder}: its {self.world} replica(s) (the cell's nproc) do not split "
                            f"evenly over {self.nodes} nodes; give it a multiple of {self.nodes}, or fewer nodes "
                            "(--slurm-nodes).")
        head = self.argv[1] if len(self.argv) > 1 else "-"
        if self.nodes > 1 and head.startswith("-") and (head != "-m" or len(self.argv) < 3):
            raise UserError(f"CellJob {self.folder}: a multi-node cell's argv must be [python, -m, module, ...] "
                            "or [python, script, ...] (torchrun starts it on each node).")

    @property
    def world(self) -> int:
        """Replicas the cell trains with, over all its nodes."""
        return self.replicas if self.replicas is not None else max(self.nproc, 1)

    @property
    def path(self) -> Path:
        """The folder as an absolute path."""
        return self.cwd / self.folder

    def command(self) -> list[str]:
        """The argv to start now: `--resume` exactly when the folder holds a checkpoint or a summary (a failed
        or damaged run is refused without it; one that never checkpointed then starts over, as locally)."""
        base = [a for a in self.argv if a != RESUME_FLAG]
        started = (self.path / "ckpt.pt").exists() or (self.path / "summary.json").exists()
        return base + [RESUME_FLAG] if started else base


