"""Where each cell's wall time went: the epochs the paper times, and what a run costs beside them.

The paper reports training time; a user waiting for a grid pays the whole
process: start-up (interpreter, imports), building (data read or staged, model,
FLOP count), the environment record, epochs, validation, and the rest of the
fit (CUDA-graph capture, pruning, the input's quality, checkpoints, the copy
profile). Read from each run's `summary.json` `timeline_s`; runs recorded
before it existed have none and are left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report.artifact import Artifact, Table, register
from bench.report.envview import EnvView
from bench.report.format import fmt_num, fmt_time, is_num
from bench.report.plotting import figure, save, short

PARTS = (
    ("startup_s", "start-up", ("startup",)),
    ("build_s", "build", ("build", "record_env")),
    ("epochs_s", "epochs", ("epochs",)),
    ("validation_s", "validation", ("validation",)),
    ("other_s", "other", ("fit_other",)),
)
"""(column, label, the timeline_s fields it sums)."""


def _part(run: Any, fields: tuple[str, ...]) -> float | None:
    tl = run.summary.get("timeline_s")
    if not isinstance(tl, dict) or not all(is_num(tl.get(f)) for f in fields):
        return None
    return float(sum(tl[f] for f in fields))


def _spawn_exit(run: Any) -> float | None:
    """The process's wall as `bench run` timed it (its last launch, which ended well), less what the process
    recorded from its own start to its summary: the spawn and the exit. None without both records."""
    tl = run.summary.get("timeline_s")
    done = [x for x in run.launches if x.get("exit_code") == 0 and is_num(x.get("wall_s"))]
    if not done or not isinstance(tl, dict):
        return None
    inside = [tl.get(f) for f in ("startup", "build", "record_env", "fit")]
    return float(done[-1]["wall_s"]) - float(sum(inside)) if all(is_num(v) for v in inside) else None


def build(env: EnvView) -> Table | None:
    """Median over finished repeats of each part of the wall time, per cell, and the epochs' share."""
    cells = [c for c in env.cells if any(isinstance(r.summary.get("timeline_s"), dict) for r in c.ok_runs)]
    if not cells:
        return None
    csv, md = [], []
    for c in sorted(cells, key=lambda c: (c.grid, c.name)):
        parts = {col: c.med(lambda r, f=fields: _part(r, f)) for col, _, fields in PARTS}
        parts["spawn_exit_s"] = c.med(_spawn_exit)
        known = [v for v in parts.values() if is_num(v)]
        total = float(sum(known)) if known else None
        share = 100.0 * parts["epochs_s"] / total if is_num(parts["epochs_s"]) and total else None
        row = {**env.head(c), **parts, "wall_s": total, "epochs_share_pct": share,
               "capture_s": c.med(lambda r: r.summary.get("capture_time_s")),
               "staging_s": c.med(lambda r: r.summary.get("staging_time_s"))}
        csv.append(row)
        md.append({"grid": row["grid"], "cell": c.name, **{label: fmt_time(parts[col]) for col, label, _ in PARTS},
                   "spawn + exit": fmt_time(parts["spawn_exit_s"]), "wall": fmt_time(total),
                   "epochs share": fmt_num(share, 1, " %"),
                   "of which capture": fmt_time(row["capture_s"]) if row["capture_s"] else "—"})
    notes = ["Medians over finished repeats of each run's `timeline_s` (summary.json). start-up: the process's "
             "start to its run folder (only for processes launched to train); build: data read or staged, model, "
             "FLOP count and env.json; other: the rest of the fit (CUDA-graph capture, pruning, the input's "
             "quality, checkpoints, the copy profile); spawn + exit: the process's wall as `bench run` timed it "
             "(launches.jsonl) less all of the above, for cells `bench run` started. The speed tables use the "
             "epochs alone."]
    return Table("wall", "Where each cell's wall time went", csv, md, list(md[0].keys()), notes)


def plot(table: Table, path: Path) -> Path | None:
    """One stacked horizontal bar per cell: start-up, build, epochs, validation, other, spawn + exit."""
    rows = [r for r in table.csv_rows if is_num(r.get("wall_s"))]
    if not rows:
        return None
    fig, ax = figure(9, 1.5 + 0.35 * len(rows))
    names = [short(f"{r['grid']}/{r['cell']}", 40) for r in rows]
    left = [0.0] * len(rows)
    for col, label in [(col, label) for col, label, _ in PARTS] + [("spawn_exit_s", "spawn + exit")]:
        widths = [float(r[col]) if is_num(r.get(col)) else 0.0 for r in rows]
        ax.barh(names, widths, left=left, label=label)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median over repeats)")
    fig.legend(fontsize=7, ncols=len(PARTS) + 1, loc="outside lower center")  # below the axes, over no bar
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(table.title, fontsize=10)
    return save(fig, path)


register(Artifact(
    key="wall",
    title="Where each cell's wall time went",
    build=build,
    plot=plot,
))
