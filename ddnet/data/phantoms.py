"""Chest-like phantoms in Hounsfield units (plus Shepp-Logan and random ellipses).

Drawn in continuous normalised coordinates (x, y in [-1, 1], x to the right,
y downwards as image rows go, so anterior is at the top and the spine at the
bottom), so the same seed gives the same anatomy at every size. Edges are
anti-aliased (a pixel's value is blended by its covered fraction), which mimics
the partial-volume effect and keeps thin vessels visible at small sizes.
Everything lies inside the inscribed circle of the image; outside it is air.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ddnet.data.errors import DataError

AIR_HU = -1000.0
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
