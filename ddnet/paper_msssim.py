"""MS-SSIM as the paper's public code computes it: a reproduction of its behaviour, bracket included.

This is NOT a correct MS-SSIM. It reproduces `msssim(..., normalize="simple")`
as called by the `MSSSIM` module of the paper's code (github.com/ayushchatur/2dnet,
`core/losses.py`, lines 20-115 and 145-154), so that our numbers can be put next
to the paper's. Its training and validation loops call `MSSSIM()(outputs, targets)`
on whole batches; `ddnet_inference.py` calls it slice by slice (batch 1).
The standard metric of this repo is `ddnet.loss` (pytorch_msssim).

How it differs from the standard (pytorch_msssim), each checked against the
source text:

1. Per scale, SSIM with a Gaussian window (sigma 1.5) of side min(11, H, W) of
   the image *at that scale*, VALID convolution (`padding=0`); 5 scales with
   2x2 average pooling (stride 2, odd sides floored) between them; weights
   (0.0448, 0.2856, 0.3001, 0.2363, 0.1333). The source also pools after the
   last scale, so it needs sides of at least 32 (`MIN_SIDE`), not 16. A clipped window of even side is
   off-centre (offsets -k/2 .. k/2-1), as `gaussian()` makes it.
2. `cs` of a scale is the mean of (2 s12 + C2) / (s1 + s2 + C2) over the whole
   tensor (every image, channel and pixel) and the SSIM term is the mean of the
   SSIM map over the whole tensor: one number per batch, not per image.
3. The dynamic range is read from the first argument (`pred`, the network
   output): max_val = 255 if max(pred) > 128 else 1; min_val = -0.1 if
   min(pred) < -0.001 else 0; L = max_val - min_val, C1 = (0.01 L)^2,
   C2 = (0.03 L)^2. These are the thresholds of the source (lines 24-33);
   a description that said "min_val = -1 if min < -0.5" does not match it and
   is not what is implemented. The source computes L inside `ssim()`, which
   `msssim()` calls once per scale on the pooled images, so L is re-read at
   every scale: an image whose maximum drops to 128 or below after pooling is
   scored with L = 1 (or 1.1) at the coarser scales.
4. "Simple" normalisation: every ssim and cs value v is mapped to (v + 1) / 2
   before the powers, so anti-correlated images still give a positive score.
5. The combination `torch.prod(pow1[:-1] * pow2[-1])` (line 106) has a
   misplaced bracket: each of the 4 factors is cs_i^w_i times the coarsest
   SSIM^w_5, so the coarsest SSIM enters with exponent 4 x 0.1333 instead of
   0.1333 (cs of the coarsest scale enters neither formula).

Differences from the source that do not change the value: the computation
runs in float32 (float64 when an input is float64) outside autocast, whereas
the source's float32 window fails on float64 inputs; the range rule uses
tensor arithmetic instead of Python branches, so there is no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAPER_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Per-scale exponents of the paper's code (Wang et al. 2003), finest scale first."""
PAPER_SCALES = len(PAPER_WEIGHTS)
PAPER_WINDOW = 11
PAPER_SIGMA = 1.5
MIN_SIDE = 2**PAPER_SCALES
"""32: the source pools after every scale, the last included (line 90), so the image must
survive 5 poolings (its coarsest scale is then 2x2, with a 2x2 window); below that the
source stops with a pooling error. Full 11x11 windows at every scale need a side of 176."""

_Dims = tuple[int, ...]


