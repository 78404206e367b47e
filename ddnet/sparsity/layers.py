"""Which layers sparsity touches, and the checks every pruning verb shares."""

from __future__ import annotations

from torch import nn

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


