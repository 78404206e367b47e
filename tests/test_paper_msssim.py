"""ddnet.paper_msssim: the paper code's MS-SSIM, pinned against an independent float64 reference.

The reference below is a straightforward numpy rewrite (sliding windows, reshape pooling) with a
switch for each of the five ways the paper's code differs from a standard MS-SSIM; each test flips
one switch and checks that the function follows the paper's code and not the alternative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from pytorch_msssim import ms_ssim

from ddnet.paper_msssim import (
    MIN_SIDE,
    PAPER_WEIGHTS,
    ms_ssim_paper_code,
    ms_ssim_paper_code_per_image,
    paper_code_scales,
)

W = np.array(PAPER_WEIGHTS)


def _source_range(x: np.ndarray) -> float:
    """The source's rule: 255 if max > 128 else 1, minus (-0.1 if min < -0.001 else 0)."""
    return (255.0 if x.max() > 128 else 1.0) - (-0.1 if x.min() < -0.001 else 0.0)


def _brief_range(x: np.ndarray) -> float:
    """The rule as first described to us (min -1 below -0.5): not what the source does."""
    return (255.0 if x.max() > 128 else 1.0) - (-1.0 if x.min() < -0.5 else 0.0)


def _terms(x, y, padding="valid", per_image=False, range_rule=_source_range, range_per_scale=True):
    """Per-scale (ssim, cs), each a float or a (B,) array, in float64; finest scale first."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    groups = [slice(i, i + 1) for i in range(x.shape[0])] if per_image else [slice(None)]
    ranges0 = [range_rule(x[g]) for g in groups]
    out = []
    for scale in range(5):
        if scale:
            h, w = x.shape[2] // 2, x.shape[3] // 2
            x = x[:, :, : 2 * h, : 2 * w].reshape(*x.shape[:2], h, 2, w, 2).mean(axis=(3, 5))
            y = y[:, :, : 2 * h, : 2 * w].reshape(*y.shape[:2], h, 2, w, 2).mean(axis=(3, 5))
        k = min(11, x.shape[2], x.shape[3])
        g = np.exp(-0.5 * ((np.arange(k) - k // 2) / 1.5) ** 2)
        win = np.outer(g, g) / g.sum() ** 2

        def filt(img, k=k, win=win):
            if padding == "same":
                img = np.pad(img, [(0, 0), (0, 0), (k // 2, (k - 1) // 2), (k // 2, (k - 1) // 2)])
            return np.einsum("bchwij,ij->bchw", sliding_window_view(img, (k, k), axis=(2, 3)), win)

        ss, cc = [], []
        for gi, grp in enumerate(groups):
            a, b = x[grp], y[grp]
            big_l = range_rule(a) if range_per_scale else ranges0[gi]
            c1, c2 = (0.01 * big_l) ** 2, (0.03 * big_l) ** 2
            ma, mb = filt(a), filt(b)
            va, vb, cov = filt(a * a) - ma**2, filt(b * b) - mb**2, filt(a * b) - ma * mb
            cs = (2 * cov + c2) / (va + vb + c2)
            lum = (2 * ma * mb + c1) / (ma**2 + mb**2 + c1)
            ss.append((lum * cs).mean())
            cc.append(cs.mean())
        out.append((np.array(ss) if per_image else ss[0], np.array(cc) if per_image else cc[0]))
    return out


def _paper_combine(terms, normalise=True):
    """prod over the first four scales of cs_i^w_i * ssim_5^w_5 (the source's bracket)."""
    s5 = terms[-1][0]
    f = (lambda v: (v + 1) / 2) if normalise else (lambda v: v)
    with np.errstate(invalid="ignore"):
        return np.prod([f(cs) ** W[i] * f(s5) ** W[4] for i, (_, cs) in enumerate(terms[:-1])], axis=0)


def _correct_combine(terms):
    """The textbook bracket, with the same normalisation: prod_{i<5} cs_i^w_i * ssim_5^w_5."""
    f = lambda v: (v + 1) / 2  # noqa: E731
    return np.prod([f(cs) ** W[i] for i, (_, cs) in enumerate(terms[:-1])], axis=0) * f(terms[-1][0]) ** W[4]


def _pair(shape, seed, noise=0.1, lo=0.0, hi=1.0):
    rng = np.random.default_rng(seed)
    x = lo + (hi - lo) * rng.random(shape)
    y = np.clip(x + noise * (hi - lo) * rng.standard_normal(shape), lo, hi)
    return x, y


def _t(*arrs, dtype=torch.float64):
    return [torch.as_tensor(a, dtype=dtype) for a in arrs]


def _smooth_noise(n: int, sigma: float, seed: int) -> torch.Tensor:
    """(1, 1, n, n) Gaussian-blurred noise scaled to [0, 1]: CT-like structure at several scales."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 1, n, n, generator=g, dtype=torch.float64)
    r = torch.arange(-3 * int(sigma), 3 * int(sigma) + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    k = k / k.sum()
    z = torch.nn.functional.conv2d(z, k.view(1, 1, 1, -1), padding="same")
    z = torch.nn.functional.conv2d(z, k.view(1, 1, -1, 1), padding="same")
    return (z - z.min()) / (z.max() - z.min())


# ----------------------------------------------------------------------- the value itself


@pytest.mark.parametrize(("shape", "seed", "lo", "hi"), [
    ((2, 1, 48, 40), 0, 0.0, 1.0),
    ((1, 1, 37, 45), 1, 0.0, 1.0),   # odd sides: pooling floors them
    ((3, 1, 32, 33), 2, -0.2, 0.8),  # smallest size, min_val = -0.1 at every scale
    ((2, 2, 40, 40), 3, 0.0, 255.0),  # two channels, L = 255
])
def test_matches_an_independent_float64_reference(shape, seed, lo, hi):
    x, y = _pair(shape, seed, lo=lo, hi=hi)
    want = _paper_combine(_terms(x, y))
    got64 = ms_ssim_paper_code(*_t(x, y))
    assert got64.dtype == torch.float64 and got64.ndim == 0
    assert float(got64) == pytest.approx(want, rel=1e-10)
    got32 = ms_ssim_paper_code(*_t(x, y, dtype=torch.float32))
    assert got32.dtype == torch.float32
    assert float(got32) == pytest.approx(want, rel=1e-4)
    ref_scales = _terms(x, y)
    s, c = paper_code_scales(*_t(x, y))
    np.testing.assert_allclose(s.numpy(), [t[0] for t in ref_scales], rtol=1e-10)
    np.testing.assert_allclose(c.numpy(), [t[1] for t in ref_scales], rtol=1e-10)


def test_identical_images_score_exactly_one():
    x, _ = _pair((2, 1, 40, 40), 4)
    assert float(ms_ssim_paper_code(*_t(x, x))) == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(ms_ssim_paper_code_per_image(*_t(x, x)), torch.ones(2, dtype=torch.float64))


def test_constant_images_closed_form_with_the_coarsest_ssim_four_times():
    # Constants: every variance is 0, so cs = C2/C2 = 1 and SSIM = (2ab + C1) / (a^2 + b^2 + C1) at every
    # scale; the result is ((SSIM + 1) / 2) ** (4 * 0.1333) from the bracket alone.
    a, b = 0.2, 0.6
    s = (2 * a * b + 1e-4) / (a * a + b * b + 1e-4)
    got = float(ms_ssim_paper_code(torch.full((1, 1, 32, 32), a, dtype=torch.float64),
                                   torch.full((1, 1, 32, 32), b, dtype=torch.float64)))
    assert got == pytest.approx(((s + 1) / 2) ** (4 * 0.1333), rel=1e-12)
    assert got != pytest.approx(((s + 1) / 2) ** 0.1333, rel=1e-3)  # what the textbook bracket gives


def test_autocast_dtype_and_device_independence():
    x, y = _pair((2, 1, 40, 40), 5)
    ref = ms_ssim_paper_code(*_t(x, y, dtype=torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ms_ssim_paper_code(*_t(x, y, dtype=torch.float32))
    assert inside.dtype == torch.float32 and torch.equal(inside, ref)
    half = ms_ssim_paper_code(*_t(x, y, dtype=torch.bfloat16))
    assert half.dtype == torch.float32 and float(half) == pytest.approx(float(ref), abs=5e-3)


def test_too_small_images_are_refused_with_the_minimum_side():
    assert MIN_SIDE == 32  # the source pools after its 5th scale too
    x = torch.rand(1, 1, MIN_SIDE - 1, 64)
    with pytest.raises(ValueError, match="at least 32 pixels"):
        ms_ssim_paper_code(x, x)
    with pytest.raises(ValueError, match="same shape"):
        ms_ssim_paper_code(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 40))
    ok = torch.rand(1, 1, MIN_SIDE, MIN_SIDE)
    assert float(ms_ssim_paper_code(ok, ok)) == pytest.approx(1.0)


# ----------------------------------------------------------------------- the five differences


def test_1_valid_convolution_not_same_padding():
    # Differences only in a 2-pixel frame, where the two paddings disagree most: zero padding would add
    # the same zero border to both images (inflating their similarity) and centre windows on the frame.
    x = np.full((1, 1, 64, 64), 0.5) + 0.1 * np.random.default_rng(6).standard_normal((1, 1, 64, 64))
    y = x.copy()
    y[..., :2, :] += 0.3
    y[..., -2:, :] -= 0.3
    y[..., :, :2] += 0.3
    y[..., :, -2:] -= 0.3
    got = float(ms_ssim_paper_code(*_t(x, y)))
    valid, same = _paper_combine(_terms(x, y)), _paper_combine(_terms(x, y, padding="same"))
    assert got == pytest.approx(valid, rel=1e-10)
    assert abs(same - valid) > 0.05


def test_2_one_number_per_batch_from_batch_means():
    x0, y0 = _pair((1, 1, 40, 40), 7, noise=0.02)
    x1, y1 = _pair((1, 1, 40, 40), 8, noise=0.3)
    x, y = np.concatenate([x0, x1]), np.concatenate([y0, y1])
    got = ms_ssim_paper_code(*_t(x, y))
    assert got.ndim == 0
    assert float(got) == pytest.approx(_paper_combine(_terms(x, y)), rel=1e-10)
    per = ms_ssim_paper_code_per_image(*_t(x, y))
    assert per.shape == (2,)
    np.testing.assert_allclose(per.numpy(), _paper_combine(_terms(x, y, per_image=True)), rtol=1e-10)
    # Per image with batch 1 is the batch function on that one image...
    for i in range(2):
        assert float(per[i]) == pytest.approx(float(ms_ssim_paper_code(*_t(x[i : i + 1], y[i : i + 1]))), rel=1e-12)
    # ...but the batch value is neither their mean nor their product.
    assert abs(float(got) - float(per.mean())) > 1e-3
    assert abs(float(got) - float(per.prod())) > 1e-3


def _const(v: float) -> torch.Tensor:
    return torch.full((1, 1, 32, 32), v, dtype=torch.float64)


def _closed(a: float, b: float, big_l: float) -> float:
    c1 = (0.01 * big_l) ** 2
    s = (2 * a * b + c1) / (a * a + b * b + c1)
    return ((s + 1) / 2) ** (4 * 0.1333)


@pytest.mark.parametrize(("a", "b", "source_l", "brief_l"), [
    (200.0, 100.0, 255.0, 255.0),   # max > 128
    (128.0, 60.0, 1.0, 1.0),        # max == 128 is not > 128
    (-0.6, 0.3, 1.1, 2.0),          # below -0.5: the source says 1.1, the first description said 2
    (-0.05, 0.3, 1.1, 1.0),         # below -0.001: min_val = -0.1
    (-0.0005, 0.3, 1.0, 1.0),       # above -0.001: min_val = 0
])
def test_3_dynamic_range_follows_the_source_thresholds(a, b, source_l, brief_l):
    got = float(ms_ssim_paper_code(_const(a), _const(b)))
    # rel 1e-7: E[x^2] - E[x]^2 of a constant 128 leaves a rounding residue next to C2
    assert got == pytest.approx(_closed(a, b, source_l), rel=1e-7)
    if brief_l != source_l:
        assert got != pytest.approx(_closed(a, b, brief_l), rel=1e-6)


def test_3_dynamic_range_is_read_from_pred_at_every_scale():
    x, y = _pair((1, 1, 48, 48), 9)
    # From pred only: the same pair scored with L = 255 when pred holds a bright pixel, not when target does.
    bright = x.copy()
    bright[0, 0, 20, 20] = 200.0
    assert float(ms_ssim_paper_code(*_t(bright, y))) == pytest.approx(_paper_combine(_terms(bright, y)), rel=1e-10)
    assert float(ms_ssim_paper_code(*_t(y, bright))) == pytest.approx(_paper_combine(_terms(y, bright)), rel=1e-10)
    assert _source_range(bright) == 255.0 and _source_range(y) == 1.0
    # Per scale: after one pooling the bright pixel averages to ~50 < 128, so L falls back to 1 there.
    per_scale, once = _paper_combine(_terms(bright, y)), _paper_combine(_terms(bright, y, range_per_scale=False))
    assert float(ms_ssim_paper_code(*_t(bright, y))) == pytest.approx(per_scale, rel=1e-10)
    assert abs(per_scale - once) > 1e-3


def test_4_simple_normalisation_keeps_anticorrelated_images_positive():
    x, _ = _pair((1, 1, 48, 48), 10)
    y = 1.0 - x  # anti-correlated: negative cs and SSIM at the fine scales
    s, c = paper_code_scales(*_t(x, y))
    assert float(s[0]) < 0 and float(c[0]) < 0
    got = float(ms_ssim_paper_code(*_t(x, y)))
    assert 0.0 < got < 0.5
    assert got == pytest.approx(_paper_combine(_terms(x, y)), rel=1e-10)
    assert np.isnan(_paper_combine(_terms(x, y), normalise=False))  # negative ** 0.0448 without it


def test_5_bracket_puts_the_coarsest_ssim_in_four_times():
    x, y = _pair((2, 1, 64, 64), 11, noise=0.2)
    got = float(ms_ssim_paper_code(*_t(x, y)))
    terms = _terms(x, y)
    correct = _correct_combine(terms)
    s5 = (terms[-1][0] + 1) / 2
    assert s5 < 1.0
    # paper / correct = s5 ** (4 w5) / s5 ** w5: the bracket lowers the value by s5 ** (3 * 0.1333).
    assert got == pytest.approx(correct * s5 ** (3 * 0.1333), rel=1e-10)
    assert got < correct


@pytest.mark.parametrize("amount", [0.25, 0.55])  # standard MS-SSIM about 0.97 and 0.88
def test_paper_code_reads_higher_than_standard_msssim_on_a_realistic_pair(amount):
    target = _smooth_noise(512, 4.0, seed=12)
    noise = _smooth_noise(512, 1.0, seed=13) - 0.5
    pred = (target + amount * noise).clamp(0, 1)
    standard = float(ms_ssim(pred, target, data_range=1.0, size_average=True))
    paper = float(ms_ssim_paper_code(pred, target))
    assert 0.85 < standard < 0.98  # the range of the denoising results we compare with the paper
    assert paper > standard