def _window(side: int, channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(C, 1, side, side) Gaussian window, sigma 1.5, centred on index side // 2 as in the source."""
    x = torch.arange(side, dtype=dtype, device=device) - side // 2
    g = torch.exp(-(x**2) / (2 * PAPER_SIGMA**2))
    g = g / g.sum()
    return torch.outer(g, g).expand(channels, 1, side, side).contiguous()


def _scale_terms(img1: torch.Tensor, img2: torch.Tensor, dims: _Dims) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean cs of one scale over `dims`, with L read from img1 over the same dims."""
    _, c, h, w = img1.shape
    win = _window(min(PAPER_WINDOW, h, w), c, img1.dtype, img1.device)
    # keepdim so that L is a scalar-like (1,1,1,1) for a batch and (B,1,1,1) per image
    max_val = 1.0 + 254.0 * (img1.amax(dim=dims, keepdim=True) > 128).to(img1.dtype)  # 255 or 1
    min_val = -0.1 * (img1.amin(dim=dims, keepdim=True) < -0.001).to(img1.dtype)  # -0.1 or 0
    data_range = max_val - min_val
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, win, padding=0, groups=c)  # VALID: no padding

    mu1, mu2 = blur(img1), blur(img2)
    s1 = blur(img1 * img1) - mu1 * mu1
    s2 = blur(img2 * img2) - mu2 * mu2
    s12 = blur(img1 * img2) - mu1 * mu2
    cs_map = (2 * s12 + c2) / (s1 + s2 + c2)
    ssim_map = (2 * mu1 * mu2 + c1) / (mu1 * mu1 + mu2 * mu2 + c1) * cs_map
    return ssim_map.mean(dim=dims), cs_map.mean(dim=dims)


def _check(pred: torch.Tensor, target: torch.Tensor) -> torch.dtype:
    if pred.ndim != 4 or pred.shape != target.shape:
        raise ValueError(f"pred and target must be (B, C, H, W) of the same shape, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if min(pred.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"images of {pred.shape[-2]}x{pred.shape[-1]} are too small for {PAPER_SCALES} "
                         f"scales: the paper code's MS-SSIM needs a side of at least {MIN_SIDE} pixels")
    return torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32


def _scales(pred: torch.Tensor, target: torch.Tensor, dims: _Dims) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = _check(pred, target)
    ssims, css = [], []
    with torch.autocast(device_type=pred.device.type, enabled=False):
        img1, img2 = pred.to(dtype), target.to(dtype)
        for i in range(PAPER_SCALES):
            if i:
                img1, img2 = F.avg_pool2d(img1, 2), F.avg_pool2d(img2, 2)
            s, c = _scale_terms(img1, img2, dims)
            ssims.append(s)
            css.append(c)
    return torch.stack(ssims), torch.stack(css)


def _combine(ssims: torch.Tensor, css: torch.Tensor) -> torch.Tensor:
    """The source's normalisation and bracket: prod_{i<5}(((cs_i+1)/2)^w_i * ((ssim_5+1)/2)^w_5)."""
    w = torch.tensor(PAPER_WEIGHTS, dtype=ssims.dtype, device=ssims.device)
    w = w.reshape(-1, *([1] * (ssims.ndim - 1)))  # (5,) or (5, 1) against (5,) or (5, B)
    ssims, css = (ssims + 1) / 2, (css + 1) / 2  # "simple" normalisation
    return torch.prod(css[:-1] ** w[:-1] * ssims[-1] ** w[-1], dim=0)


def paper_code_scales(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-scale (ssim, cs), each (5,), as the paper's code computes them, before normalisation.

    Finest scale first; each is a mean over the whole batch with L read from
    `pred` at that scale. `ms_ssim_paper_code` combines exactly these.
    """
    return _scales(pred, target, dims=(0, 1, 2, 3))


def ms_ssim_paper_code(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MS-SSIM of a batch as the paper's code computes it (one number, in [0, 1]), bracket included.

    pred, target: (B, C, H, W), C = 1 for CT slices, sides >= 32 (`MIN_SIDE`). `pred` is
    the code's `img1` (the network output): the dynamic range is read from it.
    Returns a 0-dim tensor, a fraction (not percent), float32 (float64 for
    float64 inputs); computed outside autocast, without a host sync. This is
    a reproduction of that code's behaviour for comparing with the paper's
    numbers, not a correct MS-SSIM: see the module docstring for the five
    differences. Raises ValueError for images too small for 5 scales.
    """
    return _combine(*_scales(pred, target, dims=(0, 1, 2, 3)))


def ms_ssim_paper_code_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`ms_ssim_paper_code` of each image on its own: (B,), for per-slice records.

    The paper's code averaged ssim and cs over a whole batch before combining
    them (training and validation), so its batch value is not the mean of these;
    with batch size 1 (as in its `ddnet_inference.py`) the two are the same:
    entry i equals `ms_ssim_paper_code(pred[i:i+1], target[i:i+1])`, L included.
    """
    return _combine(*_scales(pred, target, dims=(1, 2, 3)))
