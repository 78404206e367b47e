"""DDNet is the paper's network: layer counts, parameters, shapes, unit order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddnet.config import ModelConfig
from ddnet.model import ConvUnit, DDNet, count_layers


def test_paper_counts() -> None:
    counts = count_layers(DDNet())
    assert counts == {"conv2d": 37, "conv_transpose2d": 8, "batchnorm2d": 45, "params": 566_451}


@pytest.mark.parametrize("side", [16, 32, 48, 64, 96])
def test_output_shape_equals_input(side: int) -> None:
    model = DDNet(ModelConfig(base_width=4, growth=4, bottleneck=8)).eval()
    x = torch.rand(2, 1, side, side)
    assert model(x).shape == x.shape


def test_rectangular_input() -> None:
    model = DDNet(ModelConfig(base_width=4, growth=4, bottleneck=8)).eval()
    assert model(torch.rand(1, 1, 32, 64)).shape == (1, 1, 32, 64)


def test_rejects_size_not_divisible_by_16() -> None:
    with pytest.raises(ValueError, match="divisible by 16"):
        DDNet()(torch.rand(1, 1, 40, 40))


def test_every_unit_is_bn_conv_lrelu() -> None:
    """BN -> conv -> LeakyReLU(0.01): a unit's output is lrelu(conv(bn(x)))."""
    torch.manual_seed(0)
    unit = ConvUnit(3, 5, 5).eval()
    unit.bn.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    expected = nn.functional.leaky_relu(unit.conv(unit.bn(x)), 0.01)
    torch.testing.assert_close(unit(x), expected)
    assert (unit(x) < 0).any()  # the negative slope is there (not a plain ReLU)


def test_widths_follow_the_paper() -> None:
    m = DDNet()
    assert m.stem.conv.kernel_size == (7, 7) and m.stem.bn.num_features == 1
    block = m.encoder[0].block
    assert [layer.bottleneck.bn.num_features for layer in block] == [16, 32, 48, 64]
    assert all(layer.bottleneck.conv.out_channels == 64 for layer in block)
    assert all(layer.grow.conv.kernel_size == (5, 5) and layer.grow.conv.out_channels == 16 for layer in block)
    assert m.encoder[0].transition.conv.in_channels == 80
    assert [d.deconv5.conv.in_channels for d in m.decoder] == [32] * 4
    assert [d.deconv1.conv.out_channels for d in m.decoder] == [16, 16, 16, 1]
    assert all(isinstance(d.deconv5.conv, nn.ConvTranspose2d) for d in m.decoder)


def test_no_global_residual_or_sigmoid() -> None:
    """Output is unbounded above (no sigmoid) and a zero-weight net does not return its input."""
    m = DDNet(ModelConfig(base_width=4, growth=4, bottleneck=8)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.decoder[3].deconv1.conv.bias.fill_(5.0)
    y = m(torch.rand(1, 1, 32, 32))
    torch.testing.assert_close(y, torch.full_like(y, 5.0))
