"""What runs on the compute node: one cell's command (torchrun around it on each node of a multi-node cell),
requeued with --resume when preempted."""


from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import signals
from bench.cell_log import (
    EXIT_NO_SPACE,
    StallWatch,
    error_line,
    exit_text,
    interrupted_why,
    log_tail,
    oom_error,
    oom_kills,
    record_failure,
)
from bench.slurm.options import CELL_LOCK, RESUME_FLAG, CellJob, _now
from bench.store import read_jsonl, read_summary, rewrite_jsonl

# ------------------------------------------------------------------ the job on the node


class CellFailed(RuntimeError):
    """The cell's process did not finish with summary status 'ok' (the array task is marked failed)."""


def _child_setup() -> Callable[[], None]:
    """Pre-exec hook for the cell's process (runs in the child between fork and exec).

    - It ignores submitit's checkpoint signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise): Slurm
      sends `--signal` to every process of the job, and the signal's default action would kill the
      trainer mid-epoch; `CellCommand.checkpoint` stops it instead. An ignored signal stays ignored
      across exec, in the trainer's replicas too.
    - Linux: it gets SIGTERM if the job process dies (SIGKILL included), so no orphan keeps the GPU.
    """
    usr_sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
    end_with_job = signals.parent_death_hook()

    def hook() -> None:  # pragma: no cover - runs in the child
        signal.signal(usr_sig, signal.SIG_IGN)
        if end_with_job is not None:
            end_with_job()

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
    with open(folder / CELL_LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CellFailed(f"{folder} is being run by another process (its {CELL_LOCK} is held); "
                             "not starting a second one.") from None
        yield


# ------------------------------------------------------------------ a cell over several nodes


NPROC_FLAG = "--nproc"


def rendezvous_port(job_id: str) -> int:
    """The rendezvous port of a multi-node job, from its id alone, so every node computes the same one.

    crc32, not hash(): str hashes differ between processes. 20000-31999 stays below Linux's ephemeral
    range (32768+), where an outgoing connection of the node could hold it.
    """
    return 20000 + zlib.crc32(job_id.encode()) % 12000


def torchrun_command(job: CellJob, node: int, hostnames: Sequence[str], job_id: str, port: int) -> list[str]:
    """What node `node` (0-based, Slurm's SLURM_NODEID) of a multi-node cell runs: torchrun around the cell's
    own command (`job.command()`, so `--resume` is carried), with `job.world / job.nodes` replicas here.

    Static rendezvous on the first host (`--node-rank`): global rank 0, which writes the run folder and
    prints its outcome, is always on node 0, whose train.log and summary this job's node 0 keeps. (A c10d
    rendezvous ranks the nodes by host name and pid, so rank 0 could land on any node.)
    The cell's `--nproc` is replaced by the per-node count: torchrun gives the trainer its world (the
    cell's nproc, recorded in config.json); `--nproc` only sizes this node's check of its GPUs.
    """
    per_node = job.world // job.nodes
    python, *args = job.command()
    kept: list[str] = []
    drop_next = False
    for a in args:  # the cell's own --nproc N / --nproc=N goes
        if drop_next:
            drop_next = False
        elif a == NPROC_FLAG:
            drop_next = True
        elif not a.startswith(NPROC_FLAG + "="):
            kept.append(a)
    launch = ["--nnodes", str(job.nodes), "--nproc-per-node", str(per_node), "--node-rank", str(node),
              "--master-addr", hostnames[0], "--master-port", str(port), "--rdzv-id", job_id]
    # `--` ends torchrun's own options: its argparse would take the trainer's --nproc for an abbreviation
    # of --nproc-per-node ("ambiguous option"), even after the script name
    script = ["-m", "--", *kept[1:2]] if kept[0] == "-m" else ["--", kept[0]]
    rest = kept[2:] if kept[0] == "-m" else kept[1:]
    return [python, "-m", "torch.distributed.run", *launch, *script, *rest, NPROC_FLAG, str(per_node)]


NODE0_GRACE_S = 30.0
"""How long another node's torchrun may outlive node 0's end before it is stopped (a normal end is seconds
apart: every replica leaves the group together)."""


def node0_marker(folder: Path, job_id: str) -> Path:
    """The file node 0 of a multi-node job leaves when it ends (finished, failed, or failed before its torchrun
    started), so that the other nodes need not wait out torchrun's rendezvous timeout (600 s) for it.

    Named by job id and Slurm's restart count: the nodes of a requeued job ignore the last attempt's.
    """
    return node_end_marker(folder, job_id, 0)


NODES_END_WAIT_S = 30.0
"""How long node 0, its replicas on other nodes lost, waits for those nodes to say how they ended (node_end_marker):
a node whose replica the out-of-memory killer ended says so within seconds (torchrun notices in 0.1 s)."""


def node_end_marker(folder: Path, job_id: str, node: int) -> Path:
    """The file node `node` of a multi-node job leaves when it ends (node 0: node0_marker); node k > 0 when its
    torchrun ends: empty, or why the out-of-memory killer ended it (only the node itself can read its memory
    cgroup)."""
    return folder / f".node{node}-ended.{job_id}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"


@dataclass(frozen=True)
class NodePlace:
    """Where this process runs in a multi-node job (what torchrun_command needs)."""

    node: int
    """This node's index in the job (0: the first host)."""
    hostnames: tuple[str, ...]
    """The job's hosts, in Slurm's order."""
    job_id: str
    """The job's id ('4242_3' for an array task): the same on every node."""


def node_place(job: CellJob) -> NodePlace:
    """This node's place, from submitit's JobEnvironment (Slurm's environment variables)."""
    try:
        import submitit  # noqa: PLC0415 - optional dependency (.[slurm])

        env = submitit.JobEnvironment()
        place = NodePlace(env.node, tuple(env.hostnames), str(env.job_id))
        nodes = env.num_nodes
    except Exception as e:  # no submitit, not in a Slurm job, an unreadable SLURM_* variable
        raise CellFailed(f"{job.path}: a {job.nodes}-node cell must run as a submitit Slurm job ({e})") from None
    if nodes != job.nodes or len(place.hostnames) != nodes:
        raise CellFailed(f"{job.path}: the cell asks for {job.nodes} nodes but its job has {nodes} "
                         f"({', '.join(place.hostnames)}); submit it with nodes={job.nodes}.")
    return place


def _other_node_oom(folder: Path, place: NodePlace) -> tuple[int, str] | None:
    """(node, why the cell failed) when the out-of-memory killer ended it on a node other than this node 0, as that
    node says (node_end_marker) within NODES_END_WAIT_S; None when none says so (a node lost, the network cut)."""
    deadline = time.monotonic() + NODES_END_WAIT_S
    while True:
        said = {}
        for k in range(1, len(place.hostnames)):
            with contextlib.suppress(OSError):
                said[k] = node_end_marker(folder, place.job_id, k).read_text().strip()
        if oom := next(((k, why) for k, why in said.items() if why), None):
            return oom[0], f"stopped when node {oom[0]} ({place.hostnames[oom[0]]}) ended, its torchrun {oom[1]}"
        if len(said) == len(place.hostnames) - 1 or time.monotonic() > deadline:
            return None
        time.sleep(0.5)


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

    TERM_WAIT_S = 600.0
    """After Slurm's SIGTERM (a preemption's notice, or scancel's; see `_term_noted`), how long the
    job waits for Slurm to end it. Slurm requeues a preempted job (PreemptMode=REQUEUE) only if it still runs at
    the end of its GraceTime: one that ended on its own first stays ended (FAILED) until the next `bench run`."""

    def __init__(self, job: CellJob) -> None:
        self.job = job
        self._proc: subprocess.Popen | None = None
        self._stalled: str | None = None  # why, when node 0 stopped it as hung (`StallWatch.stalled`)
        self._term_at: float | None = None  # when SIGTERM reached this job (monotonic)
        self._oom_kills: int | None = None  # this node's out-of-memory kills before it started the cell

    def __getstate__(self) -> dict[str, Any]:
        return {"job": self.job}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["job"])

    def __repr__(self) -> str:
        return f"CellCommand({self.job.folder})"

    def __call__(self) -> dict[str, Any]:
        """Run the cell here. A multi-node cell runs once per node: node 0 holds the folder (lock, train.log,
        outcome); node k appends its torchrun's output to `train.log.node<k>` and returns its exit code."""
        with self._term_noted():
            return self._run_here()

    @contextlib.contextmanager
    def _term_noted(self) -> Iterator[None]:
        """In a submitit Slurm job (whose SIGTERM handler only logs it), note when SIGTERM comes (see TERM_WAIT_S)
        and pass it on to the cell's process group.

        Slurm signals a job's processes according to its proctrack plugin: proctrack/linuxproc and /pgid reach
        the cell too, but proctrack/cgroup (most clusters) sends every signal but SIGKILL only to the step's
        tasks (this process, not its children): unless passed on, SIGTERM would leave the cell training,
        unaware, until the SIGKILL KillWait later, and nothing would say why it stopped."""
        try:
            previous = signal.getsignal(signal.SIGTERM)
        except ValueError:  # pragma: no cover - not the main thread
            previous = None
        if not callable(previous) or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
            yield  # not a Slurm job (submitit's sbatch script sets SUBMITIT_EXECUTOR): SIGTERM means what it says
            return

        def note(signum: int, frame: Any) -> None:
            self._term_at = time.monotonic()
            self._pass_on(signum)
            previous(signum, frame)

        signal.signal(signal.SIGTERM, note)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _pass_on(self, signum: int) -> None:
        """Send `signum` to the running cell's process group (a second SIGTERM where Slurm sent one is harmless)."""
        proc = self._proc
        if proc is not None and not _exited(proc):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signum)

    def _await_slurm(self, log_path: Path) -> None:
        """SIGTERM stopped the cell: leave it resumable and wait for Slurm to requeue or end the job."""
        if self._term_at is None:
            return
        with contextlib.suppress(OSError), open(log_path, "a") as log:
            log.write(f"=== bench slurm {_now()}: SIGTERM from Slurm (a preemption, or scancel) stopped the cell after "
                      f"epoch {len(read_jsonl(self.job.path / 'epochs.jsonl'))}; it stays resumable. Waiting up to "
                      f"{self.TERM_WAIT_S:g} s for Slurm to requeue or end the job\n")
        while time.monotonic() < self._term_at + self.TERM_WAIT_S:
            time.sleep(0.5)

    def _run_here(self) -> dict[str, Any]:
        folder = self.job.path
        s = read_summary(folder)
        if s is not None and s.get("status") == "ok":
            print(f"{folder}: already finished; nothing to run", flush=True)
            return {"folder": str(folder), "status": "ok", "exit_code": None}
        folder.mkdir(parents=True, exist_ok=True)
        place = node_place(self.job) if self.job.nodes > 1 else None
        # every node decides --resume from the folder before its torchrun joins the rendezvous, and the
        # trainer writes nothing before all have joined: the nodes cannot disagree
        argv = (self.job.command() if place is None
                else torchrun_command(self.job, place.node, place.hostnames, place.job_id,
                                      rendezvous_port(place.job_id)))
        job_id = place.job_id if place is not None else (
            os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or "?")
        if place is not None and place.node > 0:
            # no wait for Slurm here after a SIGTERM (see TERM_WAIT_S): node 0's task alone keeps the job running
            self._oom_kills = oom_kills()
            rc = self._run(argv, folder / f"train.log.node{place.node}", f"node {place.node} of job {job_id}",
                           watch=node0_marker(folder, job_id))
            with contextlib.suppress(OSError):
                node_end_marker(folder, job_id, place.node).write_text(oom_error(self._oom_kills, rc) or "")
            return {"folder": str(folder), "node": place.node, "exit_code": rc}
        try:
            with _cell_lock(folder):
                epochs = folder / "epochs.jsonl"
                if RESUME_FLAG not in argv and epochs.exists() and epochs.stat().st_size > 0:
                    # rows written before the first checkpoint have no model state behind them: start over,
                    # as the local runner does (the trainer refuses to start fresh over existing rows)
                    rewrite_jsonl(epochs, [])
                log_path = folder / "train.log"
                since = len(read_jsonl(epochs)) if RESUME_FLAG in argv else 0
                self._oom_kills = oom_kills()
                rc = self._run(argv, log_path, f"job {job_id}", since=since)
                if rc != 0:
                    self._await_slurm(log_path)  # holding the cell's lock: nothing else may start it meanwhile
        finally:
            if place is not None:  # however node 0 ends, the other nodes learn it (see node0_marker)
                with contextlib.suppress(OSError):
                    node0_marker(folder, job_id).write_text(f"{_now()}\n")
        return self._outcome(folder, rc, log_path, place)

    def _run(self, argv: list[str], log_path: Path, what: str, watch: Path | None = None,
             since: int | None = None) -> int:
        """Start `argv` with its output appended to `log_path` after a header line; its exit status.

        `watch` (node k > 0): node 0's end marker; once it exists, the process is stopped if it still runs
        `NODE0_GRACE_S` later (a node 0 gone before or during the rendezvous would hold it 600 s).
        `since` (node 0): the epoch rows the folder held at the start; the process is stopped as hung when
        it writes no new one (before its first, shows no sign of life) for its stall limit (`stall_limit_s`)."""
        print(f"{self.job.path}: {shlex.join(argv)}", flush=True)
        with open(log_path, "a") as log:
            log.write(f"=== bench slurm {_now()} {what} on {os.uname().nodename}: {shlex.join(argv)}\n")
            log.flush()
            self._proc = subprocess.Popen(
                argv, cwd=self.job.cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                # own process group: a stop reaches the trainer's spawned replicas too
                start_new_session=True, preexec_fn=_child_setup(),
            )
            if self._term_at is not None:  # SIGTERM came before the cell started: it stops at once
                self._pass_on(signal.SIGTERM)
            try:
                return self._wait_watching(log, watch, since)
            except BaseException:  # submitit's requeue (SystemExit), Ctrl-C: never leave it running
                self._stop()
                raise
            finally:
                self._proc = None

    def _wait_watching(self, log: Any, watch: Path | None, since: int | None) -> int:
        proc, seen, size = self._proc, None, -1
        epochs = self.job.path / "epochs.jsonl"
        progress = StallWatch(since, self.job.stall_timeout_s, time.monotonic()) if since is not None else None
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if progress is not None:
                try:
                    grown = epochs.stat().st_size
                except OSError:  # not written yet
                    grown = 0
                if grown != size:  # rows appended (or rewritten on resume): read them (a shared disk: not every second)
                    size = grown
                    progress.seen(read_jsonl(epochs), now)
                progress.alive(self.job.path, now)
                if (why := progress.stalled(now)) is not None:
                    self._stalled = why
                    log.write(f"=== bench slurm {_now()}: the cell {why}\n")
                    log.flush()
                    self._stop()
                    return proc.wait()
            if watch is None:
                continue
            if seen is None and watch.exists():
                seen = now
            if seen is not None and now - seen > NODE0_GRACE_S:
                log.write(f"=== bench slurm {_now()}: node 0 ended over {NODE0_GRACE_S:g} s ago ({watch.name}) and "
                          "this node's torchrun still runs: stopped\n")
                log.flush()
                self._stop()
                return proc.wait()

    def _outcome(self, folder: Path, rc: int, log_path: Path, place: NodePlace | None = None) -> dict[str, Any]:
        s = read_summary(folder) or {}
        if rc == 0 and s.get("status") == "ok":
            return {"folder": str(folder), "status": "ok", "exit_code": 0}
        if self._term_at is not None:  # Slurm stopped it (and did not end the job in TERM_WAIT_S): resumable
            raise CellFailed(f"{folder}: stopped by Slurm's SIGTERM (a preemption, or scancel) with exit status "
                             f"{rc}; it stays resumable (see {log_path})")
        if (oom := oom_error(self._oom_kills, rc)) is not None:  # it would run out again: failed
            s = record_failure(folder, s, rc, log_tail(log_path), oom)
            raise CellFailed(f"{folder}: {s.get('error')} (see {log_path})")
        if self._stalled is not None:  # stopped as hung: failed (not resubmitted) unless --retry-failed
            s = record_failure(folder, s, rc, log_tail(log_path), self._stalled)
            raise CellFailed(f"{folder}: {s.get('error')} (see {log_path})")
        if (why := interrupted_why(s)) is not None:  # a replica lost (a node, the network): not the cell's failure
            if place is not None and (oom := _other_node_oom(folder, place)) is not None:  # unless it would recur
                s = record_failure(folder, {k: v for k, v in s.items() if k != "interrupted"}, rc,
                                   log_tail(log_path), oom[1], whole=True)  # node 0's log: only replicas lost
                raise CellFailed(f"{folder}: {s.get('error')} (see {log_path}.node{oom[0]})")
            raise CellFailed(f"{folder}: {why}; it stays resumable, the next `bench run` resubmits it (see {log_path})")
        if rc == EXIT_NO_SPACE:  # the trainer recorded nothing as failed: the next submission resumes it
            raise CellFailed(f"{folder}: the disk is full ({error_line(log_tail(log_path))}); free some space, the "
                             f"cell stays resumable (see {log_path})")
        if rc < 0:
            # killed by a signal: scancel, preemption without requeue, the OOM killer, node trouble. The
            # folder stays resumable; the next `bench run --executor slurm` resubmits it.
            raise CellFailed(f"{folder}: the cell process was {exit_text(rc)}; it stays resumable (see {log_path})")
        # the process may have ended without recording its failure: recorded as the local runner does
        s = record_failure(folder, s, rc, log_tail(log_path))
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
        from submitit.helpers import DelayedSubmission  # noqa: PLC0415 - optional dependency (.[slurm])

        self._stop()
        argv = self.job.command()
        print(f"{self.job.path}: checkpoint -> requeued with {shlex.join(argv)}", flush=True)
        if self.job.nodes == 1 or node_place(self.job).node == 0:  # the cell's own log says why it stopped
            done = len(read_jsonl(self.job.path / "epochs.jsonl"))
            with contextlib.suppress(OSError), open(self.job.path / "train.log", "a") as log:
                log.write(f"=== bench slurm {_now()}: stopped after epoch {done} for Slurm's time limit or a "
                          "preemption; submitit requeues the job (same id) to resume here, unless its requeues "
                          "are spent: then `bench run` resubmits it\n")
        return DelayedSubmission(CellCommand(replace(self.job, argv=argv)))


