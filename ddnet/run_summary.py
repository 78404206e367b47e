"""What a run's summary.json and its DDP records hold (built from a finished `ddnet.trainer.Run`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from ddnet.sparsity import measure_sparsity


def run_summary(run: Any, rows: list[dict]) -> dict[str, Any]:
    """summary.json of a finished run: times, sizes, sparsity, final quality, records of every collector."""
    sp = measure_sparsity(run.model)
    last = rows[-1] if rows else {}
    train_time = sum(r["time_s"] for r in rows)
    capture = sum(r.get("capture_time_s", 0.0) for r in rows)
    prune = sum(r.get("prune_time_s", 0.0) for r in rows)
    summary = {
        # every epoch of the loop, also one whose row a damaged epochs.jsonl lost (`kept_rows` warned of it)
        "status": "ok", "error": None, "epochs_completed": max(len(rows), run.cfg.epochs),
        "train_time_s": train_time, "capture_time_s": capture, "prune_time_s": prune, **run.staging,
        **run.data_load,
        "total_time_s": train_time + capture + prune + run.staging["staging_time_s"],
        "params": sp["params"], "effective_params": sp["effective_params"],
        "flops_fwd_per_image_before_pruning": run.flops_dense, "flops_fwd_per_image": run._flops(),
        "sparsity": {
            "overall": sp["overall"], "kind": run.sparsity_kind, "per_layer": sp["per_layer"],
            "requested_amount": run.cfg.sparsity.amount if run.cfg.sparsity.kind != "none" else 0.0,
            "pattern": run.cfg.sparsity.pattern, "report": run.sparsity_report,
        },
        "switch_epoch": run.switch_epoch,
        "switch_rule": run.auto.rule if run.auto is not None else None,
        "final_val_ms_ssim": last.get("val_ms_ssim"), "final_val_ms_ssim_std": last.get("val_ms_ssim_std"),
        "final_val_psnr": last.get("val_psnr"), "final_val_rmse_hu": last.get("val_rmse_hu"),
        "final_val_ms_ssim_paper_code": last.get("val_ms_ssim_paper_code"), **run.input,
        "msssim_setting": run.loss_fn.setting.to_dict(), "device": str(run.device), "image_side": run.image_side,
        "precision_flags": run.precision.flags, "copies": run.copies, "memory": run.memory.summary(),
        "world_size": run.dist.world,
    }
    if run.per_slice is not None and run.dist.main:
        m, p, r = run.per_slice
        summary["val_slices"] = [{"name": n, "ms_ssim": a, "psnr": b, "rmse_hu": c}
                                 for n, a, b, c in zip(run.val.names, m, p, r, strict=True)]
    return summary


def kept_rows(rows: list[dict], upto: int, path: Path) -> list[dict]:
    """The epoch rows a run resumed from its checkpoint of epoch `upto` keeps (those up to it), warning of any
    epoch up to it without a readable row (a damaged line in `path`): its records are lost, not silently."""
    kept = [r for r in rows if isinstance(r.get("epoch"), int) and r["epoch"] <= upto]
    lost = sorted(set(range(1, upto + 1)) - {r["epoch"] for r in kept})
    if lost:
        warnings.warn(f"{path} holds no readable row for epoch(s) {', '.join(map(str, lost))} of the {upto} its "
                      "checkpoint holds (a damaged line): their records are lost, the run resumes from the "
                      "checkpoint and its summary's times leave them out.", UserWarning, stacklevel=2)
    return kept


def ddp_records(run: Any) -> dict[str, Any]:
    """Facts about the replicas, gathered to rank 0: who read files, shards, final weights' checksum."""
    flat = torch.cat([p.detach().double().flatten().cpu() for p in run.model.parameters()])
    mine = {
        "rank": run.dist.rank,
        "read_files": run.read_files,
        "weights_checksum": float(flat.sum().item()),
        "weights_abs_checksum": float(flat.abs().sum().item()),
        "epoch0_indices": run.loader.indices(0),
    }
    gathered: list[Any] = [None] * run.dist.world
    torch_dist.all_gather_object(gathered, mine)
    return {"ddp_ranks": gathered}
