"""Validation: the model under eval() and no_grad(), scored per slice with the loss's own metrics,
beside the low-dose input's own score (the floor a denoiser must beat)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from ddnet.loss import DDNetLoss, MSSSIMSetting, slice_metrics

PER_SLICE = ("ms_ssim_pct", "psnr_db", "rmse_hu")
"""The per-slice scores kept for `summary.json`'s val_slices (in this order)."""

# per-slice metric key -> epoch-row field (mean; '_std' added for the spread)
_FIELDS = {"ms_ssim_pct": "ms_ssim", "ms_ssim_paper_code_pct": "ms_ssim_paper_code", "psnr_db": "psnr",
           "rmse_hu": "rmse_hu"}


def _means(cols: dict[str, list[torch.Tensor]], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, name in _FIELDS.items():
        if cols.get(key):
            v = torch.cat(cols[key]).double().cpu()
            out[f"{prefix}_{name}"] = float(v.mean())
            out[f"{prefix}_{name}_std"] = float(v.std(unbiased=False))
    return out


def _score(pred_of: Callable[[torch.Tensor], torch.Tensor], lq: torch.Tensor, hq: torch.Tensor,
           hu_scale: torch.Tensor, setting: MSSSIMSetting, batch_size: int, device: torch.device,
           loss_fn: DDNetLoss | None = None) -> tuple[dict[str, list[torch.Tensor]], float]:
    """Per-slice metrics of pred_of(lq) vs hq, batch by batch; and the summed loss when `loss_fn` is given."""
    cols: dict[str, list[torch.Tensor]] = {}
    loss_sum = torch.zeros((), device=device)
    for i in range(0, lq.shape[0], batch_size):
        x = lq[i : i + batch_size].to(device)
        y = hq[i : i + batch_size].to(device)
        pred = pred_of(x).float()
        if loss_fn is not None:
            loss_sum += loss_fn(pred, y) * x.shape[0]
        for k, v in slice_metrics(pred, y, hu_scale[i : i + batch_size].to(device), setting).items():
            cols.setdefault(k, []).append(v)
    return cols, float(loss_sum.item())


@torch.no_grad()
def input_quality(lq: torch.Tensor, hq: torch.Tensor, hu_scale: torch.Tensor, setting: MSSSIMSetting,
                  batch_size: int, device: torch.device) -> dict[str, float]:
    """The low-dose input scored against the target as the output is: `input_ms_ssim`, `input_psnr`, ..."""
    cols, _ = _score(lambda x: x, lq, hq, hu_scale, setting, batch_size, device)
    return _means(cols, "input")


@torch.no_grad()
def validate(model: nn.Module, lq: torch.Tensor, hq: torch.Tensor, hu_scale: torch.Tensor,
             loss_fn: DDNetLoss, batch_size: int, autocast: Callable[[str], AbstractContextManager],
             device: torch.device) -> dict[str, Any]:
    """Validation under eval() and no_grad(): loss and per-slice MS-SSIM (%, standard and the paper
    code's), PSNR (dB), RMSE (HU); `val_*` means and stds, and `_per_slice` lists for the summary."""
    was_training = model.training
    model.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(device.type):
            return model(x)

    cols, loss_sum = _score(forward, lq, hq, hu_scale, loss_fn.setting, batch_size, device, loss_fn)
    model.train(was_training)
    per_slice = tuple(torch.cat(cols[k]).double().cpu().tolist() for k in PER_SLICE)
    return {"val_loss": loss_sum / lq.shape[0], **_means(cols, "val"), "_per_slice": per_slice}
