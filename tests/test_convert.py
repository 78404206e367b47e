"""The layout converter and checkpoint loader (ddnet/convert.py), against the original DDNet weights."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from ddnet.config import DataConfig, ModelConfig
from ddnet.convert import (
    detect_layout,
    load_model_weights,
    name_table,
    original_to_ours,
    ours_to_original,
    unit_table,
)
from ddnet.data import load_split
from ddnet.errors import UserError
from ddnet.loss import ms_ssim_per_image, psnr_per_image
from ddnet.model import DDNet
from ddnet.sparsity import conform_to_state_dict_

FIXTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/ddnet-2d-dect/weights_50_1.pt"
needs_fixture = pytest.mark.skipif(
    not FIXTURE.exists(),
    reason=f"original DDNet weights fixture not found at {FIXTURE} (it lives in ../shared beside the checkout)",
)
TINY = ModelConfig(base_width=4, growth=4, bottleneck=8)


@pytest.fixture(scope="module")
def original_sd() -> OrderedDict[str, torch.Tensor]:
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------- name table
def test_name_table_covers_our_model_exactly() -> None:
    ours = DDNet().state_dict()
    table = name_table()
    assert list(table) == list(ours)  # same keys, in our module order
    assert len(set(table.values())) == len(table)  # one-to-one
    assert len(table) == 315


def test_name_table_follows_the_original_roles() -> None:
    roles = {ours: (bn, conv) for ours, bn, conv, _ in unit_table()}
    assert roles["stem"] == ("batch1", "conv1")
    assert roles["encoder.2.block.3.bottleneck"] == ("dnet3.batch_norm1_3", "dnet3.conv1_3")
    assert roles["encoder.2.block.3.grow"] == ("dnet3.batch_norm2_3", "dnet3.conv2_3")
    assert roles["encoder.3.transition"] == ("batch5", "conv5")
    # BN before the 5x5 deconv of stage i is batch(6+2i), before the 1x1 one batch(7+2i)
    assert roles["decoder.0.deconv5"] == ("batch6", "convT1")
    assert roles["decoder.0.deconv1"] == ("batch7", "convT2")
    assert roles["decoder.3.deconv5"] == ("batch12", "convT7")
    assert roles["decoder.3.deconv1"] == ("batch13", "convT8")


# ---------------------------------------------------------------------------- the fixture
@needs_fixture
def test_fixture_loads_strictly_with_every_tensor_in_its_role(original_sd: OrderedDict) -> None:
    model, info = load_model_weights(FIXTURE)
    assert info["layout"] == "original"
    assert info["format"] == "state-dict"
    assert info["epoch"] is None
    assert info["normalisation"]["normalisation"] == "minmax"
    assert info["params"] == 566_451
    # values land in the layer of the same role
    assert torch.equal(model.stem.bn.running_mean, original_sd["batch1.running_mean"])
    assert model.stem.bn.running_mean.item() == pytest.approx(0.31, abs=0.01)  # SOURCE.md
    assert torch.equal(model.stem.conv.weight, original_sd["conv1.weight"])
    assert torch.equal(model.encoder[1].block[2].bottleneck.conv.weight, original_sd["dnet2.conv1_2.weight"])
    assert torch.equal(model.encoder[1].block[2].bottleneck.bn.running_var, original_sd["dnet2.batch_norm1_2.running_var"])
    assert torch.equal(model.encoder[3].block[0].grow.conv.bias, original_sd["dnet4.conv2_0.bias"])
    assert torch.equal(model.encoder[2].transition.bn.weight, original_sd["batch4.weight"])
    assert torch.equal(model.decoder[1].deconv5.bn.running_mean, original_sd["batch8.running_mean"])
    assert torch.equal(model.decoder[1].deconv5.conv.weight, original_sd["convT3.weight"])
    assert torch.equal(model.decoder[2].deconv1.bn.running_mean, original_sd["batch11.running_mean"])
    assert torch.equal(model.decoder[3].deconv1.conv.weight, original_sd["convT8.weight"])
    assert model.decoder[3].deconv1.bn.num_batches_tracked.item() == original_sd["batch13.num_batches_tracked"].item()


@needs_fixture
def test_round_trip_gives_identical_keys_and_tensors(original_sd: OrderedDict) -> None:
    ours = original_to_ours(original_sd)
    back = ours_to_original(ours)
    assert set(back) == set(original_sd)
    for k, v in original_sd.items():
        assert back[k].dtype == v.dtype
        assert torch.equal(back[k], v), k
    # and through a real model: load, save, convert back
    model, _ = load_model_weights(FIXTURE)
    again = ours_to_original(model.state_dict())
    assert set(again) == set(original_sd)
    assert all(torch.equal(again[k], original_sd[k]) for k in original_sd)


@needs_fixture
def test_detect_layout_on_both_layouts(original_sd: OrderedDict) -> None:
    assert detect_layout(original_sd) == "original"
    assert detect_layout(DDNet(TINY).state_dict()) == "ours"
    assert detect_layout({f"module.{k}": v for k, v in DDNet(TINY).state_dict().items()}) == "ours"
    with pytest.raises(UserError, match="neither"):
        detect_layout({"fc.weight": torch.zeros(2)})


@needs_fixture
def test_wrong_shape_is_refused_naming_the_tensor(original_sd: OrderedDict, tmp_path: Path) -> None:
    bad = OrderedDict(original_sd)
    bad["dnet2.conv2_1.weight"] = torch.zeros(16, 64, 3, 3)
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    with pytest.raises(UserError) as e:
        load_model_weights(path)
    msg = str(e.value)
    assert "dnet2.conv2_1.weight" in msg
    assert "(16, 64, 3, 3)" in msg and "(16, 64, 5, 5)" in msg
    assert "\n" not in msg


@needs_fixture
def test_missing_key_is_named(original_sd: OrderedDict, tmp_path: Path) -> None:
    bad = OrderedDict(original_sd)
    del bad["batch9.running_var"]
    torch.save(bad, tmp_path / "orig.pt")
    with pytest.raises(UserError, match=r"missing tensor 'batch9\.running_var'"):
        load_model_weights(tmp_path / "orig.pt")
    # our layout too
    ours = DDNet(TINY).state_dict()
    del ours["decoder.2.deconv5.conv.bias"]
    torch.save(ours, tmp_path / "ours.pt")
    with pytest.raises(UserError, match=r"missing tensor 'decoder\.2\.deconv5\.conv\.bias'"):
        load_model_weights(tmp_path / "ours.pt")


def test_unexpected_key_is_named(tmp_path: Path) -> None:
    sd = DDNet(TINY).state_dict()
    sd["decoder.0.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "x.pt")
    with pytest.raises(UserError, match=r"unexpected tensor 'decoder\.0\.extra\.weight'"):
        load_model_weights(tmp_path / "x.pt")


@needs_fixture
def test_converted_fixture_runs_on_64px() -> None:
    model, _ = load_model_weights(FIXTURE)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert model.training is False  # loader returns the model in eval mode


@needs_fixture
def test_original_bn_statistics_confirm_the_mapping() -> None:
    """Feed slices through the converted net the way the original trained (BN on batch statistics,
    one image per batch) and compare each decoder BN's running mean, channel by channel, with the
    measured mean of its input. The right assignment correlates strongly; the other same-shaped
    decoder BNs, and the concatenation with skip and upsampled halves swapped, do not."""
    model, _ = load_model_weights(FIXTURE)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.0  # keep the stored statistics while measuring
    sites = [f"decoder.{i}.{u}" for i in range(4) for u in ("deconv5", "deconv1")]
    seen: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    for s in sites:
        model.get_submodule(s).bn.register_forward_hook(
            lambda mod, inp, out, s=s: seen[s].append(inp[0].mean((0, 2, 3)))
        )
    x = _ct_like(4, 128)
    with torch.no_grad():
        for i in range(len(x)):
            model(x[i : i + 1])
    measured = {s: torch.stack(v).mean(0) for s, v in seen.items()}
    stored = {s: model.get_submodule(s).bn.running_mean for s in sites}
    for s in sites:
        own = _corr(stored[s], measured[s])
        others = max(_corr(stored[s], measured[o]) for o in sites if o != s)
        assert own > 0.75 and own > others + 0.2, (s, own, others)
    for s in sites[::2]:  # deconv5 BNs see cat(upsampled, skip)
        swapped = torch.cat([measured[s][16:], measured[s][:16]])
        assert _corr(stored[s], measured[s]) > _corr(stored[s], swapped) + 0.5


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm() + 1e-12))


def _ct_like(n: int, side: int) -> torch.Tensor:
    """Crude chest-like slices in HU (air, body, two lungs, noise), min-max normalised per image."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    out = []
    for _ in range(n):
        img = torch.full((side, side), -1000.0)
        img[(xx / 0.9) ** 2 + (yy / 0.7) ** 2 < 1] = 40.0
        for cx in (-0.4, 0.4):
            img[((xx - cx) / 0.3) ** 2 + (yy / 0.45) ** 2 < 1] = -850.0
        img = img + 60.0 * torch.randn(side, side, generator=g)
        out.append((img - img.min()) / (img.max() - img.min()))
    return torch.stack(out)[:, None]


