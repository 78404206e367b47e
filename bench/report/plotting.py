"""Plot helpers shared by the artifacts: seaborn on the Agg backend (no display needed).

Every plot puts the paper's number beside ours where the paper has one (black
diamonds or dashed lines) and shows our spread (95% intervals for speedups,
std over validation slices for MS-SSIM); a bar without one is hatched, and an interval over one run's
epochs (the tables' '(within one run)') has dashed whiskers. MS-SSIM
bars compare the paper's numbers with ours on the paper code's scale, the
standard MS-SSIM beside them. Figures are created as
`matplotlib.figure.Figure` with an Agg canvas, so no global pyplot state or
interactive backend is touched.

Importing this module loads pandas, matplotlib and seaborn: only the report
command does so (through the artifacts), never the CLI at start-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from bench.report.artifact import Table
from bench.report.format import WITHIN_RUN, is_num

NO_CI_HATCH = "//"
"""Hatching of a bar that has no interval (or no spread)."""
PAPER_STYLE = {"marker": "D", "color": "black", "s": 36, "zorder": 5, "label": "paper"}


def draw(plot: Callable[[Table, Path], Path | None] | None, table: Table, path: Path) -> Path | None:
    """Draw `table` with its artifact's `plot` into `path` (PNG); None when there is no plot or nothing to draw."""
    if plot is None:
        return None
    # Context managers, not set_theme: the style must not leak into the caller's matplotlib state.
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        return plot(table, path)


