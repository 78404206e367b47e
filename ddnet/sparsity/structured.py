"""Structured sparsity that really shrinks the layers, and loading such a checkpoint into a full-width net."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ddnet.errors import UserError
from ddnet.model import DecoderStage, DenseLayer
from ddnet.sparsity.layers import (
    CONV_TYPES,
    _check_amount,
    _in_dim,
    _out_dim,
    _trainable_params,
    _unwrap,
    prunable_layers,
)
from ddnet.sparsity.measure import count_flops

# ----------------------------------------------------------------------------- structured


def _channel_groups(model: nn.Module) -> list[tuple[str, str]]:
    """(producer, consumer) ConvUnit names whose producer output feeds no concatenation.

    In a dense layer the 1x1 bottleneck's output goes only into the 5x5 'grow' unit;
    in a decoder stage the 5x5 deconv's output goes only into the 1x1 deconv. Every
    other conv output is concatenated (dense block, skip connection) or is the
    network's output, so removing its channels would change widths downstream.
    """

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
