"""One entry point: `sparsify_(model, SparsityConfig)` applies the configured technique."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ddnet.config import SparsityConfig
from ddnet.sparsity.layers import _trainable_params, _unwrap, prunable_layers
from ddnet.sparsity.masks import Masks, _left_dense_2to4, random_prune_, topk_prune_
from ddnet.sparsity.measure import count_flops, effective_flops, measure_sparsity
from ddnet.sparsity.structured import structured_prune_

# ----------------------------------------------------------------------------- one entry point


@dataclass
class SparsifyResult:
    """What `sparsify_` did."""

    masks: Masks | None
    """Masks to re-apply after every optimizer step; None for structured and none."""
    kind: str
    """'none' | 'masked' (simulated: dense kernels unchanged) | 'structural' (layers shrunk)."""
    report: dict[str, Any]
    """Flat-ish numbers: params_before/after, flops_fwd_before/after (executed, per image),
    flops_fwd_theoretical_after (ideal sparse kernels), layers_pruned, layers_left_dense, ..."""


def sparsify_(
    model: nn.Module,
    cfg: SparsityConfig,
    *,
    seed: int,
    optimizer: torch.optim.Optimizer | None = None,
    image_size: int = 64,
) -> SparsifyResult:
    """Prune `model` in place as `cfg` says; apply masks once and mask the optimizer state.

    random draws its masks from a CPU generator seeded with `seed` (the same masks
    on every device). FLOPs are per image at `image_size`. For masked sparsity the
    executed FLOPs do not change (`flops_fwd_after` == before); the
    `*_theoretical_after` keys give what ideal sparse kernels would execute.
    """
    inner = _unwrap(model)
    base: dict[str, Any] = {
        "sparsity": cfg.kind,
        "amount": cfg.amount if cfg.kind != "none" else 0.0,
        "pattern": cfg.pattern,
        "scope": cfg.scope,
        "flops_image_size": image_size,
    }
    if cfg.kind == "structured":  # a SparsityConfig is valid by construction: no 2:4 here
        report = structured_prune_(inner, cfg.amount, optimizer, image_size=image_size)
        report.pop("pattern")
        eff = effective_flops(inner, image_size)
        sp = measure_sparsity(inner)
        report.update(
            flops_fwd_theoretical_after=eff["flops_fwd_theoretical_sparse"],
            flops_fwd_bwd_theoretical_after=eff["flops_fwd_bwd_theoretical_sparse"],
            sparsity_measured=sp["overall"],
            effective_params=sp["effective_params"],
        )
        return SparsifyResult(None, "structural", {**base, **report, "realisation": "structural"})

    params_before = _trainable_params(inner)
    flops_before = count_flops(inner, image_size)
    masks: Masks | None = None
    left_dense: dict[str, str] = {}
    if cfg.masked:
        if cfg.pattern == "2:4":
            left_dense = _left_dense_2to4(prunable_layers(inner))
        if cfg.kind == "random":
            gen = torch.Generator().manual_seed(seed)
            masks = random_prune_(inner, cfg.amount, cfg.pattern, generator=gen)
        else:
            masks = topk_prune_(inner, cfg.amount, cfg.pattern, cfg.scope)
        if optimizer is not None:
            masks.mask_optimizer_state_(inner, optimizer)

    sp = measure_sparsity(inner)
    eff = effective_flops(inner, image_size)
    report = {
        **base,
        "realisation": "masked" if masks is not None else "none",
        "params_before": params_before,
        "params_after": sp["effective_params"],
        "effective_params": sp["effective_params"],
        "sparsity_measured": sp["overall"],
        "flops_fwd_before": flops_before["flops_fwd"],
        "flops_fwd_after": eff["flops_fwd"],
        "flops_fwd_bwd_before": flops_before["flops_fwd_bwd"],
        "flops_fwd_bwd_after": eff["flops_fwd_bwd"],
        "flops_fwd_theoretical_after": eff["flops_fwd_theoretical_sparse"],
        "flops_fwd_bwd_theoretical_after": eff["flops_fwd_bwd_theoretical_sparse"],
        "layers_pruned": sorted(masks.masks) if masks is not None else [],
        "layers_left_dense": left_dense,
    }
    return SparsifyResult(masks, report["realisation"], report)


