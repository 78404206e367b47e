"""Reading run folders for `bench report`: one `RunRecord` per folder, with its per-run measures.

A run folder is any folder holding `summary.json` (the contract in
bench/store.py). Nothing here trains or imports the trainer: only the JSON
files are read. Unreadable files make an 'unreadable' run, never an exception.

The epoch-row rules (phase, warm-up, cost) are bench/store.py's, shared with the
estimates and `bench status`; they are re-exported here for the artifacts.
Steady-state times never include a warm-up epoch.
"""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cell_log import LAUNCHES, interrupted_why, resume_hint
from bench.report.format import is_num
from bench.report.setting import Setting, setting_from
from bench.stats import median
from bench.store import (
    epoch_cost,
    epoch_phase,
    is_warmup,
    read_json,
    read_jsonl_checked,
    seconds,
    writer_alive,
)
from ddnet.config import TrainConfig
from ddnet.errors import UserError

UNKNOWN_ENV = "unknown"
"""Fingerprint given to runs whose env.json is missing and cannot be attributed."""
NO_ENV_NOTE = "no env.json: machine unknown, compared only with other runs without one"
"""Said of such a run (status.csv) and of its cell (the tables' flags)."""

# Config fields that change what is measured but are not optimizations: two
# cells compare only when all of these agree (same data, net, epochs, batch).
_CONTEXT_FIELDS = ("batch_size", "epochs", "nproc", "lr", "gamma", "warmup_epochs")
_DEFAULTS = TrainConfig().to_dict()
"""TrainConfig's defaults: what a field missing from an older config.json stands for."""


def context_blob(config: dict[str, Any], setting: Setting) -> dict[str, Any]:
    """What must agree for two runs to be compared: data, net, epochs, batch, optimizer (`model` and `data`
    as the config's dicts); without a config, the batch size and epochs its setting knows.

    A field an older config lacks reads as `TrainConfig`'s default, as the run's `Setting` does: a repeat
    written before `warmup_epochs` or `data.synth_mode` existed is a repeat of the same cell (pooled, its
    code version flagged), not a second cell named '[nproc None, warmup_epochs None]'.
    """
    if config:
        model, data = config.get("model"), config.get("data")
        return {**{k: config.get(k, _DEFAULTS.get(k)) for k in _CONTEXT_FIELDS},
                "model": {**_DEFAULTS["model"], **model} if isinstance(model, dict) else model,
                "data": {**_DEFAULTS["data"], **(data if isinstance(data, dict) else {})}}
    return {"batch_size": setting.batch_size, "epochs": setting.epochs}


