"""Fig. 4(c) of the paper: final MS-SSIM against the dense/sparse split of the epochs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import seaborn as sns

from bench.report.artifact import Artifact, Needs, Table, register
from bench.report.cells import CellRuns
from bench.report.envview import EnvView, drop_note
from bench.report.format import fmt_drop, fmt_num, fmt_pm, is_num
from bench.report.plotting import figure, save
from bench.report.setting import Setting


def needs(s: Setting, _p: int) -> bool:
    """fp32/host/eager sparse models (at any dense/sparse split)."""
    return s.arch_off and not s.dense


def build(env: EnvView) -> Table | None:
    """Fig. 4(c): final MS-SSIM against the dense/sparse split of the epochs."""
    cells = env.select(needs)
    if not cells:
        return None
    fig4 = env.paper["fig4"]
    csv, md = [], []
    for c in sorted(cells, key=lambda c: (c.grid, c.setting.sparsity, _split(c), c.name)):
        base = env.baseline(c)
        q = env.quality_cols(c, base)
        split = _split(c)
        row = {**env.head(c), **q, "dense_epochs_run": split,
               "sparse_epochs_run": c.setting.epochs - split if is_num(split) else None,
               "dense_fraction": split / c.setting.epochs if is_num(split) else None,
               "paper_dense_epochs": fig4["hybrid_split"]["dense_epochs"],
               "paper_sparse_epochs": fig4["hybrid_split"]["sparse_epochs"],
               "paper_split_fraction": fig4["hybrid_split"]["dense_epochs"] / fig4["total_epochs"]}
        csv.append(row)
        md.append({
            "grid": row["grid"], "sparsity": f"{c.setting.sparsity} {c.setting.amount:.0%}",
            "dense + sparse epochs": f"{split} + {row['sparse_epochs_run']}" if is_num(split) else "—",
            "schedule": "auto" if c.setting.dense_epochs == "auto" else "fixed",
            "status": row["status"],
            "MS-SSIM %": fmt_pm(q["ms_ssim_pct"], q["ms_ssim_std_pct"]),
            "dense baseline %": fmt_num(q["baseline_ms_ssim_pct"], 2),
            "drop vs dense": fmt_drop(q),
        })
    notes = ["Paper (Fig. 4c): 50 epochs split into dense then sparse; 25 + 25 keeps the dense accuracy and was "
             "chosen. Here the split is shown in this run's epochs; the plot marks the paper's fraction (1/2).",
             *drop_note(csv)]
    return Table("fig4c", "Fig. 4(c) analogue: accuracy against the dense/sparse split", csv, md,
                 list(md[0].keys()), notes)


def _split(c: CellRuns) -> Any:
    """Dense epochs actually run before pruning: the fixed setting, or the median switch_epoch of 'auto'."""
    if c.setting.dense_epochs != "auto":
        return int(c.setting.dense_epochs)
    v = c.med(lambda r: r.summary.get("switch_epoch") if is_num(r.summary.get("switch_epoch")) else None)
    return int(round(v)) if v is not None else None


def _line(r: dict[str, Any], grids: bool, lengths: bool) -> str:
    """A row's line in the plot: one per sparsity, amount and pattern (and grid, run length where they vary)."""
    label = f"{r['sparsity']} {float(r['amount']):.0%}{' 2:4' if r.get('pattern') == '2:4' else ''}"
    label += f", {r['epochs']} epochs" if lengths else ""
    return f"{r['grid']}: {label}" if grids else label


BASELINE_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
"""Line styles of the dense baselines in the plot, one each (black, so they are never taken for a model's line)."""


def baseline_lines(rows: list[dict[str, Any]], grids: bool, lengths: bool) -> list[tuple[float, str, Any]]:
    """(MS-SSIM, label, line style) of each dense baseline the rows are compared with: each its own style, labelled
    with its grid and run length where those vary, and its value where two labels would read alike (other data
    or batch). Two baselines of other lengths were drawn as identical black dashed lines."""
    bases = sorted({(r["grid"], int(r["epochs"]), float(r["baseline_ms_ssim_pct"])) for r in rows
                    if is_num(r.get("baseline_ms_ssim_pct"))})
    labels = [f"dense baseline (ours{f', {g}' * grids}{f', {e} epochs' * lengths})" for g, e, _ in bases]
    out = []
    for i, ((_, _, base), label) in enumerate(zip(bases, labels, strict=True)):
        label += f": {base:.2f} %" if labels.count(label) > 1 else ""
        out.append((base, label, BASELINE_STYLES[i % len(BASELINE_STYLES)]))
    return out


def plot(table: Table, path: Path) -> Path | None:
    """Final MS-SSIM against the fraction of epochs run dense before pruning: a line per model (never an average
    of different amounts, grids or run lengths), each baseline, and the paper's split (1/2) marked."""
    rows = [r for r in table.csv_rows if is_num(r.get("ms_ssim_pct")) and is_num(r.get("dense_epochs_run"))]
    if not rows:
        return None
    grids, lengths = len({r["grid"] for r in rows}) > 1, len({r["epochs"] for r in rows}) > 1
    df = pd.DataFrame(rows)
    df["line"] = [_line(r, grids, lengths) for r in rows]
    df["dense_fraction"] = df["dense_epochs_run"] / df["epochs"]
    fig, ax = figure(7, 4.5)
    sns.lineplot(data=df.sort_values("dense_fraction"), x="dense_fraction", y="ms_ssim_pct", hue="line",
                 marker="o", ax=ax, errorbar=None, estimator=None, units="line")
    for r, x in zip(rows, df["dense_fraction"], strict=True):
        if is_num(r.get("ms_ssim_std_pct")):
            ax.errorbar(x, r["ms_ssim_pct"], yerr=r["ms_ssim_std_pct"], fmt="none", ecolor="grey", capsize=3,
                        lw=1)
    for base, label, style in baseline_lines(rows, grids, lengths):
        ax.axhline(base, color="black", ls=style, lw=1, label=label)
    ax.axvline(rows[0]["paper_split_fraction"], color="green", ls="--", lw=1, label="paper's split (25 of 50)")
    ax.set_xlabel("fraction of the epochs run dense before pruning"
                  + ("" if lengths else f" (of {rows[0]['epochs']})"))
    ax.set_ylabel("final validation MS-SSIM (%)")
    ax.legend(fontsize=7)
    ax.set_title(table.title, fontsize=10)
    return save(fig, path)


register(Artifact(
    key="fig4c",
    title="Fig. 4(c) analogue",
    build=build,
    plot=plot,
    needs=Needs("fp32/host/eager sparse models at one or more dense/sparse splits", needs),
    fills=("fig4c", "table2", "full", "smoke"),
))
