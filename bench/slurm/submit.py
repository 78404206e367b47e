"""Submitting cells as job arrays through submitit, and previewing the sbatch script."""


from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.slurm.node import CellCommand
from bench.slurm.options import CellJob, SlurmOptions
from ddnet.errors import UserError

# ------------------------------------------------------------------ submission


def _gpus(job: CellJob, options: SlurmOptions) -> int:
    """GPUs per node: the cell's GPUs split over its nodes (CellJob refuses an uneven split)."""
    return options.gpus_per_node if options.gpus_per_node is not None else job.nproc // job.nodes


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
            import submitit  # noqa: PLC0415 - optional dependency (`pip install ddnet-bench[slurm]`)
        except ImportError:
            raise UserError("the slurm executor needs submitit: pip install 'ddnet-bench[slurm]'") from None
        try:
            return submitit.AutoExecutor(folder=folder, cluster=options.cluster,
                                         slurm_max_num_timeout=options.max_requeues)
        except RuntimeError as e:  # SlurmExecutor: 'Could not detect "srun"'
            raise UserError(f"cannot submit to Slurm here ({e}); run on a Slurm login node, "
                            "or use --executor local.") from None

    return make


def _is_auto(executor: Any) -> bool:
    try:
        from submitit import AutoExecutor  # noqa: PLC0415 - optional dependency (.[slurm])
    except ImportError:
        return False
    return isinstance(executor, AutoExecutor)


def submit_jobs(
    jobs: Sequence[CellJob],
    options: SlurmOptions,
    log_dir: Path,
    executor_factory: Callable[[Path], Any] | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> list[Any]:
    """Submit `jobs` as one array per resource shape; returns submitit Job objects in the order of `jobs`
    (None for a cell not submitted because `stop()` said so before its array: see `interrupts_held`).

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
        if stop():
            break
        executor = make(folder)
        params = executor_parameters(options, gpus, nodes)
        if not _is_auto(executor):
            params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        executor.update_parameters(**params)
        try:
            with executor.batch():  # one sbatch --array for the group
                submitted = [executor.submit(CellCommand(jobs[i])) for i in idx]
        except (RuntimeError, OSError) as e:  # submitit's FailedJobError (sbatch's stderr), no sbatch on PATH
            raise SubmissionFailed(_refusal(e, len(idx)), out) from None
        for i, job in zip(idx, submitted, strict=True):
            out[i] = job
    return out


HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class HeldSignals:
    """The signals `interrupts_held` held so far (true once one came; `names`)."""

    def __init__(self, note: Callable[[str], None]) -> None:
        self.names: list[str] = []
        self.note = note
        self.blocked = False

    def hold(self, signum: int, frame: object = None) -> None:
        name = signal.Signals(signum).name
        if not self.names:
            self.note(name)
        if name not in self.names:
            self.names.append(name)

    def __bool__(self) -> bool:
        if self.blocked:  # blocked here, a signal waits pending: take it now
            for sig in set(HELD_SIGNALS) & signal.sigpending():
                signal.sigtimedwait([sig], 0)
                self.hold(sig)
        return bool(self.names)


@contextlib.contextmanager
def interrupts_held(note: Callable[[str], None], block_in_children: bool = True) -> Iterator[HeldSignals]:
    """Hold Ctrl-C and SIGTERM while jobs are submitted and recorded: a job sbatch queued whose id never
    reached grid.json would run unseen, and the next `bench run` would queue its cell a second time.

    Yields what came (`HeldSignals`, false while nothing did); `note` is told of the first at once, or when
    the submission next asks. With `block_in_children` (a real Slurm), the signals are also blocked in
    this thread, and sbatch, started from it, inherits that: a Ctrl-C in the terminal, which reaches the
    whole process group, cannot kill sbatch between queueing an array and printing its id. Not with
    submitit's local executor: its cells, started from here, would keep them blocked for good. Only the
    main thread may handle signals; elsewhere this holds nothing.
    """
    held = HeldSignals(note)
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    previous = {sig: signal.signal(sig, held.hold) for sig in HELD_SIGNALS}
    mask = None
    if block_in_children and hasattr(signal, "sigtimedwait"):  # Linux (not macOS)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        held.blocked = True
    try:
        yield held
    finally:
        if mask is not None:
            bool(held)  # take what is pending while it is still blocked
            held.blocked = False
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _run_pending_handlers()  # one another thread received runs here, before the old handlers are back
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _run_pending_handlers() -> None:
    """A Python-level call: the interpreter runs the handlers of signals already received before it."""


class SubmissionFailed(UserError):
    """sbatch refused a job array (or could not be run). `submitted`: the submitit Job of each cell submitted
    before it (in the order of the jobs given), None for the others: record those, they run."""

    def __init__(self, message: str, submitted: list[Any]) -> None:
        super().__init__(message)
        self.submitted = submitted


def _refusal(e: BaseException, n_cells: int) -> str:
    """One line for a failed sbatch: its own error lines, and what to change."""
    if isinstance(e, FileNotFoundError):
        return ("cannot submit to Slurm here (no sbatch on PATH); run on a Slurm login node, or use "
                "--executor local.")
    lines = (line.strip().removeprefix("sbatch: error: ") for line in str(e).splitlines())
    said = "; ".join(dict.fromkeys(line for line in lines if line))
    said = said if len(said) <= 400 else said[:397] + "..."
    return (f"sbatch refused the job array of {n_cells} cell(s) ({said or type(e).__name__}); fix the option it "
            "names (--slurm-partition, --slurm-account, --slurm-qos, --slurm-time, --slurm-extra, ...; `sinfo -s` "
            "lists the partitions and their time limits), then run the same command again.")


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
        from submitit.slurm.slurm import _make_sbatch_string  # noqa: PLC0415 - optional; private: guarded below

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
        if nodes > 1:
            parts.append(f"# each task runs on {nodes} nodes: on each, torchrun --nnodes {nodes} --node-rank "
                         "<k> --master-addr <first host> around the command below, with --nproc <replicas "
                         "per node>; node 0 writes train.log, node k train.log.node<k>")
        parts.append("# array tasks (cell folder: command; --resume is added at start when ckpt.pt or summary.json exists)")
        for task, i in enumerate(idx):
            parts.append(f"#  [{task}] {jobs[i].folder}: {shlex.join(jobs[i].command())}")
        parts.append("")
    return "\n".join(parts)