def _context_of(config: dict[str, Any], setting: Setting) -> str:
    """Hash of `context_blob`: runs compare only when theirs agree."""
    blob = context_blob(config, setting)
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass
class RunRecord:
    """One run folder as read from disk, with what the report derives from it."""

    path: Path
    rel: str
    """Path relative to the results folder (for tables)."""
    status: str
    """'ok', 'running' (partial), 'stopped' (partial, its process has ended: resumable), 'failed', 'skipped', or
    'unreadable'."""
    error: str | None
    reason: str | None
    config: dict[str, Any]
    env: dict[str, Any]
    summary: dict[str, Any]
    epochs: list[dict[str, Any]]
    cell: dict[str, Any]
    copies: dict[str, Any] | None
    setting: Setting
    context: str
    fingerprint: str
    grid: str
    cell_name: str
    repeat: int
    label: str
    damage: str | None = None
    """What is wrong with epochs.jsonl (unreadable lines, duplicated or missing epochs), or None."""
    launches: list[dict[str, Any]] = field(default_factory=list)
    """`bench run`'s record of each process it started for this run (launches.jsonl: wall_s, exit_code)."""

    @property
    def ok(self) -> bool:
        """Finished without error (only these enter the numbers)."""
        return self.status == "ok"

    # ------------------------------------------------------------ per-run measures
    def phase_times(self) -> dict[str, list[float]]:
        """Non-warm-up epoch times (time_s) per phase; empty for a phase that had only warm-up epochs.

        A warm-up epoch is never used in place of a steady one: in a hybrid run
        whose dense phase is a single (warm-up) epoch, that epoch's first-call
        overheads would be compared with the baseline's steady epochs.
        """
        out: dict[str, list[float]] = {}
        for row in self.epochs:
            times = out.setdefault(epoch_phase(row), [])
            if not is_warmup(row, self.config) and is_num(row.get("time_s")):
                times.append(float(row["time_s"]))
        return out

    def warmup_only_phases(self) -> list[str]:
        """Phases without a single non-warm-up epoch (their steady time is unknown)."""
        return [p for p, t in self.phase_times().items() if not t]

    def phase_counts(self) -> dict[str, int]:
        """Epochs run per phase (warm-up included): the weights of the training-time estimate."""
        counts: dict[str, int] = {}
        for row in self.epochs:
            phase = epoch_phase(row)
            counts[phase] = counts.get(phase, 0) + 1
        return counts

    def steady_epoch_times(self) -> list[float]:
        """All non-warm-up epoch times (empty if every epoch was a warm-up)."""
        return [float(r["time_s"]) for r in self.epochs if not is_warmup(r, self.config) and is_num(r.get("time_s"))]

    def epoch_time_p50(self) -> float | None:
        """Median of the non-warm-up epochs' time_s."""
        t = self.steady_epoch_times()
        return float(median(t)) if t else None

    def train_time_est_s(self) -> float | None:
        """Robust training time: sum over phases of (epochs in phase) x (median non-warm-up epoch time)."""
        times, counts = self.phase_times(), self.phase_counts()
        if not times or any(not v for v in times.values()):
            return None
        return float(sum(counts[p] * float(median(times[p])) for p in times))

    def total_time_s(self) -> float | None:
        """summary total_time_s (epochs + capture + prune + staging), else summed from epochs.jsonl."""
        v = self.summary.get("total_time_s")
        if is_num(v):
            return float(v)
        if not self.epochs:
            return None
        return float(sum(epoch_cost(r) for r in self.epochs) + seconds(self.summary.get("staging_time_s")))

    def final_quality(self) -> tuple[float | None, float | None]:
        """Final validation MS-SSIM mean and std over slices (percent)."""
        m, s = self.summary.get("final_val_ms_ssim"), self.summary.get("final_val_ms_ssim_std")
        if is_num(m):
            return float(m), (float(s) if is_num(s) else None)
        for row in reversed(self.epochs):
            if is_num(row.get("val_ms_ssim")):
                s = row.get("val_ms_ssim_std")
                return float(row["val_ms_ssim"]), (float(s) if is_num(s) else None)
        return None, None

    def final_metric(self, field: str) -> tuple[float | None, float | None]:
        """The last epoch row's `field` and `field_std` (e.g. 'val_ms_ssim_paper_code', 'input_ms_ssim')."""
        for row in reversed(self.epochs):
            if is_num(row.get(field)):
                s = row.get(f"{field}_std")
                return float(row[field]), (float(s) if is_num(s) else None)
        v = self.summary.get(field if field.startswith("input_") else f"final_{field}")
        return (float(v), None) if is_num(v) else (None, None)

    def time_to_target(self, target_pct: float) -> tuple[int, float] | None:
        """(epoch from which val_ms_ssim stays >= target to the last validation, training time up to its end
        incl. staging), or None when the run did not end at the target.

        Validation MS-SSIM swings from epoch to epoch: the first epoch that touches the target can be a spike
        the run falls back from, so the target counts as reached only where it is held (`first_touch` keeps
        the first epoch that touched it).
        """
        held = None
        for i, row in enumerate(self.epochs):
            v = row.get("val_ms_ssim")
            if is_num(v):
                held = (i if held is None else held) if float(v) >= target_pct else None
        return self._spent_to(held) if held is not None else None

    def first_touch(self, target_pct: float) -> tuple[int, float] | None:
        """(first epoch with val_ms_ssim >= target, training time up to its end incl. staging), held or not."""
        for i, row in enumerate(self.epochs):
            v = row.get("val_ms_ssim")
            if is_num(v) and float(v) >= target_pct:
                return self._spent_to(i)
        return None

    def _spent_to(self, i: int) -> tuple[int, float]:
        """(epoch number of row i, staging + the cost of every epoch up to and including row i)."""
        spent = seconds(self.summary.get("staging_time_s")) + sum(epoch_cost(r) for r in self.epochs[: i + 1])
        return int(self.epochs[i].get("epoch", 0)), spent

    def memory(self) -> dict[str, Any]:
        """Whole-run memory peaks: summary 'memory', else the max of each mem_* field over epochs."""
        mem = self.summary.get("memory")
        if isinstance(mem, dict) and mem:
            return dict(mem)
        out: dict[str, Any] = {}
        for row in self.epochs:
            for k, v in row.items():
                if k.startswith("mem_") and k.endswith("_gib") and is_num(v):
                    out[k] = max(float(v), out.get(k, float(v)))
                elif k == "mem_source":
                    out[k] = v
        return out

    def status_text(self) -> str:
        """'ok', 'running (partial: 3/50 epochs)', 'stopped (partial: ...)', 'failed: <error>', 'skipped: <reason>';
        damage appended."""
        text = self._status_text()
        return f"{text} [{self.damage}]" if self.damage else text

    def _status_text(self) -> str:
        done = len(self.epochs)
        total = self.setting.epochs
        if self.status == "ok":
            return "ok"
        if self.status == "running":
            return f"running (partial: {done}/{total} epochs){_elsewhere(self.summary.get('writer'))}"
        if self.status == "stopped":
            why = interrupted_why(self.summary)
            how = resume_hint(self.path, bool(self.cell.get("cell")))
            return f"stopped (partial: {done}/{total} epochs): its process has ended{f' ({why})' if why else ''}; {how}"
        if self.status == "failed":
            return f"failed after {done}/{total} epochs: {_one_line(self.error) or 'no error recorded'}"
        if self.status == "skipped":
            return f"skipped: {_one_line(self.reason or self.error) or 'no reason recorded'}"
        return f"{self.status}: {_one_line(self.error)}".strip()


