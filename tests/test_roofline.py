"""bench.roofline: peaks table and lookup, the row's arithmetic, the CPU peak, counted bytes per image."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.roofline import (
    ACTIVATION_PASSES,
    PARAM_PASSES_ADAM,
    PEAKS,
    PRECISIONS,
    DevicePeak,
    count_activation_bytes,
    estimate_bytes_per_image,
    lookup_peak,
    measure_cpu_peak,
    normalise_device_name,
    roofline_row,
)
from ddnet.config import ModelConfig
from ddnet.model import DDNet

ROW_KEYS = {
    "achieved_tflops",
    "peak_tflops",
    "pct_of_peak_flops",
    "bytes_per_image_gb",
    "achieved_bandwidth_tbs",
    "pct_of_peak_bandwidth",
    "bandwidth_floor_images_per_s",
    "peak_source",
    "peak_measured",
}


# --- the row's arithmetic ----------------------------------------------------------------------


def test_pct_of_peak_flops_of_ddnet_on_h100_bf16():
    # 115 GFLOP per image (DDNet fwd + bwd at 512 px) at 100 images/s = 11.5 TFLOP/s of 989.4
    row = roofline_row(115e9, None, 100.0, "amp-bf16", lookup_peak("NVIDIA H100 80GB HBM3"))
    assert set(row) == ROW_KEYS
    assert row["achieved_tflops"] == pytest.approx(11.5)
    assert row["peak_tflops"] == 989.4
    assert row["pct_of_peak_flops"] == pytest.approx(1.1623, abs=1e-4)
    assert round(row["pct_of_peak_flops"], 2) == 1.16
    assert row["peak_measured"] is False
    assert "H100" in row["peak_source"]
    # no bytes given: the bandwidth columns stay empty, the flop ones are still there
    for key in ("bytes_per_image_gb", "achieved_bandwidth_tbs", "pct_of_peak_bandwidth", "bandwidth_floor_images_per_s"):
        assert row[key] is None


def test_bandwidth_columns_from_bytes_and_rate():
    peak = DevicePeak("toy", {"fp32": 10.0}, 2.0, "made up for the test", measured=False)
    row = roofline_row(1e12, 2e9, 100.0, "fp32", peak)  # 1 TFLOP and 2 GB per image, 100 images/s
    assert row["achieved_tflops"] == pytest.approx(100.0)
    assert row["pct_of_peak_flops"] == pytest.approx(1000.0)  # the arithmetic does not clip
    assert row["bytes_per_image_gb"] == pytest.approx(2.0)
    assert row["achieved_bandwidth_tbs"] == pytest.approx(0.2)
    assert row["pct_of_peak_bandwidth"] == pytest.approx(10.0)
    assert row["bandwidth_floor_images_per_s"] == pytest.approx(1000.0)  # 2e12 B/s / 2e9 B


def test_flops_per_image_is_taken_as_given():
    # the caller's fwd+bwd count goes in unchanged: 3x the forward gives exactly 3x the achieved rate
    peak = lookup_peak("NVIDIA A100-SXM4-80GB")
    forward = roofline_row(38e9, None, 50.0, "tf32", peak)
    train = roofline_row(3 * 38e9, None, 50.0, "tf32", peak)
    assert train["achieved_tflops"] == pytest.approx(3 * forward["achieved_tflops"])
    assert forward["achieved_tflops"] == pytest.approx(1.9)
    assert forward["pct_of_peak_flops"] == pytest.approx(100 * 1.9 / 156.0)


def test_unknown_device_leaves_peak_columns_empty():
    assert lookup_peak("Tesla T4") is None
    row = roofline_row(115e9, 4e9, 10.0, "fp32", None)
    assert row["achieved_tflops"] == pytest.approx(1.15)  # what was achieved does not depend on the device
    assert row["bytes_per_image_gb"] == pytest.approx(4.0)
    assert row["achieved_bandwidth_tbs"] == pytest.approx(0.04)
    for key in ("peak_tflops", "pct_of_peak_flops", "pct_of_peak_bandwidth", "bandwidth_floor_images_per_s"):
        assert row[key] is None
    assert row["peak_source"] is None and row["peak_measured"] is None


def test_precision_without_a_figure_gives_none_not_another_precisions_peak():
    cpu_like = DevicePeak("cpu (measured)", {"fp32": 0.1}, 0.05, "measured", measured=True)
    row = roofline_row(1e9, 1e9, 1.0, "amp-fp16", cpu_like)
    assert row["peak_tflops"] is None and row["pct_of_peak_flops"] is None
    assert row["pct_of_peak_bandwidth"] == pytest.approx(100 * 0.001 / 0.05)
    assert row["peak_measured"] is True


@pytest.mark.parametrize(
    "args, match",
    [
        ((1e9, None, 1.0, "fp16", None), "precision"),
        ((1e9, None, -1.0, "fp32", None), "images_per_s"),
        ((1e9, None, math.nan, "fp32", None), "images_per_s"),
        ((-1.0, None, 1.0, "fp32", None), "flops_per_image"),
        ((1e9, 0.0, 1.0, "fp32", None), "bytes_per_image"),
    ],
)
def test_bad_input_is_refused_with_the_field_named(args, match):
    with pytest.raises(ValueError, match=match):
        roofline_row(*args)


# --- the peaks table ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "torch_name, fp32, tf32, bf16, bandwidth",
    [
        ("NVIDIA H100 80GB HBM3", 66.9, 494.7, 989.4, 3.35),
        ("NVIDIA H200", 66.9, 494.7, 989.4, 4.8),
        ("NVIDIA H100 PCIe", 51.0, 378.0, 756.5, 2.0),
        ("NVIDIA A100-SXM4-40GB", 19.5, 156.0, 312.0, 1.555),
        ("NVIDIA A100-SXM4-80GB", 19.5, 156.0, 312.0, 2.039),
        ("NVIDIA A100 80GB PCIe", 19.5, 156.0, 312.0, 1.935),
        ("NVIDIA A100-PCIE-40GB", 19.5, 156.0, 312.0, 1.555),
        ("NVIDIA L40S", 91.6, 183.0, 362.05, 0.864),
    ],
)
def test_lookup_by_torch_device_name(torch_name, fp32, tf32, bf16, bandwidth):
    peak = lookup_peak(torch_name)
    assert peak is not None and not peak.measured and peak.source
    assert peak.flops_tflops == {"fp32": fp32, "tf32": tf32, "amp-fp16": bf16, "amp-bf16": bf16}
    assert peak.bandwidth_tbs == bandwidth


@pytest.mark.parametrize(
    "torch_name",
    [
        "NVIDIA H200 NVL",  # a different board (lower clocks): must not borrow the SXM figures
        "NVIDIA H100 NVL",
        "NVIDIA A100-SXM4-40GB MIG 1g.5gb",  # a slice of the GPU has a slice of its peak
        "NVIDIA GeForce RTX 4090",
        "cpu",
        "",
    ],
)
def test_lookup_of_other_names_is_none(torch_name):
    assert lookup_peak(torch_name) is None


def test_lookup_ignores_case_and_punctuation():
    assert normalise_device_name("NVIDIA A100-SXM4-80GB") == "a100 sxm4 80gb"
    assert lookup_peak("nvidia a100 sxm4 80gb") is lookup_peak("NVIDIA A100-SXM4-80GB")


def test_table_holds_dense_peaks_for_every_precision():
    for key, peak in PEAKS.items():
        assert key == normalise_device_name(key)
        assert set(peak.flops_tflops) == set(PRECISIONS)
        tc = peak.flops_tflops
        # dense tensor-core rates: TF32 is half of BF16/FP16 on these parts, and both beat plain fp32;
        # a sparse figure taken by mistake would break one of these or the exact values above
        assert tc["amp-fp16"] == tc["amp-bf16"]
        assert tc["tf32"] == pytest.approx(tc["amp-bf16"] / 2, rel=0.02)  # L40S: 183 vs 362.05
        assert tc["fp32"] < tc["tf32"]
        assert 0.5 < peak.bandwidth_tbs < 10
        assert "datasheet" in peak.source or "whitepaper" in peak.source


# --- the measured CPU peak ---------------------------------------------------------------------


def test_measure_cpu_peak_returns_positive_finite_figures():
    peak = measure_cpu_peak(seconds=0.2)
    assert peak.measured is True and peak.name == "cpu (measured)"
    assert set(peak.flops_tflops) == {"fp32", "tf32", "amp-bf16"}  # amp-fp16 is refused on a CPU
    for value in [*peak.flops_tflops.values(), peak.bandwidth_tbs]:
        assert math.isfinite(value) and value > 0
    # a CPU, not a datacenter GPU: sanity bounds, not a benchmark
    assert peak.flops_tflops["fp32"] < 50 and peak.bandwidth_tbs < 5
    row = roofline_row(1e9, 1e8, 10.0, "fp32", peak)
    assert row["peak_measured"] is True and row["pct_of_peak_flops"] > 0


# --- counted bytes per image -------------------------------------------------------------------


class TinyNet(nn.Module):
    """conv 3x3 (1->4) -> relu (functional) -> conv 1x1 (4->1) -> + input (functional) -> flatten (a view)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)  # 36 + 4 params
        self.conv2 = nn.Conv2d(4, 1, 1)  # 4 + 1 params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x))) + x
        return y.flatten(1).view_as(y)  # views move no bytes