# ---------------------------------------------------------------------------- does it denoise?
def _scores(model: torch.nn.Module, lq: torch.Tensor, hq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(lq)
    return 100.0 * ms_ssim_per_image(out, hq), psnr_per_image(out, hq)


@needs_fixture
def test_pretrained_weights_are_far_closer_to_the_target_than_an_untrained_net() -> None:
    """On the default synthetic slices (min-max normalised, as the original trained) the
    shipped weights do NOT beat the low-dose input: that input already scores ~99 % MS-SSIM,
    and in eval mode (BN running statistics, which the original code never used: it ran in
    train mode) the output scores ~74-78 %. What is robust, and what a wrong mapping
    would break, is that the output is a real image of the slice: far above an untrained DDNet."""

    s = load_split(DataConfig(image_size=64, n_val=6, normalisation="minmax"), "val")
    model, _ = load_model_weights(FIXTURE)
    torch.manual_seed(0)
    ms, psnr = _scores(model, s.lq, s.hq)
    ms_rand, psnr_rand = _scores(DDNet(), s.lq, s.hq)
    assert ms.min() > 60.0  # measured 74-81 %
    assert ms_rand.max() < 5.0  # measured 0 %
    assert psnr.mean() > psnr_rand.mean() + 2.0  # measured 12.6 vs 9.6 dB


@needs_fixture
def test_pretrained_weights_denoise_heavy_noise() -> None:
    """Where the noise dominates (dose 0.01), the shipped weights do improve on the input:
    measured +5.6 MS-SSIM points and +5.4 dB PSNR on average, every slice better."""

    s = load_split(DataConfig(image_size=128, n_val=8, normalisation="minmax", synth_mode="fast", dose=0.01), "val")
    model, _ = load_model_weights(FIXTURE)

    ms_in, psnr_in = 100.0 * ms_ssim_per_image(s.lq, s.hq), psnr_per_image(s.lq, s.hq)
    ms_out, psnr_out = _scores(model, s.lq, s.hq)
    assert (ms_out - ms_in).mean() > 2.0
    assert (ms_out - ms_in).min() > 0.0
    assert (psnr_out - psnr_in).mean() > 3.0


# ---------------------------------------------------------------------------- our formats
def test_our_checkpoint_formats_load_with_their_info(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DDNet(TINY)
    sd = model.state_dict()
    norm = {"normalisation": "window", "hu_window": [-1024.0, 1024.0]}
    mc = {"base_width": 4, "growth": 4, "bottleneck": 8, "layers_per_block": 4}
    torch.save({"format": "ddnet-bench-weights/1", "model": sd, "model_config": mc,
                "normalisation": norm, "epoch": 3}, tmp_path / "weights.pt")
    # a ckpt with RNG states that the restricted unpickler refuses (a numpy array in a tuple)
    torch.save({"format": "ddnet-bench-ckpt/1", "model": sd, "model_config": mc, "normalisation": norm,
                "epoch": 2, "rng": {"numpy": ("MT19937", np.arange(4, dtype=np.uint32), 0, 0, 0.0)}},
               tmp_path / "ckpt.pt")
    torch.save(sd, tmp_path / "plain.pt")
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        ref = model.eval()(x)
    for name, fmt, epoch, expect_norm in [
        ("weights.pt", "ddnet-bench-weights/1", 3, norm),
        ("ckpt.pt", "ddnet-bench-ckpt/1", 2, norm),
        ("plain.pt", "state-dict", None, None),
    ]:
        loaded, info = load_model_weights(tmp_path / name)
        assert (info["layout"], info["format"], info["epoch"]) == ("ours", fmt, epoch)
        assert info["normalisation"] == expect_norm
        assert info["model_config"] == mc  # from model_config, or inferred from the shapes (plain)
        with torch.no_grad():
            assert torch.equal(loaded(x), ref)


def test_original_layout_of_our_model_loads_back(tmp_path: Path) -> None:
    model = DDNet(TINY)
    torch.save(ours_to_original(model.state_dict()), tmp_path / "orig.pt")
    loaded, info = load_model_weights(tmp_path / "orig.pt")
    assert info["layout"] == "original" and info["model_config"]["base_width"] == 4
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_structurally_pruned_weights_load(tmp_path: Path) -> None:
    """Narrower (structurally pruned) layers are rebuilt from the shapes before the strict load.

    The narrowed state dict is made by hand (what structured pruning writes: a 1x1
    bottleneck with fewer outputs, its consumer BN and 5x5 conv with fewer inputs);
    `sparsify_` itself is tested in test_sparsity.py and is slow to run here.
    """

    torch.manual_seed(0)
    sd = DDNet(TINY).state_dict()
    keep = 5  # of 8 bottleneck channels
    unit = "encoder.1.block.2"
    for k in (f"{unit}.bottleneck.conv.weight", f"{unit}.bottleneck.conv.bias"):
        sd[k] = sd[k][:keep].clone()
    for s in ("weight", "bias", "running_mean", "running_var"):
        sd[f"{unit}.grow.bn.{s}"] = sd[f"{unit}.grow.bn.{s}"][:keep].clone()
    sd[f"{unit}.grow.conv.weight"] = sd[f"{unit}.grow.conv.weight"][:, :keep].clone()
    reference = DDNet(TINY)
    conform_to_state_dict_(reference, sd)
    reference.load_state_dict(sd, strict=True)
    mc = {"base_width": 4, "growth": 4, "bottleneck": 8, "layers_per_block": 4}
    torch.save({"format": "ddnet-bench-weights/1", "model": sd, "model_config": mc,
                "normalisation": None, "epoch": 1}, tmp_path / "weights.pt")
    torch.save(sd, tmp_path / "plain.pt")  # no model_config: widths inferred, narrow layer conformed
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        ref = reference.eval()(x)
    for name in ("weights.pt", "plain.pt"):
        loaded, info = load_model_weights(tmp_path / name)
        assert info["model_config"] == mc
        assert loaded.get_submodule(f"{unit}.bottleneck.conv").weight.shape[0] == keep
        with torch.no_grad():
            assert torch.equal(loaded(x), ref)


# ---------------------------------------------------------------------------- bad files
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_model_weights(tmp_path / "nope.pt")


@pytest.mark.parametrize("kind", ["text", "pickled-list", "torch-list", "dict-of-strings", "unknown-format"])
def test_not_a_checkpoint(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.pt"
    if kind == "text":
        path.write_text("hello, not a checkpoint\n")
    elif kind == "pickled-list":
        path.write_bytes(pickle.dumps([1, 2, 3]))
    elif kind == "torch-list":
        torch.save([torch.zeros(2)], path)
    elif kind == "dict-of-strings":
        torch.save({"a": "b"}, path)
    else:
        torch.save({"format": "someone-else/2", "model": {}}, path)
    with pytest.raises(UserError) as e:
        load_model_weights(path)
    assert "\n" not in str(e.value)
    assert str(path) in str(e.value)


def test_arbitrary_pickle_is_never_executed(tmp_path: Path) -> None:
    """A pickle that would run code on load is refused, even if it mentions our marker in a string."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"format": "not-ours", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError):
        load_model_weights(tmp_path / "evil.pt")
    assert not marker.exists()