def _one_line(text: str | None, limit: int = 240) -> str:
    """First line of a message, shortened for a table cell (the full text stays in summary.json)."""
    if not text:
        return ""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _elsewhere(writer: Any) -> str:
    """For a 'running' summary written on another host (a Slurm node): that this host cannot tell whether the
    process still runs, and who can; '' when it ran here (the report then knows) or the summary names no host."""
    host = writer.get("host") if isinstance(writer, dict) else None
    if not isinstance(host, str) or not host or host == socket.gethostname():
        return ""
    return (f" on {host}, as its summary says: this host cannot see that process, so a run killed there also "
            "reads 'running'; `bench status` on the grid folder asks Slurm where it can")


def _read_optional(path: Path) -> tuple[Any, str | None]:
    if not path.exists():
        return None, None
    try:
        value = read_json(path)
    except (OSError, ValueError) as exc:  # ValueError: bad JSON and bytes that are not UTF-8 alike
        return None, f"{path.name} unreadable: {exc}"
    if not isinstance(value, dict):  # valid JSON, but no record: say so, not a bare 'unreadable:'
        return None, f"{path.name} unreadable: it holds a JSON {type(value).__name__}, not an object"
    return value, None


def read_run(path: Path, root: Path) -> RunRecord:
    """Read one run folder; unreadable files make an 'unreadable' run, never an exception."""
    problems: list[str] = []
    summary, err = _read_optional(path / "summary.json")
    if err or (summary is not None and "status" not in summary):
        problems.append(err or "summary.json unreadable: it records no status")
    config, err = _read_optional(path / "config.json")
    if err:
        problems.append(err)
    if config is None:
        config, _ = _read_optional(path / "config.request.json")
        trained = isinstance(summary, dict) and summary.get("status") != "skipped"
        if config is None and not err and trained:  # numbers with no settings: the defaults would stand in
            problems.append("config.json missing: the run's settings are unknown")
    env, err = _read_optional(path / "env.json")
    if err:
        problems.append(err)
    cell, err = _read_optional(path / "cell.json")
    if err:
        problems.append(err)
    summary = summary if isinstance(summary, dict) else {}
    config = config if isinstance(config, dict) else {}
    env = env if isinstance(env, dict) else {}
    cell = cell if isinstance(cell, dict) else {}
    try:
        raw, bad_lines = read_jsonl_checked(path / "epochs.jsonl")
    except OSError as exc:
        raw, bad_lines = [], []
        problems.append(f"epochs.jsonl unreadable: {exc}")
    done = summary.get("epochs_completed")  # what the run says it trained: rows short of it are missing too
    epochs, damage = _clean_epochs(raw, bad_lines, done if isinstance(done, int) and not isinstance(done, bool) else 0)
    copies = summary.get("copies") if isinstance(summary.get("copies"), dict) else None
    if copies is None:
        c, _ = _read_optional(path / "copies.json")
        copies = c if isinstance(c, dict) and c else None
    status = str(summary.get("status", "unreadable")) if summary else "unreadable"
    if status == "running" and (interrupted_why(summary) or writer_alive(summary.get("writer")) is False):
        # `bench status`'s rule: the process the summary names ran on this host and has ended (or the run
        # recorded why it was interrupted), so nothing is running; the run stays resumable
        status = "stopped"
    error = summary.get("error")
    if problems and status != "failed":
        status, error = "unreadable", "; ".join(problems)
    setting = setting_from(config, cell.get("factors"))
    try:
        rel = str(path.relative_to(root))
    except ValueError:
        rel = str(path)
    if cell.get("cell"):
        cell_name = str(cell["cell"])
    else:
        # A folder from plain `bench train`: the setting names the cell, so seeds of one setting are repeats.
        cell_name = f"{setting.label()} [{_context_of(config, setting)}]"
    return RunRecord(
        path=path,
        rel=rel if rel != "." else path.name,
        status=status,
        error=str(error) if error else None,
        reason=str(summary.get("reason")) if summary.get("reason") else None,
        config=config,
        env=env,
        summary=summary,
        epochs=epochs,
        cell=cell,
        copies=copies,
        setting=setting,
        context=_context_of(config, setting),
        fingerprint=str(env.get("fingerprint") or ""),
        grid=str(cell.get("grid") or ""),
        cell_name=cell_name,
        repeat=int(cell.get("repeat", 0) or 0),
        label=str(cell.get("label") or setting.label()),
        damage=damage,
        launches=_launches(path),
    )


