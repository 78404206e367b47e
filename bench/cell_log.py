"""A cell's train.log read back, the failure recorded for a cell process that ended without recording one,
and when a cell counts as hung.

Both executors start the same `bench train` command into the same folder (the local runner,
`bench.processes`; a Slurm node, `bench.slurm.node`), both stop it when it writes no new epoch
for its stall limit, and both record the same failure when it ends badly without saying why in
its summary.json.
"""

from __future__ import annotations

import math
import re
import signal
from pathlib import Path
from typing import Any

from bench.store import alive_mark, epoch_wall, read_jsonl, write_json
from ddnet.errors import UserError

LAUNCHES = "launches.jsonl"
"""Per cell folder: one row per `bench train` process the runner started (wall time, epochs before/after)."""
def resume_hint(folder: object, grid_cell: bool) -> str:
    """The command that resumes a stopped run: a grid's cell by its `bench run`, a run of its own by `bench train`
    (said alike by `bench status` and `bench report`)."""
    return ("`bench run` (the same command) resumes it" if grid_cell
            else f"`bench train --out {folder} --resume` resumes it")


OPEN_LAUNCH = ".launch.open.json"
"""Per cell folder: the launch under way (its start), removed once its row is in LAUNCHES; left behind, it names a
launch whose runner was killed (SIGKILL, a lost machine) before it could record it (`bench.processes`)."""

STALL_FLOOR_S = 1800.0
STALL_FACTOR = 10.0
"""A cell that writes no new epoch for max(STALL_FLOOR_S, STALL_FACTOR x its slowest epoch) is taken for hung
(`stall_limit_s`): a stuck GPU or collective must not hold an overnight grid, or a node, forever."""
STARTUP_STALL_S = 3600.0
"""Before a launch's first epoch row nothing is measured to judge by: a cell that shows no sign of life (its run
folder's `bench.store.ALIVE_NAME` untouched, every training step touches it) for this long, or for its
--stall-timeout where that is longer, is taken for hung while it loads data, builds, compiles or captures, or in
its first epoch's steps. Far above any of those (the paper's data loads in minutes, a compile takes minutes)."""

EXIT_NO_SPACE = 4
"""`bench train`'s exit status when a write failed because the disk (or quota) is full. Nothing is recorded
as failed: both executors leave the cell resumable and stop starting cells on that disk (`out_of_space`)."""

EXIT_NO_DEVICE = 5
"""`bench train`'s exit status when the grid that started it was planned on a GPU and none is visible now (a GPU
that failed or was taken away): it must not fall back to the CPU. The cell is left resumable and the grid stops."""

EXIT_PEER_LOST = 6
"""`bench train`'s exit status when its DDP group broke and no replica said why (a node lost, the network cut, a
replica killed: `ddnet.replicas.PeerLost`). Nothing is recorded as failed; the summary says why
(`interrupted_why`): both executors leave the cell resumable."""

PLANNED_DEVICE_ENV = "DDNET_BENCH_PLANNED_DEVICE"
"""Set by the local runner for each cell: the device ('cuda' or 'cpu') this machine had when the grid started."""


class DeviceGone(UserError):
    """The grid's GPU is no longer visible: one line, exit status `EXIT_NO_DEVICE`."""

    exit_code = EXIT_NO_DEVICE


LOG_TAIL_LINES = 20
"""Lines of a failed cell's train.log shown to the user and stored in its summary."""


def log_tail(log: Path, n: int = LOG_TAIL_LINES) -> list[str]:
    """The last `n` lines of `log` (none when it cannot be read)."""
    try:
        with open(log, errors="replace") as f:
            return [line.rstrip("\n") for line in f.readlines()[-n:]]
    except OSError:
        return []


_NOISE = re.compile(r"^(=== bench |\s)|^\S+:\d+: \w*Warning: |^warning: |━|^(train|val|eval)\b.*\d+/\d+")
"""Log lines that never say why a process ended: the runners' own ('=== bench run ...'), indented ones (a
warning's source line, a traceback's frames), Python warnings and ours ('warning: ...'), and progress-bar
fragments."""


def error_line(tail: list[str]) -> str:
    """The most telling line of a log tail: the CLI's 'error: ...' line, else the last non-empty line that is not
    noise (`_NOISE`); '' when there is none (a cell killed mid-epoch, whose log holds only warnings and bars)."""
    for line in reversed(tail):
        if line.startswith("error:"):
            return line
    return next((line.strip() for line in reversed(tail) if line.strip() and not _NOISE.search(line)), "")


def interrupted_why(summary: dict[str, Any]) -> str | None:
    """Why an unfinished run stopped for a cause outside it (`RunSink.interrupt`: a replica lost); None: it did not."""
    why = summary.get("interrupted") if summary.get("status") == "running" else None
    return str(why) if why else None


