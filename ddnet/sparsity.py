"""Sparsity for DDNet: random, top-K (magnitude) and structured pruning, 2:4 patterns,
masks that hold through training, counted sparsity and FLOPs, and the 'auto' switch.

Three ways of realising sparsity, named honestly in `SparsifyResult.kind`:

- 'masked' (random, topk): weights are zeroed and a boolean mask is re-applied after
  every optimizer step. The dense kernels are unchanged, so the executed FLOPs are
  the same; only the *theoretical* FLOPs (what an ideal sparse kernel would do) fall.
- 'structural' (structured): whole output channels are removed from layers whose
  outputs feed no concatenation, and those layers (and their consumers) are rebuilt
  as smaller dense modules. The executed FLOPs really fall.
- 'none'.

Defects of the paper's public code avoided here (each has a test):
masks are kept and re-applied (Adam would otherwise regrow pruned weights),
magnitude pruning keeps weights in place (no scrambling), a wrapped model
(DataParallel / DDP / torch.compile) is unwrapped instead of pruning nothing,
and no precision flag (TF32) is ever touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ddnet.config import SparsityConfig
from ddnet.errors import UserError

CONV_TYPES = (nn.Conv2d, nn.ConvTranspose2d)

# ----------------------------------------------------------------------------- layers


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DataParallel / DistributedDataParallel / torch.compile wrappers.

    Pruning the wrapper by name would find layers called 'module.…' or '_orig_mod.…'
    and masks saved from one would not fit the other; always work on the inner module.
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d and ConvTranspose2d of `model`, by qualified name (wrappers removed)."""
    return [(n, m) for n, m in _unwrap(model).named_modules() if isinstance(m, CONV_TYPES)]


def _in_dim(conv: nn.Module) -> int:
    """Dimension of the weight that runs over input channels: Conv2d (out, in, kh, kw) -> 1,
    ConvTranspose2d (in, out, kh, kw) -> 0."""
    return 0 if isinstance(conv, nn.ConvTranspose2d) else 1


def _out_dim(conv: nn.Module) -> int:
    return 1 - _in_dim(conv)


def _trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in _unwrap(model).parameters() if p.requires_grad)


def _check_amount(amount: float) -> None:
    if not 0.0 <= amount < 1.0:
        raise UserError(f"sparsity amount {amount} must be in [0, 1); use e.g. --amount 0.5.")


def _check_pattern(pattern: str, amount: float) -> None:
    if pattern not in ("unstructured", "2:4"):
        raise UserError(f"sparsity pattern {pattern!r} is not one of unstructured, 2:4.")
    if pattern == "2:4" and amount != 0.5:
        raise UserError("--pattern 2:4 prunes exactly half; use --amount 0.5.")


