"""Table 1 of the paper: the dense model against a sparse one pruned before training, no other optimization."""

from __future__ import annotations

from pathlib import Path

from bench.paper import table1_row
from bench.report.artifact import Artifact, Needs, Table, register
from bench.report.envview import (
    OURS_OVER_PAPER_NOTE,
    EnvView,
    drop_note,
    interval_notes,
    other_model_note,
    paper_model,
    paper_vs_dense,
    ratio,
    run_size_note,
)
from bench.report.format import fmt_drop, fmt_num, fmt_pm, fmt_quality, fmt_speedup, fmt_time, is_num
from bench.report.plotting import bars_with_ci, figure, quality_bars, save
from bench.report.setting import Setting


def needs(s: Setting, _p: int) -> bool:
    """fp32/host/eager cells of the dense model or of a model pruned before training."""
    return s.arch_off and (s.dense or s.dense_epochs == 0)


def _has_sparse(settings: list[Setting]) -> bool:
    return any(not s.dense for s in settings)


def build(env: EnvView) -> Table | None:
    """Table 1: dense vs sparse from the first epoch, no other optimization."""
    cells = env.select(needs)
    # Only grids/contexts that hold a model pruned before training: their dense cell is its comparison.
    groups = {(c.grid, c.context) for c in cells if not c.setting.dense}
    cells = [c for c in cells if (c.grid, c.context) in groups]
    if not cells:
        return None
    paper = env.paper
    csv, md, pairs = [], [], []
    for c in sorted(cells, key=lambda c: (c.grid, not c.setting.dense, c.name)):
        base = env.baseline(c)
        pairs.append((c, base))
        kind = "none" if c.setting.dense else c.setting.sparsity
        p = table1_row(paper, kind) if paper_model(c.setting) else None
        row = {**env.head(c), **env.quality_cols(c, base), **env.time_cols(c, base)}
        row["paper_ms_ssim_pct"] = p["ms_ssim_pct"] if p else None
        row["paper_ms_ssim_std_pct"] = p["ms_ssim_std_pct"] if p else None
        row["paper_time_min"] = p["time_min"] if p else None
        row["paper_speedup_x"] = paper_vs_dense(paper, c.setting) if p else None
        row["speedup_total_ours_over_paper"] = ratio(row["speedup_total_x"], row["paper_speedup_x"])
        csv.append(row)
        md.append({
            "grid": row["grid"], "cell": c.name, "model": c.setting.model_label(), "status": row["status"],
            "MS-SSIM % (paper)": fmt_pm(row["paper_ms_ssim_pct"], row["paper_ms_ssim_std_pct"]),
            "MS-SSIM %, paper's scale (ours)": fmt_quality(row, "_paper_code"),
            "MS-SSIM %, standard (ours)": fmt_quality(row),
            "drop vs dense": fmt_drop(row),
            "training time (ours)": fmt_time(row["total_time_s"]),
            "training time (paper)": f"{row['paper_time_min']} min" if p else "—",
            "epoch p50": fmt_time(row["epoch_time_s_p50"]),
            "speedup, epochs (95% CI)": fmt_speedup(row),
            "speedup, total time": fmt_speedup(row, "speedup_total"),
            "speedup (paper)": fmt_num(row["paper_speedup_x"], 2, "x"),
            "ours/paper (total time)": fmt_num(row["speedup_total_ours_over_paper"], 2),
        })
    hp = paper["table1"]["hyperparameters"]
    notes = [
        "Paper: batch size 1, 50 epochs; the sparse model is 50% random, pruned before training. "
        "The paper's speedup is its 235 min / 175 min, derived here from Table 1's times.",
        OURS_OVER_PAPER_NOTE,
        *run_size_note(cells, hp["batch_size"], hp["epochs"], "Table 1"),
        *other_model_note(cells),
        *env.borrowed_note(pairs),
        *interval_notes(csv),
        *drop_note(csv),
    ]
    return Table("table1", "Table 1 analogue: dense vs sparse from the first epoch", csv, md,
                 list(md[0].keys()), notes)


def plot(table: Table, path: Path) -> Path | None:
    """Table 1: MS-SSIM (ours and paper, +- std over slices) and speedup over the dense model."""
    rows = [r for r in table.csv_rows if is_num(r.get("ms_ssim_pct"))]
    if not rows:
        return None
    fig, (a1, a2) = figure(10, 4.2, ncols=2)
    quality_bars(a1, rows, "cell")
    bars_with_ci(a2, rows, "cell", "grid", "speedup_total_x", "speedup_total_lo_x", "speedup_total_hi_x",
                 "paper_speedup_x")
    a2.axhline(1.0, color="grey", lw=1, ls="--")
    a2.set_ylabel("speedup in total training time (x)")
    a2.set_xlabel("")
    fig.suptitle(table.title, fontsize=10)
    return save(fig, path)


register(Artifact(
    key="table1",
    title="Table 1 analogue",
    build=build,
    plot=plot,
    needs=Needs("fp32/host/eager cells: the dense model and a sparse model pruned before training (dense_epochs 0)",
                needs, _has_sparse),
    fills=("table1", "full"),
))
