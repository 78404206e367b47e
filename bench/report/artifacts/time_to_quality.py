"""Time to quality (MLPerf-style): time to a target MS-SSIM, and the speedup in that measure.

A run reaches the target at the first epoch from which every later validation
stays at or above it: validation MS-SSIM swings from epoch to epoch, and the
first epoch that touches the target is often a spike the run falls back from
(`RunRecord.time_to_target`; the first touch is kept in the CSV). Over repeats
the time is a median in which a repeat that did not reach and hold the target
counts as never, so a cell has a time (and a speedup) only when more than half
of its finished repeats held the target, and an interval only when every one did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.paper import table1_row
from bench.report.artifact import Artifact, Table, register
from bench.report.cells import CellRuns
from bench.report.envview import BELOW_INPUT, EnvView, other_model_note, paper_model, paper_vs_dense, ratio
from bench.report.format import fmt_num, fmt_speedup, fmt_time, is_num
from bench.report.plotting import bars_with_ci, figure, save
from bench.report.setting import Setting
from bench.stats import (
    MIN_SAMPLES_PER_ARM,
    NO_INTERVAL,
    NO_VERDICT,
    censored_median,
    classify_ratio,
    cover,
    ratio_ci,
)


def paper_never_text(paper: dict[str, Any], s: Setting) -> str:
    """The paper column of a model that never reached the paper's own target, e.g. 'paper: ended at 42.39 %,
    below its 97.22 % target': a fact about the paper's run (Table 1, batch 1), whatever this row's target."""
    return (f"paper: ended at {table1_row(paper, s.sparsity)['ms_ssim_pct']:g} %, below its "
            f"{paper['reference']['target_ms_ssim_pct']:g} % target")


@dataclass(frozen=True)
class Reach:
    """How a cell's finished repeats met a quality target: per repeat, (epoch, seconds) or None."""

    held: list[tuple[int, float] | None]
    """Where the target was reached and held to the last validation (`RunRecord.time_to_target`)."""
    touched: list[tuple[int, float] | None]
    """The first epoch at the target, held or not (`RunRecord.first_touch`)."""

    @property
    def n(self) -> int:
        """Finished repeats."""
        return len(self.held)

    @property
    def n_held(self) -> int:
        """Repeats that reached the target and held it."""
        return sum(h is not None for h in self.held)

    @property
    def n_fell_back(self) -> int:
        """Repeats that touched the target and ended below it."""
        return sum(t is not None and h is None for h, t in zip(self.held, self.touched, strict=True))

    def seconds(self) -> float | None:
        """Median time to the held target over repeats, a repeat that did not hold it counting as never."""
        return censored_median([h[1] if h else None for h in self.held])

    def epoch(self) -> float | None:
        """Median epoch at which the target was reached and held (same rule as `seconds`)."""
        return censored_median([h[0] if h else None for h in self.held])

    def touch_epoch(self) -> float | None:
        """Median first epoch at the target, held or not (same rule)."""
        return censored_median([t[0] if t else None for t in self.touched])

    def touch_seconds(self) -> float | None:
        """Median time to the first epoch at the target, held or not (same rule)."""
        return censored_median([t[1] if t else None for t in self.touched])


def reach(cell: CellRuns | None, target: float | None) -> Reach:
    """How each finished repeat of `cell` met `target` (nothing for no cell or no target)."""
    if cell is None or target is None:
        return Reach([], [])
    runs = cell.ok_runs
    return Reach([r.time_to_target(target) for r in runs], [r.first_touch(target) for r in runs])


def speedup_cols(base: Reach, arm: Reach, is_baseline: bool = False) -> dict[str, Any]:
    """`speedup_ttq_*` columns: ratio of the censored medians; an interval only when every repeat held it."""
    if is_baseline:
        return {"speedup_ttq_x": 1.0 if is_num(arm.seconds()) else None, "speedup_ttq_lo_x": None,
                "speedup_ttq_hi_x": None, "speedup_ttq_verdict": "baseline"}
    point, lo, hi = ratio(base.seconds(), arm.seconds()), None, None
    short = [f"{x.n - x.n_held} of {x.n} {name} repeats" for name, x in (("baseline", base), ("cell", arm))
             if x.n_held < x.n]
    if point is not None and short:
        verdict = f"no interval ({' and '.join(short)} did not hold the target)"
    elif point is not None and min(base.n, arm.n) >= MIN_SAMPLES_PER_ARM:
        lo, hi = cover(point, *ratio_ci([h[1] for h in arm.held if h], [h[1] for h in base.held if h])[1:])
        verdict = classify_ratio(lo, hi)
    else:
        verdict = NO_VERDICT if min(base.n, arm.n) > 1 else NO_INTERVAL
    return {"speedup_ttq_x": point, "speedup_ttq_lo_x": lo, "speedup_ttq_hi_x": hi, "speedup_ttq_verdict": verdict}


