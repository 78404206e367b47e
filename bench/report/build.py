"""Making a report: read the run folders, build every registered artifact per environment, write the files.

Writes, into a fresh report folder (made aside and renamed into place when complete, so a failure
leaves the earlier report, if any, as it was):

    report.md                 everything below, embedded, with the environments in a header
    tables/<key>.md, .csv     one per artifact (CSV: numeric, every environment, units in column names)
    tables/epochs_raw.csv     every epoch of every run; status.csv, environments.csv
    figures/<key>[-<env>].png seaborn plots, ours beside the paper's numbers

Runs from different machines (env.json 'fingerprint') are never mixed in one
ratio: each environment gets its own section. Artifacts whose cells were not
run are listed with the grids that would fill them.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import psutil

from bench.grids import registry
from bench.paper import load_paper
from bench.report.artifact import Table
from bench.report.artifacts import ARTIFACTS
from bench.report.cells import group_cells
from bench.report.environments import Environment, environments
from bench.report.envview import EnvView
from bench.report.format import is_num
from bench.report.markdown import render, table_file
from bench.report.options import DEFAULT_RESULTS, Options, check_target
from bench.report.plotting import draw
from bench.report.runs import NO_ENV_NOTE, UNKNOWN_ENV, RunRecord, load_runs, not_started
from bench.report.setting import setting_from
from ddnet.errors import UserError, make_folder, out_of_space

NOT_STARTED = "not started"
"""The status of a cell its grid.json lists that has no run folder yet."""


@dataclass
class Report:
    """What `make_report` produced."""

    out: Path
    report_md: Path
    environments: list[Environment]
    not_run: dict[str, list[str]]
    """Table key -> grids that would fill it, for tables no environment filled and none failed to render."""
    files: list[Path]
    failed: dict[str, list[str]] = field(default_factory=dict)
    """Table key -> environments where its cells are there but the table could not be rendered."""

    def table(self, key: str, env: str | None = None) -> Table | None:
        """The table `key` of environment label `env` (default: the first environment that has it)."""
        for e in self.environments:
            if env is None or e.label == env:
                for t in e.tables:
                    if t.key == key:
                        return t
        return None


def _check_out(out: Path, force: bool) -> None:
    """Refuse an --out that is a file, an earlier report without --force, or a folder that is not a report."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} is a file; choose a folder for the report.")
        if any(out.iterdir()):
            if not force:
                raise UserError(f"report folder {out} already exists; pass --force to replace it or choose another --out.")
            if not (out / "report.md").exists() or any(out.rglob("summary.json")):
                raise UserError(
                    f"{out} is not a report folder (no report.md, or it holds run folders); "
                    "refusing to delete it even with --force: choose another --out."
                )


