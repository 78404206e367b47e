"""DDNet: DenseNet encoder + deconvolution decoder (Zhang et al., IEEE TMI 2018).

Exactly the network of the paper's public code (checked against its shipped
weights): every unit is BatchNorm -> conv -> LeakyReLU(0.01).

    x (B,1,H,W) -> stem -> c0 (16, H)
    c0 -> [pool -> dense block -> transition] x4 -> c1..c4 (16, H/2..H/16)
    c4 -> [upsample x2 -> concat skip -> BN deconv5x5 -> BN deconv1x1] x4 -> (1, H)

At the default widths: 37 Conv2d, 8 ConvTranspose2d, 45 BatchNorm2d,
566,451 trainable parameters. Layers keep their own widths (no global width
is re-read in forward), so structured pruning can swap in narrower layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddnet.config import ModelConfig

SLOPE = 0.01  # LeakyReLU negative slope of the original code


class ConvUnit(nn.Module):
    """BN -> Conv (or ConvTranspose) -> LeakyReLU, the building block of the whole net."""

    def __init__(self, c_in: int, c_out: int, kernel: int, transpose: bool = False) -> None:
        super().__init__()
        conv_cls = nn.ConvTranspose2d if transpose else nn.Conv2d
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = conv_cls(c_in, c_out, kernel, stride=1, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(self.bn(x)), SLOPE)


class DenseLayer(nn.Module):
    """Bottleneck 1x1 (-> bottleneck ch) then 5x5 (-> growth ch); output is concatenated to the input."""

    def __init__(self, c_in: int, bottleneck: int, growth: int) -> None:
        super().__init__()
        self.bottleneck = ConvUnit(c_in, bottleneck, 1)
        self.grow = ConvUnit(bottleneck, growth, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.grow(self.bottleneck(x))], dim=1)


class DenseBlock(nn.Sequential):
    """`n` dense layers: c_in -> c_in + n * growth channels."""

    def __init__(self, c_in: int, n: int, bottleneck: int, growth: int) -> None:
        super().__init__(*(DenseLayer(c_in + i * growth, bottleneck, growth) for i in range(n)))


class EncoderStage(nn.Module):
    """MaxPool(3, 2, 1) -> dense block -> transition 1x1 back to `width` channels."""

    def __init__(self, width: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.block = DenseBlock(width, cfg.layers_per_block, cfg.bottleneck, cfg.growth)
        self.transition = ConvUnit(width + cfg.layers_per_block * cfg.growth, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        return self.transition(self.block(x))


def _linear_weights(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) matrix of linear interpolation with align_corners=True, computed as
    F.interpolate computes its weights (scale and source positions in fp32, fp64 for fp64): two nonzeros a row."""
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    # the scale is divided on the CPU, in `acc` as interpolate divides it, and enters as a number: a tensor
    # made on the GPU from a Python number is a host-to-device copy, which a CUDA graph capture refuses
    scale = (torch.tensor(float(n_in - 1), dtype=acc) / max(n_out - 1, 1)).item()
    src = torch.arange(n_out, device=like.device, dtype=acc) * scale
    low = src.floor()
    frac = src - low
    j = torch.arange(n_in, device=like.device, dtype=acc)
    w = torch.where(j == low[:, None], 1.0 - frac[:, None], 0.0)
    return (w + torch.where(j == low[:, None] + 1.0, frac[:, None], 0.0)).to(like.dtype)


def bilinear_matmul(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with align_corners=True as two matrix products (columns, then rows).

    The same values as `F.interpolate(..., mode="bilinear", align_corners=True)` up to rounding, but
    with a deterministic backward on CUDA (two more matrix products), where interpolate's backward
    accumulates with atomics and raises under `torch.use_deterministic_algorithms(True)`. It costs
    a few % of DDNet's FLOPs, so only `--deterministic` runs use it."""
    rows = _cached_weights(x.shape[-2], size[0], x)
    cols = _cached_weights(x.shape[-1], size[1], x)
    return torch.matmul(rows, torch.matmul(x, cols.t()))


_WEIGHTS: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}
"""`_linear_weights` already built, by (n_in, n_out, device, dtype): constants, so an eager step (or the
warm-up before a CUDA graph capture) launches no kernels to rebuild them. A few MB at most per image size."""


def _cached_weights(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling() or (like.is_cuda and torch.cuda.is_current_stream_capturing()):
        # traced: the compiler folds the construction. Captured: a tensor made now holds its values only once
        # the graph replays, so it must not serve eager code (validation) from a cache.
        return _linear_weights(n_in, n_out, like)
    key = (n_in, n_out, like.device, like.dtype)
    w = _WEIGHTS.get(key)
    if w is None:  # never dropped: a captured CUDA graph keeps reading the memory it was captured with
        w = _WEIGHTS[key] = _linear_weights(n_in, n_out, like)
    return w


class DecoderStage(nn.Module):
    """Upsample x2 -> concat skip -> BN deconv 5x5 -> BN deconv 1x1."""

    def __init__(self, c_up: int, c_skip: int, c_mid: int, c_out: int) -> None:
        super().__init__()
        self.deconv5 = ConvUnit(c_up + c_skip, c_mid, 5, transpose=True)
        self.deconv1 = ConvUnit(c_mid, c_out, 1, transpose=True)
        self.deterministic = False
        """Upsample with `bilinear_matmul` (deterministic backward on CUDA) instead of F.interpolate."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        size = (skip.shape[-2], skip.shape[-1])
        if self.deterministic:
            x = bilinear_matmul(x, size)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.deconv1(self.deconv5(torch.cat([x, skip], dim=1)))


class DDNet(nn.Module):
    """The DDNet denoiser. Input (B, 1, H, W) with H, W divisible by 16; output the same shape."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg = cfg
        w = cfg.base_width
        self.stem = ConvUnit(1, w, 7)
        self.encoder = nn.ModuleList(EncoderStage(w, cfg) for _ in range(4))
        # decoder stages 1..3 give `w` channels, the last one the single output channel
        self.decoder = nn.ModuleList(DecoderStage(w, w, 2 * w, w if i < 3 else 1) for i in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ValueError(f"DDNet needs H and W divisible by 16, got {tuple(x.shape[-2:])}")
        skips = [self.stem(x)]  # c0 (B, w, H, W)
        for stage in self.encoder:
            skips.append(stage(skips[-1]))  # c1..c4 at H/2..H/16
        y = skips.pop()  # c4
        for stage in self.decoder:
            y = stage(y, skips.pop())  # concat with c3, c2, c1, c0
        return y

    def set_deterministic(self, on: bool) -> DDNet:
        """Use the upsampling whose CUDA backward is deterministic (`bilinear_matmul`), or interpolate's."""
        for stage in self.decoder:
            stage.deterministic = on
        return self


def count_layers(model: nn.Module) -> dict[str, int]:
    """Numbers of Conv2d, ConvTranspose2d, BatchNorm2d and trainable parameters."""
    mods = list(model.modules())
    return {
        "conv2d": sum(type(m) is nn.Conv2d for m in mods),
        "conv_transpose2d": sum(type(m) is nn.ConvTranspose2d for m in mods),
        "batchnorm2d": sum(type(m) is nn.BatchNorm2d for m in mods),
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