def oom_kills(root: Path = Path("/")) -> int | None:
    """How many processes the out-of-memory killer has killed in this process's memory cgroup (a Slurm job's,
    when Slurm confines memory: ConstrainRAMSpace): cgroup v1's memory.oom_control or v2's memory.events. None
    where that cannot be read (no memory cgroup, not Linux)."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    places = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "-", "")
        rel = path.lstrip("/")
        if "memory" in controllers.split(","):  # v1
            places.append(root / "sys/fs/cgroup/memory" / rel / "memory.oom_control")
        elif controllers == "":  # v2: mounted at /sys/fs/cgroup, or beside v1 at /sys/fs/cgroup/unified
            places += [root / "sys/fs/cgroup" / rel / "memory.events",
                       root / "sys/fs/cgroup/unified" / rel / "memory.events"]
    for place in places:
        try:
            fields = dict(line.split() for line in place.read_text().splitlines() if len(line.split()) == 2)
            return int(fields["oom_kill"])
        except (OSError, KeyError, ValueError):
            continue
    return None


def oom_error(before: int | None, rc: int) -> str | None:
    """Why a cell process that ended with `rc` failed when the out-of-memory killer has struck in this cgroup
    since `before` (`oom_kills()` when the cell started), for `record_failure`; None when it ended well, or the
    killer has not struck, or that cannot be told."""
    if rc == 0 or before is None:
        return None
    after = oom_kills()
    if after is None or after <= before:
        return None
    return f"{exit_text(rc)} after {OOM_STRUCK}"


OOM_STRUCK = ("the out-of-memory killer struck at its memory limit (a Slurm job's --mem): ask for more memory "
              "(--slurm-mem-gb) or lower --batch-size or --num-workers, then --retry-failed resumes it")


def exit_text(rc: int) -> str:
    """'exited with code 3', 'killed by signal SIGKILL'."""
    if rc < 0:
        try:
            return f"killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with code {rc}"


def record_failure(cell_dir: Path, summary: dict[str, Any], rc: int, tail: list[str],
                   why: str | None = None, *, whole: bool = False) -> dict[str, Any]:
    """The cell's summary after its process ended badly: `summary` itself when the trainer recorded the
    failure, else a 'failed' one written to `cell_dir/summary.json` (the error from `why`, default the
    exit status, and the log's telling line unless `why` is `whole`; the tail; the epochs the folder holds)."""
    if summary.get("status") == "failed":
        return summary
    if why is None:
        why = exit_text(rc) if rc != 0 else f"exited 0 but summary.json status is {summary.get('status')!r}"
    line = "" if whole else error_line(tail)
    record = {
        **summary,
        "status": "failed",
        "error": f"cell process {why}" + (f": {line}" if line else ""),
        "exit_code": rc,
        "log_tail": tail,
        "epochs_completed": len(read_jsonl(cell_dir / "epochs.jsonl")),
    }
    write_json(cell_dir / "summary.json", record)
    return record


def check_stall_timeout(value: float | None, name: str = "--stall-timeout") -> None:
    """Refuse a stall limit (`stall_limit_s`'s `setting`) that is not a finite number of seconds >= 0, in one line
    naming `name`: nan and inf would never be reached, a watch silently off; 0 is how it is turned off."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value >= 0):
        raise UserError(f"{name}={value!r}: give a finite number of seconds (>= 0; 0 turns the watch off), or leave "
                        "it unset for the default limit.")


def stall_limit_s(rows: list[dict[str, Any]], since: int, setting: float | None = None) -> float | None:
    """Seconds a running cell may go without progress before it is stopped as hung; None: never (`setting` 0).

    Once this launch has written a row (more than the `since` rows it started with), progress is a new epoch
    row: the limit is `setting` where given, else max(STALL_FLOOR_S, STALL_FACTOR x the slowest epoch so far,
    validation, capture and pruning included). Before that it loads data, builds, compiles or captures, with
    nothing measured to compare against: progress is any sign of life (`StallWatch.alive`), and the limit is
    max(STARTUP_STALL_S, `setting`), so a --stall-timeout sized for its epochs never cuts a slow start short.
    """
    if setting == 0:
        return None
    if len(rows) <= since:
        return max(STARTUP_STALL_S, setting or 0.0)
    if setting is not None:
        return setting
    return max(STALL_FLOOR_S, STALL_FACTOR * max(epoch_wall(r) for r in rows))


class StallWatch:
    """A running cell's progress, as both runners watch it from the cell's launch (`now`, the runner's monotonic
    clock): at each look, `seen(rows, now)` with its epoch rows and `alive(folder, now)` with its run folder;
    `stalled(now)` says why it counts as hung (None while it makes progress)."""

    def __init__(self, since: int, setting: float | None, now: float) -> None:
        self.since, self.setting = since, setting
        self.rows, self.changed_at = -1, now
        self.limit = stall_limit_s([], 0, setting)
        self.mark: int | None = None

    def seen(self, rows: list[dict[str, Any]], now: float) -> bool:
        """Note the rows the cell holds now; whether their count changed since the last look."""
        if len(rows) == self.rows:
            return False
        self.rows, self.changed_at = len(rows), now
        self.limit = stall_limit_s(rows, self.since, self.setting)
        return True

    def alive(self, folder: Path, now: float) -> None:
        """Note the cell's sign of life (`bench.store.alive_mark` of its run folder): a new one restarts the clock
        until this launch's first row; from then on only new rows count, and the folder is no longer looked at."""
        if self.rows > self.since:
            return
        if (mark := alive_mark(folder)) != self.mark:
            self.mark, self.changed_at = mark, now

    def stalled(self, now: float) -> str | None:
        """Why the cell is taken for hung now (`stall_error`), None while it makes progress."""
        if self.limit is None or now - self.changed_at <= self.limit:
            return None
        return stall_error(self.limit, max(self.rows, 0), starting=self.rows <= self.since)


def stall_error(limit_s: float, epochs: int, starting: bool = False) -> str:
    """Why a hung cell was stopped (the error both runners record); `starting`: before this launch's first row."""
    if starting:
        return (f"showed no sign of life for {limit_s:g} s before writing epoch {epochs + 1} (loading data, "
                "building, compiling or capturing, or in its steps) and was stopped as hung (--stall-timeout; "
                "--retry-failed resumes it)")
    return (f"wrote no new epoch for {limit_s:g} s after epoch {epochs} and was stopped as hung "
            "(--stall-timeout; --retry-failed resumes it)")
