"""`bench report`: the paper's tables and figures re-measured from run folders, beside its numbers.

Reads run folders only (config.json, env.json, epochs.jsonl, summary.json,
cell.json, copies.json); never trains and never imports the trainer. Writes,
into a fresh report folder:

    report.md                 everything below, embedded, with the environments in a header
    tables/<key>.md, .csv     one per table (CSV: numeric, every environment, units in column names)
    figures/<key>-<env>.png   seaborn plots, ours beside the paper's numbers

Runs from different machines (env.json 'fingerprint') are never mixed in one
ratio: each environment gets its own section. Tables whose cells were not run
are listed with the grids that would fill them.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import typer

from bench.paper import PAPER_JSON, load_paper
from bench.report_format import md_table
from bench.report_load import UNKNOWN_ENV, CellRuns, RunRecord, group_cells, load_runs, setting_from
from bench.report_tables import BUILDERS, TABLE_NEEDS, EnvView, Options, Table, table_filled_by
from ddnet.errors import UserError

DEFAULT_RESULTS = Path("results/runs")

# Which grids fill which table when the grid registry cannot be expanded (kept in step with ablations/).
_STATIC_FILLS = {
    "table1": ["table1", "full"],
    "table2": ["table2", "full", "smoke"],
    "fig4ab": ["table1", "table2", "fig4c", "full", "smoke"],
    "fig4c": ["fig4c", "table2", "full", "smoke"],
    "fig8a": ["fig8a", "full", "smoke"],
    "fig8b": ["fig8b", "full", "smoke"],
    "fig9a": ["fig9"],
    "fig9b": ["fig8a", "full", "smoke"],
    "memory": ["fig8a", "full", "smoke"],
}

TITLES = {
    "table1": "Table 1 analogue",
    "table2": "Table 2 analogue",
    "fig4ab": "Fig. 4(a,b) analogue",
    "fig4c": "Fig. 4(c) analogue",
    "fig8a": "Fig. 8(a) analogue",
    "fig8b": "Fig. 8(b) analogue",
    "fig9a": "Fig. 9(a) analogue",
    "fig9b": "Fig. 9(b) analogue",
    "memory": "Peak memory per precision",
    "ttq": "Time to quality",
    "sparsity": "Sparsity",
}


@dataclass
class Environment:
    """One machine+software fingerprint and the cells measured on it."""

    fingerprint: str
    label: str
    """Short name used in tables and file names: env1, env2, ..."""
    runs: list[RunRecord]
    cells: list[CellRuns]
    tables: list[Table] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Tables or plots that failed to render, with the error (shown in the report, never silently dropped)."""

    def describe(self) -> dict[str, Any]:
        """GPU/CPU, driver, CUDA, cuDNN, torch, python, host, commits (dirty flags) of its runs."""
        envs = [r.env for r in self.runs if r.env]
        e = envs[0] if envs else {}
        gpus = e.get("gpu_models") or []
        device = sorted({str(r.env.get("device") or r.summary.get("device") or "") for r in self.runs} - {""})
        commits = sorted({
            f"{str(x.get('git_commit'))[:10]}{' (dirty)' if x.get('git_dirty') else ''}"
            for x in envs if x.get("git_commit")
        })
        return {
            "env": self.label,
            "fingerprint": self.fingerprint,
            "device": ", ".join(device) or "—",
            "GPU": ", ".join(gpus) if gpus else "none",
            "driver": e.get("gpu_driver") or "—",
            "CUDA": e.get("cuda_version") or "—",
            "cuDNN": e.get("cudnn_version") or "—",
            "torch": e.get("torch_version") or "—",
            "python": e.get("python_version") or "—",
            "CPU": e.get("cpu_model") or "—",
            "host": ", ".join(sorted({str(x.get("hostname")) for x in envs if x.get("hostname")})) or "—",
            "commit": ", ".join(commits) or "—",
            "dirty": any(bool(x.get("git_dirty")) for x in envs),
            "runs": len(self.runs),
        }


@dataclass
class Report:
    """What `make_report` produced."""

    out: Path
    report_md: Path
    environments: list[Environment]
    not_run: dict[str, list[str]]
    """Table key -> grids that would fill it, for tables no environment filled."""
    files: list[Path]

    def table(self, key: str, env: str | None = None) -> Table | None:
        """The table `key` of environment label `env` (default: the first environment that has it)."""
        for e in self.environments:
            if env is None or e.label == env:
                for t in e.tables:
                    if t.key == key:
                        return t
        return None


