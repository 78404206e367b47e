"""`bench status`: where each cell of a grid stands, read from its folders (and Slurm job states if given).

Reads only: `grid.json` (cell order, recorded Slurm jobs), and per cell folder `cell.json`,
`config.json` / `config.request.json` (epochs asked), `epochs.jsonl` (epochs done, time used) and
`summary.json` (outcome). A missing file is a state; a damaged one is reported as
'unreadable: <why>', never a traceback.

Statuses (one per cell):

    pending     listed in grid.json, no record yet (its detail says if a runner launched it) and no job recorded
    submitted   a job is recorded, no summary yet, and its Slurm state was not asked for
    queued      its job waits in the queue (a requeued cell shows the epochs it resumes from)
    running     epochs under way ('epoch k/N'); without job states, any unfinished started cell
    stopped     unfinished, and its job ended (failed, cancelled, preempted, gone; Slurm's reason and its fix
                given, e.g. 'failed (Slurm TIMEOUT: the job hit --slurm-time; ...)'): `bench run` resubmits it; or,
                without job states, the process its summary names ran on this host and has ended
    finished    summary.json status 'ok'
    failed      summary.json status 'failed' (its error's first line)
    skipped     summary.json status 'skipped' (the reason)
    unreadable  summary.json (or grid.json) cannot be read
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from bench.cell_log import OPEN_LAUNCH, interrupted_why, resume_hint
from bench.slurm import latest_job_records, state_label, state_text
from bench.store import alive_mark, epoch_cost, read_jsonl_checked, writer_alive
from ddnet.errors import UserError

STATUSES = ("pending", "submitted", "queued", "running", "stopped", "finished", "failed", "skipped",
            "unreadable")
_COLOURS = {"pending": "white", "submitted": "blue", "queued": "blue", "running": "cyan", "stopped": "yellow",
            "finished": "green", "failed": "red", "skipped": "dim", "unreadable": "magenta"}
_MISSING = object()
RUN_FILES = ("summary.json", "epochs.jsonl", "config.json", "config.request.json", "cell.json")
"""Files that make a folder one run's (`bench train --out`), when it holds no grid."""


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if not isinstance(e, json.JSONDecodeError) else f"invalid JSON ({e})"


