"""Masked (simulated) sparsity: random and top-K pruning, 2:4 patterns, masks kept through training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ddnet.errors import UserError
from ddnet.sparsity.layers import _check_amount, _check_pattern, _in_dim, _layers_or_fail, _unwrap

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

    def bind(self, model: nn.Module) -> Callable[[], None]:
        """`apply_` for this very model, resolved once: the weights are looked up and checked here,
        and the returned function is a single foreach multiply over the bound tensors.

        Call it after every optimizer step (the hot loop); bind again whenever the model's
        parameters are replaced (structured pruning, a rebuilt step). No host sync and no
        new parameters, so it can sit inside a torch.cuda.graph capture (masks must already
        be on the model's device).
        """
        weights, masks = self._weights(model), list(self.masks.values())
        if not weights:
            return _nothing

        def apply() -> None:
            with torch.no_grad():
                # bool masks promote to the weight dtype inside the multiply; no copy is made
                torch._foreach_mul_(weights, masks)

        return apply

    def apply_(self, model: nn.Module) -> None:
        """weight *= mask for every masked layer, in place (resolves the layers each call: see `bind`)."""
        self.bind(model)()

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


def _nothing() -> None:
    return None
