"""A cell's train.log read back, and the failure recorded for a cell process that ended without recording one.

Both executors start the same `bench train` command into the same folder (the local runner,
`bench.processes`; a Slurm node, `bench.slurm.node`), and both record the same failure when
it ends badly without saying why in its summary.json.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from bench.store import read_jsonl, write_json

LAUNCHES = "launches.jsonl"
"""Per cell folder: one row per `bench train` process the runner started (wall time, epochs before/after)."""

LOG_TAIL_LINES = 20
"""Lines of a failed cell's train.log shown to the user and stored in its summary."""


def log_tail(log: Path, n: int = LOG_TAIL_LINES) -> list[str]:
    """The last `n` lines of `log` (none when it cannot be read)."""
    try:
        with open(log, errors="replace") as f:
            return [line.rstrip("\n") for line in f.readlines()[-n:]]
    except OSError:
        return []


def error_line(tail: list[str]) -> str:
    """The most telling line of a log tail: the CLI's 'error: ...' line, else the last non-empty line."""
    for line in reversed(tail):
        if line.startswith("error:"):
            return line
    return next((line.strip() for line in reversed(tail) if line.strip()), "")


def exit_text(rc: int) -> str:
    """'exited with code 3', 'killed by signal SIGKILL'."""
    if rc < 0:
        try:
            return f"killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with code {rc}"


def record_failure(cell_dir: Path, summary: dict[str, Any], rc: int, tail: list[str],
                   why: str | None = None) -> dict[str, Any]:
    """The cell's summary after its process ended badly: `summary` itself when the trainer recorded the
    failure, else a 'failed' one written to `cell_dir/summary.json` (the error from `why`, default the
    exit status, and the log's telling line; the tail; the epochs the folder holds)."""
    if summary.get("status") == "failed":
        return summary
    if why is None:
        why = exit_text(rc) if rc != 0 else f"exited 0 but summary.json status is {summary.get('status')!r}"
    line = error_line(tail)
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
