"""What pruning did: measured sparsity, and whether the work really shrank (structural) or not (masked)."""

from __future__ import annotations

from bench.report.artifact import Artifact, Table, register
from bench.report.envview import EnvView
from bench.report.format import fmt_int, fmt_num


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
        if kind == "masked":
            note = ("masked (simulated) sparsity: zeros are kept in dense tensors and the dense kernels do no less "
                    "work, so any speedup is not from sparsity")
        elif kind == "structural":
            note = "structural: channels removed, the layers are narrower and do less work"
        else:
            note = f"sparsity kind {kind!r} not recorded"
        row["note"] = note
        csv.append(row)
        md.append({
            "grid": row["grid"], "cell": c.name, "kind": kind or "—",
            "measured sparsity": fmt_num(row["sparsity_overall"], 3),
            "params before → after": f"{fmt_int(base_params)} → {fmt_int(row['params'])}",
            "effective params": fmt_int(row["effective_params"]),
            "FLOPs/image before → after": f"{fmt_int(row['flops_fwd_per_image_before_pruning'])} → "
                                          f"{fmt_int(row['flops_fwd_per_image'])}",
            "note": note,
        })
    notes = ["Params 'before' are the dense baseline's; FLOPs are forward, per image, counted on the model as run."]
    return Table("sparsity", "Sparsity: what pruning changed", csv, md, list(md[0].keys()), notes)


# Text only (no plot); any finished sparse cell fills it (no `needs`): never listed as not run.
register(Artifact(key="sparsity", title="Sparsity", build=build))
