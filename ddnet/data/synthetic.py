"""Seeded synthetic low-dose / normal-dose CT slice pairs, in Hounsfield units.

Phantoms are drawn in continuous normalised coordinates (x, y in [-1, 1],
x to the right, y downwards as image rows go, so anterior is at the top and
the spine at the bottom), so the same seed gives the same anatomy at every
size. Edges are anti-aliased (a pixel's value is blended by its covered
fraction), which mimics the partial-volume effect and keeps thin vessels
visible at small sizes. Everything lies inside the inscribed circle of the
image (the scanner's field of view); outside it is air.

Two low-dose simulations:

- ``physics``: parallel-beam projection of linear attenuation, Poisson noise
  on the detected counts plus Gaussian electronic noise, filtered
  back-projection. The HQ target is the noise-free FBP of the same phantom
  with the same geometry, so LQ and HQ differ by noise only.
- ``fast``: image-domain noise with the ramp-shaped noise power spectrum of
  FBP, scaled like 1/sqrt(dose). The HQ target is the lightly blurred phantom.

Every slice i of a call with seed s draws from its own generator
``np.random.default_rng([s, i])``, so a slice does not depend on how many
slices are generated with it or on the chunking.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ddnet.data.errors import DataError

AIR_HU = -1000.0
MU_WATER_PER_MM = 0.02
"""Linear attenuation of water at a typical effective CT energy (~70 keV), 1/mm."""
FOV_MM = {"chest": 380.0, "shepp-logan": 250.0, "ellipses": 380.0}
"""Field of view (mm) per phantom: a body scan for chest and ellipses, a head scan for Shepp-Logan.
The pixel size is FOV / size whatever the size."""
I0_FULL_DOSE_512 = 1.0e6
"""Photons per detector ray at full dose for a 512 px reconstruction (calibrated: quarter dose gives ~20-30 HU noise in the chest)."""
ELECTRONIC_NOISE_COUNTS = 5.0
"""Standard deviation of the detector's electronic noise, in counts."""
FAST_SIGMA_FULL_DOSE_HU = 10.0
"""Image noise (std, HU) of the `fast` mode at full dose; it grows like 1/sqrt(dose)."""
RECON_BLUR_PX = 0.5
"""Gaussian sigma (px) of the `fast` mode's reconstruction blur, applied to LQ and HQ alike."""

Mode = Literal["physics", "fast"]
PhantomKind = Literal["chest", "shepp-logan", "ellipses"]
MODES: tuple[str, ...] = ("physics", "fast")
PHANTOMS: tuple[str, ...] = ("chest", "shepp-logan", "ellipses")


