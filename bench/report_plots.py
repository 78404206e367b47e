"""Seaborn plots for `bench report`, drawn on the Agg backend (no display needed).

Every plot puts the paper's number beside ours where the paper has one (black
diamonds or dashed lines) and shows our spread (bootstrap 95% intervals for
speedups, std over validation slices for MS-SSIM). Figures are created as
`matplotlib.figure.Figure` with an Agg canvas, so no global pyplot state or
interactive backend is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.report_format import is_num
from bench.report_tables import Table

PAPER_STYLE = {"marker": "D", "color": "black", "s": 36, "zorder": 5, "label": "paper"}


def _figure(width: float = 8.0, height: float = 4.5, ncols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg: PNG without a display
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _short(text: str, n: int = 28) -> str:
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
            if lo and hi and is_num(r.get(lo)) and is_num(r.get(hi)):
                ax.errorbar(cx, v, yerr=[[v - float(r[lo])], [float(r[hi]) - v]], fmt="none", ecolor="black",
                            capsize=3, lw=1)
            if paper and is_num(r.get(paper)):
                paper_pts.append((cx, float(r[paper])))
    if paper_pts:
        ax.scatter([p[0] for p in paper_pts], [p[1] for p in paper_pts], **PAPER_STYLE)
    ax.set_xticks(range(len(xs)), [_short(s) for s in xs], rotation=20, ha="right")
    ax.legend(fontsize=7, loc="best")


def plot_fig8(table: Table, path: Path) -> Path | None:
    """Speedup of each optimization (or combination) over the same model without it, per model."""
    rows = table.csv_rows
    if not any(is_num(r.get("speedup_vs_model_x")) for r in rows):
        return None
    fig, ax = _figure(9, 4.8)
    bars_with_ci(ax, rows, "optimizations", "model", "speedup_vs_model_x", "speedup_vs_model_lo_x",
                 "speedup_vs_model_hi_x", "paper_vs_model_x")
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set_ylabel("speedup over the same model, fp32/host/eager (x)")
    ax.set_xlabel("")
    ax.set_title(f"{table.title} — bars: ours with 95% CI; diamonds: paper", fontsize=10)
    return _save(fig, path)


def plot_table1(table: Table, path: Path) -> Path | None:
    """Table 1: MS-SSIM (ours and paper, +- std over slices) and speedup over the dense model."""
    rows = [r for r in table.csv_rows if is_num(r.get("ms_ssim_pct"))]
    if not rows:
        return None
    fig, (a1, a2) = _figure(10, 4.2, ncols=2)
    _quality_bars(a1, rows, "cell")
    bars_with_ci(a2, rows, "cell", "grid", "speedup_total_x", "speedup_total_lo_x", "speedup_total_hi_x",
                 "paper_speedup_x")
    a2.axhline(1.0, color="grey", lw=1, ls="--")
    a2.set_ylabel("speedup in total training time (x)")
    a2.set_xlabel("")
    fig.suptitle(table.title, fontsize=10)
    return _save(fig, path)


def _quality_bars(ax: Any, rows: list[dict[str, Any]], x: str) -> None:
    labels = [_short(str(r[x])) for r in rows]
    pos = np.arange(len(rows))
    ours = [float(r["ms_ssim_pct"]) for r in rows]
    err = [float(r["ms_ssim_std_pct"]) if is_num(r.get("ms_ssim_std_pct")) else 0.0 for r in rows]
    pal = sns.color_palette()
    ax.bar(pos - 0.2, ours, 0.4, yerr=err, capsize=3, color=pal[0], label="ours (± std over slices)")
    pv = [r.get("paper_ms_ssim_pct") for r in rows]
    pe = [r.get("paper_ms_ssim_std_pct") for r in rows]
    if any(is_num(v) for v in pv):
        ax.bar(pos + 0.2, [v if is_num(v) else 0 for v in pv], 0.4,
               yerr=[e if is_num(e) else 0 for e in pe], capsize=3, color="lightgrey", edgecolor="black",
               label="paper")
    ax.set_xticks(pos, labels, rotation=20, ha="right")
    ax.set_ylabel("final validation MS-SSIM (%)")
    ax.legend(fontsize=7)


def plot_table2(table: Table, path: Path) -> Path | None:
    """Table 2: speedup (with CI) and MS-SSIM per sparsity type, paper beside."""
    rows = [r for r in table.csv_rows if is_num(r.get("speedup_x"))]
    if not rows:
        return None
    fig, (a1, a2) = _figure(10, 4.2, ncols=2)
    for r in rows:
        r["type"] = f"{r['sparsity']} ({r['dense_epochs']}+{r['epochs'] - r['dense_epochs']})" \
            if is_num(r.get("dense_epochs")) else f"{r['sparsity']} (auto)"
    bars_with_ci(a1, rows, "type", "grid", "speedup_x", "speedup_lo_x", "speedup_hi_x", "paper_speedup_x")
    a1.axhline(1.0, color="grey", lw=1, ls="--")
    a1.set_ylabel("speedup over dense fp32 (x)")
    a1.set_xlabel("")
    _quality_bars(a2, rows, "type")
    base = next((r["baseline_ms_ssim_pct"] for r in rows if is_num(r.get("baseline_ms_ssim_pct"))), None)
    if base is not None:
        a2.axhline(base, color="black", ls="--", lw=1, label="dense baseline (ours)")
        a2.legend(fontsize=7)
    fig.suptitle(table.title, fontsize=10)
    return _save(fig, path)


def plot_fig9a(table: Table, path: Path) -> Path | None:
    """Share of data movement per kind and loader (time and bytes), paper shares as diamonds."""
    rows = [r for r in table.csv_rows if is_num(r.get("share_time_pct")) or is_num(r.get("share_bytes_pct"))]
    if not rows:
        return None
    for r in rows:
        r["arm"] = f"{r['loader']} ({r['cell']})"
    fig, (a1, a2) = _figure(11, 4.2, ncols=2)
    bars_with_ci(a1, rows, "kind", "arm", "share_time_pct", paper="paper_share_pct")
    a1.set_ylabel("share of copy time (%)")
    bars_with_ci(a2, rows, "kind", "arm", "share_bytes_pct", paper="paper_share_pct")
    a2.set_ylabel("share of bytes moved (%)")
    for a in (a1, a2):
        a.set_xlabel("")
    measure = "CPU copy ops" if any(r.get("copies_device") == "cpu" for r in rows) else "CUDA copies"
    fig.suptitle(f"{table.title} ({measure}; diamonds: paper)", fontsize=10)
    return _save(fig, path)


def plot_fig9b(table: Table, path: Path) -> Path | None:
    """Per-epoch time, eager vs graphs, with capture time stacked on the graphs epochs."""
    ep = [e for e in table.plot_data.get("epochs", []) if is_num(e.get("time_s"))]
    if not ep:
        return None
    pairs = list(dict.fromkeys(e["pair"] for e in ep))
    fig, axes = _figure(6 * min(len(pairs), 3), 4.2, ncols=min(len(pairs), 3))
    axes = np.atleast_1d(axes)
    for ax, pair in zip(axes, pairs, strict=False):
        sub = pd.DataFrame([e for e in ep if e["pair"] == pair])
        sns.lineplot(data=sub, x="epoch", y="time_s", hue="arm", style="arm", markers=True, dashes=False, ax=ax)
        g = sub[sub["arm"] == "graphs"]
        if len(g) and float(g["capture_time_s"].sum()) > 0:
            ax.bar(g["epoch"], g["capture_time_s"], bottom=g["time_s"], width=0.5, color="tab:red", alpha=0.6,
                   label="graph capture (on top of time_s)")
        ax.set_ylabel("epoch time (s)")
        ax.set_title(_short(pair, 60), fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(table.title, fontsize=10)
    return _save(fig, path)


def plot_fig4c(table: Table, path: Path) -> Path | None:
    """Final MS-SSIM against dense epochs before pruning; dense baseline and the paper's split marked."""
    rows = [r for r in table.csv_rows if is_num(r.get("ms_ssim_pct")) and is_num(r.get("dense_epochs_run"))]
    if not rows:
        return None
    fig, ax = _figure(7, 4.5)
    df = pd.DataFrame(rows)
    sns.lineplot(data=df, x="dense_epochs_run", y="ms_ssim_pct", hue="sparsity", marker="o", ax=ax,
                 errorbar=None)
    for r in rows:
        if is_num(r.get("ms_ssim_std_pct")):
            ax.errorbar(r["dense_epochs_run"], r["ms_ssim_pct"], yerr=r["ms_ssim_std_pct"], fmt="none",
                        ecolor="grey", capsize=3, lw=1)
    base = next((r["baseline_ms_ssim_pct"] for r in rows if is_num(r.get("baseline_ms_ssim_pct"))), None)
    if base is not None:
        ax.axhline(base, color="black", ls="--", lw=1, label="dense baseline (ours)")
    epochs = rows[0]["epochs"]
    ax.axvline(rows[0]["paper_split_fraction"] * epochs, color="green", ls="--", lw=1,
               label="paper's split (25 of 50), scaled")
    ax.set_xlabel(f"dense epochs before pruning (of {epochs})")
    ax.set_ylabel("final validation MS-SSIM (%)")
    ax.legend(fontsize=7)
    ax.set_title(table.title, fontsize=10)
    return _save(fig, path)


