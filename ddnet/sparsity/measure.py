"""Counted sparsity and FLOPs (executed and theoretical)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ddnet.sparsity.layers import _trainable_params, _unwrap, prunable_layers

# ----------------------------------------------------------------------------- measurement


def measure_sparsity(model: nn.Module) -> dict[str, Any]:
    """Counted zeros of every conv/deconv weight (not the requested amount).

    Returns overall (zeros / numel over those weights), zeros, numel, per_layer
    {name: {numel, zeros, sparsity}}, params (all trainable) and effective_params
    (params minus the counted zeros). Syncs with the device: not for the hot loop.
    """
    inner = _unwrap(model)
    per_layer: dict[str, dict[str, Any]] = {}
    zeros = numel = 0
    with torch.no_grad():
        for name, mod in prunable_layers(inner):
            z = int((mod.weight == 0).sum())
            n = mod.weight.numel()
            per_layer[name] = {"numel": n, "zeros": z, "sparsity": z / n if n else 0.0}
            zeros += z
            numel += n
    params = _trainable_params(inner)
    return {
        "overall": zeros / numel if numel else 0.0,
        "zeros": zeros,
        "numel": numel,
        "per_layer": per_layer,
        "params": params,
        "effective_params": params - zeros,
    }


def _counted_pass(model: nn.Module, image_size: int, batch: int) -> tuple[FlopCounterMode, FlopCounterMode]:
    """One forward and one forward+backward under FlopCounterMode, leaving the model as it was:
    eval mode (no BatchNorm running-stat update), gradients taken with autograd.grad (no
    .grad written), a zero input (the global RNG is not consumed)."""
    inner = _unwrap(model)
    p0 = next(inner.parameters())
    x = torch.zeros(batch, 1, image_size, image_size, device=p0.device, dtype=p0.dtype)
    params = [p for p in inner.parameters() if p.requires_grad]
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fwd:
            inner(x)
        with torch.enable_grad(), FlopCounterMode(display=False) as both:
            y = inner(x)
            torch.autograd.grad(y.sum(), params, allow_unused=True)
    finally:
        inner.train(was_training)
    return fwd, both


def count_flops(model: nn.Module, image_size: int, batch: int = 1) -> dict[str, int]:
    """FLOPs (2 per multiply-add, as torch.utils.flop_counter counts) of a (batch, 1, S, S) input:
    forward, and forward + backward (weight and input gradients)."""
    fwd, both = _counted_pass(model, image_size, batch)
    return {"flops_fwd": int(fwd.get_total_flops()), "flops_fwd_bwd": int(both.get_total_flops())}


def effective_flops(model: nn.Module, image_size: int) -> dict[str, Any]:
    """Per-image FLOPs executed (dense kernels) and *theoretical* FLOPs of ideal sparse kernels.

    The theoretical figure scales each conv/deconv layer's counted FLOPs (forward,
    and forward+backward) by that layer's measured density (1 - zeros/numel); FLOPs
    outside those layers are kept as they are. No real kernel here skips zeros.
    """
    inner = _unwrap(model)
    fwd, both = _counted_pass(inner, image_size, 1)
    root = type(inner).__name__
    per_fwd, per_both = fwd.get_flop_counts(), both.get_flop_counts()
    sp = measure_sparsity(inner)["per_layer"]
    totals = {"fwd": int(fwd.get_total_flops()), "fwd_bwd": int(both.get_total_flops())}
    theo = dict(totals)
    for name, stats in sp.items():
        density = 1.0 - stats["sparsity"]
        for key, counts in (("fwd", per_fwd), ("fwd_bwd", per_both)):
            layer = sum(counts.get(f"{root}.{name}", {}).values())
            theo[key] -= layer * (1.0 - density)
    return {
        "flops_fwd": totals["fwd"],
        "flops_fwd_bwd": totals["fwd_bwd"],
        "flops_fwd_theoretical_sparse": int(round(theo["fwd"])),
        "flops_fwd_bwd_theoretical_sparse": int(round(theo["fwd_bwd"])),
        "theoretical_fraction_fwd": theo["fwd"] / totals["fwd"] if totals["fwd"] else 1.0,
    }