# ----------------------------------------------------------------------------- drawing helpers
class _Canvas:
    """A square HU image plus its pixel-centre coordinates in [-1, 1]."""

    def __init__(self, size: int, fill: float = AIR_HU) -> None:
        self.size = size
        self.px = 2.0 / size  # pixel width in normalised units
        self.c = (np.arange(size, dtype=np.float64) * 2 + 1) / size - 1.0  # pixel centres
        self.img = np.full((size, size), fill, dtype=np.float64)

    def window(self, cx: float, cy: float, r: float) -> tuple[slice, slice, np.ndarray, np.ndarray]:
        """Row/col slices covering the square of half-width r around (cx, cy), and their coordinates."""
        r = r + 2 * self.px
        j0 = max(0, int(math.floor((cx - r + 1) / self.px)))
        j1 = min(self.size, int(math.ceil((cx + r + 1) / self.px)) + 1)
        i0 = max(0, int(math.floor((cy - r + 1) / self.px)))
        i1 = min(self.size, int(math.ceil((cy + r + 1) / self.px)) + 1)
        rows, cols = slice(i0, max(i0, i1)), slice(j0, max(j0, j1))
        return rows, cols, self.c[cols][None, :], self.c[rows][:, None]

    def blob(
        self, cx: float, cy: float, a: float, b: float, phi: float = 0.0,
        harmonics: Sequence[tuple[int, float, float]] = (),
    ) -> tuple[tuple[slice, slice], np.ndarray]:
        """Anti-aliased coverage (0..1) of an ellipse, optionally with a wavy outline.

        `harmonics` are (k, amplitude, phase): the boundary radius is scaled by
        1 + sum(amp * cos(k * angle + phase)), which turns ellipses into
        organic outlines. Returns the window and the coverage inside it.
        """
        extra = 1.0 + sum(abs(h[1]) for h in harmonics)
        rows, cols, x, y = self.window(cx, cy, max(a, b) * extra)
        cp, sp = math.cos(phi), math.sin(phi)
        xr = (x - cx) * cp + (y - cy) * sp
        yr = -(x - cx) * sp + (y - cy) * cp
        u, v = xr / a, yr / b
        rho = np.sqrt(u * u + v * v)
        if harmonics:
            ang = np.arctan2(v, u)
            scale = np.ones_like(rho)
            for k, amp, ph in harmonics:
                scale += amp * np.cos(k * ang + ph)
            rho = rho / scale
        # Signed distance to the outline ~ (rho - 1) / |grad rho|; 1/|grad rho| ~ the local radius.
        grad = np.sqrt((u / a) ** 2 + (v / b) ** 2) / np.maximum(rho, 1e-9)
        dist = (rho - 1.0) / np.maximum(grad, 1e-9)
        cov = np.clip(0.5 - dist / self.px, 0.0, 1.0)
        return (rows, cols), cov

    def paint(self, win: tuple[slice, slice], cov: np.ndarray, value: float | np.ndarray) -> None:
        """Blend `value` into the image with weight `cov` (later shapes cover earlier ones)."""
        region = self.img[win]
        if isinstance(value, np.ndarray):
            value = value[win]
        region += cov * (value - region)

    def ellipse(self, cx: float, cy: float, a: float, b: float, value: float | np.ndarray,
                phi: float = 0.0, harmonics: Sequence[tuple[int, float, float]] = (),
                coverage: bool = False) -> np.ndarray | None:
        """Paint an ellipse; with `coverage`, return its full-image coverage map."""
        win, cov = self.blob(cx, cy, a, b, phi, harmonics)
        self.paint(win, cov, value)
        if not coverage:
            return None
        full = np.zeros_like(self.img)
        full[win] = cov
        return full


def _smooth_fields(size: int, rng: np.random.Generator, corr: float) -> tuple[np.ndarray, np.ndarray]:
    """Two independent zero-mean unit-std Gaussian random fields, correlation length `corr` (normalised units).

    One complex FFT gives both: the real and imaginary parts of filtered
    complex white noise are independent.
    """
    white = rng.standard_normal((size, size)) + 1j * rng.standard_normal((size, size))
    f = np.fft.fftfreq(size) * size / 2.0  # cycles per normalised unit
    f2 = f[:, None] ** 2 + f[None, :] ** 2
    field = np.fft.ifft2(np.fft.fft2(white) * np.exp(-2 * (math.pi * corr) ** 2 * f2))
    re, im = field.real, field.imag
    return re / max(re.std(), 1e-12), im / max(im.std(), 1e-12)


