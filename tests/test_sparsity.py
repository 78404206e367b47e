"""Tests of ddnet.sparsity on a tiny DDNet (base 4, growth 4, bottleneck 8) on the CPU."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from ddnet.config import ModelConfig, SparsityConfig
from ddnet.errors import UserError
from ddnet.model import DDNet
from ddnet.sparsity import (
    AutoSwitch,
    Masks,
    conform_to_state_dict_,
    count_flops,
    effective_flops,
    measure_sparsity,
    phase_of,
    prunable_layers,
    random_prune_,
    sparsify_,
    structured_prune_,
    topk_prune_,
)

W, G, B = 4, 4, 8  # base width, growth, bottleneck of the tiny net
TINY = ModelConfig(base_width=W, growth=G, bottleneck=B)
S = 32  # image side


def tiny(seed: int = 0) -> DDNet:
    torch.manual_seed(seed)
    return DDNet(TINY)


def batch(seed: int = 1, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, S, S, generator=g)
    return x, (x + 0.1 * torch.randn(n, 1, S, S, generator=g)).clamp(0, 1)


def in_groups(mod: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """(N, 4) rows of 4 consecutive input channels, written independently of the module under test."""
    if isinstance(mod, nn.ConvTranspose2d):  # (in, out, kh, kw)
        return t.permute(1, 2, 3, 0).reshape(-1, 4)
    return t.permute(0, 2, 3, 1).reshape(-1, 4)  # Conv2d (out, in, kh, kw)


# ----------------------------------------------------------------------------- layers


def test_prunable_layers_are_every_conv_and_deconv_also_under_a_wrapper() -> None:
    m = tiny()
    names = [n for n, _ in prunable_layers(m)]
    kinds = [type(mod) for _, mod in prunable_layers(m)]
    assert kinds.count(nn.Conv2d) == 37 and kinds.count(nn.ConvTranspose2d) == 8
    assert "stem.conv" in names and "decoder.3.deconv1.conv" in names
    # a wrapped model must not prune nothing (the paper's DDP defect) nor rename layers
    assert [n for n, _ in prunable_layers(nn.DataParallel(m))] == names
    masks = random_prune_(nn.DataParallel(m), 0.5, generator=torch.Generator().manual_seed(0))
    assert measure_sparsity(m)["zeros"] == masks.zeros() > 0


# ----------------------------------------------------------------------------- random / top-K


@pytest.mark.parametrize("amount", [0.3, 0.5, 0.9])
def test_random_prune_exact_count_per_layer_and_only_weights(amount: float) -> None:
    m = tiny()
    before = copy.deepcopy(m.state_dict())
    masks = random_prune_(m, amount, generator=torch.Generator().manual_seed(3))
    sp = measure_sparsity(m)
    assert len(sp["per_layer"]) == 45
    for name, mod in prunable_layers(m):
        n = mod.weight.numel()
        assert sp["per_layer"][name]["zeros"] == round(amount * n), name
        assert int((~masks.masks[name]).sum()) == round(amount * n)
        assert torch.equal(mod.weight == 0, ~masks.masks[name])
    # biases and BatchNorm untouched
    after = m.state_dict()
    for k, v in before.items():
        if not (k.endswith("conv.weight")):
            assert torch.equal(after[k], v), k
    assert sp["effective_params"] == sp["params"] - sp["zeros"]


def test_random_prune_is_seeded() -> None:
    a = random_prune_(tiny(), 0.5, generator=torch.Generator().manual_seed(7))
    b = random_prune_(tiny(), 0.5, generator=torch.Generator().manual_seed(7))
    c = random_prune_(tiny(), 0.5, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert not all(torch.equal(a.masks[k], c.masks[k]) for k in a.masks)


@pytest.mark.parametrize("amount", [0.25, 0.5])
def test_topk_keeps_largest_in_place_exact_count(amount: float) -> None:
    m = tiny()
    orig = {n: mod.weight.detach().clone() for n, mod in prunable_layers(m)}
    masks = topk_prune_(m, amount)
    for name, mod in prunable_layers(m):
        w, w0, keep = mod.weight.detach(), orig[name], masks.masks[name]
        assert int((w == 0).sum()) == round(amount * w.numel()), name
        # kept weights are the original values in their original positions (no scrambling)
        assert torch.equal(w[keep], w0[keep])
        assert torch.equal(w[~keep], torch.zeros_like(w[~keep]))
        assert w0[keep].abs().min() >= w0[~keep].abs().max(), name


def test_topk_global_one_threshold_exact_total() -> None:
    m = tiny()
    orig = {n: mod.weight.detach().clone() for n, mod in prunable_layers(m)}
    masks = topk_prune_(m, 0.5, scope="global")
    total = sum(w.numel() for w in orig.values())
    sp = measure_sparsity(m)
    assert sp["zeros"] == round(0.5 * total) and sp["numel"] == total
    kept_min = min(orig[n][k].abs().min() for n, k in masks.masks.items() if k.any())
    pruned_max = max(orig[n][~k].abs().max() for n, k in masks.masks.items() if (~k).any())
    assert kept_min >= pruned_max
    # one threshold over layers of different scale: layers end up differently sparse
    per = [v["sparsity"] for v in sp["per_layer"].values()]
    assert max(per) - min(per) > 0.2


@pytest.mark.parametrize("method", ["random", "topk"])
def test_two_four_in_every_group_and_stem_left_dense(method: str) -> None:
    m = tiny()
    orig = {n: mod.weight.detach().clone() for n, mod in prunable_layers(m)}
    res = sparsify_(m, SparsityConfig(kind=method, pattern="2:4"), seed=0, image_size=S)
    assert res.kind == "masked"
    assert set(res.report["layers_left_dense"]) == {"stem.conv"}
    assert "divisible by 4" in res.report["layers_left_dense"]["stem.conv"]
    assert torch.equal(m.stem.conv.weight, orig["stem.conv"])
    checked = {nn.Conv2d: 0, nn.ConvTranspose2d: 0}
    for name, mod in prunable_layers(m):
        if name == "stem.conv":
            continue
        rows = in_groups(mod, mod.weight.detach())
        assert ((rows == 0).sum(dim=1) == 2).all(), name
        if method == "topk":
            rows0 = in_groups(mod, orig[name]).abs()
            kept_small = torch.where(rows != 0, rows0, torch.inf).min(dim=1).values
            pruned_big = torch.where(rows == 0, rows0, -torch.inf).max(dim=1).values
            assert (kept_small >= pruned_big).all(), name
        checked[type(mod)] += 1
    assert checked == {nn.Conv2d: 36, nn.ConvTranspose2d: 8}
    assert res.report["layers_pruned"] == sorted(n for n, _ in prunable_layers(m) if n != "stem.conv")


def test_bad_requests_are_user_errors() -> None:
    with pytest.raises(UserError, match="amount"):
        random_prune_(tiny(), 1.0)
    with pytest.raises(UserError, match="2:4"):
        topk_prune_(tiny(), 0.3, pattern="2:4")
    with pytest.raises(UserError, match="scope layer"):
        topk_prune_(tiny(), 0.5, pattern="2:4", scope="global")
    with pytest.raises(UserError, match="no Conv2d"):
        random_prune_(nn.Sequential(nn.Linear(4, 4)), 0.5)
    with pytest.raises(UserError, match="no prunable channel group"):
        structured_prune_(nn.Sequential(nn.Conv2d(1, 4, 3)), 0.5)
    masks = topk_prune_(tiny(), 0.5)
    with pytest.raises(UserError, match="does not fit"):
        masks.apply_(DDNet(ModelConfig(base_width=8, growth=4, bottleneck=8)))


# ----------------------------------------------------------------------------- masks that hold


def _adam_steps(m: nn.Module, opt: torch.optim.Optimizer, masks: Masks | None, steps: int) -> None:
    x, y = batch()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        if masks is not None:
            masks.apply_(m)


def test_zeros_hold_through_20_adam_steps_and_a_save_load_round_trip() -> None:
    m = tiny()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    _adam_steps(m, opt, None, 2)  # dense epochs first: Adam state exists at pruning time
    res = sparsify_(m, SparsityConfig(kind="topk"), seed=0, optimizer=opt, image_size=S)
    masks = res.masks
    assert masks is not None
    for name, mod in prunable_layers(m):
        st = opt.state[mod.weight]
        assert (st["exp_avg"][~masks.masks[name]] == 0).all()
        assert (st["exp_avg_sq"][~masks.masks[name]] == 0).all()
        assert (st["exp_avg"][masks.masks[name]] != 0).any()
    w_before = m.encoder[0].block[0].grow.conv.weight.detach().clone()
    _adam_steps(m, opt, masks, 20)
    assert not torch.equal(w_before, m.encoder[0].block[0].grow.conv.weight)  # it did train
    for name, mod in prunable_layers(m):
        assert torch.equal(mod.weight == 0, ~masks.masks[name]), name  # zeros exactly where pruned
    # checkpoint round trip: model + masks state dicts, then more training
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "masks": masks.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)
    m2 = DDNet(TINY)
    m2.load_state_dict(ck["model"])
    masks2 = Masks.from_state_dict(ck["masks"])
    _adam_steps(m2, torch.optim.Adam(m2.parameters(), lr=1e-2), masks2, 5)
    for name, mod in prunable_layers(m2):
        assert torch.equal(mod.weight == 0, ~masks.masks[name]), name
    assert measure_sparsity(m2)["zeros"] == measure_sparsity(m)["zeros"]


def test_without_reapplying_masks_adam_regrows_pruned_weights() -> None:
    # the paper's defect this module exists to avoid: masks dropped right after pruning
    m = tiny()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    topk_prune_(m, 0.5)
    _adam_steps(m, opt, None, 3)
    assert measure_sparsity(m)["overall"] < 0.1  # from 0.5: most pruned weights regrew


def test_masks_to_and_state_dict() -> None:
    masks = random_prune_(tiny(), 0.5, generator=torch.Generator().manual_seed(0))
    moved = masks.to("cpu")
    assert moved.masks.keys() == masks.masks.keys()
    back = Masks.from_state_dict({k: v.float() for k, v in masks.state_dict().items()})
    assert all(back.masks[k].dtype == torch.bool and torch.equal(back.masks[k], masks.masks[k]) for k in masks.masks)
    assert masks.numel() == sum(mod.weight.numel() for _, mod in prunable_layers(tiny()))


# ----------------------------------------------------------------------------- structured


def _trained_tiny(seed: int = 0) -> DDNet:
    """A tiny net with non-trivial BatchNorm (beta != 0, running stats moved), so that the
    equivalence test would catch a pruned channel leaking beta through the consumer BN."""
    m = tiny(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
        m.train()
        for s in range(2):
            m(batch(seed=10 + s)[0])
    return m


def _mask_full_network_(m: DDNet, kept: dict[str, list[int]]) -> None:
    """Zero the pruned output filters and biases AND the consumer conv's weights over those channels."""
    with torch.no_grad():
        for layer, keep in kept.items():
            unit = m.get_submodule(layer.rsplit(".", 1)[0])
            consumer = m.get_submodule(layer.replace("bottleneck.conv", "grow").replace("deconv5.conv", "deconv1"))
            n = unit.conv.bias.numel()
            drop = [i for i in range(n) if i not in keep]
            if isinstance(unit.conv, nn.ConvTranspose2d):
                unit.conv.weight[:, drop] = 0
                consumer.conv.weight[drop] = 0
            else:
                unit.conv.weight[drop] = 0
                consumer.conv.weight[:, drop] = 0
            unit.conv.bias[drop] = 0


