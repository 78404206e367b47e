"""What pruning did: measured sparsity, and whether the work really shrank (structural) or not (masked)."""

from __future__ import annotations

from typing import Any

from bench.report.artifact import Artifact, Table, register
from bench.report.envview import EnvView
from bench.report.format import fmt_int, fmt_num, is_num


def _removed(sp: dict[str, Any], params: Any, base_params: Any) -> float | None:
    """Fraction of the parameters structural pruning removed: its own before/after counts, else vs the baseline's."""
    rep = sp.get("report") if isinstance(sp.get("report"), dict) else {}
    before, removed = rep.get("params_before"), rep.get("params_removed")
    if is_num(before) and is_num(removed) and before > 0:
        return float(removed) / float(before)
    return 1.0 - float(params) / float(base_params) if is_num(params) and is_num(base_params) and base_params else None


def build(env: EnvView) -> Table | None:
    """What pruning did: measured sparsity, and whether the work really shrank (structural) or not (masked)."""
    cells = [c for c in env.cells if not c.setting.dense and c.has_numbers]
    if not cells:
        return None
    csv, md = [], []
    for c in sorted(cells, key=lambda c: (c.grid, c.name)):
        run = c.ok_runs[0]
        sp = run.summary.get("sparsity") if isinstance(run.summary.get("sparsity"), dict) else {}
        kind = sp.get("kind")
        base = env.baseline(c)
        base_params = base.med(lambda r: r.summary.get("params")) if base is not None else None
        row = {**env.head(c), "sparsity_kind_measured": kind, "sparsity_overall": sp.get("overall"),
               "requested_amount": sp.get("requested_amount"), "params": run.summary.get("params"),
               "params_dense_baseline": base_params, "effective_params": run.summary.get("effective_params"),
               "flops_fwd_per_image": run.summary.get("flops_fwd_per_image"),
               "flops_fwd_per_image_before_pruning": run.summary.get("flops_fwd_per_image_before_pruning")}
        row["params_removed_fraction"] = _removed(sp, run.summary.get("params"), base_params) \
            if kind == "structural" else None
        if kind == "masked":
            note = ("masked (simulated) sparsity: zeros are kept in dense tensors and the dense kernels do no less "
                    "work, so any speedup is not from sparsity")
        elif kind == "structural":
            note = "structural: channels removed, the layers are narrower and do less work"
        else:
            note = f"sparsity kind {kind!r} not recorded"
        rep = sp.get("report") if isinstance(sp.get("report"), dict) else {}
        left = rep.get("layers_left_dense") if isinstance(rep.get("layers_left_dense"), dict) else {}
        # e.g. the 1-channel stem under 2:4: a reader must know which layers the pattern skipped, and why
        # (structural pruning's unprunable layers, the many that feed a concatenation, are in the CSV alone)
        why: dict[str, list[str]] = {}
        for name, reason in sorted(left.items()):
            why.setdefault(str(reason), []).append(name)
        row["layers_left_dense"] = "; ".join(f"{', '.join(n)} ({r})" for r, n in why.items()) or None
        if left and kind == "masked":
            note += f"; left dense: {row['layers_left_dense']}"
        row["note"] = note
        csv.append(row)
        md.append({
            "grid": row["grid"], "cell": c.name, "kind": kind or "—",
            # narrowed layers hold no zeros: for structural pruning the measure is the parameters removed
            "measured sparsity": f"{fmt_num(row['params_removed_fraction'], 3)} of params removed"
            if kind == "structural" else fmt_num(row["sparsity_overall"], 3),
            "params before → after": f"{fmt_int(base_params)} → {fmt_int(row['params'])}",
            "effective params": fmt_int(row["effective_params"]),
            "FLOPs/image before → after": f"{fmt_int(row['flops_fwd_per_image_before_pruning'])} → "
                                          f"{fmt_int(row['flops_fwd_per_image'])}",
            "note": note,
        })
    notes = ["Params 'before' are the dense baseline's; FLOPs are forward, per image, counted on the model as run.",
             "Measured sparsity: the fraction of zero weights for masked pruning; for structural pruning, which "
             "removes channels and leaves no zeros, the fraction of the model's parameters removed."]
    return Table("sparsity", "Sparsity: what pruning changed", csv, md, list(md[0].keys()), notes)


# Text only (no plot); any finished sparse cell fills it (no `needs`): never listed as not run.
register(Artifact(key="sparsity", title="Sparsity", build=build))