def _segments_coverage(cv: _Canvas, segs: Sequence[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
    """Anti-aliased coverage (0..1) of capsules (segment p0 -> p1 with radius r), full image.

    A pixel's coverage is the overlap of its width with the vessel's
    cross-section at its distance d, so vessels thinner than a pixel fade
    instead of turning into full-value lines. Each capsule is evaluated only
    on the pixels of its bounding box, all capsules in one vectorised pass
    (a Python loop over ~100 segments per slice would dominate the run time).
    """
    out = np.zeros(cv.img.shape, dtype=np.float64)
    seg = np.array([[*p0, *p1, r] for p0, p1, r in segs if r >= 0.1 * cv.px]).reshape(-1, 5)
    if len(seg) == 0:
        return out
    p0, p1, r = seg[:, 0:2], seg[:, 2:4], seg[:, 4]
    lo = np.minimum(p0, p1) - r[:, None] - cv.px
    hi = np.maximum(p0, p1) + r[:, None] + cv.px
    # Pixel index ranges [first, last) of each box, clipped to the image; x -> columns, y -> rows.
    first = np.clip(np.floor((lo + 1) / cv.px - 0.5), 0, cv.size).astype(np.int64)
    last = np.clip(np.ceil((hi + 1) / cv.px - 0.5) + 1, 0, cv.size).astype(np.int64)
    ncol, nrow = np.maximum(last[:, 0] - first[:, 0], 0), np.maximum(last[:, 1] - first[:, 1], 0)
    count = ncol * nrow
    k = np.repeat(np.arange(len(seg)), count)  # segment of each (pixel, segment) pair
    local = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    jj = first[k, 0] + local % ncol[k]
    ii = first[k, 1] + local // ncol[k]
    x, y = cv.c[jj] - p0[k, 0], cv.c[ii] - p0[k, 1]
    d = (p1 - p0)[k]
    t = np.clip((x * d[:, 0] + y * d[:, 1]) / np.maximum((d * d).sum(1), 1e-12), 0.0, 1.0)
    dist = np.hypot(x - t * d[:, 0], y - t * d[:, 1])
    half = cv.px / 2
    overlap = np.minimum(dist + half, r[k]) - np.maximum(dist - half, -r[k])
    np.maximum.at(out, (ii, jj), overlap / cv.px)
    return np.clip(out, 0.0, 1.0)


def _vessel_tree(rng: np.random.Generator, start: np.ndarray, angle: float, length: float,
                 radius: float, depth: int) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Segments of a randomly branching tree (each branch forks in two, thinner and shorter)."""
    segs: list[tuple[np.ndarray, np.ndarray, float]] = []
    stack = [(start, angle, length, radius, depth)]
    while stack:
        p, ang, ln, rad, dep = stack.pop()
        q = p + ln * np.array([math.cos(ang), math.sin(ang)])
        segs.append((p, q, rad))
        if dep > 1:
            for sign in (-1.0, 1.0):
                stack.append((q, ang + sign * rng.uniform(0.3, 0.7), ln * rng.uniform(0.6, 0.85),
                              rad * rng.uniform(0.62, 0.78), dep - 1))
    return segs


# ----------------------------------------------------------------------------- phantoms
def chest_phantom(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random axial chest slice at heart level, (size, size) float32 in HU.

    Air outside (-1000), subcutaneous fat (~-100), muscle and soft tissue
    (~40), two lungs (~-850) with branching vessels (~40) and sometimes a
    nodule, heart and descending aorta (~40), a vertebra (cortex ~900-1100,
    cancellous bone ~250-400) with its arch, spinal canal and spinous
    process, ribs (~700-1000) and the sternum. Sizes, positions and values
    vary with `rng`.
    """
    cv = _Canvas(size)
    u = rng.uniform
    body_a = u(0.80, 0.90)
    body_b = body_a * u(0.62, 0.74)
    body_phi = u(-0.04, 0.04)
    waves = [(k, u(0.0, 0.025), u(0, 2 * math.pi)) for k in (2, 3, 4)]
    fat_frac = u(0.06, 0.12)
    ai, bi = body_a * (1 - fat_frac), body_b * (1 - fat_frac)  # inner (muscle) semi-axes

    texture, lung_tex = _smooth_fields(size, rng, corr=0.015)
    cv.ellipse(0.0, 0.0, body_a, body_b, u(-120, -80) + 6 * texture, body_phi, waves)
    cv.ellipse(0.0, 0.0, ai, bi, u(30, 55) + 8 * texture, body_phi, waves)

    # Lungs. Image left is the patient's right (radiological convention).
    lung_cov = np.zeros_like(cv.img)
    lungs = []
    for side in (-1.0, 1.0):
        cx, cy = side * 0.45 * ai * u(0.95, 1.05), -0.03 * bi + u(-0.03, 0.03) * bi
        a, b = 0.36 * ai * u(0.92, 1.04), 0.76 * bi * u(0.92, 1.0)
        phi = side * u(0.0, 0.15)
        harm = [(k, u(0.0, 0.04), u(0, 2 * math.pi)) for k in (2, 3)]
        lung = cv.ellipse(cx, cy, a, b, u(-880, -820) + 18 * lung_tex, phi, harm, coverage=True)
        lung_cov = np.maximum(lung_cov, lung)
        lungs.append((side, cx, cy, a, b))

    # Pulmonary vessels: trees from the hilum (medial side) branching outwards, clipped to the lungs.
    segs: list[tuple[np.ndarray, np.ndarray, float]] = []
    for side, cx, cy, a, b in lungs:
        for _ in range(int(rng.integers(2, 4))):
            start = np.array([cx - side * 0.55 * a, cy + u(-0.35, 0.35) * b])
            ang = (0.0 if side > 0 else math.pi) + u(-1.1, 1.1)
            segs += _vessel_tree(rng, start, ang, 0.35 * a * u(0.8, 1.2), u(0.008, 0.014), int(rng.integers(4, 6)))
    vessel_cov = _segments_coverage(cv, segs) * lung_cov
    cv.img += vessel_cov * (u(30, 50) - cv.img)

    # Occasional nodules inside a lung.
    for _ in range(int(rng.integers(0, 3))):
        side, cx, cy, a, b = lungs[int(rng.integers(0, 2))]
        r, ang = math.sqrt(u(0, 0.5)), u(0, 2 * math.pi)
        nr = u(0.012, 0.035)
        win, cov = cv.blob(cx + r * a * math.cos(ang), cy + r * b * math.sin(ang), nr, nr * u(0.8, 1.2))
        cv.paint(win, cov * lung_cov[win], u(-20, 50))

    # Heart (anterior, shifted to the patient's left) and descending aorta.
    cv.ellipse(0.12 * ai * u(0.8, 1.2), -0.08 * bi * u(0.5, 1.5), 0.30 * ai * u(0.9, 1.1),
               0.46 * bi * u(0.9, 1.05), u(30, 55), u(0.3, 0.7))
    cv.ellipse(0.17 * ai, 0.30 * bi * u(0.9, 1.1), 0.065 * ai * u(0.9, 1.1), 0.065 * ai, u(30, 55))

    # Vertebra: body (cortex + cancellous interior), arch around the spinal canal, spinous process.
    rv = 0.105 * ai * u(0.92, 1.08)
    vy = 0.52 * bi * u(0.95, 1.05)
    cortex = u(900, 1100)
    cv.ellipse(0.0, vy, rv, rv * 0.9, cortex)
    cv.ellipse(0.0, vy, rv * 0.78, rv * 0.7, u(250, 400))
    canal_y = vy + 1.45 * rv
    cv.ellipse(0.0, canal_y, rv * 0.72, rv * 0.62, cortex * 0.85)
    cv.ellipse(0.0, canal_y + 0.72 * rv, rv * 0.2, rv * 0.45, cortex * 0.85)
    cv.ellipse(0.0, canal_y, rv * 0.42, rv * 0.36, u(15, 40))

    # Ribs between the lungs and the fat layer, skipping the spine and the sternum; sternum in front.
    for side in (-1.0, 1.0):
        n_ribs = int(rng.integers(5, 8))
        angles = np.linspace(-0.35 * math.pi, 0.38 * math.pi, n_ribs) + u(-0.06, 0.06, n_ribs)
        for t in angles:
            rx = side * 0.905 * ai * math.cos(t)
            ry = 0.895 * bi * math.sin(t)
            tangent = math.atan2(0.895 * bi * math.cos(t), -side * 0.905 * ai * math.sin(t))
            ra, rb = 0.055 * ai * u(0.8, 1.2), 0.028 * ai * u(0.85, 1.15)
            cv.ellipse(rx, ry, ra, rb, u(700, 1000), tangent)
            cv.ellipse(rx, ry, ra * 0.55, rb * 0.45, u(250, 350), tangent)
    cv.ellipse(0.0, -0.93 * bi, 0.085 * ai, 0.035 * ai, u(600, 900))
    return cv.img.astype(np.float32)


# Shepp & Logan (1974), Table 1: (intensity, a, b, x0, y0, phi in degrees), y upwards.
_SHEPP_LOGAN = (
    (2.0, 0.69, 0.92, 0.0, 0.0, 0.0),
    (-0.98, 0.6624, 0.874, 0.0, -0.0184, 0.0),
    (-0.02, 0.11, 0.31, 0.22, 0.0, -18.0),
    (-0.02, 0.16, 0.41, -0.22, 0.0, 18.0),
    (0.01, 0.21, 0.25, 0.0, 0.35, 0.0),
    (0.01, 0.046, 0.046, 0.0, 0.1, 0.0),
    (0.01, 0.046, 0.046, 0.0, -0.1, 0.0),
    (0.01, 0.046, 0.023, -0.08, -0.605, 0.0),
    (0.01, 0.023, 0.023, 0.0, -0.606, 0.0),
    (0.01, 0.023, 0.046, 0.06, -0.605, 0.0),
)


def shepp_logan(size: int) -> np.ndarray:
    """The original Shepp-Logan head phantom, (size, size) float32 in HU.

    Its intensities are relative attenuations (water = 1), so HU = 1000 * (v - 1):
    skull 1000, brain 20, ventricles 0, small features 10..40, air -1000.
    """
    cv = _Canvas(size, fill=0.0)
    for value, a, b, x0, y0, deg in _SHEPP_LOGAN:
        # The table has y upwards and angles counter-clockwise; rows go down, so flip both.
        win, cov = cv.blob(x0, -y0, a, b, -math.radians(deg))
        cv.img[win] += value * cov
    return (1000.0 * (cv.img - 1.0)).astype(np.float32)


def random_ellipses(size: int, rng: np.random.Generator) -> np.ndarray:
    """A water-like body ellipse holding 6-14 random ellipses of -1000..1000 HU, (size, size) float32."""
    cv = _Canvas(size)
    u = rng.uniform
    a, b = u(0.6, 0.9), u(0.5, 0.9)
    cv.ellipse(0.0, 0.0, a, b, u(-50, 60), u(0, math.pi))
    for _ in range(int(rng.integers(6, 15))):
        r, ang = math.sqrt(u(0, 1)) * 0.7, u(0, 2 * math.pi)
        cx, cy = r * a * math.cos(ang), r * b * math.sin(ang)
        room = 0.95 - math.hypot(cx, cy)  # stay inside the field of view
        ea = min(u(0.02, 0.3), room)
        cv.ellipse(cx, cy, ea, min(ea * u(0.3, 1.0), room), u(-1000, 1000), u(0, math.pi))
    return cv.img.astype(np.float32)


def make_phantom(phantom: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One phantom of the named kind, (size, size) float32 in HU."""
    if phantom == "chest":
        return chest_phantom(size, rng)
    if phantom == "shepp-logan":
        return shepp_logan(size)
    if phantom == "ellipses":
        return random_ellipses(size, rng)
    raise DataError(f"unknown phantom {phantom!r}; use one of {', '.join(PHANTOMS)}.")


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


# ----------------------------------------------------------------------------- fast mode
def _fast(hu: np.ndarray, dose: float, rngs: Sequence[np.random.Generator]) -> tuple[np.ndarray, np.ndarray]:
    """Fast-mode LQ/HQ for a stack (N, H, W) in HU; slice i draws its noise from rngs[i]."""
    n, h, w = hu.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)  # cycles per pixel, 0..0.71
    blur = np.exp(-2 * (math.pi * RECON_BLUR_PX) ** 2 * f * f)
    # FBP noise has a ramp-shaped power spectrum (NPS ~ |f| * window^2), so white noise is
    # filtered with amplitude sqrt(|f|) * window; the window (a smooth roll-off, like a
    # reconstruction kernel) takes the high-frequency corner down.
    amp = np.sqrt(f) * np.exp(-((f / 0.35) ** 4)) * blur
    amp *= math.sqrt(amp.size / (amp**2).sum())  # unit output variance
    white = np.stack([rngs[i].standard_normal((h, w)) for i in range(n)])
    noise = np.fft.ifft2(np.fft.fft2(white) * amp).real
    sigma = FAST_SIGMA_FULL_DOSE_HU / math.sqrt(dose)
    hq = np.fft.ifft2(np.fft.fft2(hu.astype(np.float64)) * blur).real
    fov = _fov_mask(h) if h == w else np.ones((h, w), dtype=bool)
    hq[:, ~fov] = AIR_HU
    lq = hq + sigma * noise * fov
    return lq.astype(np.float32), hq.astype(np.float32)


def simulate_low_dose(
    hu: np.ndarray, mode: Mode = "fast", dose: float = 0.25, rng: np.random.Generator | None = None,
    fov_mm: float = FOV_MM["chest"],
) -> tuple[np.ndarray, np.ndarray]:
    """Low-dose (LQ) and normal-dose target (HQ) images of a phantom, both in HU.

    `hu` is (H, W) or (N, H, W); the result has the same shape, float32.
    `dose` is the fraction of full dose (0.25 = quarter dose); `fov_mm` the
    width of the image in mm (physics mode: it sets the path lengths). See
    the module docstring for the two modes.
    """
    _check(mode, dose)
    rng = rng if rng is not None else np.random.default_rng()
    stack = hu[None] if hu.ndim == 2 else hu
    if mode == "physics":
        if stack.shape[1] != stack.shape[2]:
            raise DataError(f"physics mode needs square images, got {stack.shape[1]}x{stack.shape[2]}.")
        lq, hq = _physics(stack, dose, [rng] * len(stack), fov_mm)
    else:
        lq, hq = _fast(stack, dose, [rng] * len(stack))
    return (lq[0], hq[0]) if hu.ndim == 2 else (lq, hq)


def _check(mode: str, dose: float) -> None:
    if mode not in MODES:
        raise DataError(f"unknown synthetic mode {mode!r}; use one of {', '.join(MODES)}.")
    if not 0.0 < dose <= 1.0:
        raise DataError(f"dose fraction {dose} must be in (0, 1] (0.25 = quarter dose).")


SECONDS_PER_512_SLICE = {"fast": 0.12, "physics": 3.0}
"""Measured on one core (2-core CI machine): time to make one 512 px slice pair; cost grows with the area."""
WORKER_MIN_S = 1.5
"""Least work worth a worker process of its own (a spawned worker takes a second or two to import torch)."""


def pool_workers(n: int, size: int, mode: str) -> int:
    """How many processes `generation_pool` should start for `n` slices of `size` px: 1 unless it pays."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    work_s = n * SECONDS_PER_512_SLICE.get(mode, 0.12) * (size / 512) ** 2
    return max(1, min(cores, n, int(work_s / WORKER_MIN_S)))


@contextmanager
def generation_pool(workers: int) -> Iterator[Executor | None]:
    """Worker processes for `generate(..., pool=)`, or None when one process (this one) will do.

    Spawned, not forked: the parent may hold CUDA or OpenMP state a forked child must not inherit.
    """
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def _generate_piece(args: tuple) -> tuple[np.ndarray, np.ndarray]:
    n, size, seed, mode, dose, phantom, first = args
    return generate(n, size, seed, mode, dose, phantom, first=first)


def generate(
    n: int,
    size: int,
    seed: int,
    mode: Mode = "fast",
    dose: float = 0.25,
    phantom: PhantomKind = "chest",
    progress: bool = False,
    first: int = 0,
    pool: Executor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`n` seeded LQ/HQ slice pairs, each (n, size, size) float32 in HU.

    Slice i (counting from `first`) uses ``np.random.default_rng([seed, i])``
    for its anatomy and its noise, so `generate(10, ...)` equals the
    concatenation of `generate(4, ...)` and `generate(6, ..., first=4)`, and
    the slices do not depend on who made them: with a `pool`
    (`generation_pool`) the range is cut into pieces made in parallel, with
    the same result. `progress` shows a rich progress bar over slices.
    """
    if pool is not None and n > 1:
        _check(mode, dose)
        workers = getattr(pool, "_max_workers", 1)
        step = -(-n // workers)
        pieces = [(min(step, n - a), size, seed, mode, dose, phantom, first + a) for a in range(0, n, step)]
        parts = list(pool.map(_generate_piece, pieces))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    _check(mode, dose)
    if seed < 0:
        raise DataError(f"seed {seed} must be non-negative.")
    if n < 0 or size < 16:
        raise DataError(f"cannot generate {n} slices of {size} px; use n >= 0 and a size of at least 16.")
    if phantom not in PHANTOMS:
        raise DataError(f"unknown phantom {phantom!r}; use one of {', '.join(PHANTOMS)}.")
    lq = np.empty((n, size, size), dtype=np.float32)
    hq = np.empty((n, size, size), dtype=np.float32)
    # Physics mode batches a few slices per projector call (the grids are shared across them).
    batch = 4 if mode == "physics" else 64
    bar = _progress_bar(f"synthesising {mode} {phantom} slices") if progress else None
    with bar if bar is not None else nullcontext():
        task = bar.add_task("slices", total=n) if bar is not None else None
        for b0 in range(0, n, batch):
            idx = range(first + b0, first + min(n, b0 + batch))
            rngs = [np.random.default_rng([seed, i]) for i in idx]
            hu = np.stack([make_phantom(phantom, size, r) for r in rngs])
            if mode == "physics":
                pair = _physics(hu, dose, rngs, FOV_MM[phantom])
            else:
                pair = _fast(hu, dose, rngs)
            lq[b0:b0 + len(idx)], hq[b0:b0 + len(idx)] = pair
            if bar is not None and task is not None:
                bar.advance(task, len(idx))
    return lq, hq


def _progress_bar(label: str):  # -> rich.progress.Progress (imported lazily: rich is slow to import)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
