"""Time to quality (MLPerf-style): time to a target MS-SSIM, and the speedup in that measure."""

from __future__ import annotations

from pathlib import Path

from bench.report.artifact import Artifact, Table, register
from bench.report.envview import EnvView, paper_vs_dense, ratio
from bench.report.format import fmt_num, fmt_speedup, fmt_time, is_num
from bench.report.plotting import bars_with_ci, figure, save
from bench.stats import MIN_SAMPLES_PER_ARM, NO_INTERVAL, NO_VERDICT, classify_ratio, cover, median, ratio_ci


def build(env: EnvView) -> Table | None:
    """MLPerf-style time to a target MS-SSIM, and the speedup in that measure."""
    cells = [c for c in env.cells if c.runs]
    if not any(c.has_numbers for c in cells):
        return None
    ref = env.paper["reference"]
    csv, md = [], []
    for c in sorted(cells, key=lambda c: (c.grid, not (c.setting.dense and c.setting.arch_off), c.name)):
        target, how = env.target_for(c)
        base = env.baseline(c)
        row = {**env.head(c), "target_ms_ssim_pct": target, "target_rule": how}
        hits, n = env.ttq(c, target) if target is not None else ([], len(c.ok_runs))
        row["repeats_reached"] = len(hits)
        row["reached_epoch"] = float(median([h[0] for h in hits])) if hits else None
        row["ttq_s"] = float(median([h[1] for h in hits])) if hits else None
        bhits = env.ttq(base, target)[0] if base is not None and target is not None else []
        row["baseline_ttq_s"] = float(median([h[1] for h in bhits])) if bhits else None
        row["speedup_ttq_x"] = ratio(row["baseline_ttq_s"], row["ttq_s"])
        if base is c:
            row.update(speedup_ttq_lo_x=None, speedup_ttq_hi_x=None, speedup_ttq_verdict="baseline")
        elif len(hits) >= MIN_SAMPLES_PER_ARM and len(bhits) >= MIN_SAMPLES_PER_ARM:
            lo, hi = cover(row["speedup_ttq_x"], *ratio_ci([h[1] for h in hits], [h[1] for h in bhits])[1:])
            row.update(speedup_ttq_lo_x=lo, speedup_ttq_hi_x=hi, speedup_ttq_verdict=classify_ratio(lo, hi))
        else:
            verdict = NO_VERDICT if len(hits) > 1 and len(bhits) > 1 else NO_INTERVAL
            row.update(speedup_ttq_lo_x=None, speedup_ttq_hi_x=None, speedup_ttq_verdict=verdict)
        row["paper_speedup_x"] = paper_vs_dense(env.paper, c.setting)
        row["paper_reference_ttq_min"] = ref["time_to_target_min"] if c.setting.dense and c.setting.arch_off else None
        csv.append(row)
        if not c.has_numbers:
            reached = c.status_text()
        elif target is None:
            reached = how
        elif not hits:
            reached = f"never reached ({n} repeat{'s' if n != 1 else ''})"
        else:
            reached = f"epoch {row['reached_epoch']:g} ({len(hits)}/{n} repeats)"
        md.append({
            "grid": row["grid"], "cell": c.name, "label": c.setting.label(),
            "target %": fmt_num(target, 2), "reached": reached, "time to target": fmt_time(row["ttq_s"]),
            "speedup (95% CI)": fmt_speedup(row, "speedup_ttq"),
            "paper speedup": fmt_num(row["paper_speedup_x"], 2, "x"),
            "paper reference": f"{ref['time_to_target_min']} min to {ref['target_ms_ssim_pct']}%"
            if row["paper_reference_ttq_min"] else "—",
        })
    tgt = (f"--target {env.opts.target_pct:g}%" if env.opts.target_pct is not None
           else f"the dense fp32 baseline's final MS-SSIM minus {env.opts.tolerance_pp:g} pp (--tolerance)")
    notes = [f"Target: {tgt}. Time = staging + sum over epochs up to the first epoch at the target of "
             "(time_s + capture_time_s + prune_time_s); validation time is not counted.",
             "Paper: the dense DDNet (batch 32) took 79 min to reach MS-SSIM 97.22 (its reference time)."]
    return Table("ttq", "Time to quality (MLPerf-style)", csv, md, list(md[0].keys()), notes)


def plot(table: Table, path: Path) -> Path | None:
    """Speedup in time to the quality target, with CI where there are repeats."""
    rows = [r for r in table.csv_rows if is_num(r.get("speedup_ttq_x"))]
    if not rows:
        return None
    fig, ax = figure(9, 4.5)
    bars_with_ci(ax, rows, "cell", "grid", "speedup_ttq_x", "speedup_ttq_lo_x", "speedup_ttq_hi_x",
                 "paper_speedup_x")
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set_ylabel("speedup in time to target MS-SSIM (x)")
    ax.set_xlabel("")
    ax.set_title(f"{table.title} — diamonds: paper", fontsize=10)
    return save(fig, path)


# Any finished cell fills it (no `needs`): it is never listed as not run.
register(Artifact(key="ttq", title="Time to quality", build=build, plot=plot))
