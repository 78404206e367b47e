"""Table 2 of the paper: the sparsity types on the hybrid schedule, speedup and accuracy drop vs the dense baseline."""

from __future__ import annotations

from pathlib import Path

from bench.paper import table2_row
from bench.report.artifact import Artifact, Needs, Table, register
from bench.report.envview import (
    OURS_OVER_PAPER_NOTE,
    EnvView,
    drop_note,
    interval_notes,
    other_model_note,
    paper_model,
    ratio,
    run_size_note,
)
from bench.report.format import fmt_drop, fmt_num, fmt_pm, fmt_quality, fmt_speedup, fmt_time, is_num
from bench.report.plotting import bars_with_ci, figure, quality_bars, save
from bench.report.setting import Setting


def needs(s: Setting, _p: int) -> bool:
    """fp32/host/eager sparse models on the hybrid schedule (dense epochs, then sparse)."""
    return s.arch_off and s.hybrid


def build(env: EnvView) -> Table | None:
    """Table 2: sparsity types on the hybrid schedule, speedup and accuracy drop vs the dense baseline."""
    cells = env.select(needs)
    if not cells:
        return None
    paper = env.paper
    csv, md, pairs = [], [], []
    for c in sorted(cells, key=lambda c: (c.grid, c.setting.sparsity, str(c.setting.dense_epochs), c.name)):
        base = env.baseline(c)
        pairs.append((c, base))
        p = table2_row(paper, c.setting.sparsity) if paper_model(c.setting) else None
        row = {**env.head(c), **env.quality_cols(c, base), **env.time_cols(c, base)}
        row["switch_epoch"] = c.med(lambda r: r.summary.get("switch_epoch"))
        row["paper_speedup_x"] = p["speedup_x"] if p else None
        row["paper_ms_ssim_pct"] = p["ms_ssim_pct"] if p else None
        row["paper_ms_ssim_std_pct"] = p["ms_ssim_std_pct"] if p else None
        row["paper_accuracy_drop_pct"] = p["accuracy_drop_pct"] if p else None
        row["speedup_total_ours_over_paper"] = ratio(row["speedup_total_x"], row["paper_speedup_x"])
        csv.append(row)
        md.append({
            "grid": row["grid"], "cell": c.name, "model": c.setting.model_label(), "status": row["status"],
            "speedup, epochs (95% CI)": fmt_speedup(row),
            "speedup, total time": fmt_speedup(row, "speedup_total"),
            "speedup (paper)": fmt_num(row["paper_speedup_x"], 2, "x"),
            "ours/paper (total time)": fmt_num(row["speedup_total_ours_over_paper"], 2),
            "MS-SSIM % (paper)": fmt_pm(row["paper_ms_ssim_pct"], row["paper_ms_ssim_std_pct"]),
            "MS-SSIM %, paper's scale (ours)": fmt_quality(row, "_paper_code"),
            "MS-SSIM %, standard (ours)": fmt_quality(row),
            "drop vs dense (ours)": fmt_drop(row),
            "% accuracy drop (paper)": fmt_num(row["paper_accuracy_drop_pct"], 2),
            "epoch p50 dense / sparse": f"{fmt_time(row['epoch_time_dense_s_p50'])} / "
                                        f"{fmt_time(row['epoch_time_sparse_s_p50'])}",
        })
    notes = [
        "Paper: 25 dense + 25 sparse epochs, 50% of conv/deconv weights pruned, batch 32; all three types 1.14x.",
        "Speedup (epochs) = (dense epochs x median dense-phase epoch + sparse epochs x median sparse-phase epoch) "
        "of the dense baseline over the same of this cell; total time includes capture, pruning and staging.",
        OURS_OVER_PAPER_NOTE,
        *run_size_note(cells, paper["reference"]["batch_size"], sum(paper["table2"]["schedule"].values()),
                       "Table 2"),
        *other_model_note(cells),
        *env.borrowed_note(pairs),
        *interval_notes(csv),
        *drop_note(csv),
    ]
    return Table("table2", "Table 2 analogue: sparsity types on the hybrid schedule", csv, md, list(md[0].keys()), notes)


def plot(table: Table, path: Path) -> Path | None:
    """Table 2: speedup (with CI) and MS-SSIM per sparsity type, paper beside."""
    rows = [r for r in table.csv_rows if is_num(r.get("speedup_x"))]
    if not rows:
        return None
    fig, (a1, a2) = figure(10, 4.2, ncols=2)
    for r in rows:
        r["type"] = f"{r['sparsity']} ({r['dense_epochs']}+{r['epochs'] - r['dense_epochs']})" \
            if is_num(r.get("dense_epochs")) else f"{r['sparsity']} (auto)"
    bars_with_ci(a1, rows, "type", "grid", "speedup_x", "speedup_lo_x", "speedup_hi_x", "paper_speedup_x")
    a1.axhline(1.0, color="grey", lw=1, ls="--")
    a1.set_ylabel("speedup over dense fp32 (x)")
    a1.set_xlabel("")
    quality_bars(a2, rows, "type")
    base = next((r["baseline_ms_ssim_pct"] for r in rows if is_num(r.get("baseline_ms_ssim_pct"))), None)
    if base is not None:
        a2.axhline(base, color="black", ls="--", lw=1, label="dense baseline (ours, standard)")
        a2.legend(fontsize=7)
    fig.suptitle(table.title, fontsize=10)
    return save(fig, path)


register(Artifact(
    key="table2",
    title="Table 2 analogue",
    build=build,
    plot=plot,
    needs=Needs("fp32/host/eager sparse models on the hybrid schedule (dense_epochs > 0)", needs),
    fills=("table2", "full", "smoke"),
))