def figure(width: float = 8.0, height: float = 4.5, ncols: int = 1, nrows: int = 1) -> tuple[Figure, Any]:
    """A constrained-layout Figure on an Agg canvas with `nrows` x `ncols` axes (one row: side by side)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg: PNG without a display
    axes = fig.subplots(nrows, ncols)
    return fig, axes


def save(fig: Figure, path: Path) -> Path:
    """Write `fig` as a PNG at `path` (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def short(text: str, n: int = 28) -> str:
    """`text` cut to `n` characters with an ellipsis (tick labels)."""
    return text if len(text) <= n else text[: n - 1] + "…"


def bars_with_ci(ax: Any, rows: list[dict[str, Any]], x: str, hue: str, y: str, lo: str | None = None,
                 hi: str | None = None, paper: str | None = None) -> None:
    """Grouped bars of `y` by `x` and `hue`, error bars from the `lo`/`hi` columns, paper values as diamonds."""
    rows = [dict(r) for r in rows if is_num(r.get(y))]
    if not rows:
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
        return
    # seaborn would average bars that share (x, hue), e.g. the same model in two grids: keep them apart.
    keys = [(str(r[x]), str(r[hue])) for r in rows]
    if len(set(keys)) < len(keys) and len({r.get("grid") for r in rows}) > 1 and hue != "grid":
        for r in rows:
            r[hue] = f"{r[hue]} [{r.get('grid')}]"
    seen: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (str(r[x]), str(r[hue]))
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            r[hue] = f"{r[hue]} #{seen[key]}"
    xs = list(dict.fromkeys(str(r[x]) for r in rows))
    hs = list(dict.fromkeys(str(r[hue]) for r in rows))
    df = pd.DataFrame([{x: str(r[x]), hue: str(r[hue]), y: float(r[y])} for r in rows])
    sns.barplot(data=df, x=x, y=y, hue=hue, order=xs, hue_order=hs, errorbar=None, ax=ax)
    lookup = {(str(r[x]), str(r[hue])): r for r in rows}
    paper_pts: list[tuple[float, float]] = []
    no_ci = within = False
    # seaborn draws one container per hue level (levels without data are dropped above), bars at x index +- dodge.
    for h, container in zip(hs, ax.containers, strict=False):
        for patch in container.patches:
            cx = patch.get_x() + patch.get_width() / 2.0
            xi = int(round(cx))
            if not 0 <= xi < len(xs):
                continue
            r = lookup.get((xs[xi], h))
            if r is None:
                continue
            v = float(r[y])
            verdict = str(r.get(f"{y.removesuffix('_x')}_verdict") or "")
            if lo and hi and is_num(r.get(lo)) and is_num(r.get(hi)):
                bars = ax.errorbar(cx, v, yerr=[[v - float(r[lo])], [float(r[hi]) - v]], fmt="none",
                                   ecolor="black", capsize=3, lw=1)
                if verdict.endswith(WITHIN_RUN):  # one run's epoch jitter: never drawn like an interval over runs
                    bars.lines[2][0].set_linestyle("--")
                    within = True
            elif lo and hi and verdict != "baseline":
                # a bar without an interval must not look like one whose interval is tiny
                patch.set_hatch(NO_CI_HATCH)
                no_ci = True
            if paper and is_num(r.get(paper)):
                paper_pts.append((cx, float(r[paper])))
    if paper_pts:
        ax.scatter([p[0] for p in paper_pts], [p[1] for p in paper_pts], **PAPER_STYLE)
    ax.set_xticks(range(len(xs)), [short(s) for s in xs], rotation=20, ha="right")
    _legend(ax, "hatched: no CI" if no_ci else None, within)


def _legend(ax: Any, hatched: str | None, within: bool = False) -> None:
    """The axes' legend, with a hatched swatch that explains hatched bars when there are some, and a dashed
    whisker that explains intervals over one run's epochs (`WITHIN_RUN`) when there are some.

    The swatches are artists on the axes (at NaN, so they draw nothing), not legend-only handles:
    a caller that adds a line and calls `ax.legend()` again keeps them.
    """
    if hatched:
        ax.add_patch(Rectangle((math.nan, math.nan), 0, 0, facecolor="white", edgecolor="black",
                               hatch=NO_CI_HATCH, label=hatched))
    if within:
        ax.plot([math.nan], [math.nan], color="black", ls="--", lw=1, label=f"dashed: 95% CI{WITHIN_RUN}, not over runs")
    ax.legend(fontsize=7, loc="best")


def quality_bars(ax: Any, rows: list[dict[str, Any]], x: str) -> None:
    """Final MS-SSIM bars by `x`: ours on the paper code's scale beside the paper's, our standard one beside them.

    The paper's MS-SSIM was most likely computed with its code's MS-SSIM, which reads higher than the
    standard one (`ddnet.paper_msssim`): ours on that scale is the bar to compare with the paper's.
    Error bars: std over validation slices; a bar without one is hatched.
    """
    labels = [short(str(r[x])) for r in rows]
    pos = np.arange(len(rows))
    pal = sns.color_palette()
    series = [(key, label, style) for key, label, style in (
        ("ms_ssim_paper_code", "ours, paper's scale (± std over slices)", {"color": pal[0]}),
        ("ms_ssim", "ours, standard (± std over slices)", {"color": pal[1]}),
        ("paper_ms_ssim", "paper", {"color": "lightgrey", "edgecolor": "black"}),
    ) if any(is_num(r.get(f"{key}_pct")) for r in rows)]
    width = 0.8 / max(len(series), 1)
    hatched = False
    for i, (key, label, style) in enumerate(series):
        vals = [r.get(f"{key}_pct") for r in rows]
        errs = [r.get(f"{key}_std_pct") for r in rows]
        bars = ax.bar(pos + (i - (len(series) - 1) / 2) * width, [float(v) if is_num(v) else 0.0 for v in vals],
                      width, yerr=[float(e) if is_num(e) else 0.0 for e in errs], capsize=3, label=label, **style)
        for bar, v, e in zip(bars, vals, errs, strict=True):
            if is_num(v) and not is_num(e):
                bar.set_hatch(NO_CI_HATCH)
                hatched = True
    ax.set_xticks(pos, labels, rotation=20, ha="right")
    ax.set_ylabel("final validation MS-SSIM (%)")
    _legend(ax, "hatched: no spread recorded" if hatched else None)