def test_structured_shrinks_and_matches_the_masked_full_network() -> None:
    full = _trained_tiny()
    small = copy.deepcopy(full)
    rep = structured_prune_(small, 0.5, image_size=S)
    kept = rep["kept_channels"]
    assert len(kept) == 16 + 4 and all(len(v) == B // 2 for v in kept.values())
    assert small.encoder[2].block[1].bottleneck.conv.weight.shape == (B // 2, W + G, 1, 1)
    assert small.encoder[2].block[1].grow.bn.running_mean.shape == (B // 2,)
    assert small.encoder[2].block[1].grow.conv.weight.shape == (G, B // 2, 5, 5)
    assert small.decoder[3].deconv5.conv.weight.shape == (2 * W, W, 5, 5)  # (in, out, kh, kw)
    assert small.decoder[3].deconv1.conv.weight.shape == (W, 1, 1, 1)

    masked = copy.deepcopy(full)
    _mask_full_network_(masked, kept)
    x = batch(seed=5)[0]
    for mode in ("eval", "train"):
        a, b = copy.deepcopy(small), copy.deepcopy(masked)
        a.train(mode == "train")
        b.train(mode == "train")
        with torch.no_grad():
            ya, yb = a(x), b(x)
        assert torch.allclose(ya, yb, atol=1e-5, rtol=0), (mode, (ya - yb).abs().max())
    # zeroing only the producer is NOT equivalent: BN turns a zero channel into beta
    leaky = copy.deepcopy(full)
    with torch.no_grad():
        for layer, keep in kept.items():
            conv = leaky.get_submodule(layer)
            drop = [i for i in range(conv.bias.numel()) if i not in keep]
            (conv.weight[:, drop] if isinstance(conv, nn.ConvTranspose2d) else conv.weight[drop]).zero_()
            conv.bias[drop] = 0
        leaky.eval()
        small.eval()
        assert (leaky(x) - small(x)).abs().max() > 1e-3


def test_structured_params_and_flops_fall_by_the_hand_computed_amount() -> None:
    m = tiny()
    params0 = sum(p.numel() for p in m.parameters())
    rep = structured_prune_(m, 0.5, image_size=S)
    r = B // 2  # channels removed from each bottleneck (8 -> 4) and each decoder 5x5 (2W=8 -> 4)
    r_dec = (2 * W) // 2
    exp_params = exp_flops = 0
    for stage in range(4):
        hw = (S // 2 ** (stage + 1)) ** 2
        for j in range(4):
            c_in = W + j * G
            # bottleneck conv weight+bias, grow BN gamma+beta, grow conv 5x5 input slices
            exp_params += r * (c_in + 1 + 2 + G * 25)
            exp_flops += 2 * hw * r * (c_in + G * 25)
    for i, hw_side in enumerate((S // 8, S // 4, S // 2, S)):
        c_out = W if i < 3 else 1
        exp_params += r_dec * (2 * W * 25 + 1 + 2 + c_out)
        exp_flops += 2 * hw_side**2 * r_dec * (2 * W * 25 + c_out)
    assert rep["params_before"] == params0
    assert rep["params_before"] - rep["params_after"] == exp_params
    assert sum(p.numel() for p in m.parameters()) == params0 - exp_params
    assert rep["flops_fwd_before"] - rep["flops_fwd_after"] == exp_flops
    assert rep["flops_fwd_after"] == count_flops(m, S)["flops_fwd"]
    sp = measure_sparsity(m)
    assert sp["params"] == sp["effective_params"] == params0 - exp_params  # real count, no zeros


def test_structured_slices_optimizer_state_in_place_and_training_goes_on() -> None:
    m = tiny()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    _adam_steps(m, opt, None, 2)
    conv = m.decoder[1].deconv5.conv  # ConvTranspose2d: output channels on dim 1
    old_avg = opt.state[conv.weight]["exp_avg"].clone()
    old_bn_sq = opt.state[m.decoder[1].deconv1.bn.weight]["exp_avg_sq"].clone()
    old_cons = opt.state[m.decoder[1].deconv1.conv.weight]["exp_avg"].clone()
    res = sparsify_(m, SparsityConfig(kind="structured", amount=0.5), seed=0, optimizer=opt, image_size=S)
    assert res.kind == "structural" and res.masks is None
    keep = torch.tensor(res.report["kept_channels"]["decoder.1.deconv5.conv"])
    new = m.decoder[1].deconv5.conv
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in m.parameters()}
    assert len(opt.state) == len(list(m.parameters()))
    assert torch.equal(opt.state[new.weight]["exp_avg"], old_avg[:, keep])
    assert torch.equal(opt.state[m.decoder[1].deconv1.bn.weight]["exp_avg_sq"], old_bn_sq[keep])
    assert torch.equal(opt.state[m.decoder[1].deconv1.conv.weight]["exp_avg"], old_cons[keep])
    assert int(opt.state[new.weight]["step"]) == 2
    w = new.weight.detach().clone()
    _adam_steps(m, opt, None, 1)
    sched.step()
    assert not torch.equal(w, new.weight) and int(opt.state[new.weight]["step"]) == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_conform_to_state_dict_round_trip() -> None:
    m = _trained_tiny()
    structured_prune_(m, 0.75, image_size=S)
    sd = m.state_dict()
    fresh = DDNet(TINY)
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(sd, strict=True)
    conform_to_state_dict_(fresh, sd)
    fresh.load_state_dict(sd, strict=True)
    assert fresh.encoder[0].block[0].bottleneck.conv.weight.shape[0] == 2  # 8 - round(0.75 * 8)
    m.eval()
    fresh.eval()
    x = batch()[0]
    with torch.no_grad():
        assert torch.equal(m(x), fresh(x))


# ----------------------------------------------------------------------------- measurement


def test_count_flops_matches_the_paper_scale_and_leaves_the_model_alone() -> None:
    m = DDNet()  # default widths; FLOPs scale with the pixel count, so 32 px x 256 = 512 px
    f = count_flops(m, 32)
    assert f["flops_fwd"] * 256 / 1e9 == pytest.approx(38.2, rel=0.01)
    assert f["flops_fwd_bwd"] * 256 / 1e9 == pytest.approx(114.5, rel=0.01)
    t = tiny()
    t.train()
    stats = t.stem.bn.running_mean.clone()
    rng = torch.get_rng_state()
    count_flops(t, S, batch=2)
    assert t.training and torch.equal(t.stem.bn.running_mean, stats)
    assert all(p.grad is None for p in t.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_effective_flops_are_theoretical_and_scale_with_density() -> None:
    m = tiny()
    dense = effective_flops(m, S)
    assert dense["flops_fwd_theoretical_sparse"] == dense["flops_fwd"]
    topk_prune_(m, 0.5)
    eff = effective_flops(m, S)
    assert eff["flops_fwd"] == dense["flops_fwd"]  # masked: dense kernels still run
    assert eff["flops_fwd_theoretical_sparse"] == pytest.approx(0.5 * dense["flops_fwd"], rel=1e-3)
    assert eff["flops_fwd_bwd_theoretical_sparse"] == pytest.approx(0.5 * dense["flops_fwd_bwd"], rel=1e-3)


def test_sparsify_none_and_random_reports() -> None:
    m = tiny()
    none = sparsify_(m, SparsityConfig(kind="none"), seed=0, image_size=S)
    assert none.kind == "none" and none.masks is None
    assert none.report["params_after"] == none.report["params_before"] and none.report["sparsity_measured"] == 0
    rnd = sparsify_(m, SparsityConfig(kind="random", amount=0.5), seed=4, image_size=S)
    again = sparsify_(tiny(), SparsityConfig(kind="random", amount=0.5), seed=4, image_size=S)
    assert rnd.masks is not None and again.masks is not None
    assert all(torch.equal(rnd.masks.masks[k], again.masks.masks[k]) for k in rnd.masks.masks)
    rep = rnd.report
    assert rep["realisation"] == "masked" and rep["sparsity_measured"] == pytest.approx(0.5, abs=1e-3)
    assert rep["params_before"] - rep["params_after"] == measure_sparsity(m)["zeros"]
    assert rep["flops_fwd_after"] == rep["flops_fwd_before"]
    assert rep["flops_fwd_theoretical_after"] == pytest.approx(0.5 * rep["flops_fwd_before"], rel=1e-3)


def _precision_flags() -> tuple:
    """TF32 settings through the API this torch has (legacy getters raise once the new API was set)."""
    b = torch.backends
    if hasattr(b, "fp32_precision"):
        return (b.fp32_precision, b.cuda.matmul.fp32_precision, b.cudnn.fp32_precision,
                b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, torch.get_float32_matmul_precision())
    return (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, torch.get_float32_matmul_precision())


def test_pruning_never_touches_precision_flags() -> None:
    flags = _precision_flags()
    for kind, pattern in (("random", "unstructured"), ("topk", "2:4"), ("structured", "unstructured")):
        sparsify_(tiny(), SparsityConfig(kind=kind, pattern=pattern), seed=0, image_size=S)
    assert flags == _precision_flags()


# ----------------------------------------------------------------------------- schedule


def _run(switch: AutoSwitch, losses: list[float]) -> int | None:
    for loss in losses:
        if switch.update(loss):
            return switch.switch_epoch
    return None


def test_auto_switch_fires_when_changes_settle_within_one_order() -> None:
    # d_2..d_7 fall 10x per epoch (1, 0.1, ..., 1e-5), then d_t = 8e-6 (flat).
    # Windows of 3 changes: t=7 (1e-3,1e-4,1e-5) ratio 100; t=8 (1e-4,1e-5,8e-6) ratio 12.5;
    # t=9 (1e-5,8e-6,8e-6) ratio 1.25 <= 10 -> fires at the end of epoch 9.
    changes = [10.0**-k for k in range(6)] + [8e-6] * 10
    losses = [10.0]
    for d in changes:
        losses.append(losses[-1] - d)
    sw = AutoSwitch(patience=3, min_epoch=2, max_epoch=40)
    assert _run(sw, losses) == 9 and not sw.forced
    assert sw.update(123.0) and sw.switch_epoch == 9  # stays fired
    assert "one order of magnitude" in sw.rule and "3" in sw.rule


def test_auto_switch_forced_at_max_epoch_when_loss_never_settles() -> None:
    losses = [1.0 + sum(10.0 ** -(k / 2) * (k % 2 * 9 + 1) for k in range(t)) for t in range(14)]
    # changes alternate x1 and x10 on a falling trend: every 3-window spans > 10x
    d = [abs(b - a) for a, b in zip(losses, losses[1:], strict=False)]
    assert all(max(d[i : i + 3]) / min(d[i : i + 3]) > 10 for i in range(len(d) - 2))
    sw = AutoSwitch(patience=3, min_epoch=2, max_epoch=12)
    assert _run(sw, losses) == 12 and sw.forced
    nan = AutoSwitch(patience=2, max_epoch=6)
    assert _run(nan, [1.0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan]) == 6


def test_auto_switch_min_epoch_and_state_round_trip() -> None:
    sw = AutoSwitch(patience=3, min_epoch=6)
    flat = [5.0 - 0.1 * t for t in range(10)]  # constant changes: settled from epoch 4 on
    assert _run(sw, flat) == 6
    sw2 = AutoSwitch(patience=3, min_epoch=2)
    for loss in flat[:2]:
        sw2.update(loss)
    resumed = AutoSwitch(patience=3, min_epoch=2)
    resumed.load_state_dict(sw2.state_dict())
    assert _run(resumed, flat[2:]) == 4
    with pytest.raises(UserError):
        AutoSwitch(patience=0)


def test_phase_of() -> None:
    assert [phase_of(e, 3) for e in range(5)] == ["dense"] * 3 + ["sparse"] * 2
    assert phase_of(0, 0) == "sparse"
    assert phase_of(7, None) == "dense"
    with pytest.raises(ValueError):
        phase_of(-1, 2)


def test_structured_keeps_channels_last_layout() -> None:
    m = tiny().to(memory_format=torch.channels_last)
    structured_prune_(m, 0.5, image_size=S)
    for w in (m.decoder[0].deconv5.conv.weight, m.encoder[0].block[0].grow.conv.weight):
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert m(batch()[0]).shape == (2, 1, S, S)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_apply_is_capturable_in_a_cuda_graph() -> None:
    m = tiny().cuda()
    masks = topk_prune_(m, 0.5)
    assert all(v.is_cuda and v.dtype == torch.bool for v in masks.masks.values())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as torch.cuda.graph asks
        masks.apply_(m)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        masks.apply_(m)
    with torch.no_grad():
        for _, mod in prunable_layers(m):
            mod.weight.fill_(1.0)  # in place: the captured pointers stay valid
    graph.replay()
    torch.cuda.synchronize()
    for name, mod in prunable_layers(m):
        assert torch.equal(mod.weight == 0, ~masks.masks[name]), name