def plot_fig4ab(table: Table, path: Path) -> Path | None:
    """(a) training and validation loss; (b) epoch-to-epoch loss change on a log axis, switch marked."""
    curves = [c for c in table.plot_data.get("curves", []) if is_num(c.get("train_loss"))]
    if not curves:
        return None
    df = pd.DataFrame(curves)
    # One line per cell: several grids may hold a 'dense' model, which seaborn would otherwise average.
    multi = df["grid"].nunique() > 1
    df["model"] = [f"{m} [{g}]" if multi else m for m, g in zip(df["model"], df["grid"], strict=True)]
    long = pd.concat([
        df.assign(loss=df["train_loss"], split="train"),
        df.assign(loss=df["val_loss"], split="validation"),
    ])
    long = long[long["loss"].map(is_num)]
    fig, (a1, a2) = _figure(12, 4.5, ncols=2)
    sns.lineplot(data=long, x="epoch", y="loss", hue="model", style="split", units="cell", estimator=None, ax=a1)
    if (long["loss"] > 0).all():
        a1.set_yscale("log")
    a1.set_title("(a) training and validation loss", fontsize=9)
    ch = df[df["loss_change"].map(lambda v: is_num(v) and v > 0)]
    if len(ch):
        sns.lineplot(data=ch, x="epoch", y="loss_change", hue="model", marker="o", units="cell", estimator=None,
                     ax=a2)
        a2.set_yscale("log")
    # Pruning happens after `switch_epoch` dense epochs: mark between that epoch and the next, once per epoch.
    switches = sorted({int(c["switch_epoch"]) for c in curves if is_num(c.get("switch_epoch")) and c["switch_epoch"] > 0})
    for i, switch in enumerate(switches):
        a2.axvline(switch + 0.5, color="red", ls=":", lw=1, label="switch to sparse" if i == 0 else None)
    epochs = int(max(c["epochs"] for c in curves))
    paper_at = table.csv_rows[0]["paper_saturation_epoch"] / table.csv_rows[0]["paper_total_epochs"] * epochs
    a2.axvline(paper_at, color="black", ls="--", lw=1, label=f"paper: saturates at 28/50 (x{epochs / 50:.2g})")
    a2.set_ylabel("|Δ train loss| between epochs (log)")
    a2.set_title("(b) loss change", fontsize=9)
    a2.legend(fontsize=7)
    fig.suptitle(table.title, fontsize=10)
    return _save(fig, path)