def _drop_stale(out: Path) -> None:
    """Remove what a killed `bench report` left beside `out` (`.<name>.tmp-<pid>`, `.<name>.old-<pid>`)."""
    for path in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = path.name[len(out.name) + 2:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _swap_in(work: Path, out: Path) -> None:
    """Put the finished report `work` at `out`, replacing the one there (checked by `_check_out`)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        work.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)  # the earlier report back where it was
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], ints: Sequence[str] = ()) -> Path:
    """`rows` as a CSV; the columns `ints` as integers with blanks (not 6.0 where a row has none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(list(rows))
    df = df.astype({k: "Int64" for k in ints if k in df})
    df.to_csv(path, index=False)
    return path


def _status_rows(envs: list[Environment], unstarted: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """One row per run, then one per cell a grid.json lists that has no run folder yet (`not_started`), placed
    on the machine of its grid's other runs when they ran on one."""
    rows = []
    for e in envs:
        for r in sorted(e.runs, key=lambda r: (r.grid, r.cell_name, r.repeat, r.rel)):
            rows.append({
                "env": e.label, "grid": r.grid or "-", "cell": r.cell_name, "repeat": r.repeat, "status": r.status,
                "epochs_done": len(r.epochs), "epochs": r.setting.epochs,
                "message": "; ".join(m for m in (r.status_text() if r.status != "ok" or r.damage else "",
                                                 NO_ENV_NOTE if r.fingerprint == UNKNOWN_ENV else "") if m),
                "damage": r.damage or "",
                "path": r.rel,
            })
    for c in unstarted:
        labels = sorted({e.label for e in envs for r in e.runs if r.grid == c["grid"]})
        rows.append({"env": labels[0] if len(labels) == 1 else "—", "grid": c["grid"] or "-", "cell": c["cell"],
                     "repeat": c["repeat"], "status": NOT_STARTED, "epochs_done": 0, "epochs": None,
                     "message": "listed in grid.json, no run folder with summary.json yet: `bench run` starts it",
                     "damage": "", "path": c["path"]})
    return rows

_RAW_FIELDS = ("epoch", "phase", "warmup", "time_s", "time_s_invalid", "capture_time_s", "prune_time_s", "val_time_s",
               "images_per_s", "step_time_ms_p50", "step_time_ms_p90", "train_loss", "val_loss", "loss_change",
               "val_ms_ssim", "val_ms_ssim_std", "val_ms_ssim_paper_code", "val_ms_ssim_paper_code_std", "val_psnr",
               "sparsity", "lr")


def drop_bad_times(runs: list[RunRecord]) -> list[str]:
    """Take out every epoch time_s <= 0 (a clock that went wrong) and flag its run; one warning per run.

    Only the time goes: the row keeps its validation and its place in the phase's epoch count, and the
    value read is kept as `time_s_invalid`. One such epoch used to cost whole tables (the interval is
    on log times) and every valid row in them.
    """
    warnings = []
    for r in runs:
        bad = [row for row in r.epochs if is_num(row.get("time_s")) and row["time_s"] <= 0]
        if not bad:
            continue
        for row in bad:
            row["time_s_invalid"], row["time_s"] = row["time_s"], None
        what = (f"epoch{'s' if len(bad) > 1 else ''} "
                + ", ".join(f"{row.get('epoch', '?')} (time_s {row['time_s_invalid']:g})" for row in bad)
                + " not > 0: left out of the times")
        r.damage = f"{r.damage}; {what}" if r.damage else f"epochs.jsonl damaged: {what}"
        warnings.append(f"{r.rel}: {what}")
    return warnings


def _raw_epoch_rows(envs: list[Environment]) -> list[dict[str, Any]]:
    rows = []
    for e in envs:
        for r in sorted(e.runs, key=lambda r: (r.grid, r.cell_name, r.repeat, r.rel)):
            for row in r.epochs:
                rows.append({"env": e.label, "fingerprint": e.fingerprint, "grid": r.grid or "-",
                             "cell": r.cell_name, "repeat": r.repeat, "run": r.rel, "status": r.status,
                             **{k: row.get(k) for k in _RAW_FIELDS}})
    return rows


def grid_fills() -> dict[str, list[str]]:
    """Artifact key -> names of the shipped grids whose cells would fill it (derived from the cells' settings)."""
    needy = [a for a in ARTIFACTS.values() if a.needs is not None]
    try:
        reg = registry()
        out: dict[str, list[str]] = {a.key: [] for a in needy}
        for name, grid in reg.items():
            cells = grid.cells()
            items = [(setting_from(c.config.to_dict(), c.factors), int(c.config.profile_steps)) for c in cells]
            for a in needy:
                if a.needs is not None and a.needs.filled_by(items):
                    out[a.key].append(name)
        # The grid named after the table first, then the factorials, then the rest.
        rank = lambda key, g: (not key.startswith(g), g != "full", g != "smoke", g)  # noqa: E731
        return {k: sorted(v, key=lambda g, k=k: rank(k, g)) for k, v in out.items()}
    except Exception:  # the registry is a convenience here; fall back to the grids each artifact names
        return {a.key: list(a.fills) for a in needy}


def make_report(
    results_dir: str | Path = DEFAULT_RESULTS,
    out: str | Path | None = None,
    force: bool = False,
    opts: Options | None = None,
) -> Report:
    """Read every run folder under `results_dir` and write the report into `out` (default results_dir/report)."""
    opts = opts or Options()
    if not 0.0 <= opts.tolerance_pp < math.inf:  # NaN fails both: it made every target NaN, 'never reached'
        raise UserError(f"--tolerance {opts.tolerance_pp} must be a finite number >= 0 percentage points, "
                        "e.g. --tolerance 0.5.")
    if opts.target_pct is not None:
        check_target(opts.target_pct)
    results_dir = Path(results_dir)
    runs = load_runs(results_dir)
    paper = load_paper()
    out = Path(out) if out is not None else results_dir / "report"
    _check_out(out, force)
    # written aside and renamed into place when complete: a failure (a full disk, a crash) leaves the earlier
    # report as it was and no half-written one, so the same command can simply be run again
    make_folder(out.parent, "pass a writable --out folder for the report.")
    _drop_stale(out)
    work = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    make_folder(work, "pass a writable --out folder for the report.")
    try:
        rep = _write(results_dir, runs, paper, opts, work)
        _swap_in(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    def moved(path: Path) -> Path:
        return out / path.relative_to(work)

    for e in rep.environments:
        for t in e.tables:
            t.plots = [moved(p) for p in t.plots]
    return replace(rep, out=out, report_md=moved(rep.report_md), files=[moved(f) for f in rep.files])


def _write(results_dir: Path, runs: list[RunRecord], paper: dict[str, Any], opts: Options, out: Path) -> Report:
    """Every table, figure and report.md of `runs` into the empty folder `out`."""
    tables_dir, figs_dir = out / "tables", out / "figures"
    files: list[Path] = []

    for msg in drop_bad_times(runs):
        print(f"warning: {msg}", file=sys.stderr)
    envs = environments(runs, group_cells(runs))
    failed: dict[str, list[str]] = {}
    for e in envs:
        view = EnvView(e.fingerprint, e.label, e.cells, opts, paper)
        for art in ARTIFACTS.values():
            # One table that cannot be rendered (odd data, a bug) must not cost the whole report: say so in it.
            try:
                t = art.build(view)
            except Exception as exc:  # noqa: BLE001
                e.problems.append(f"{art.title}: could not be rendered ({type(exc).__name__}: {exc})")
                failed.setdefault(art.key, []).append(e.label)
                continue
            if t is None:
                continue
            suffix = f"-{e.label}" if len(envs) > 1 else ""
            try:
                png = draw(art.plot, t, figs_dir / f"{art.key}{suffix}.png")
            except Exception as exc:  # noqa: BLE001
                if out_of_space(exc):  # not this plot's problem: every later file would fail alike
                    raise
                e.problems.append(f"{t.title}: plot could not be drawn ({type(exc).__name__}: {exc})")
                png = None
            if png is not None:
                t.plots.append(png)
                files.append(png)
            e.tables.append(t)
        for msg in e.problems:
            print(f"warning: {msg}", file=sys.stderr)

    # CSV: one file per table across environments (the 'env' and 'fingerprint' columns tell them apart).
    for key in ARTIFACTS:
        per_env = [(e.label, t) for e in envs for t in e.tables if t.key == key]
        if not per_env:
            continue
        files.append(_write_csv(tables_dir / f"{key}.csv", [r for _, t in per_env for r in t.csv_rows]))
        for extra in {n for _, t in per_env for n in t.extra_csv}:
            files.append(_write_csv(tables_dir / f"{extra}.csv", [r for _, t in per_env for r in t.extra_csv.get(extra, [])]))
        (tables_dir / f"{key}.md").write_text(table_file(per_env, out, several_envs=len(envs) > 1))
        files.append(tables_dir / f"{key}.md")

    # Raw per-epoch values of every run: the medians above can always be re-derived from these.
    files.append(_write_csv(tables_dir / "epochs_raw.csv", _raw_epoch_rows(envs)))
    status = _status_rows(envs, not_started(results_dir))
    files.append(_write_csv(tables_dir / "status.csv", status, ints=("epochs",)))
    env_rows = [e.describe() for e in envs]
    files.append(_write_csv(tables_dir / "environments.csv", env_rows))

    filled = {t.key for e in envs for t in e.tables}
    # a table whose cells are there but that failed to render is not 'not run': running its grid won't fill it
    unfilled = [a.key for a in ARTIFACTS.values() if a.needs is not None and a.key not in filled | set(failed)]
    fills = grid_fills() if unfilled else {}
    not_run = {k: fills.get(k, []) for k in unfilled}

    report_md = out / "report.md"
    report_md.write_text(render(results_dir, runs, envs, env_rows, status, not_run, paper, opts, failed))
    files.append(report_md)
    return Report(out, report_md, envs, not_run, files, failed)