def _launches(path: Path) -> list[dict[str, Any]]:
    try:
        return read_jsonl_checked(path / LAUNCHES)[0]
    except OSError:  # a record for the wall-time table only: never a reason to mark the run unreadable
        return []


def _clean_epochs(
    raw: list[dict[str, Any]], bad_lines: list[int], recorded: int = 0
) -> tuple[list[dict[str, Any]], str | None]:
    """Every valid epoch row once, in epoch order, and what was wrong with the file (None when nothing).

    Damage is flagged, never hidden: lines that are not a row (garbage, a torn line), epochs recorded
    twice (the last record of an epoch is kept: a resume rewrites rows past its checkpoint), and epoch
    numbers missing up to the last row or the `recorded` epochs the summary counts (a file cut short, or
    gone), whichever is more.
    """
    by_epoch: dict[int, dict[str, Any]] = {}
    dup: list[int] = []
    loose: list[dict[str, Any]] = []
    for row in raw:
        e = row.get("epoch")
        if not isinstance(e, int) or isinstance(e, bool):
            loose.append(row)
            continue
        if e in by_epoch:
            dup.append(e)
        by_epoch[e] = row
    epochs = [by_epoch[e] for e in sorted(by_epoch)] + loose
    gaps = [e for e in range(1, max([recorded, *by_epoch]) + 1) if e not in by_epoch]
    parts = []
    if bad_lines:
        parts.append(f"{len(bad_lines)} unreadable line{'s' if len(bad_lines) > 1 else ''} "
                     f"(line {', '.join(map(str, bad_lines[:5]))})")
    if dup:
        parts.append(f"epoch{'s' if len(set(dup)) > 1 else ''} {', '.join(map(str, sorted(set(dup))[:5]))} "
                     "recorded twice")
    if gaps:
        parts.append(f"epoch{'s' if len(gaps) > 1 else ''} {', '.join(map(str, gaps[:5]))} missing")
    return epochs, ("epochs.jsonl damaged: " + "; ".join(parts)) if parts else None


