"""Validation: the model under eval() and no_grad(), scored per slice with the loss's own metrics."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from ddnet.loss import DDNetLoss, slice_metrics


@torch.no_grad()
def validate(model: nn.Module, lq: torch.Tensor, hq: torch.Tensor, hu_scale: torch.Tensor,
             loss_fn: DDNetLoss, batch_size: int, autocast: Callable[[str], AbstractContextManager],
             device: torch.device) -> dict[str, Any]:
    """Validation under eval() and no_grad(): loss and per-slice MS-SSIM (%), PSNR (dB), RMSE (HU)."""
    was_training = model.training
    model.eval()
    losses, cols = [], {"ms_ssim_pct": [], "psnr_db": [], "rmse_hu": []}
    for i in range(0, lq.shape[0], batch_size):
        x = lq[i : i + batch_size].to(device)
        y = hq[i : i + batch_size].to(device)
        with autocast(device.type):
            out = model(x)
        out = out.float()
        losses.append(loss_fn(out, y) * x.shape[0])
        for k, v in slice_metrics(out, y, hu_scale[i : i + batch_size].to(device), loss_fn.setting).items():
            cols[k].append(v)
    model.train(was_training)
    m, p, r = (torch.cat(cols[k]).double().cpu() for k in ("ms_ssim_pct", "psnr_db", "rmse_hu"))
    return {
        "val_loss": float(torch.stack(losses).sum().item() / lq.shape[0]),
        "val_ms_ssim": float(m.mean()),
        "val_ms_ssim_std": float(m.std(unbiased=False)),
        "val_psnr": float(p.mean()),
        "val_psnr_std": float(p.std(unbiased=False)),
        "val_rmse_hu": float(r.mean()),
        "_per_slice": (m.tolist(), p.tolist(), r.tolist()),
    }