def plot_memory(table: Table, path: Path) -> Path | None:
    """Peak memory per cell, coloured by precision, with the measure in the axis label."""
    rows = [r for r in table.csv_rows if is_num(r.get("primary_peak_gib"))]
    if not rows:
        return None
    fig, ax = _figure(9, 4.5)
    bars_with_ci(ax, rows, "cell", "precision", "primary_peak_gib")
    measures = sorted({str(r["primary_measure"]) for r in rows})
    ax.set_ylabel(f"peak memory (GiB): {', '.join(measures)}", fontsize=8)
    ax.set_xlabel("")
    ax.set_title(f"{table.title} (paper: 62 GB fp32, 27 GB mixed precision)", fontsize=10)
    return _save(fig, path)


def plot_ttq(table: Table, path: Path) -> Path | None:
    """Speedup in time to the quality target, with CI where there are repeats."""
    rows = [r for r in table.csv_rows if is_num(r.get("speedup_ttq_x"))]
    if not rows:
        return None
    fig, ax = _figure(9, 4.5)
    bars_with_ci(ax, rows, "cell", "grid", "speedup_ttq_x", "speedup_ttq_lo_x", "speedup_ttq_hi_x",
                 "paper_speedup_x")
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set_ylabel("speedup in time to target MS-SSIM (x)")
    ax.set_xlabel("")
    ax.set_title(f"{table.title} — diamonds: paper", fontsize=10)
    return _save(fig, path)


PLOTTERS = {
    "table1": plot_table1,
    "table2": plot_table2,
    "fig8a": plot_fig8,
    "fig8b": plot_fig8,
    "fig9a": plot_fig9a,
    "fig9b": plot_fig9b,
    "fig4c": plot_fig4c,
    "fig4ab": plot_fig4ab,
    "memory": plot_memory,
    "ttq": plot_ttq,
}
"""Table key -> plot function (tables without one are text only)."""


def plot_table(table: Table, path: Path) -> Path | None:
    """Draw the plot of `table` into `path` (PNG); None when it has nothing to draw."""
    fn = PLOTTERS.get(table.key)
    if fn is None:
        return None
    # Context managers, not set_theme: the style must not leak into the caller's matplotlib state.
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        return fn(table, path)