def _prepare_out(out: Path, force: bool) -> None:
    """Create an empty report folder; refuse to clobber one unless --force, and never delete non-reports."""
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
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _environments(runs: list[RunRecord], cells: list[CellRuns]) -> list[Environment]:
    fps = sorted({r.fingerprint for r in runs}, key=lambda f: (f == UNKNOWN_ENV, f))
    return [
        Environment(fp, f"env{i}", [r for r in runs if r.fingerprint == fp], [c for c in cells if c.fingerprint == fp])
        for i, fp in enumerate(fps, start=1)
    ]


def grid_fills() -> dict[str, list[str]]:
    """Table key -> names of the shipped grids whose cells would fill it (derived from the cells' settings)."""
    try:
        from bench.grids import registry

        reg = registry()
        out: dict[str, list[str]] = {k: [] for k in TABLE_NEEDS}
        for name, grid in reg.items():
            cells = grid.cells()
            items = [(setting_from(c.config.to_dict(), c.factors), int(c.config.profile_steps)) for c in cells]
            for key in TABLE_NEEDS:
                if table_filled_by(key, items):
                    out[key].append(name)
        # The grid named after the table first, then the factorials, then the rest.
        rank = lambda key, g: (not key.startswith(g), g != "full", g != "smoke", g)  # noqa: E731
        return {k: sorted(v, key=lambda g, k=k: rank(k, g)) for k, v in out.items()}
    except Exception:  # the registry is a convenience here; fall back to the known mapping
        return {k: list(v) for k, v in _STATIC_FILLS.items()}


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(list(rows)).to_csv(path, index=False)
    return path


def _status_rows(envs: list[Environment]) -> list[dict[str, Any]]:
    rows = []
    for e in envs:
        for r in sorted(e.runs, key=lambda r: (r.grid, r.cell_name, r.repeat, r.rel)):
            rows.append({
                "env": e.label, "grid": r.grid or "-", "cell": r.cell_name, "repeat": r.repeat, "status": r.status,
                "epochs_done": len(r.epochs), "epochs": r.setting.epochs,
                "message": r.status_text() if r.status != "ok" else "", "path": r.rel,
            })
    return rows


_RAW_FIELDS = ("epoch", "phase", "warmup", "time_s", "capture_time_s", "prune_time_s", "val_time_s",
               "images_per_s", "step_time_ms_p50", "step_time_ms_p90", "train_loss", "val_loss", "loss_change",
               "val_ms_ssim", "val_ms_ssim_std", "val_psnr", "sparsity", "lr")


def _raw_epoch_rows(envs: list[Environment]) -> list[dict[str, Any]]:
    rows = []
    for e in envs:
        for r in sorted(e.runs, key=lambda r: (r.grid, r.cell_name, r.repeat, r.rel)):
            for row in r.epochs:
                rows.append({"env": e.label, "fingerprint": e.fingerprint, "grid": r.grid or "-",
                             "cell": r.cell_name, "repeat": r.repeat, "run": r.rel, "status": r.status,
                             **{k: row.get(k) for k in _RAW_FIELDS}})
    return rows


def _how_to_read(opts: Options) -> list[str]:
    return [
        "Speedup = training-time estimate of the baseline / the same of the cell. The estimate is, per phase "
        "(dense, sparse), the number of epochs times the median of that phase's non-warm-up epoch times "
        "(`time_s`); for a model without a sparse phase this is the ratio of median epoch times.",
        "[lo, hi] is a seeded bootstrap 95% interval (`--n-boot`, `--seed`): over finished repeats when both arms "
        "have at least two, otherwise over non-warm-up epochs within each phase. An interval containing 1.0 is "
        "printed as 'no measurable change', not as a win; '(no CI)' means an arm had fewer than two samples.",
        "'speedup, total time' uses total_time_s (epochs + graph capture + pruning + DoLL staging), the measure "
        "the paper quotes; it has an interval only with two or more repeats per arm.",
        "Baselines: the dense fp32/host-loader/eager cell of the same grid, data, net, epochs and batch size, "
        "on the same machine (env fingerprint). Fig. 8's 'vs same model' compares with the same sparsity and "
        "schedule with every architecture-aware optimization off.",
        "MS-SSIM is the final epoch's validation mean ± std over slices (percent), median over repeats; "
        "'drop' is baseline minus cell in percentage points and relative to the baseline.",
        f"Time to quality: first epoch whose validation MS-SSIM reaches the target (default: the dense fp32 "
        f"baseline's final value minus {opts.tolerance_pp:g} pp), time summed up to it.",
        "Paper columns quote Chaturvedi, Cao, Feng (A100, 512x512 chest CT, 50 epochs); small synthetic runs "
        "on other hardware are not expected to match them, the columns are there to compare shapes and ratios.",
    ]


