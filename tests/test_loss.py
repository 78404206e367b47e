"""MSE + 0.1 (1 - MS-SSIM) through pytorch_msssim, in fp32, with settings for small images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim

from ddnet.loss import (
    DDNetLoss,
    choose_msssim,
    ms_ssim_per_image,
    psnr_per_image,
    rmse_per_image,
    slice_metrics,
)
from ddnet.precision import get_fp32_modes, set_fp32_precision


def _pair(side: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(2, 1, side, side, generator=g)
    y = F.avg_pool2d(y, 5, 1, 2)  # smooth images, like CT
    x = (y + noise * torch.randn(y.shape, generator=g)).clamp(0, 1)
    return x, y


def test_zero_for_identical_images() -> None:
    _, y = _pair(64, 0.0)
    loss = DDNetLoss(64)(y, y)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_grows_with_noise() -> None:
    fn = DDNetLoss(176)
    losses = [fn(*_pair(176, s)).item() for s in (0.01, 0.05, 0.1, 0.2)]
    assert losses == sorted(losses) and losses[0] > 0


@pytest.mark.parametrize("side", [176, 256])
def test_equals_direct_pytorch_msssim_call(side: int) -> None:
    x, y = _pair(side, 0.1)
    direct = F.mse_loss(x, y) + 0.1 * (1 - ms_ssim(x, y, data_range=1.0, size_average=True))
    assert DDNetLoss(side)(x, y).item() == pytest.approx(direct.item(), rel=1e-6)
    torch.testing.assert_close(ms_ssim_per_image(x, y, 1.0),
                               ms_ssim(x, y, data_range=1.0, size_average=False))


def test_reduced_window_equals_library_with_that_window() -> None:
    x, y = _pair(128, 0.1)
    s = choose_msssim(128)
    assert (s.scales, s.win_size, s.standard) == (5, 7, False)
    torch.testing.assert_close(ms_ssim_per_image(x, y, 1.0, s),
                               ms_ssim(x, y, data_range=1.0, size_average=False, win_size=7))


def test_settings_by_size() -> None:
    assert choose_msssim(512).standard and choose_msssim(161).win_size == 11
    assert choose_msssim(160).win_size == 9
    assert choose_msssim(64).win_size == 3 and choose_msssim(64).scales == 5
    few = choose_msssim(32)
    assert few.scales == 4 and few.win_size == 3
    assert sum(few.weights) == pytest.approx(1.0)
    assert choose_msssim(16).scales == 3
    with pytest.raises(ValueError, match="too small for MS-SSIM"):
        choose_msssim(4)


def test_small_image_warns_which_setting() -> None:
    with pytest.warns(UserWarning, match="3x3 window"):
        DDNetLoss(64)


def test_fp32_under_autocast() -> None:
    x, y = _pair(64, 0.1)
    fn = DDNetLoss(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fn(x.bfloat16(), y.bfloat16())
    assert loss.dtype == torch.float32
    # the same bf16-rounded inputs outside autocast give the same loss: nothing ran in bf16
    assert loss.item() == pytest.approx(fn(x.bfloat16().float(), y.bfloat16().float()).item(), rel=1e-6)


def test_psnr_and_rmse() -> None:
    y = torch.zeros(1, 1, 16, 16)
    x = y + 0.1
    assert psnr_per_image(x, y).item() == pytest.approx(20.0, rel=1e-5)
    assert rmse_per_image(x, y, 2048.0).item() == pytest.approx(204.8, rel=1e-5)


def test_loss_and_metrics_run_in_true_fp32_whatever_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """--precision tf32 sets TF32 process-wide; the loss and metrics must still convolve in IEEE fp32."""
    seen = []
    real_conv2d = F.conv2d

    def spy(*args, **kwargs):
        seen.append(get_fp32_modes())
        return real_conv2d(*args, **kwargs)

    monkeypatch.setattr(F, "conv2d", spy)  # pytorch_msssim's Gaussian filter calls F.conv2d
    set_fp32_precision("tf32")
    try:
        before = get_fp32_modes()
        x, y = _pair(64, 0.1)
        DDNetLoss(64)(x, y)
        slice_metrics(x, y, torch.ones(2), choose_msssim(64))
        assert get_fp32_modes() == before  # restored afterwards
    finally:
        set_fp32_precision("ieee")
    ieee = get_fp32_modes()
    assert seen and all(m == ieee for m in seen), seen
