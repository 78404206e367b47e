"""DDNet's loss: MSE + 0.1 * (1 - MS-SSIM), and the quality metrics.

MS-SSIM comes from `pytorch_msssim` with data_range and channel given
explicitly and is always computed in true fp32 outside autocast (its products
of powers underflow in half precision) with TF32 off, also in the tf32 runs,
so every precision's quality is measured with the same arithmetic. The standard setting (5 scales, 11x11
Gaussian window) needs a side > 160 px; smaller images get a smaller window
(still 5 scales), and below 48 px fewer scales with renormalised weights.
Each scale is pytorch_msssim's own `_ssim`; the window and weights are made
on the device once, so the loss can be captured in a CUDA graph.
`choose_msssim` says which setting a size gets, and runs record it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

from ddnet.paper_msssim import MIN_SIDE as PAPER_MIN_SIDE
from ddnet.paper_msssim import ms_ssim_paper_code_per_image
from ddnet.precision import true_fp32

MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003
MSSSIM_WEIGHT_IN_LOSS = 0.1


@dataclass(frozen=True)
class MSSSIMSetting:
    """How MS-SSIM is computed for one image size."""

    scales: int
    win_size: int
    weights: tuple[float, ...]
    standard: bool
    """True only for the paper's setting: 5 scales, 11x11 window."""

    def describe(self) -> str:
        kind = "standard" if self.standard else "reduced"
        return f"{kind} MS-SSIM: {self.scales} scales, {self.win_size}x{self.win_size} window"

    def to_dict(self) -> dict:
        return asdict(self)


def choose_msssim(side: int) -> MSSSIMSetting:
    """The MS-SSIM setting for a square-ish image whose smaller side is `side` px.

    pytorch_msssim's `ms_ssim` asserts side > (win - 1) * 16 whatever the
    number of scales, so the window shrinks first (odd sizes 11..3); below
    that, scales are dropped (each scale halves the image, and the window
    must fit in the coarsest one) and the first weights renormalised.
    """
    for win in (11, 9, 7, 5, 3):
        if side > (win - 1) * 16:
            return MSSSIMSetting(5, win, MSSSIM_WEIGHTS, standard=(win == 11))
    win = 3
    scales = 1 + int(math.floor(math.log2(side / win))) if side >= win else 0
    scales = min(scales, 4)
    if scales < 2:
        raise ValueError(
            f"image side {side} px is too small for MS-SSIM (needs at least 2 scales with a 3x3 window, "
            f"i.e. a side of at least 6 px); use larger images (--image-size 64 or more)."
        )
    w = MSSSIM_WEIGHTS[:scales]
    total = sum(w)
    return MSSSIMSetting(scales, win, tuple(x / total for x in w), standard=False)