def _read_json(path: Path) -> tuple[Any, str | None]:
    """(value, None), (_MISSING, None) when absent, or (None, 'why') when it cannot be read as JSON."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return _MISSING, None
    except (OSError, UnicodeDecodeError) as e:
        return None, _why(e)
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, _why(e)


def _read_rows(path: Path, live: bool = True) -> tuple[list[dict[str, Any]], str | None]:
    """Every readable epoch row; a torn last line is normal while the run may go on (a kill mid-append, resumed
    from its checkpoint), a bad inner line is noted, and so is a torn last line of a run that has ended."""
    try:
        rows, bad = read_jsonl_checked(path, live=live)
    except OSError as e:
        return [], f"unreadable: epochs.jsonl: {_why(e)}"
    note = f"unreadable: epochs.jsonl line(s) {', '.join(map(str, bad))}" if bad else None
    return rows, note


def _time_used(rows: list[dict[str, Any]]) -> float:
    """Training time so far as the trainer totals it: epoch time plus graph capture and pruning."""
    return sum(epoch_cost(r) for r in rows)


def _first_line(v: Any) -> str:
    text = str(v).strip() if v not in (None, "") else ""
    return text.splitlines()[0] if text else ""


def _epochs_asked(folder: Path, notes: list[str]) -> int | None:
    for name in ("config.json", "config.request.json"):
        cfg, err = _read_json(folder / name)
        if err:
            notes.append(f"unreadable: {name}: {err}")
            continue
        if isinstance(cfg, dict) and isinstance(cfg.get("epochs"), int):
            return cfg["epochs"]
    return None


def _cell_row(folder: Path, record: dict[str, Any] | None, states: dict[str, str] | None,
              planned_epochs: int | None = None) -> dict[str, Any]:
    notes: list[str] = []
    cell, err = _read_json(folder / "cell.json")
    if err:
        notes.append(f"unreadable: cell.json: {err}")
    label = str(cell.get("label") or "") if isinstance(cell, dict) else ""
    epochs = _epochs_asked(folder, notes)
    if epochs is None:  # a cell the local runner has not reached: no folder yet, grid.json has its epochs
        epochs = planned_epochs
    summary, s_err = _read_json(folder / "summary.json")
    ended = isinstance(summary, dict) and summary.get("status") in ("ok", "failed", "skipped")
    rows, note = _read_rows(folder / "epochs.jsonl", live=not ended)
    if note:
        notes.append(note)
    job = str(record["job_id"]) if record else None
    state = states.get(job, "unknown") if (job and states is not None) else None
    done = len(rows)
    of = f"{done}/{epochs if epochs is not None else '?'}"  # epochs done / asked
    time_used: float | None = _time_used(rows) if rows else None

    if s_err or (summary is not _MISSING and not isinstance(summary, dict)):
        status = "unreadable"
        detail = f"unreadable: summary.json: {s_err or 'not a JSON object'}"
    else:
        s = summary if isinstance(summary, dict) else {}
        kind = s.get("status")
        if isinstance(s.get("total_time_s"), int | float) and not isinstance(s.get("total_time_s"), bool):
            time_used = float(s["total_time_s"])
        if kind == "ok":
            status = "finished"
            if isinstance(s.get("epochs_completed"), int):
                if s["epochs_completed"] > done:  # rows lost: the report would show fewer epochs than ran
                    notes.append(f"epochs.jsonl holds {done} of its {s['epochs_completed']} epoch rows")
                done = s["epochs_completed"]
            ms = s.get("final_val_ms_ssim")
            detail = f"final MS-SSIM {ms:.2f}%" if isinstance(ms, int | float) else ""
        elif kind == "failed":
            status, detail = "failed", _first_line(s.get("error")) or "failed (no error recorded)"
        elif kind == "skipped":
            status, detail = "skipped", _first_line(s.get("reason") or s.get("error"))
        elif kind not in (None, "running"):
            status, detail = "unreadable", f"unreadable: summary.json status {kind!r}"
        elif state == "queued":
            status = "queued"
            after = _checkpoint_epoch(s, done)
            detail = f"job {job} {state_text(state)}" + (
                f"; resumes after epoch {after}/{epochs if epochs is not None else '?'}" if done else "")
            detail += f" ({done - after} epoch(s) done past its checkpoint are retrained)" if after < done else ""
        elif state in ("failed", "cancelled", "finished") or (state == "unknown" and (done or kind)):
            status = "stopped"
            detail = f"job {job} {state_text(state)} with {of} epochs done; `bench run` resubmits it"  # Slurm's why, fix
            detail += _behind_checkpoint(s, done)
        elif state == "unknown":
            status, detail = "submitted", f"job {job}, not listed by Slurm"
        elif state is None and kind == "running" and (interrupted_why(s) or writer_alive(s.get("writer")) is False):
            # a local run whose process has ended (interrupted, killed, a full disk, the machine rebooted, a
            # replica lost: then the summary says so)
            status = "stopped"
            detail = (f"{of} epochs done{_behind_checkpoint(s, done)}; its process has ended: "
                      f"{resume_hint(folder, isinstance(cell, dict))}")
        elif kind == "running" or done or state == "running":
            status = "running"
            last = rows[-1].get("phase") if rows else None
            detail = _running(done, epochs, last if isinstance(last, str) else "") + _last_sign(folder)
        elif job is not None:
            status, detail = "submitted", f"job {job}"
        else:
            status, detail = "pending", _not_started(folder)
    if status == "stopped" and isinstance(summary, dict) and (why := interrupted_why(summary)):
        detail += f" (stopped: {why})"
    if status in ("failed", "stopped") and (again := _relaunched(folder)):
        detail += f"; {again}"
    if notes:
        detail = "; ".join([d for d in (detail,) if d] + notes)
    return {
        "cell": folder.name, "label": label, "status": status, "detail": detail,
        "epochs_done": done, "epochs": epochs, "time_used_s": time_used,
        "job_id": job, "job_state": state,
    }



def _behind_checkpoint(summary: dict[str, Any], done: int) -> str:
    """' (1 of them in its checkpoint: the resume retrains from epoch 2)' when the run's checkpoint holds fewer
    epochs than its rows (`checkpoint_epoch` of its 'running' summary): a stop between an epoch's row and its
    checkpoint (a full disk), or `--checkpoint-every N`. A resume drops the rows past the checkpoint. ''
    otherwise, and for runs that do not record it."""
    k = _checkpoint_epoch(summary, done)
    if k == done:
        return ""
    kept = f"{k} of them in its checkpoint" if k else "none of them in a checkpoint"
    return f" ({kept}: the resume retrains from epoch {k + 1})"


def _checkpoint_epoch(summary: dict[str, Any], done: int) -> int:
    """The epoch a resume restarts after: the 'running' summary's `checkpoint_epoch` when it is below the `done`
    epoch rows, else `done` (a run that does not record it, or one whose checkpoint is up to date)."""
    k = summary.get("checkpoint_epoch")
    return k if isinstance(k, int) and not isinstance(k, bool) and 0 <= k < done else done


def _running(done: int, epochs: int | None, last_phase: str) -> str:
    """'in epoch 3/5 (2 done, dense)': the epoch under way, not the count done, which read 'epoch 0/5' in
    epoch 1; 'all 5/5 epochs done, finishing' while the final evaluation and records are written."""
    if epochs is not None and done >= epochs:
        return f"all {done}/{epochs} epochs done, finishing"
    under_way = f"in epoch {done + 1}/{epochs if epochs is not None else '?'}"
    return under_way + (f" ({done} done, {last_phase})" if done and last_phase else f" ({done} done)" if done else "")


def _not_started(folder: Path) -> str:
    """'not started', or, when a runner has launched the cell (its open-launch mark) and the trainer has written
    nothing yet, when: the process is starting, or that runner was killed before the trainer began."""
    mark, _ = _read_json(folder / OPEN_LAUNCH)
    if mark is _MISSING:
        return "not started"
    when = mark.get("started_utc") if isinstance(mark, dict) else None
    return (f"launched{f' {when}' if isinstance(when, str) else ''}, no record yet: starting, or its `bench run` "
            "was stopped before the trainer began (`bench run` starts it again)")


def _relaunched(folder: Path) -> str:
    """For a failed or stopped cell a runner has launched again (`--retry-failed`, a resume) whose trainer has
    not yet rewritten its summary: when, as `_not_started` says it (its launch mark is newer than the
    summary), else ''."""
    try:
        if (folder / OPEN_LAUNCH).stat().st_mtime < (folder / "summary.json").stat().st_mtime:
            return ""
    except OSError:
        return ""
    return _not_started(folder).replace("launched", "launched again", 1)


def _last_sign(folder: Path) -> str:
    """', last sign of life 2 min ago' for a running cell whose trainer has touched its ALIVE file (every step,
    every 10 s at most; by the writer's clock or its file server's, so approximate across hosts), else ''."""
    mark = alive_mark(folder)
    if mark is None:
        return ""
    age = max(0.0, time.time() - mark / 1e9)
    ago = f"{age:.0f} s" if age < 120 else f"{age / 60:.0f} min" if age < 7200 else f"{age / 3600:.1f} h"
    return f", last sign of life {ago} ago"


def recorded_jobs(results_dir: Path) -> dict[str, str]:
    """{cell folder: latest Slurm job id} recorded in `results_dir/grid.json` ({} if none or unreadable)."""
    grid, err = _read_json(Path(results_dir) / "grid.json")
    if err or not isinstance(grid, dict):
        return {}
    return {f: str(r["job_id"]) for f, r in latest_job_records(grid).items()}


def cell_status_rows(results_dir: Path, job_states: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One flat row per cell of the grid in `results_dir` (grid.json's order first, then other cell folders).

    `job_states`: {job id: queued | running | finished | failed | cancelled | unknown}, from
    `bench.slurm.job_states(list(recorded_jobs(results_dir).values()))`; None: Slurm is not asked.
    Row keys: cell, label, status, detail, epochs_done, epochs, time_used_s, job_id, job_state.
    A damaged grid.json adds a first row with cell 'grid.json' and status 'unreadable'. A folder without a grid
    that is one run's (`bench train --out`, or one cell's) gives that run's row.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UserError(f"{results_dir} is not a folder; give the --out folder of a `bench run`.")
    grid, grid_err = _read_json(results_dir / "grid.json")
    order: list[str] = []
    records: dict[str, dict[str, Any]] = {}
    if not grid_err and grid is not _MISSING:
        if isinstance(grid, dict):
            order = [f for f in grid.get("order", []) if isinstance(f, str)] if isinstance(
                grid.get("order"), list) else []
            records = latest_job_records(grid)
        else:
            grid_err = "not a JSON object"
    try:
        found = sorted(d.name for d in results_dir.iterdir()
                       if d.is_dir() and ((d / "cell.json").exists() or (d / "summary.json").exists()))
    except OSError as e:
        raise UserError(f"cannot list {results_dir}: {e}") from None
    folders = list(dict.fromkeys(order + found))
    cells = grid.get("cells") if isinstance(grid, dict) else None
    planned = {c["folder"]: c["epochs"] for c in (cells if isinstance(cells, list) else [])
               if isinstance(c, dict) and isinstance(c.get("folder"), str) and isinstance(c.get("epochs"), int)}
    rows = [_cell_row(results_dir / f, records.get(f), job_states, planned.get(f)) for f in folders]
    if not rows and grid is _MISSING and any((results_dir / n).exists() for n in RUN_FILES):
        rows = [_cell_row(results_dir.resolve(), None, job_states)]  # one `bench train` run (or one cell's folder)
    if grid_err:
        rows.insert(0, {"cell": "grid.json", "label": "", "status": "unreadable",
                        "detail": f"unreadable: grid.json: {grid_err}", "epochs_done": 0, "epochs": None,
                        "time_used_s": None, "job_id": None, "job_state": None})
    return rows


def status_totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """{'cells': n, 'by_status': {status: count}, 'time_used_s': total} (the grid.json row is not a cell)."""
    cells = [r for r in rows if r["cell"] != "grid.json"]
    counts: dict[str, int] = {}
    for r in cells:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    by_status = {s: counts[s] for s in (*STATUSES, *sorted(set(counts) - set(STATUSES))) if s in counts}
    return {"cells": len(cells), "by_status": by_status,
            "time_used_s": sum(r["time_used_s"] or 0.0 for r in cells)}


def format_duration(seconds: float | None) -> str:
    """'-', '12.3 s', '4m05s' or '2h07m'."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def status_table(rows: list[dict[str, Any]], title: str = "bench status") -> Table:
    """The rows as a rich Table, with the totals (cells per status, time used) as its caption."""
    totals = status_totals(rows)
    counts = ", ".join(f"{n} {s}" for s, n in totals["by_status"].items()) or "no cells"
    n = totals["cells"]
    table = Table(title=title, caption=f"{n} cell{'' if n == 1 else 's'}: {counts}; time used "
                                       f"{format_duration(totals['time_used_s'])}")
    for col, kw in (("cell", {"overflow": "fold"}), ("status", {}), ("epochs", {"justify": "right"}),
                    ("time used", {"justify": "right"}), ("job", {}), ("detail", {"overflow": "fold"})):
        table.add_column(col, **kw)
    for r in rows:
        colour = _COLOURS.get(r["status"], "white")
        epochs = f"{r['epochs_done']}/{r['epochs'] if r['epochs'] is not None else '?'}"
        job = r["job_id"] or "-"
        if r["job_state"]:
            job += f" ({state_label(r['job_state'])})"  # 'failed: TIMEOUT', 'preempted': the detail says more
        table.add_row(Text(r["cell"]), Text(r["status"], style=colour), epochs,
                      format_duration(r["time_used_s"]), Text(job), Text(r["detail"] or ""))
    return table
