"""The run folder: atomic JSON files and an append-only, flushed JSONL of epochs.

Layout of one run folder (the contract `bench report` reads):

    config.json    the TrainConfig as a dict
    env.json       the environment (bench.collectors.environment())
    epochs.jsonl   one JSON object per finished epoch, appended and fsynced
    summary.json   status and totals; written at start ('running', with its `writer`) and at the end
    ckpt.pt        latest resumable checkpoint (atomic replace)

The epoch-row rules live here, once, for every reader (the report, the estimates, `bench status`):
an epoch's phase is its `phase` field ('dense' when absent); it is a warm-up epoch when its
`warmup` flag says so, or, for rows without the flag, when its number is at most the config's
`warmup_epochs` (default 1); the training time it cost is its `time_s` plus the graph capture and
pruning done in it.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from ddnet.errors import UserError, out_of_space


def _clean(obj: Any) -> Any:
    """JSON cannot hold NaN/inf portably: store them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _umask_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp makes 0600, unreadable to a group)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text`: a temporary file in the same folder, fsync, rename. A failure (a full disk)
    leaves `path` as it was and no temporary file behind to fill the disk further."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (`_write_atomic`), making the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n")


def writer_record() -> dict[str, Any]:
    """Who writes a run folder now, for its 'running' summary: host, pid and the process's creation time."""
    import psutil  # noqa: PLC0415 - only the writer and `bench status` need it

    return {"host": socket.gethostname(), "pid": os.getpid(), "created": psutil.Process().create_time()}


def writer_alive(writer: Any) -> bool | None:
    """Whether the process a 'running' summary names (`writer_record`) still runs: None when that cannot be told
    from here (no record: an older folder; another host: a Slurm node), else True or False (a pid reused by
    another process has another creation time)."""
    import psutil  # noqa: PLC0415 - see writer_record

    if not isinstance(writer, dict) or writer.get("host") != socket.gethostname():
        return None
    pid, created = writer.get("pid"), writer.get("created")
    if not isinstance(pid, int) or not isinstance(created, int | float):
        return None
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - created) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return None


TRAIN_LOCK = ".bench-train.lock"  # held by a `bench train` writing the folder (`take_lock`)
ALIVE_NAME = ".alive"
"""Per run folder: touched by the writer (global rank 0) at most every ALIVE_EVERY_S while the run makes progress
(building its step, every training step): the sign of life the runners' stall watch goes by before a launch's
first epoch row (`bench.cell_log.StallWatch`)."""
ALIVE_EVERY_S = 10.0


def alive_mark(folder: Path) -> int | None:
    """The run folder's latest sign of life (ALIVE_NAME's modification time, ns), None before the first. The stall
    watch counts only its changes, by the watcher's own clock, never comparing the writer's (another host's)."""
    try:
        return (folder / ALIVE_NAME).stat().st_mtime_ns
    except OSError:
        return None


def take_lock(path: Path, fix: str, busy: str) -> IO[str]:
    """Open `path` and take its exclusive flock without waiting; the open file holds the lock until closed (the
    lock dies with the process, even on SIGKILL). A place that cannot be written is one UserError ending in
    `fix`, a lock another process holds is the UserError `busy`, a full disk the OSError it is."""
    import fcntl  # noqa: PLC0415 - POSIX only, and only the writers need it

    try:
        f = open(path, "w")  # noqa: SIM115 - returned, the caller closes it
    except OSError as e:
        if out_of_space(e):
            raise
        raise UserError(f"cannot write in {path.parent} ({e.strerror or e}); {fix}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(busy) from None
    return f


def lock_held(path: Path) -> bool:
    """Whether another process holds `path`'s flock now (taken by `take_lock`); False when there is no such file."""
    import fcntl  # noqa: PLC0415 - see take_lock

    try:
        f = open(path)  # noqa: SIM115 - closed below; read-only: probing writes nothing
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    with open(path) as f:
        return json.load(f)


def read_summary(folder: str | Path) -> dict[str, Any] | None:
    """A run folder's summary.json: None when there is none, {"status": "damaged", "error": ...} when it
    cannot be read as a JSON object (write_json is atomic: only a foreign writer or a bad disk tears it)."""
    path = Path(folder) / "summary.json"
    try:
        s = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8
        return {"status": "damaged", "error": f"{path} is unreadable ({type(e).__name__})"}
    return s if isinstance(s, dict) else {"status": "damaged", "error": f"{path} is not a JSON object"}


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append one row and flush it to disk before returning (a kill loses no finished epoch)."""
    with open(path, "a") as f:
        f.write(json.dumps(_clean(row), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_checked(path: str | Path, live: bool = False) -> tuple[list[dict[str, Any]], list[int]]:
    """Every valid row (a JSON object), and the 1-based numbers of the lines that are not one.

    A line that does not parse (garbage, a torn last line of a run killed mid-write) is skipped
    and reported, never a reason to drop the valid rows after it. `live`: the file may be being
    appended to right now, so a last line that does not parse is not reported (it is half-written).
    A missing file is no rows; another OSError is raised.
    """
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return [], []
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    rows, bad = [], []
    for i, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if not (live and i == len(lines) - 1):
                bad.append(number)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(number)
    return rows, bad


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every valid row; lines that are not one (e.g. a torn last line) are skipped (see `read_jsonl_checked`)."""
    return read_jsonl_checked(path)[0]


def rewrite_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Atomically replace a JSONL file with `rows` (used to drop rows past a resumed checkpoint)."""
    _write_atomic(Path(path), "".join(json.dumps(_clean(row), sort_keys=True) + "\n" for row in rows))


# ------------------------------------------------------------------ an epoch row's rules (module docstring)


def epoch_phase(row: dict[str, Any]) -> str:
    """The training phase an epochs.jsonl row belongs to: 'dense' or 'sparse' ('dense' when not recorded)."""
    return str(row.get("phase", "dense"))


def is_warmup(row: dict[str, Any], config: Mapping[str, Any]) -> bool:
    """Whether an epochs.jsonl row is a warm-up epoch: its `warmup` flag, else epoch <= config warmup_epochs."""
    if "warmup" in row:
        return bool(row["warmup"])
    return int(row.get("epoch", 0)) <= int(config.get("warmup_epochs", 1))


def seconds(v: Any) -> float:
    """A recorded duration as a float: 0.0 for a missing, non-numeric (bools too) or non-finite value."""
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else 0.0


def epoch_cost(row: dict[str, Any]) -> float:
    """Training time an epoch cost: its timed part plus graph capture and pruning done in it."""
    return seconds(row.get("time_s")) + seconds(row.get("capture_time_s")) + seconds(row.get("prune_time_s"))


def epoch_wall(row: dict[str, Any]) -> float:
    """An epoch's wall time as its row records it: `epoch_cost` plus its validation."""
    return epoch_cost(row) + seconds(row.get("val_time_s"))