def reached_text(r: Reach) -> str:
    """'epoch 5 (3/3 repeats)', 'reached at epoch 2, not held', or 'never reached (1 repeat)'."""
    n = f"{r.n} repeat{'s' if r.n != 1 else ''}"
    if is_num(r.epoch()):
        back = f"; {r.n_fell_back} reached it and fell back" if r.n_fell_back else ""
        touch = r.touch_epoch()
        early = f"; first at the target at epoch {touch:g}, then below it" if is_num(touch) and touch < r.epoch() else ""
        return f"epoch {r.epoch():g} ({r.n_held}/{r.n} repeats){back}{early}"
    touched = [t[0] for t in r.touched if t]
    if not touched:
        return f"never reached ({n})"
    if r.n == 1:
        return f"reached at epoch {touched[0]}, not held"
    back = f", {r.n_fell_back} reached it (first at epoch {min(touched)}) and fell back" if r.n_fell_back else ""
    # a time needs more than half: exactly half (1 of 2 repeats) has none either, and is not 'fewer than half'
    return f"{r.n_held}/{r.n} repeats held it{back}: {'half' if 2 * r.n_held == r.n else 'fewer than half'}, no time"


def paper_never_reached(paper: dict[str, Any], s: Setting) -> bool:
    """Table 1's model pruned before training ended at 42.39 %, below the 97.22 % target: it has no time to it."""
    if s.dense or not s.arch_off or s.dense_epochs != 0 or not paper_model(s):
        return False
    row = table1_row(paper, s.sparsity)
    return row is not None and row["ms_ssim_pct"] < paper["reference"]["target_ms_ssim_pct"]


def build(env: EnvView) -> Table | None:
    """MLPerf-style time to a target MS-SSIM, and the speedup in that measure."""
    cells = [c for c in env.cells if c.runs]
    if not any(c.has_numbers for c in cells):
        return None
    ref = env.paper["reference"]
    csv, md = [], []
    no_target: dict[str, list[str]] = {}  # why a context has no target -> its cells
    below: set[str] = set()  # cells whose target a baseline below its own input set
    for c in sorted(cells, key=lambda c: (c.grid, not (c.setting.dense and c.setting.arch_off), c.name)):
        target, how = env.target_for(c)
        if target is None:
            no_target.setdefault(how, []).append(c.name)
        elif BELOW_INPUT in how:
            below.add(c.name)
        base = env.baseline(c)
        r, rb = reach(c, target), reach(base, target)
        row = {**env.head(c), "target_ms_ssim_pct": target, "target_rule": how,
               "repeats_reached": r.n_held, "reached_epoch": r.epoch(), "ttq_s": r.seconds(),
               "repeats_fell_back": r.n_fell_back, "first_touch_epoch": r.touch_epoch(),
               "first_touch_s": r.touch_seconds(), "baseline_ttq_s": rb.seconds()}
        row.update(speedup_cols(rb, r, is_baseline=base is c))
        never = paper_never_reached(env.paper, c.setting)
        row["paper_speedup_x"] = None if never else paper_vs_dense(env.paper, c.setting)
        row["paper_reference_ttq_min"] = ref["time_to_target_min"] if c.setting.dense and c.setting.arch_off else None
        csv.append(row)
        if not c.has_numbers:
            reached = c.status_text()
        elif target is None:
            reached = "no target (see the notes)"
        else:
            reached = reached_text(r)
        md.append({
            "grid": row["grid"], "cell": c.name, "label": c.setting.label(),
            "target %": fmt_num(target, 2), "reached and held": reached, "time to target": fmt_time(row["ttq_s"]),
            "speedup (95% CI)": fmt_speedup(row, "speedup_ttq"),
            "paper speedup": paper_never_text(env.paper, c.setting) if never
            else fmt_num(row["paper_speedup_x"], 2, "x"),
            "paper reference": f"{ref['time_to_target_min']} min to {ref['target_ms_ssim_pct']}%"
            if row["paper_reference_ttq_min"] else "—",
        })
    if env.opts.target_pct is not None:
        tgt = f"--target {env.opts.target_pct:g}%"
    elif env.opts.target_input:
        tgt = "the low-dose input's own MS-SSIM (--target input): the first epoch that beats the input"
    else:
        tgt = f"the dense fp32 baseline's final MS-SSIM minus {env.opts.tolerance_pp:g} pp (--tolerance)"
    notes = [f"Target: {tgt}. Reached = the first epoch from which every later validation MS-SSIM stays at or "
             "above the target (a run that touches it and falls back reads 'not held' and counts as not "
             "reached; its first touch is in the CSV, `first_touch_epoch`). Time = staging + sum over epochs up "
             "to that epoch of (time_s + capture_time_s + prune_time_s); validation time is not counted.",
             "Over repeats: the median, a repeat that did not hold the target counting as never; so a time and a "
             "speedup only when more than half of the finished repeats held it, an interval only when all did "
             f"(at least {MIN_SAMPLES_PER_ARM} per arm).",
             "Paper: the dense DDNet (batch 32) took 79 min to reach MS-SSIM 97.22 (its reference time); Table 1's "
             "model pruned before training ended at 42.39 % and never reached it.",
             *[f"No target, hence no time or speedup, for {', '.join(names)}: {how}." for how, names in
               no_target.items()],
             *([f"The target of {', '.join(sorted(below))} was set by a dense fp32 baseline that ended {BELOW_INPUT}: "
                "it is a quality the input already has, so these times measure how fast training gets to that "
                "baseline's quality, not to a useful denoiser (short runs on small data often end there); "
                "--target PCT sets another."] if below else []),
             *other_model_note(cells)]
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
    ax.set_ylabel("speedup in time to target MS-SSIM, held (x)")
    ax.set_xlabel("")
    ax.set_title(f"{table.title} — diamonds: paper", fontsize=10)
    return save(fig, path)


# Any finished cell fills it (no `needs`): it is never listed as not run.
register(Artifact(key="ttq", title="Time to quality", build=build, plot=plot))
