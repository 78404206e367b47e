"""Slices for training and evaluation: synthetic phantoms or real HQ/LQ pairs, normalised.

`load_split(cfg, split)` is the one entry point: with ``cfg.source ==
"synthetic"`` it generates seeded chest-like phantoms and their simulated
low-dose versions (`ddnet.data.synthetic`); otherwise it reads
``{cfg.source}/{split}/{HQ,LQ}/`` (`ddnet.data.readers`). Either way the
result is a `SliceSet` of (N, 1, H, W) float32 tensors in a normalised range
and, per slice, the HU per normalised unit so that errors can be quoted in HU.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ddnet.config import DataConfig
from ddnet.data.cache import load_or_generate
from ddnet.data.errors import DataError
from ddnet.data.readers import check_shape, read_split

__all__ = ["DataError", "SliceDataset", "SliceSet", "load_split", "normalise", "split_seed"]

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass
class SliceSet:
    """Paired low-dose inputs and normal-dose targets of one split, normalised the same way."""

    lq: torch.Tensor
    """(N, 1, H, W) float32 low-dose input, normalised (about [0, 1])."""
    hq: torch.Tensor
    """(N, 1, H, W) float32 normal-dose target, normalised the same way."""
    hu_scale: torch.Tensor
    """(N,) float32: HU per normalised unit of the HQ image (RMSE in HU = rmse * hu_scale)."""
    names: list[str]
    """Slice names: file stems, or 'synth_000012'."""
    normalisation: str
    """'window' or 'minmax'."""
    source: str
    """'synthetic:<mode>:<phantom>' or the data folder."""
    load: dict = field(default_factory=dict)
    """How the slices were obtained: `data_load_s` (reading or generating, before normalisation) and, for
    synthetic data, `data_cache` ('hit', 'miss' or 'off': `ddnet.data.cache`)."""

    def __post_init__(self) -> None:
        if self.lq.shape != self.hq.shape or self.lq.ndim != 4 or self.lq.shape[1] != 1:
            raise DataError(f"LQ {tuple(self.lq.shape)} and HQ {tuple(self.hq.shape)} must both be (N, 1, H, W).")
        if len(self.names) != len(self.lq) or self.hu_scale.shape != (len(self.lq),):
            raise DataError(f"{len(self.lq)} slices but {len(self.names)} names and {tuple(self.hu_scale.shape)} scales.")

    def __len__(self) -> int:
        return self.lq.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of lq + hq (what staging the set on a device costs)."""
        return self.lq.element_size() * self.lq.nelement() + self.hq.element_size() * self.hq.nelement()


class SliceDataset(torch.utils.data.Dataset):
    """A `SliceSet` for the host DataLoader: item i is (lq (1, H, W), hq (1, H, W), i)."""

    def __init__(self, s: SliceSet) -> None:
        self.s = s

    def __len__(self) -> int:
        return len(self.s)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.s.lq[i], self.s.hq[i], i


# ----------------------------------------------------------------------------- normalisation
def _window(cfg: DataConfig) -> tuple[float, float]:
    lo, hi = (float(v) for v in cfg.hu_window)
    if not hi > lo:
        raise DataError(f"hu_window {cfg.hu_window} must be (low, high) with high > low, e.g. (-1024, 1024).")
    return lo, hi


def normalise(hu: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, float]:
    """One image in HU -> (normalised float32 image, HU per normalised unit).

    'window' maps `cfg.hu_window` linearly onto [0, 1] and clips outside it
    (scale = window width). 'minmax' maps the image's own min..max onto
    [0, 1] (scale = max - min; a constant image gives zeros and scale 1).
    """
    hu = np.asarray(hu, dtype=np.float32)
    if cfg.normalisation == "window":
        lo, hi = _window(cfg)
        return np.clip((hu - lo) / (hi - lo), 0.0, 1.0).astype(np.float32), hi - lo
    if cfg.normalisation == "minmax":
        lo, hi = float(hu.min()), float(hu.max())
        span = hi - lo if hi > lo else 1.0  # a blank slice: avoid 0/0, keep RMSE in HU finite
        return ((hu - lo) / span).astype(np.float32), span
    raise DataError(f"normalisation {cfg.normalisation!r} is not one of window, minmax.")


def _normalise_pairs(lq: np.ndarray, hq: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalise stacks (N, H, W) in place where possible; returns (lq, hq, hu_scale (N,))."""
    if cfg.normalisation == "window":  # vectorised: one window for every slice
        lo, hi = _window(cfg)
        for a in (lq, hq):
            a -= lo
            a /= hi - lo
            np.clip(a, 0.0, 1.0, out=a)
        return lq, hq, np.full(len(hq), hi - lo, dtype=np.float32)
    scale = np.empty(len(hq), dtype=np.float32)
    for i in range(len(hq)):  # minmax: each image by its own range (LQ and HQ separately)
        lq[i], _ = normalise(lq[i], cfg)
        hq[i], scale[i] = normalise(hq[i], cfg)
    return lq, hq, scale


# ----------------------------------------------------------------------------- loading
def split_seed(data_seed: int, split: str) -> int:
    """Seed of a split's synthetic slices: differs across splits, stable across runs and machines."""
    if data_seed < 0:
        raise DataError(f"data seed {data_seed} must be non-negative.")
    mixed = np.random.SeedSequence([data_seed, zlib.crc32(split.encode())]).generate_state(1, np.uint32)
    return int(mixed[0])


def _synthetic(cfg: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray, list[str], str, dict]:
    size = cfg.image_size
    check_shape(size, size, f"--image-size {size}")
    n = cfg.n_train if split == "train" else cfg.n_val
    if n < 1:
        flag = "--n-train" if split == "train" else "--n-val"
        raise DataError(f"the synthetic {split} split would be empty; set {flag} to at least 1.")
    # made once per data configuration on every core, then read from the cache by every later run
    lq, hq, info = load_or_generate(n, size, split_seed(cfg.data_seed, split), cfg.synth_mode, cfg.dose, cfg.phantom)
    return (lq, hq, [f"synth_{i:06d}" for i in range(n)], f"synthetic:{cfg.synth_mode}:{cfg.phantom}",
            {"data_cache": info["cache"]})


def load_split(cfg: DataConfig, split: Split) -> SliceSet:
    """The normalised slices of one split (train, val or test).

    Synthetic: train has `cfg.n_train` slices, val and test `cfg.n_val` each,
    seeded from `cfg.data_seed` and the split name (the same config gives
    bit-identical tensors). A folder: ``{cfg.source}/{split}/{HQ,LQ}/``.
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}.")
    # A bad window or normalisation fails before any reading or generating.
    _window(cfg)
    if cfg.normalisation not in ("window", "minmax"):
        raise DataError(f"normalisation {cfg.normalisation!r} is not one of window, minmax.")
    t0 = time.perf_counter()
    if cfg.source == "synthetic":
        lq, hq, names, source, load = _synthetic(cfg, split)
    else:
        lq, hq, names = read_split(cfg.source, split, tuple(cfg.hu_window), cfg.normalisation == "window")
        source, load = str(Path(cfg.source)), {}
    load["data_load_s"] = time.perf_counter() - t0
    lq, hq, scale = _normalise_pairs(lq, hq, cfg)
    return SliceSet(
        lq=torch.from_numpy(lq).unsqueeze(1),
        hq=torch.from_numpy(hq).unsqueeze(1),
        hu_scale=torch.from_numpy(scale),
        names=names,
        normalisation=cfg.normalisation,
        source=source,
        load=load,
    )