def make_report(
    results_dir: str | Path = DEFAULT_RESULTS,
    out: str | Path | None = None,
    force: bool = False,
    opts: Options | None = None,
) -> Report:
    """Read every run folder under `results_dir` and write the report into `out` (default results_dir/report)."""
    # seaborn/matplotlib load only when plotting: every `bench` process (one per grid cell) imports this module
    from bench.report_plots import plot_table

    opts = opts or Options()
    if opts.tolerance_pp < 0:
        raise UserError(f"--tolerance {opts.tolerance_pp} must be >= 0 percentage points.")
    if opts.n_boot < 100:
        raise UserError(f"--n-boot {opts.n_boot} is too few for a 95% interval; use at least 100.")
    results_dir = Path(results_dir)
    runs = load_runs(results_dir)
    paper = load_paper()
    out = Path(out) if out is not None else results_dir / "report"
    _prepare_out(out, force)
    tables_dir, figs_dir = out / "tables", out / "figures"
    files: list[Path] = []

    envs = _environments(runs, group_cells(runs))
    for e in envs:
        view = EnvView(e.fingerprint, e.label, e.cells, opts, paper)
        for key, builder in BUILDERS:
            # One table that cannot be rendered (odd data, a bug) must not cost the whole report: say so in it.
            try:
                t = builder(view)
            except Exception as exc:  # noqa: BLE001
                e.problems.append(f"{TITLES.get(key, key)}: could not be rendered ({type(exc).__name__}: {exc})")
                continue
            if t is None:
                continue
            suffix = f"-{e.label}" if len(envs) > 1 else ""
            try:
                png = plot_table(t, figs_dir / f"{key}{suffix}.png")
            except Exception as exc:  # noqa: BLE001
                e.problems.append(f"{t.title}: plot could not be drawn ({type(exc).__name__}: {exc})")
                png = None
            if png is not None:
                t.plots.append(png)
                files.append(png)
            e.tables.append(t)
        for msg in e.problems:
            print(f"warning: {msg}", file=sys.stderr)

    # CSV: one file per table across environments (the 'env' and 'fingerprint' columns tell them apart).
    keys = [k for k, _ in BUILDERS]
    for key in keys:
        per_env = [(e, t) for e in envs for t in e.tables if t.key == key]
        if not per_env:
            continue
        files.append(_write_csv(tables_dir / f"{key}.csv", [r for _, t in per_env for r in t.csv_rows]))
        for extra in {n for _, t in per_env for n in t.extra_csv}:
            files.append(_write_csv(tables_dir / f"{extra}.csv", [r for _, t in per_env for r in t.extra_csv.get(extra, [])]))
        text = []
        for e, t in per_env:
            text.append(f"### {t.title}" + (f" — {e.label}" if len(envs) > 1 else "") + "\n")
            text.append(md_table(t.md_rows, t.md_columns))
            text.append(_bullets(t.notes))
            for p in t.plots:
                text.append(f"\n![{t.title}]({p.relative_to(out).as_posix()})\n")
        # The per-table Markdown sits in tables/, so its image links climb one level.
        (tables_dir / f"{key}.md").write_text("\n".join(text).replace("](figures/", "](../figures/"))
        files.append(tables_dir / f"{key}.md")

    # Raw per-epoch values of every run: the medians above can always be re-derived from these.
    files.append(_write_csv(tables_dir / "epochs_raw.csv", _raw_epoch_rows(envs)))
    status = _status_rows(envs)
    files.append(_write_csv(tables_dir / "status.csv", status))
    env_rows = [e.describe() for e in envs]
    files.append(_write_csv(tables_dir / "environments.csv", env_rows))

    filled = {t.key for e in envs for t in e.tables}
    fills = grid_fills() if any(k not in filled for k in TABLE_NEEDS) else {}
    not_run = {k: fills.get(k, []) for k in TABLE_NEEDS if k not in filled}

    report_md = out / "report.md"
    report_md.write_text(_render(results_dir, runs, envs, env_rows, status, not_run, paper, opts))
    files.append(report_md)
    return Report(out, report_md, envs, not_run, files)


