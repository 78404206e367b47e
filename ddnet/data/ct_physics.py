"""The physics low-dose model: parallel-beam projection, Poisson + electronic noise, filtered back-projection."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ddnet.data.phantoms import AIR_HU

MU_WATER_PER_MM = 0.02
"""Linear attenuation of water at a typical effective CT energy (~70 keV), 1/mm."""
I0_FULL_DOSE_512 = 1.0e6
"""Photons per detector ray at full dose for a 512 px reconstruction (calibrated: quarter dose gives ~20-30 HU
noise in the chest)."""
FOV_MM = {"chest": 380.0, "shepp-logan": 250.0, "ellipses": 380.0}
"""Field of view (mm) per phantom: a body scan for chest and ellipses, a head scan for Shepp-Logan.
The pixel size is FOV / size whatever the size."""
ELECTRONIC_NOISE_COUNTS = 5.0
"""Standard deviation of the detector's electronic noise, in counts."""


# ----------------------------------------------------------------------------- physics mode
def _fov_mask(size: int) -> np.ndarray:
    c = (np.arange(size) * 2 + 1) / size - 1.0
    return (c[:, None] ** 2 + c[None, :] ** 2) <= 1.0


def n_angles(size: int) -> int:
    """Number of projection angles over 180 degrees used by the physics mode (one per pixel column)."""
    return size


def _coords(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32) * 2 + 1) / n - 1.0


def forward_project(mu: torch.Tensor, n_ang: int, chunk: int = 32) -> torch.Tensor:
    """Parallel-beam sinogram of (C, H, W) images: (C, n_ang, W), line sums in pixel units.

    For each angle the image is sampled on the rotated grid (bilinear,
    `grid_sample`) and summed along the rays; detector bins coincide with
    pixel columns. Angles are processed in chunks to bound memory.
    """
    c_, h, w = mu.shape
    theta = torch.arange(n_ang, dtype=torch.float32) * math.pi / n_ang
    t = _coords(w).view(1, 1, w)  # detector coordinate
    s = _coords(h).view(1, h, 1)  # position along the ray
    out = torch.empty(c_, n_ang, w)
    inp = mu.unsqueeze(0)
    for k0 in range(0, n_ang, chunk):
        cos = torch.cos(theta[k0:k0 + chunk]).view(-1, 1, 1)
        sin = torch.sin(theta[k0:k0 + chunk]).view(-1, 1, 1)
        x = (t * cos - s * sin).expand(-1, h, w)
        y = (t * sin + s * cos).expand(-1, h, w)
        grid = torch.stack([x, y], -1).reshape(1, -1, w, 2)
        rot = F.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[:, k0:k0 + chunk] = rot.view(c_, -1, h, w).sum(2)
    return out


def ramp_filter(sino: torch.Tensor, window: Literal["ram-lak", "shepp-logan"] = "shepp-logan") -> torch.Tensor:
    """Ramp-filter each projection (last dim) of a sinogram, detector spacing = 1.

    The kernel is the spatial Ram-Lak kernel (h0 = 1/4, h_odd = -1/(pi n)^2)
    transformed with zero padding, which avoids the DC offset of sampling
    |f| directly; 'shepp-logan' multiplies by sinc(f) to damp the noisiest
    frequencies.
    """
    n = sino.shape[-1]
    pad = 1 << int(math.ceil(math.log2(2 * n)))
    k = torch.arange(pad)
    k = torch.where(k < pad // 2, k, k - pad).double()
    h = torch.zeros(pad, dtype=torch.float64)
    h[k == 0] = 0.25
    odd = (k.abs() % 2) == 1
    h[odd] = -1.0 / (math.pi * k[odd]) ** 2
    filt = torch.fft.fft(h).real
    if window == "shepp-logan":
        filt = filt * torch.sinc(torch.fft.fftfreq(pad, dtype=torch.float64))
    spec = torch.fft.rfft(sino.double(), n=pad, dim=-1) * filt[: pad // 2 + 1]
    return torch.fft.irfft(spec, n=pad, dim=-1)[..., :n].float()


def back_project(q: torch.Tensor, h: int, w: int, rows: int = 16) -> torch.Tensor:
    """Unfiltered parallel-beam back-projection of (C, n_ang, n_det) into (C, h, w), summed over angles.

    Each pixel reads every projection at t = x cos(theta) + y sin(theta)
    (linear interpolation through `grid_sample`, the angle coordinate hitting
    row centres exactly). Image rows are processed in chunks to bound memory.
    """
    c_, n_ang, n_det = q.shape
    theta = torch.arange(n_ang, dtype=torch.float32) * math.pi / n_ang
    cos, sin = torch.cos(theta).view(1, 1, -1), torch.sin(theta).view(1, 1, -1)
    x = _coords(w).view(1, -1, 1)
    y_all = _coords(h)
    row_centre = _coords(n_ang).view(1, 1, -1)
    out = torch.empty(c_, h, w)
    inp = q.unsqueeze(0)
    for r0 in range(0, h, rows):
        y = y_all[r0:r0 + rows].view(-1, 1, 1)
        t = x * cos + y * sin  # (rows, w, n_ang), same normalised units as the detector
        grid = torch.stack([t, row_centre.expand_as(t)], -1).reshape(1, -1, n_ang, 2)
        vals = F.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[:, r0:r0 + rows] = vals.view(c_, -1, w, n_ang).sum(-1)
    return out


def _physics(
    hu: np.ndarray, dose: float, rngs: Sequence[np.random.Generator], fov_mm: float = FOV_MM["chest"]
) -> tuple[np.ndarray, np.ndarray]:
    """Physics-mode LQ/HQ for a stack (N, H, W) in HU; slice i draws its noise from rngs[i]."""
    n, size, _ = hu.shape
    pixel_mm = fov_mm / size
    n_ang = n_angles(size)
    mu = np.clip(MU_WATER_PER_MM * (1.0 + hu.astype(np.float64) / 1000.0), 0.0, None)  # 1/mm
    line = forward_project(torch.from_numpy(mu * pixel_mm).float(), n_ang).double().numpy()  # (N, A, D)
    # Photons per ray scale with the size so that image noise in HU does not depend on the
    # resolution (FBP noise std ~ sqrt(size / I0)): a 128 px image at quarter dose is as noisy as
    # a 512 px one, which keeps small test images realistic.
    i0 = I0_FULL_DOSE_512 * dose * size / 512.0
    noisy = np.empty_like(line)
    for i in range(n):
        counts = rngs[i].poisson(i0 * np.exp(-line[i])).astype(np.float64)
        counts += rngs[i].normal(0.0, ELECTRONIC_NOISE_COUNTS, counts.shape)
        # Non-positive counts (photon starvation + electronic noise) have no logarithm; clamp
        # like a scanner's pre-log correction does.
        noisy[i] = -np.log(np.maximum(counts, 0.5) / i0)
    sino = torch.from_numpy(np.concatenate([noisy, line])).float()  # LQ first, then HQ
    recon = back_project(ramp_filter(sino), size, size) * (math.pi / n_ang)  # mu * pixel_mm
    recon_hu = 1000.0 * (recon.double().numpy() / (MU_WATER_PER_MM * pixel_mm) - 1.0)
    recon_hu[:, ~_fov_mask(size)] = AIR_HU  # outside the field of view, as scanners show it
    return recon_hu[:n].astype(np.float32), recon_hu[n:].astype(np.float32)