_WIN_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _window_and_weights(s: MSSSIMSetting, device: torch.device, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian window and scale weights on `device`, made once and cached.

    pytorch_msssim's `ms_ssim` builds both on the host at every call; that is a
    host-to-device copy per step, which CUDA graph capture forbids. The first
    call (eager warm-up) fills the cache, captured replays only read it.
    """
    key = (s.win_size, s.weights, str(device), channels)
    if key not in _WIN_CACHE:
        win = _fspecial_gauss_1d(s.win_size, 1.5).repeat([channels, 1, 1, 1]).to(device)
        _WIN_CACHE[key] = (win, torch.tensor(s.weights, dtype=torch.float32, device=device))
    return _WIN_CACHE[key]


def _ms_ssim_scales(x: torch.Tensor, y: torch.Tensor, s: MSSSIMSetting, data_range: float) -> torch.Tensor:
    """Per-image MS-SSIM (B,) over `s.scales` scales with pytorch_msssim's `_ssim` at each scale.

    The same recursion as `pytorch_msssim.ms_ssim` (relu'd contrast terms at
    the finer scales, SSIM at the coarsest, weighted product); equal to it for
    5 scales (tested), and valid for fewer scales, which `ms_ssim` refuses.
    """
    win, weights = _window_and_weights(s, x.device, x.shape[1])
    mcs = []
    for i in range(s.scales):
        ssim_pc, cs = _ssim(x, y, win=win, data_range=data_range, size_average=False, K=(0.01, 0.03))
        if i < s.scales - 1:
            mcs.append(torch.relu(cs))
            pad = [d % 2 for d in x.shape[2:]]
            x = F.avg_pool2d(x, kernel_size=2, padding=pad)
            y = F.avg_pool2d(y, kernel_size=2, padding=pad)
    stack = torch.stack([*mcs, torch.relu(ssim_pc)], dim=0)  # (scales, B, C)
    return _product(stack ** weights.view(-1, 1, 1)).mean(1)


def _product(terms: torch.Tensor) -> torch.Tensor:
    """Product over dim 0 as a chain of multiplies: the value of `torch.prod(terms, 0)`, without its sync.

    note: `torch.prod`'s backward counts the zeros of its input with a host
    read (`aten::item`), which CUDA-graph capture refuses; a chain of `mul`s
    has the same value and gradient and never leaves the device.
    """
    out = terms[0]
    for t in terms[1:]:
        out = out * t
    return out


def ms_ssim_per_image(
    pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, setting: MSSSIMSetting | None = None
) -> torch.Tensor:
    """MS-SSIM of each image in a (B, 1, H, W) batch, in [0, 1], in true fp32 (no TF32) outside autocast."""
    setting = setting or choose_msssim(min(pred.shape[-2:]))
    with torch.autocast(device_type=pred.device.type, enabled=False), true_fp32():
        return _ms_ssim_scales(pred.float(), target.float(), setting, data_range)


class DDNetLoss(torch.nn.Module):
    """MSE + 0.1 * (1 - MS-SSIM), in true fp32 whatever the caller's autocast state or TF32 flags."""

    def __init__(self, image_side: int, data_range: float = 1.0, guard_tf32: bool = True) -> None:
        """`guard_tf32`: switch TF32 off around the loss (needed only while the process runs in TF32,
        i.e. --precision tf32; the trainer decides it once, so compiled steps need not trace the guard)."""
        super().__init__()
        self.setting = choose_msssim(image_side)
        self.data_range = data_range
        self._exact = true_fp32 if guard_tf32 else contextlib.nullcontext
        if not self.setting.standard:
            warnings.warn(
                f"{image_side} px images are too small for the standard MS-SSIM; using {self.setting.describe()}",
                stacklevel=2,
            )

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=pred.device.type, enabled=False), self._exact():
            x, y = pred.float(), target.float()
            mse = F.mse_loss(x, y)
            msssim = _ms_ssim_scales(x, y, self.setting, self.data_range).mean()
            return mse + MSSSIM_WEIGHT_IN_LOSS * (1.0 - msssim)


def psnr_per_image(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB of each image of a batch (B,), against `data_range`."""
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def rmse_per_image(pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """RMSE of each image (B,), multiplied by `scale` (e.g. HU per normalised unit, per image)."""
    rmse = (pred.float() - target.float()).pow(2).flatten(1).mean(1).sqrt()
    return rmse * scale


def slice_metrics(pred: torch.Tensor, target: torch.Tensor, hu_scale: torch.Tensor,
                  setting: MSSSIMSetting) -> dict[str, torch.Tensor]:
    """Per-image quality of a batch (each (B,)): MS-SSIM in percent (the standard one, and the one
    the paper's code computed where the side allows it, >= 32 px), PSNR in dB, RMSE in HU.

    The one definition that training validation and `bench eval` share, so that a checkpoint
    evaluated on its own validation set reproduces the numbers training recorded.
    """
    with true_fp32():
        out = {
            "ms_ssim_pct": ms_ssim_per_image(pred, target, 1.0, setting) * 100.0,
            "psnr_db": psnr_per_image(pred, target, 1.0),
            "rmse_hu": rmse_per_image(pred, target, hu_scale),
        }
        if min(pred.shape[-2:]) >= PAPER_MIN_SIDE:
            out["ms_ssim_paper_code_pct"] = ms_ssim_paper_code_per_image(pred.float(), target.float()) * 100.0
        return out
