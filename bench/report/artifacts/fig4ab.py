"""Fig. 4(a,b) of the paper: training/validation loss curves and the epoch-to-epoch loss change, switch marked."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import seaborn as sns

from bench.report.artifact import Artifact, Needs, Table, register
from bench.report.envview import EnvView
from bench.report.format import fmt_num, is_num
from bench.report.plotting import figure, save
from bench.report.setting import Setting


def needs(s: Setting, _p: int) -> bool:
    """fp32/host/eager cells, dense or sparse (their loss curves)."""
    return s.arch_off


def build(env: EnvView) -> Table | None:
    """Fig. 4(a,b): training/validation loss curves and the epoch-to-epoch loss change, switch marked."""
    cells = [c for c in env.select(needs) if c.has_numbers]
    if not cells:
        return None
    fig4 = env.paper["fig4"]
    csv, md, curves = [], [], []
    for c in sorted(cells, key=lambda c: (c.grid, not c.setting.dense, c.name)):
        run = c.ok_runs[0]  # curves of the first finished repeat; repeats would overplot the same shape
        rows = run.epochs
        changes = [float(r["loss_change"]) for r in rows if is_num(r.get("loss_change")) and r["loss_change"] > 0]
        switch = run.summary.get("switch_epoch")
        for r in rows:
            curves.append({"env": env.env_label, "grid": c.grid or "-", "cell": c.name,
                           "model": c.setting.model_label(), "epoch": r.get("epoch"), "phase": r.get("phase"),
                           "train_loss": r.get("train_loss"), "val_loss": r.get("val_loss"),
                           "loss_change": r.get("loss_change"), "switch_epoch": switch,
                           "epochs": c.setting.epochs})
        span = math.log10(max(changes) / min(changes)) if len(changes) >= 2 else None
        row = {**env.head(c), "run": run.rel, "switch_epoch": switch,
               "switch_rule": run.summary.get("switch_rule"),
               "final_train_loss": rows[-1].get("train_loss") if rows else None,
               "final_val_loss": rows[-1].get("val_loss") if rows else None,
               "loss_change_first": changes[0] if changes else None,
               "loss_change_last": changes[-1] if changes else None,
               "loss_change_orders_of_magnitude": span,
               "paper_saturation_epoch": fig4["loss_change_saturation_epoch"],
               "paper_total_epochs": fig4["total_epochs"]}
        csv.append(row)
        md.append({
            "grid": row["grid"], "model": c.setting.model_label(), "run": run.rel,
            "final train / val loss": f"{fmt_num(row['final_train_loss'], 4)} / {fmt_num(row['final_val_loss'], 4)}",
            "loss change first → last": f"{fmt_num(row['loss_change_first'], 5)} → "
                                        f"{fmt_num(row['loss_change_last'], 5)}",
            "orders of magnitude": fmt_num(span, 1),
            "switch epoch": switch if switch is not None else "—",
            "switch rule": row["switch_rule"] or "—",
        })
    notes = ["Paper (Fig. 4b): the loss change spans several orders of magnitude over the first 28 of 50 epochs, "
             "then stays within one; the plot marks epoch 28 scaled to this run's length."]
    return Table("fig4ab", "Fig. 4(a,b) analogue: loss curves and loss change", csv, md, list(md[0].keys()), notes,
                 extra_csv={"fig4ab_curves": curves}, plot_data={"curves": curves})


def plot(table: Table, path: Path) -> Path | None:
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
    fig, (a1, a2) = figure(12, 4.5, ncols=2)
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
    # the paper's saturation (epoch 28 of 50) scaled to each run length shown, never one length's mark for all
    head = table.csv_rows[0]
    for epochs in sorted({int(c["epochs"]) for c in curves}):
        paper_at = head["paper_saturation_epoch"] / head["paper_total_epochs"] * epochs
        a2.axvline(paper_at, color="black", ls="--", lw=1, label=f"paper's 28/50, scaled to {epochs} epochs")
    a2.set_ylabel("|Δ train loss| between epochs (log)")
    a2.set_title("(b) loss change", fontsize=9)
    a2.legend(fontsize=7)
    fig.suptitle(table.title, fontsize=10)
    return save(fig, path)


register(Artifact(
    key="fig4ab",
    title="Fig. 4(a,b) analogue",
    build=build,
    plot=plot,
    needs=Needs("fp32/host/eager cells (loss curves and loss change)", needs),
    fills=("table1", "table2", "fig4c", "full", "smoke"),
))
