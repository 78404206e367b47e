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
import signal
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Literal

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ddnet.data.ct_physics import FOV_MM, _fov_mask, _physics
from ddnet.data.errors import DataError
from ddnet.data.phantoms import AIR_HU, PHANTOMS, make_phantom

FAST_SIGMA_FULL_DOSE_HU = 10.0
"""Image noise (std, HU) of the `fast` mode at full dose; it grows like 1/sqrt(dose)."""
RECON_BLUR_PX = 0.5
"""Gaussian sigma (px) of the `fast` mode's reconstruction blur, applied to LQ and HQ alike."""

Mode = Literal["physics", "fast"]
PhantomKind = Literal["chest", "shepp-logan", "ellipses"]
MODES: tuple[str, ...] = ("physics", "fast")


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
    # A Ctrl-C reaches the terminal's whole process group: the workers ignore it (each would print a
    # traceback of its own), and the parent, which turns it into one line, ends them at once instead of
    # waiting for the pieces in flight (a chunk of 512 px physics slices takes half a minute).
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_ignore_sigint)
    _start_ignoring_sigint(pool, workers)
    try:
        yield pool
    except BaseException:
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _start_ignoring_sigint(pool: ProcessPoolExecutor, workers: int) -> None:
    """Start the pool's workers now, with Ctrl-C ignored from their first instruction on.

    The initializer alone comes too late: a worker takes seconds to import torch before it runs. A process
    started while SIGINT is ignored inherits that, and Python then installs no KeyboardInterrupt for it.
    Each submit starts a worker while none is idle (a fresh one needs far longer than this loop to boot).
    """
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; the initializer still covers the workers
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for _ in range(workers):
            pool.submit(os.getpid)
    finally:
        signal.signal(signal.SIGINT, previous)


def _ignore_sigint() -> None:
    """Worker initializer: Ctrl-C is the parent's to handle (`generation_pool`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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


def _progress_bar(label: str) -> Progress:
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