def test_tiny_net_bytes_equal_a_hand_count():
    p = 32 * 32  # elements per channel plane at the full image size
    # elements:      conv1   relu    conv2   add
    in_elems = (1 + 4 + 4 + (1 + 1)) * p
    out_elems = (4 + 4 + 1 + 1) * p
    counted = count_activation_bytes(TinyNet(), 32, probe_size=16)  # area scaling x4 from the probe
    assert counted.input_bytes == 4 * in_elems
    assert counted.output_bytes == 4 * out_elems
    assert counted.output_bytes_by_op == {"Conv2d": 4 * 5 * p, "relu": 4 * 4 * p, "add": 4 * 1 * p}

    params = 45
    expected = ACTIVATION_PASSES * 4 * (in_elems + out_elems) + PARAM_PASSES_ADAM * 4 * params
    assert estimate_bytes_per_image(TinyNet(), 32) == expected == 259_848
    assert estimate_bytes_per_image(TinyNet(), 32, batch_size=2) == expected - PARAM_PASSES_ADAM * 4 * params // 2
    # AMP activations are counted at 2 bytes; fp32 master weights and Adam states stay 4
    assert estimate_bytes_per_image(TinyNet(), 32, dtype_bytes=2) == expected - ACTIVATION_PASSES * 2 * (
        in_elems + out_elems
    )


