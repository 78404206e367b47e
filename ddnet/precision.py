"""How fp32 matmuls and convolutions run on CUDA: true IEEE fp32 or TF32.

cuDNN lets convolutions use TF32 by default, so a run that claims fp32 must
switch it off explicitly, and quality metrics must run in true fp32 whatever
the training precision (otherwise the `tf32` cell's MS-SSIM would be measured
with a different arithmetic than every other cell's). Only one of PyTorch's
two APIs is ever used: the `fp32_precision` settings where they exist (torch
>= 2.9; mixing them with the legacy `allow_tf32` flags raises in recent
PyTorch), the legacy flags on older versions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

Mode = str  # 'ieee' | 'tf32' (the new API may also read 'none': inherit the parent setting)


def _new_api() -> bool:
    conv = getattr(torch.backends.cudnn, "conv", None)
    return conv is not None and hasattr(conv, "fp32_precision")


def get_fp32_modes() -> tuple[Any, Any]:
    """(matmul, conv) settings as they are now, in the API this torch uses."""
    if _new_api():
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _put(modes: tuple[Any, Any]) -> None:
    if _new_api():
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = modes
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = modes


def set_fp32_precision(mode: Mode) -> dict[str, Any]:
    """Set matmuls and convolutions to 'ieee' (true fp32) or 'tf32' process-wide; returns the flags set."""
    if _new_api():
        _put((mode, mode))
        matmul, conv = get_fp32_modes()
        return {"tf32_api": "fp32_precision", "cuda.matmul.fp32_precision": matmul,
                "cudnn.conv.fp32_precision": conv}
    allow = mode == "tf32"
    _put((allow, allow))
    return {"tf32_api": "allow_tf32", "cuda.matmul.allow_tf32": allow, "cudnn.allow_tf32": allow}


_IEEE_NEW = ("ieee", "ieee")
_IEEE_LEGACY = (False, False)


@contextlib.contextmanager
def true_fp32() -> Iterator[None]:
    """Run the body with TF32 off for matmuls and convolutions, then restore the settings.

    The loss and the quality metrics run inside it, so every precision mode
    measures quality with the same arithmetic. Setting the flags is a host-side
    attribute write (no device work, no sync): it is safe inside a CUDA-graph
    capture, where the kernels chosen while the flags hold are the ones recorded.
    """
    saved = get_fp32_modes()
    ieee = _IEEE_NEW if _new_api() else _IEEE_LEGACY
    if saved == ieee:  # the fp32 runs: nothing to switch
        yield
        return
    _put(ieee)
    try:
        yield
    finally:
        _put(saved)