def find_run_dirs(results_dir: Path) -> list[Path]:
    """Every folder under `results_dir` (itself included) that holds a summary.json, sorted."""
    return sorted({p.parent for p in results_dir.rglob("summary.json") if p.is_file()})


def not_started(results_dir: str | Path) -> list[dict[str, Any]]:
    """Cells that a grid.json under `results_dir` lists but whose folder holds no summary.json: never started.

    One dict per such cell: grid, cell, repeat, path (relative to `results_dir`); an unreadable grid.json
    lists none (`bench status` reports it).
    """
    root = Path(results_dir)
    out = []
    for grid_json in sorted(root.rglob("grid.json")):
        try:
            grid = read_json(grid_json)
        except (OSError, ValueError):  # bad JSON or not UTF-8
            continue
        cells = grid.get("cells") if isinstance(grid, dict) else None
        for c in cells if isinstance(cells, list) else []:
            folder = c.get("folder") if isinstance(c, dict) else None
            if not isinstance(folder, str) or (grid_json.parent / folder / "summary.json").is_file():
                continue
            out.append({"grid": str(c.get("grid") or grid.get("grid") or ""), "cell": str(c.get("cell") or folder),
                        "repeat": int(c.get("repeat", 0) or 0),
                        "path": str((grid_json.parent / folder).relative_to(root))})
    return out


def load_runs(results_dir: str | Path) -> list[RunRecord]:
    """Read every run folder under `results_dir`; UserError if there is none (naming the fix)."""
    root = Path(results_dir)
    if not root.exists():
        raise UserError(
            f"results folder {root} does not exist; run `bench run --grid smoke --out {root}` first "
            "or pass the folder that holds your run folders."
        )
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; pass the folder that holds your run folders.")
    dirs = find_run_dirs(root)
    if not dirs:
        raise UserError(
            f"no run folders (folders with summary.json) under {root}; run `bench run --grid smoke --out {root}` "
            "first or pass the folder that holds your run folders."
        )
    runs = [read_run(d, root) for d in dirs]
    _attribute_missing_env(runs)
    return runs


def _attribute_missing_env(runs: list[RunRecord]) -> None:
    """A run without env.json belongs to its grid's machine only if it never ran an epoch (skipped, not started).

    Such a run has no numbers, only a status row to place, so its grid's machine (or the folder's only one)
    is safe. A run with epochs but no env.json may have run anywhere: it goes under `UNKNOWN_ENV`, never in
    a ratio with a known machine's runs, and its cells say so in their status.
    """
    by_grid: dict[str, set[str]] = {}
    for r in runs:
        if r.fingerprint:
            by_grid.setdefault(r.grid, set()).add(r.fingerprint)
    every = {fp for fps in by_grid.values() for fp in fps}
    for r in runs:
        if r.fingerprint:
            continue
        fps = (by_grid.get(r.grid) or every) if not r.epochs else set()
        r.fingerprint = next(iter(fps)) if len(fps) == 1 else UNKNOWN_ENV