def test_area_scaling_matches_a_full_size_forward():
    full = count_activation_bytes(TinyNet(), 48, probe_size=48)
    scaled = count_activation_bytes(TinyNet(), 48, probe_size=16)
    assert scaled == full


def test_counting_leaves_the_model_as_it_was():
    model = DDNet(ModelConfig()).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    count_activation_bytes(model, 64, probe_size=32)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # eval-mode probe: BatchNorm running stats untouched
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    # a forward that fails (DDNet needs a multiple of 16) still takes its hooks and mode away
    with pytest.raises(ValueError, match="divisible by 16"):
        count_activation_bytes(model, 512, probe_size=40)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.training
    assert torch.ones(2).add(1).sum().item() == 4.0  # plain torch calls still work afterwards


def test_ddnet_512_activations_match_design():
    # DESIGN.md: about 0.64 GB of fp32 activations per image at 512 px, counting leaf outputs of
    # BN -> conv -> LeakyReLU units. Counted at 64 px and scaled by area (exact: every size divides).
    counted = count_activation_bytes(DDNet(ModelConfig()), 512, probe_size=64)
    by_op = counted.output_bytes_by_op
    units = by_op["BatchNorm2d"] + by_op["Conv2d"] + by_op["ConvTranspose2d"] + by_op["leaky_relu"]
    assert units == pytest.approx(0.64e9, rel=0.05)
    # every leaf output, pooling, upsampling and concatenation included: same order of magnitude
    assert 0.5 * 0.64e9 < counted.output_bytes < 1.5 * 0.64e9
    assert {"max_pool2d", "cat", "interpolate"} <= set(by_op)

    params = 566_451
    total = estimate_bytes_per_image(DDNet(ModelConfig()), 512)
    expected = ACTIVATION_PASSES * (counted.input_bytes + counted.output_bytes) + PARAM_PASSES_ADAM * 4 * params
    assert total == pytest.approx(expected, abs=1)
    assert 2e9 < total < 10e9  # a few GB per image per step: activations dominate the 23 MB of weights