def _render(results_dir: Path, runs: list[RunRecord], envs: list[Environment], env_rows: list[dict[str, Any]],
            status: list[dict[str, Any]], not_run: dict[str, list[str]], paper: dict[str, Any], opts: Options) -> str:
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    n_cells = sum(len(e.cells) for e in envs)
    lines = [
        "# DDNet benchmark report\n",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime())} by `bench report` from `{results_dir}`: "
        f"{len(runs)} run folder(s), {n_cells} cell(s), {len(envs)} environment(s). "
        f"Paper numbers: `{PAPER_JSON.relative_to(PAPER_JSON.parents[2]).as_posix()}` (each with its source).\n",
        "## Environments\n",
        md_table(env_rows),
    ]
    if len(envs) > 1:
        lines.append("Runs from different environments are never compared in one ratio; each has its own section.\n")
    if any(e.fingerprint == UNKNOWN_ENV for e in envs):
        lines.append(f"`{UNKNOWN_ENV}`: runs without env.json that could not be attributed to a machine.\n")
    lines.append("## Run status\n")
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".\n")
    bad = [r for r in status if r["status"] != "ok"]
    if bad:
        lines.append("Runs that did not finish (partial runs are shown as such; failed and skipped cells have no "
                     "numbers in the tables below):\n")
        lines.append(md_table(bad, ["env", "grid", "cell", "repeat", "status", "epochs_done", "epochs", "message",
                                    "path"]))
    lines.append("All runs: `tables/status.csv`; every epoch of every run: `tables/epochs_raw.csv`.\n")
    lines.append("## How to read the tables\n")
    lines.append(_bullets(_how_to_read(opts)))
    for e in envs:
        d = e.describe()
        lines.append(f"## Results on {e.label}: {d['GPU'] if d['GPU'] != 'none' else d['CPU']} "
                     f"(torch {d['torch']}, fingerprint `{e.fingerprint}`)\n")
        if not e.tables:
            lines.append("_No table could be filled from these runs._\n")
        if e.problems:
            lines.append("**Rendering problems** (please report them):\n")
            lines.append(_bullets(e.problems))
        for t in e.tables:
            lines.append(f"### {t.title}\n")
            lines.append(md_table(t.md_rows, t.md_columns))
            files_note = f"Numbers: `tables/{t.key}.csv`" + "".join(f", `tables/{x}.csv`" for x in t.extra_csv) + "."
            lines.append(_bullets([*t.notes, files_note]))
            for p in t.plots:
                lines.append(f"\n![{t.title}]({p.relative_to(p.parents[1]).as_posix()})\n")
    if not_run:
        lines.append("## Not run\n")
        items = []
        for key, grids in not_run.items():
            need = TABLE_NEEDS[key][0]
            how = (" or ".join(f"`bench run --grid {g}`" for g in grids)) if grids else "a grid with such cells"
            items.append(f"{TITLES[key]}: not run (needs {need}); fill it with {how}.")
        lines.append(_bullets(items))
    lines.append("## Paper sources\n")
    lines.append(_bullets([f"**{k}**: {paper[k]['source']}"
                           for k in ("table1", "table2", "reference", "fig8", "fig9a", "fig9b", "fig4")]))
    return "\n".join(lines)


def _bullets(items: Sequence[str]) -> str:
    """A Markdown list, one line per item, ending with a newline (a blank line follows in the join)."""
    return "".join(f"- {x}\n" for x in items)


def report_cmd(
    results_dir: Path = typer.Argument(DEFAULT_RESULTS, help="Folder searched recursively for run folders (summary.json)."),
    out: Path | None = typer.Option(None, "--out", help="Report folder (default: RESULTS_DIR/report)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing report folder."),
    tolerance: float = typer.Option(0.5, "--tolerance", help="Time to quality: target = dense baseline MS-SSIM minus this (pp)."),
    target: float | None = typer.Option(None, "--target", help="Time to quality: absolute MS-SSIM target in percent."),
    n_boot: int = typer.Option(2000, "--n-boot", help="Bootstrap resamples per interval."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
) -> None:
    """Tables (Markdown, CSV) and plots of the paper's tables and figures, re-measured, beside its numbers."""
    rep = make_report(results_dir, out, force, Options(tolerance_pp=tolerance, target_pct=target, n_boot=n_boot,
                                                       seed=seed))
    n_tables = sum(len(e.tables) for e in rep.environments)
    n_plots = sum(len(t.plots) for e in rep.environments for t in e.tables)
    typer.echo(f"report: {rep.report_md} ({n_tables} tables, {n_plots} plots, {len(rep.environments)} environment(s))")
    if rep.not_run:
        typer.echo(f"not run: {', '.join(rep.not_run)}")