def _layers_or_fail(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = prunable_layers(model)
    if not layers:
        # The paper's code pruned nothing under DDP without a word; never silently.
        raise UserError(
            f"{type(_unwrap(model)).__name__} has no Conv2d/ConvTranspose2d layer to prune; "
            "use --sparsity none."
        )
    return layers


# ----------------------------------------------------------------------------- masks


@dataclass(eq=False)  # tensors do not compare to one bool
class Masks:
    """Boolean keep-masks (True = kept), one per pruned layer, same shape as its weight.

    The trainer calls `apply_` after every optimizer step so pruned weights stay
    exactly zero (Adam's update of a zero weight with a non-zero gradient would
    otherwise regrow it: a defect of the paper's code).
    """

    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def _weights(self, model: nn.Module) -> list[torch.Tensor]:
        mods = dict(_unwrap(model).named_modules())
        weights = []
        for name, mask in self.masks.items():
            mod = mods.get(name)
            if mod is None or tuple(mod.weight.shape) != tuple(mask.shape):
                raise UserError(
                    f"sparsity mask for layer '{name}' does not fit this model; "
                    "load masks saved with the same model widths."
                )
            weights.append(mod.weight)
        return weights

    def apply_(self, model: nn.Module) -> None:
        """weight *= mask for every masked layer, in place.

        No host sync and no new parameters, so it can sit inside a
        torch.cuda.graph capture (masks must already be on the model's device).
        """
        weights = self._weights(model)
        if not weights:
            return
        with torch.no_grad():
            # bool masks promote to the weight dtype inside the multiply; no copy is made
            torch._foreach_mul_(weights, list(self.masks.values()))

    def mask_optimizer_state_(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Zero every per-element optimizer state (Adam's exp_avg, exp_avg_sq, max_exp_avg_sq)
        at pruned positions, so the moments accumulated while dense do not push on them."""
        with torch.no_grad():
            for weight, mask in zip(self._weights(model), self.masks.values(), strict=True):
                state = optimizer.state.get(weight)  # .get: do not create entries in the defaultdict
                if not state:
                    continue
                for value in state.values():
                    if torch.is_tensor(value) and value.shape == weight.shape:
                        value.mul_(mask)

    def to(self, device: torch.device | str) -> Masks:
        """A copy with every mask on `device`."""
        return Masks({k: v.to(device) for k, v in self.masks.items()})

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Layer name -> bool mask (the tensors themselves, as nn.Module.state_dict does)."""
        return dict(self.masks)

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> Masks:
        """Inverse of `state_dict`; masks are cast to bool (a saved float 0/1 mask works too)."""
        return cls({k: v.bool() for k, v in d.items()})

    def numel(self) -> int:
        """Weights covered by the masks."""
        return sum(m.numel() for m in self.masks.values())

    def zeros(self) -> int:
        """Pruned weights (host sync: not for the hot loop)."""
        return int(sum(int((~m).sum()) for m in self.masks.values()))


# ----------------------------------------------------------------------------- 2:4 groups


def _to_groups(w: torch.Tensor, in_dim: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View `w` as (..., in/4, 4): groups of 4 consecutive input channels at each
    (out, kh, kw) position. Returns the grouped tensor and the permutation used."""
    perm = tuple(d for d in range(w.dim()) if d != in_dim) + (in_dim,)
    g = w.permute(perm).contiguous()
    return g.reshape(*g.shape[:-1], g.shape[-1] // 4, 4), perm


def _from_groups(g: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
    g = g.reshape(*g.shape[:-2], g.shape[-2] * 4)
    inverse = [0] * len(perm)
    for i, d in enumerate(perm):
        inverse[d] = i
    return g.permute(inverse).contiguous()


def _mask_2to4(scores: torch.Tensor, in_dim: int) -> torch.Tensor:
    """Keep the 2 highest scores in every group of 4 consecutive input channels."""
    g, perm = _to_groups(scores, in_dim)
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(-1, g.topk(2, dim=-1).indices, True)
    return _from_groups(keep, perm)


def _left_dense_2to4(layers: list[tuple[str, nn.Module]]) -> dict[str, str]:
    out = {}
    for name, mod in layers:
        c_in = mod.weight.shape[_in_dim(mod)]
        if c_in % 4:
            out[name] = f"2:4 needs input channels divisible by 4, layer has {c_in}"
    return out


def _mask_exact(scores: torch.Tensor, n_zero: int) -> torch.Tensor:
    """Keep-mask that zeroes exactly the `n_zero` lowest scores (stable on ties)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_zero:
        keep[torch.argsort(scores.flatten(), stable=True)[:n_zero]] = False
    return keep.view(scores.shape)


# ----------------------------------------------------------------------------- masked pruning


def random_prune_(
    model: nn.Module,
    amount: float,
    pattern: str = "unstructured",
    generator: torch.Generator | None = None,
) -> Masks:
    """Zero a random `amount` of every conv/deconv weight in place and return the masks.

    unstructured: exactly round(amount * numel) zeros per layer.
    2:4: a random 2 of every 4 consecutive input channels; layers whose input
    channels are not a multiple of 4 stay dense (see `layers_left_dense`).
    Random numbers come from `generator` (a CPU generator; None: the global RNG)
    and are drawn on the CPU, so masks do not depend on the device.
    """
    _check_amount(amount)
    _check_pattern(pattern, amount)
    layers = _layers_or_fail(model)
    skip = _left_dense_2to4(layers) if pattern == "2:4" else {}
    masks: dict[str, torch.Tensor] = {}
    for name, mod in layers:
        if name in skip:
            continue
        w = mod.weight
        if pattern == "2:4":
            scores = torch.rand(w.shape, generator=generator)
            keep = _mask_2to4(scores, _in_dim(mod))
        else:
            n_zero = round(amount * w.numel())
            keep = torch.ones(w.numel(), dtype=torch.bool)
            keep[torch.randperm(w.numel(), generator=generator)[:n_zero]] = False
            keep = keep.view(w.shape)
        masks[name] = keep.to(w.device)
    result = Masks(masks)
    result.apply_(model)
    return result


def topk_prune_(
    model: nn.Module, amount: float, pattern: str = "unstructured", scope: str = "layer"
) -> Masks:
    """Zero the smallest-magnitude weights in place, keeping the rest where they are.

    scope 'layer': exactly round(amount * numel) zeros in every conv/deconv weight.
    scope 'global': one ranking of |w| over all those layers together, exactly
    round(amount * total) zeros in all (layers end up with different sparsities).
    2:4: the 2 largest |w| of every 4 consecutive input channels are kept.
    """
    _check_amount(amount)
    _check_pattern(pattern, amount)
    if scope not in ("layer", "global"):
        raise UserError(f"top-K scope {scope!r} is not one of layer, global.")
    if scope == "global" and pattern == "2:4":
        raise UserError("2:4 is a per-group pattern and cannot be ranked globally; use --scope layer.")
    layers = _layers_or_fail(model)
    skip = _left_dense_2to4(layers) if pattern == "2:4" else {}
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if scope == "global":
            mags = [mod.weight.detach().abs().float().flatten() for _, mod in layers]
            n_zero = round(amount * sum(m.numel() for m in mags))
            # ranks are computed on one device; layers may in principle live elsewhere
            dev = mags[0].device
            keep_all = _mask_exact(torch.cat([m.to(dev) for m in mags]), n_zero)
            for (name, mod), keep in zip(layers, keep_all.split([m.numel() for m in mags]), strict=True):
                masks[name] = keep.view(mod.weight.shape).to(mod.weight.device)
        else:
            for name, mod in layers:
                if name in skip:
                    continue
                mag = mod.weight.detach().abs().float()
                if pattern == "2:4":
                    masks[name] = _mask_2to4(mag, _in_dim(mod))
                else:
                    masks[name] = _mask_exact(mag, round(amount * mag.numel()))
    result = Masks(masks)
    result.apply_(model)
    return result


# ----------------------------------------------------------------------------- structured


def _channel_groups(model: nn.Module) -> list[tuple[str, str]]:
    """(producer, consumer) ConvUnit names whose producer output feeds no concatenation.

    In a dense layer the 1x1 bottleneck's output goes only into the 5x5 'grow' unit;
    in a decoder stage the 5x5 deconv's output goes only into the 1x1 deconv. Every
    other conv output is concatenated (dense block, skip connection) or is the
    network's output, so removing its channels would change widths downstream.
    """
    from ddnet.model import DecoderStage, DenseLayer  # local: model imports config only

    groups = []
    for name, mod in _unwrap(model).named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, DenseLayer):
            groups.append((f"{prefix}bottleneck", f"{prefix}grow"))
        elif isinstance(mod, DecoderStage):
            groups.append((f"{prefix}deconv5", f"{prefix}deconv1"))
    return groups


def _same_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t` made contiguous in `ref`'s memory format (keeps channels_last models channels_last)."""
    if ref.dim() == 4 and not ref.is_contiguous() and ref.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def _empty_conv_like(conv: nn.Module, c_in: int, c_out: int) -> nn.Module:
    """A conv of conv's type and geometry with new widths, built on 'meta' (no init, no RNG use):
    the caller assigns every parameter."""
    if conv.groups != 1:
        raise UserError(f"{type(conv).__name__} with groups={conv.groups} cannot be resized here.")
    kwargs: dict[str, Any] = dict(
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",
    )
    if isinstance(conv, nn.ConvTranspose2d):
        kwargs["output_padding"] = conv.output_padding
    new = type(conv)(c_in, c_out, **kwargs)
    new.train(conv.training)
    return new


def _empty_bn_like(bn: nn.BatchNorm2d, c: int) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(
        c, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats, device="meta",
    )
    new.train(bn.training)
    return new


def _param(t: torch.Tensor, old: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(_same_layout(t.detach().clone(), old), requires_grad=old.requires_grad)


class _ParamSwap:
    """Old parameter -> (new parameter, how to slice a tensor shaped like the old one)."""

    def __init__(self) -> None:
        self.items: list[tuple[nn.Parameter, nn.Parameter, Any]] = []

    def add(self, old: nn.Parameter, dim: int, index: torch.Tensor) -> nn.Parameter:
        def slicer(t: torch.Tensor) -> torch.Tensor:
            return _same_layout(t.index_select(dim, index.to(t.device)), old)

        with torch.no_grad():
            new = _param(old.index_select(dim, index), old)
        self.items.append((old, new, slicer))
        return new

    def rebuild_optimizer_(self, optimizer: torch.optim.Optimizer) -> None:
        """Swap params in the optimizer's groups and slice their state, in place
        (same optimizer object, so an LR scheduler bound to it keeps working)."""
        by_id = {id(old): (new, slicer) for old, new, slicer in self.items}
        for group in optimizer.param_groups:
            group["params"] = [by_id[id(p)][0] if id(p) in by_id else p for p in group["params"]]
        for old, new, slicer in self.items:
            state = optimizer.state.pop(old, None)
            if state is None:
                continue
            optimizer.state[new] = {
                k: slicer(v) if torch.is_tensor(v) and v.shape == old.shape else v
                for k, v in state.items()
            }


def _shrink_pair_(producer: nn.Module, consumer: nn.Module, keep: torch.Tensor, swap: _ParamSwap) -> None:
    """Keep only output channels `keep` of producer.conv, and the matching inputs of
    consumer.bn and consumer.conv; the modules are replaced in place."""
    pconv, cbn, cconv = producer.conv, consumer.bn, consumer.conv
    keep = keep.to(pconv.weight.device)
    n = int(keep.numel())

    new_p = _empty_conv_like(pconv, pconv.weight.shape[_in_dim(pconv)], n)
    new_p.weight = swap.add(pconv.weight, _out_dim(pconv), keep)
    if pconv.bias is not None:
        new_p.bias = swap.add(pconv.bias, 0, keep)

    new_bn = _empty_bn_like(cbn, n)
    if cbn.affine:
        new_bn.weight = swap.add(cbn.weight, 0, keep)
        new_bn.bias = swap.add(cbn.bias, 0, keep)
    if cbn.track_running_stats:
        new_bn.running_mean = cbn.running_mean.index_select(0, keep).clone()
        new_bn.running_var = cbn.running_var.index_select(0, keep).clone()
        new_bn.num_batches_tracked = cbn.num_batches_tracked.clone()

    new_c = _empty_conv_like(cconv, n, cconv.weight.shape[_out_dim(cconv)])
    new_c.weight = swap.add(cconv.weight, _in_dim(cconv), keep)
    if cconv.bias is not None:
        new_c.bias = cconv.bias  # same Parameter object: its optimizer state stays valid

    producer.conv, consumer.bn, consumer.conv = new_p, new_bn, new_c


def structured_prune_(
    model: nn.Module,
    amount: float,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    image_size: int = 64,
) -> dict[str, Any]:
    """Remove `amount` of the output channels of every prunable layer for real.

    Prunable layers are those whose output feeds no concatenation (see
    `_channel_groups`): the 1x1 bottleneck of each dense layer and the 5x5
    deconv of each decoder stage. Channels with the smallest L1 filter norm go;
    round(amount * channels) are removed, at least one kept. The layer, the
    consumer's BatchNorm (params and running stats) and the consumer's conv are
    replaced by smaller dense modules. With `optimizer`, its param groups and
    per-element state (exp_avg, exp_avg_sq) are sliced to the kept channels in
    place; scalar state (step) is kept.

    Returns a report: params and FLOPs (per image at `image_size`) before and
    after, the pruned layers with their widths, and the kept channel indices.
    """
    _check_amount(amount)
    inner = _unwrap(model)
    groups = _channel_groups(inner)
    if not groups:
        raise UserError(
            f"structured pruning found no prunable channel group in {type(inner).__name__} "
            "(it needs DDNet's dense layers / decoder stages); use --sparsity random or topk."
        )
    params_before = _trainable_params(inner)
    flops_before = count_flops(inner, image_size)

    swap = _ParamSwap()
    channels_before: dict[str, int] = {}
    channels_after: dict[str, int] = {}
    kept: dict[str, list[int]] = {}
    for prod_name, cons_name in groups:
        producer, consumer = inner.get_submodule(prod_name), inner.get_submodule(cons_name)
        conv = producer.conv
        w = conv.weight.detach()
        n = w.shape[_out_dim(conv)]
        n_keep = max(1, n - round(amount * n))
        layer = f"{prod_name}.conv"
        channels_before[layer] = n
        channels_after[layer] = n_keep
        # L1 norm of each output filter (over input channels and kernel taps)
        dims = tuple(d for d in range(w.dim()) if d != _out_dim(conv))
        l1 = w.abs().float().sum(dim=dims)
        # largest norms kept; stable sort so ties keep the lower index; sorted so order is preserved
        keep = torch.argsort(-l1, stable=True)[:n_keep].sort().values
        kept[layer] = keep.tolist()
        if n_keep < n:
            _shrink_pair_(producer, consumer, keep, swap)
    if optimizer is not None:
        swap.rebuild_optimizer_(optimizer)

    params_after = _trainable_params(inner)
    flops_after = count_flops(inner, image_size)
    pruned = set(channels_before)
    return {
        "amount": amount,
        "pattern": "channels",
        "params_before": params_before,
        "params_after": params_after,
        "params_removed": params_before - params_after,
        "flops_image_size": image_size,
        "flops_fwd_before": flops_before["flops_fwd"],
        "flops_fwd_after": flops_after["flops_fwd"],
        "flops_fwd_bwd_before": flops_before["flops_fwd_bwd"],
        "flops_fwd_bwd_after": flops_after["flops_fwd_bwd"],
        "layers_pruned": sorted(pruned),
        "channels_before": channels_before,
        "channels_after": channels_after,
        "kept_channels": kept,
        "layers_left_dense": {
            name: "output feeds a concatenation (skip connection or dense block) or is the output"
            for name, _ in prunable_layers(inner)
            if name not in pruned and not any(name == f"{c}.conv" for _, c in groups)
        },
    }


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
    if cfg.kind == "structured":
        if cfg.pattern != "unstructured":
            raise UserError("--pattern 2:4 applies to random and topk pruning; use --pattern unstructured.")
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
    if cfg.kind in ("random", "topk"):
        if cfg.pattern == "2:4":
            left_dense = _left_dense_2to4(prunable_layers(inner))
        if cfg.kind == "random":
            gen = torch.Generator().manual_seed(seed)
            masks = random_prune_(inner, cfg.amount, cfg.pattern, generator=gen)
        else:
            masks = topk_prune_(inner, cfg.amount, cfg.pattern, cfg.scope)
        if optimizer is not None:
            masks.mask_optimizer_state_(inner, optimizer)
    elif cfg.kind != "none":
        raise UserError(f"--sparsity {cfg.kind!r} is not one of none, random, structured, topk.")

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


# ----------------------------------------------------------------------------- schedule


class AutoSwitch:
    """The '--dense-epochs auto' rule, after the paper's Fig. 4b.

    The paper plots the change of the loss per epoch on a log scale: it spans
    several orders of magnitude early on, then stays within one order of
    magnitude; that is when pruning stops hurting. Precisely, with L_t the mean
    training loss of dense epoch t (t = 1, 2, ...) and d_t = |L_t - L_{t-1}|
    (t >= 2), `update` returns True at the end of epoch t when

      (a) t >= min_epoch, and t >= patience + 1 (there are `patience` changes), and
          max(d_{t-patience+1..t}) / min(d_{t-patience+1..t}) <= 10
          (all zero counts as settled; a zero beside a non-zero change does not;
          a non-finite loss never settles), or
      (b) max_epoch is set and t >= max_epoch (forced, so at least one sparse
          epoch remains when the trainer passes epochs - 1).

    `switch_epoch` is then t, the number of dense epochs done. Once fired it
    keeps returning True and `switch_epoch` does not move.
    """

    RATIO = 10.0  # one order of magnitude

    def __init__(self, patience: int = 3, min_epoch: int = 2, max_epoch: int | None = None) -> None:
        if patience < 1:
            raise UserError(f"auto switch patience {patience} must be at least 1.")
        if min_epoch < 1:
            raise UserError(f"auto switch min_epoch {min_epoch} must be at least 1.")
        if max_epoch is not None and max_epoch < 1:
            raise UserError(f"auto switch max_epoch {max_epoch} must be at least 1; use --epochs 2 or more.")
        self.patience = patience
        self.min_epoch = min_epoch
        self.max_epoch = max_epoch
        self.losses: list[float] = []
        self.switch_epoch: int | None = None
        self.forced = False
        """True when it fired because max_epoch was reached, not because the loss settled."""
        self.rule = (
            f"prune after dense epoch t >= {min_epoch} once the last {patience} changes "
            f"|L_t - L_(t-1)| of the training loss lie within one order of magnitude "
            f"(max/min <= {self.RATIO:g})"
            + (f"; forced at epoch {max_epoch}" if max_epoch is not None else "")
        )

    def changes(self) -> list[float]:
        """d_t for t = 2..len(losses)."""
        return [abs(b - a) for a, b in zip(self.losses, self.losses[1:], strict=False)]

    def _settled(self) -> bool:
        d = self.changes()[-self.patience:]
        if len(d) < self.patience or not all(math.isfinite(v) for v in d):
            return False
        lo, hi = min(d), max(d)
        if hi == 0.0:
            return True
        return lo > 0.0 and hi / lo <= self.RATIO

    def update(self, train_loss: float) -> bool:
        """Record one finished dense epoch's training loss; True when it is time to prune now."""
        if self.switch_epoch is not None:
            return True
        self.losses.append(float(train_loss))
        t = len(self.losses)
        if t >= self.min_epoch and self._settled():
            self.switch_epoch = t
        elif self.max_epoch is not None and t >= self.max_epoch:
            self.switch_epoch = t
            self.forced = True
        return self.switch_epoch is not None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the rule mid-run."""
        return {"losses": list(self.losses), "switch_epoch": self.switch_epoch, "forced": self.forced}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.losses = [float(v) for v in d["losses"]]
        self.switch_epoch = d["switch_epoch"]
        self.forced = bool(d.get("forced", False))


def phase_of(epoch_index: int, dense_epochs: int | None) -> str:
    """'dense' or 'sparse' for the 0-based `epoch_index`.

    dense_epochs None means no switch is scheduled (yet): no sparsity, or an
    'auto' schedule that has not fired, so the epoch is dense.
    """
    if epoch_index < 0:
        raise ValueError(f"epoch_index must be >= 0, got {epoch_index}")
    if dense_epochs is None or epoch_index < dense_epochs:
        return "dense"
    return "sparse"


# ----------------------------------------------------------------------------- checkpoints


def conform_to_state_dict_(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Rebuild conv/deconv/BatchNorm layers whose widths differ from `state_dict` (a
    structurally pruned run's checkpoint) so `model.load_state_dict(state_dict, strict=True)`
    works. Rebuilt layers hold zeros until that load; kernel sizes must match."""
    inner = _unwrap(model)
    for name, mod in list(inner.named_modules()):
        if not isinstance(mod, (*CONV_TYPES, nn.BatchNorm2d)):
            continue
        key = f"{name}.weight" if isinstance(mod, CONV_TYPES) or mod.affine else f"{name}.running_mean"
        if key not in state_dict:
            continue  # load_state_dict(strict=True) will name the missing key itself
        shape = tuple(state_dict[key].shape)
        ref = mod.weight if isinstance(mod, CONV_TYPES) or mod.affine else mod.running_mean
        if shape == tuple(ref.shape):
            continue
        device, dtype = ref.device, ref.dtype
        if isinstance(mod, CONV_TYPES):
            if shape[2:] != tuple(mod.weight.shape[2:]):
                raise UserError(
                    f"checkpoint layer '{name}' has kernel {shape[2:]}, the model {tuple(mod.weight.shape[2:])}; "
                    "use the model config the checkpoint was trained with."
                )
            c_out, c_in = (shape[0], shape[1]) if isinstance(mod, nn.Conv2d) else (shape[1], shape[0])
            new = _empty_conv_like(mod, c_in, c_out).to_empty(device=device).to(dtype)
            with torch.no_grad():
                new.weight.zero_()
                if new.bias is not None:
                    new.bias.zero_()
        else:
            new = _empty_bn_like(mod, shape[0]).to_empty(device=device).to(dtype)
            new.reset_parameters()  # ones/zeros, no RNG
        parent_name, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent_name) if parent_name else inner, child, new)
