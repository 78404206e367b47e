"""The optimizations of `ddnet.optim`: capture safety of the graphed step, train mode at build,
DoLL's gather into bound buffers, the compile warm-up flag, and their GPU behaviour."""

from __future__ import annotations

import contextlib
import itertools
import re
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ddnet.loss as loss_mod
import ddnet.model as model_mod
from bench.collectors import profile_copies
from bench.store import read_json, read_jsonl
from bench.training import build_run, train
from ddnet.config import ConfigError, DataConfig, ModelConfig, TrainConfig, check_runnable
from ddnet.loaders import DeviceLoader
from ddnet.loss import DDNetLoss, _product
from ddnet.model import DDNet
from ddnet.optim import GraphedStep, StepParts, build_step, graph_body, make_optimizer, setup_precision
from ddnet.sparsity import topk_prune_
from ddnet.trainer import TrainingFailed

TINY = ModelConfig(base_width=4, growth=4, bottleneck=8)
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense")
CPU = torch.device("cpu")
META = torch.device("meta")


def _cfg(**changes) -> TrainConfig:
    cfg = TrainConfig(model=TINY, data=DataConfig(image_size=64, n_train=8, n_val=4), batch_size=2,
                      lr=1e-3, device="cpu", num_workers=0)
    return cfg.replace(**changes) if changes else cfg


def _host_syncs(fn) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name in SYNC_OPS]


def _graph_parts(precision: str, masked: bool, device: torch.device = CPU, deterministic: bool = False,
                 **changes) -> tuple[StepParts, torch.Tensor, torch.Tensor]:
    """The graphed step's parts (capturable Adam) and a batch, on `device`: built on the CPU, then moved."""
    cfg = _cfg(precision=precision, graphs="cuda-graph", **changes)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = DDNet(cfg.model).set_deterministic(deterministic)
    masks = topk_prune_(model, 0.5).to(device) if masked else None
    model.to(device, memory_format=fmt)
    post = masks.bind(model) if masks is not None else (lambda: None)
    opt = make_optimizer(model, cfg, CPU)  # Adam reads its lr on the host when built (lr >= 0): moved after
    for group in opt.param_groups:
        group["lr"] = group["lr"].to(device)
    parts = StepParts(model, DDNetLoss(64), opt, setup_precision(cfg, device), device, post)
    lq, hq = (torch.rand(2, 1, 64, 64).to(device, memory_format=fmt) for _ in range(2))
    return parts, lq, hq


# ------------------------------------------------------------------- capture safety


def test_product_equals_torch_prod_in_value_and_gradient() -> None:
    base = torch.rand(5, 3, 1, dtype=torch.float64) + 0.05
    a = base.clone().requires_grad_(True)
    b = base.clone().requires_grad_(True)
    torch.prod(a, dim=0).sum().backward()
    _product(b).sum().backward()
    torch.testing.assert_close(_product(base), torch.prod(base, dim=0))
    torch.testing.assert_close(b.grad, a.grad)


def test_the_sync_detector_sees_torch_prod() -> None:
    # the check below is only worth something if it can fail: torch.prod's backward reads on the host
    x = torch.rand(4, 3, requires_grad=True)
    assert _host_syncs(lambda: torch.prod(x, dim=0).sum().backward())


@pytest.mark.parametrize(("precision", "masked"), [("fp32", False), ("amp-bf16", False), ("fp32", True)])
def test_captured_step_body_never_syncs_with_the_host(capturable_adam_on_cpu, precision: str,
                                                      masked: bool) -> None:
    parts, lq, hq = _graph_parts(precision, masked)
    parts.optimizer.zero_grad(set_to_none=True)
    graph_body(parts, lq, hq, with_tail=True)  # warm-up: lazily made state (window cache, Adam state)
    parts.optimizer.zero_grad(set_to_none=True)
    syncs = _host_syncs(lambda: graph_body(parts, lq, hq, with_tail=True))
    assert syncs == [], f"host syncs inside the captured step: {syncs}"


class _HostCrossings(TorchDispatchMode):
    """Records every op that brings a host (CPU) tensor into a step run on the meta device, which stands in for
    the GPU: a host-to-device copy (`.to(device)`, `copy_`) or a CPU operand of a device op, 0-dim ones
    included (capture would bake in the value it read). Also `torch.tensor`/`torch.as_tensor` given a device
    (a copy of host data, which the meta device makes without any op). A read on the host (`.item()`) raises
    on meta tensors by itself."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.seen: list[str] = []
        for name in ("tensor", "as_tensor"):
            monkeypatch.setattr(torch, name, self._watching(name, getattr(torch, name)))

    def _watching(self, name: str, make):
        def made(*args, **kwargs):
            if torch.device(kwargs.get("device") or "cpu").type != "cpu":
                self.seen.append(f"torch.{name}(host data, device={kwargs['device']})")
            return make(*args, **kwargs)
        return made

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        given = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        out = func(*args, **kwargs)
        made = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in given) and any(t.device.type == "meta" for t in given + made):
            self.seen.append(f"{func} <- CPU {[tuple(t.shape) for t in given if t.device.type == 'cpu']}")
        return out


@pytest.fixture()
def meta_parts(capturable_adam_on_cpu, monkeypatch: pytest.MonkeyPatch):
    """`_graph_parts` (fp32) on the meta device: `make(deterministic, masked, **changes)`.

    autocast has no meta backend, so it is off there (`graph_body` and the loss ask for it by device type)."""
    real_autocast = torch.autocast

    def autocast(device_type: str, *args, **kwargs):
        return contextlib.nullcontext() if device_type == "meta" else real_autocast(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast)

    def make(deterministic: bool, masked: bool, **changes) -> tuple[StepParts, torch.Tensor, torch.Tensor]:
        return _graph_parts("fp32", masked, META, deterministic, **changes)

    return make


@pytest.mark.parametrize(("deterministic", "masked", "changes"), [
    (False, False, {}), (True, False, {}), (False, True, {}),
    (False, True, {"channels_last": True}),  # fused Adam, the speed grid's other such part, has no meta kernel
])
def test_captured_step_body_copies_nothing_from_the_host(meta_parts, monkeypatch: pytest.MonkeyPatch,
                                                         deterministic: bool, masked: bool, changes: dict) -> None:
    # CUDA graph capture refuses a host-to-device copy: the H200 check's every --deterministic --graphs cuda-graph
    # run failed on one (a number made into a GPU tensor in the upsampling), which no CPU test could see
    parts, lq, hq = meta_parts(deterministic, masked, **changes)
    parts.optimizer.zero_grad(set_to_none=True)
    graph_body(parts, lq, hq, with_tail=True)  # the eager warm-up: the loss's window cache, Adam's state
    parts.optimizer.zero_grad(set_to_none=True)
    # as under a capture (`ddnet.model._cached_weights`): --deterministic's upsampling matrices are built in the step
    monkeypatch.setattr(model_mod, "_cached_weights", model_mod._linear_weights)
    with _HostCrossings(monkeypatch) as crossings:
        loss = graph_body(parts, lq, hq, with_tail=True)
    assert loss.device == META and parts.model.stem.conv.weight.grad.device == META  # the step ran on meta
    assert crossings.seen == []


def test_the_host_crossing_detector_sees_a_cold_window_cache(meta_parts, monkeypatch: pytest.MonkeyPatch) -> None:
    # the check above is only worth something if it can fail: the loss's first call builds its Gaussian window on
    # the host and copies it over (and its scale weights with torch.tensor), which the warm-up is there for
    parts, lq, hq = meta_parts(False, False)
    monkeypatch.setattr(loss_mod, "_WIN_CACHE", {})
    with _HostCrossings(monkeypatch) as crossings:
        graph_body(parts, lq, hq, with_tail=True)
    assert any(s.startswith("aten._to_copy") for s in crossings.seen), crossings.seen
    assert any(s.startswith("torch.tensor(host data, device=meta)") for s in crossings.seen), crossings.seen
    with _HostCrossings(monkeypatch) as crossings:
        lq.sum() + torch.ones(3).sum()  # a CPU operand of a device op, even one number
    assert len(crossings.seen) == 1 and crossings.seen[0].startswith("aten.add.Tensor"), crossings.seen


def test_captured_step_body_trains(capturable_adam_on_cpu) -> None:
    parts, lq, hq = _graph_parts("fp32", masked=True)
    losses = []
    for _ in range(6):
        parts.optimizer.zero_grad(set_to_none=True)
        losses.append(float(graph_body(parts, lq, hq, with_tail=True)))
    assert losses[-1] < losses[0]
    w = parts.model.stem.conv.weight
    assert 0.45 < float((w == 0).float().mean()) < 0.55  # the masks were re-applied every step


# ------------------------------------------------------------------- build time


@pytest.mark.parametrize("graphs", ["off", "compile"])
def test_build_step_puts_the_model_in_train_mode(graphs: str) -> None:
    cfg = _cfg(graphs=graphs)
    model = DDNet(cfg.model).eval()  # e.g. just loaded by --init
    parts = StepParts(model, DDNetLoss(64), make_optimizer(model, cfg, CPU), setup_precision(cfg, CPU), CPU,
                      lambda: None)
    _, info = build_step(cfg, parts, (torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64)))
    assert all(m.training for m in model.modules())
    assert info["warmup_next_epoch"] is (graphs == "compile")


def test_init_model_trains_in_train_mode(tmp_path: Path) -> None:
    train(_cfg(epochs=1), tmp_path / "a", progress=False)
    run = build_run(_cfg(init=str(tmp_path / "a" / "weights.pt")), tmp_path / "b")
    assert not run.model.training  # the loader hands the weights over in eval mode
    run._build_step()
    assert all(m.training for m in run.model.modules())


def test_device_loader_gathers_into_bound_buffers() -> None:
    cfg = _cfg(batch_size=4)
    lq = torch.rand(12, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    hq = torch.rand(12, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    loader = DeviceLoader(lq, hq, cfg)
    fresh = [(a.clone(), b.clone()) for a, b in loader.epoch(3)]
    buf = (torch.empty_like(lq[:4]), torch.empty_like(hq[:4]))
    ptrs = (buf[0].data_ptr(), buf[1].data_ptr())
    assert loader.bind(buf) is True
    for (a, b), (fa, fb) in zip(loader.epoch(3), fresh, strict=True):
        assert a is buf[0] and b is buf[1]  # the very buffers: no copy after the gather
        assert (a.data_ptr(), b.data_ptr()) == ptrs
        assert torch.equal(a, fa) and torch.equal(b, fb)
    loader.bind(None)
    assert next(loader.epoch(3))[0] is not buf[0]


# ----------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_cfg(**changes) -> TrainConfig:
    cfg = TrainConfig(model=TINY, data=DataConfig(image_size=64, n_train=40, n_val=4), batch_size=4,
                      epochs=2, lr=1e-3, device="cuda", num_workers=0)
    return cfg.replace(**changes)


def _gpu_run(tmp_path: Path, **changes):
    run = build_run(_gpu_cfg(**changes), tmp_path)
    run._build_step()
    return run


@pytest.mark.gpu
@needs_cuda
def test_doll_feeds_a_graph_without_a_device_copy(tmp_path: Path) -> None:
    run = _gpu_run(tmp_path, loader="device", graphs="cuda-graph")
    batches = run.loader.epoch(1)
    lq, _ = next(batches)
    assert lq is run.step.static_inputs[0]  # gathered straight into the graph's input buffer

    def steps(k: int) -> None:
        for _ in range(k):
            run.step(*next(batches))

    bound = profile_copies(steps, n_steps=4, out_dir=None, device=run.device)
    # the same graph fed the other way: a fresh gather, then a copy into the static inputs
    run.loader.bind(None)
    run.step._fill = run.step._copy_inputs
    batches = run.loader.epoch(2)
    copied = profile_copies(steps, n_steps=4, out_dir=None, device=run.device)
    batch_bytes = lq.numel() * lq.element_size()
    # every other device copy of the step (e.g. autograd's grad clones) is the same in both
    assert copied["copies_DtoD_bytes"] - bound["copies_DtoD_bytes"] >= 4 * 2 * batch_bytes, (bound, copied)
    assert bound["copies_HtoD_bytes"] < batch_bytes, bound


@pytest.mark.gpu
@needs_cuda
def test_graph_memory_peak_counts_the_activations(tmp_path: Path) -> None:
    peaks = {}
    for graphs in ("off", "cuda-graph"):
        summary = train(_gpu_cfg(loader="device", graphs=graphs, **{"model.base_width": 16, "model.growth": 16,
                                                                     "model.bottleneck": 64}),
                        tmp_path / graphs, progress=False)
        peaks[graphs] = summary["memory"]
    assert peaks["cuda-graph"]["mem_allocator_peak_allocated_source"].startswith("max(")
    # the graph holds the same activations as eager (and some warm-up extras): never far below it
    ratio = peaks["cuda-graph"]["mem_allocator_peak_allocated_gib"] / peaks["off"]["mem_allocator_peak_allocated_gib"]
    assert ratio > 0.8, peaks


@pytest.mark.gpu
@needs_cuda
def test_recapture_frees_the_old_graph_pool(tmp_path: Path) -> None:
    run = _gpu_run(tmp_path, loader="device", graphs="cuda-graph",
                   **{"model.base_width": 16, "model.growth": 16, "model.bottleneck": 64})
    torch.cuda.synchronize()
    first = torch.cuda.memory_reserved()
    for _ in range(3):
        run._build_step()
    torch.cuda.synchronize()
    # without release() every capture would keep its pool: reserved would grow by one pool each time
    assert torch.cuda.memory_reserved() <= first * 1.25 + 64 * 2**20


@pytest.mark.gpu
@needs_cuda
def test_init_then_graph_captures_batchnorm_in_train_mode(tmp_path: Path) -> None:
    train(_gpu_cfg(epochs=1), tmp_path / "a", progress=False)
    run = _gpu_run(tmp_path / "b", loader="device", graphs="cuda-graph", init=str(tmp_path / "a" / "weights.pt"))
    bn = run.model.stem.bn
    before = bn.running_mean.clone()
    run.step(*next(run.loader.epoch(1)))
    torch.cuda.synchronize()
    assert not torch.equal(bn.running_mean, before)  # train-mode BN updates its running statistics


@pytest.mark.gpu
@needs_cuda
def test_graph_captures_beside_host_loader_workers(tmp_path: Path) -> None:
    # pinned-memory thread and workers alive during capture: thread-local capture mode keeps them out
    summary = train(_gpu_cfg(loader="host", graphs="cuda-graph", num_workers=2), tmp_path, progress=False)
    assert summary["status"] == "ok" and summary["epochs_completed"] == 2


@pytest.mark.gpu
@needs_cuda
def test_every_fast_path_part_composes_with_a_captured_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the speed grid's all-cuda-graph cell, never run on a GPU before this test: channels_last, cuDNN autotuning,
    # fused capturable Adam with a device lr, bf16 and DoLL, captured as one graph; eager with the same parts beside
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # put back afterwards
    fast = {"precision": "amp-bf16", "loader": "device", "channels_last": True, "cudnn_benchmark": True,
            "optimizer_impl": "fused"}
    losses, runs = {}, {}
    for graphs in ("off", "cuda-graph"):
        runs[graphs] = run = _gpu_run(tmp_path / graphs, graphs=graphs, **fast)
        losses[graphs] = [float(run.step(lq, hq)) for lq, hq in itertools.islice(run.loader.epoch(0), 4)]
    graphed = runs["cuda-graph"]
    assert isinstance(graphed.step, GraphedStep)
    assert graphed.optimizer.defaults["fused"] and graphed.optimizer.defaults["capturable"]
    assert graphed.model.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert graphed.step.static_inputs[0].is_contiguous(memory_format=torch.channels_last)
    # before any update: the same bf16 arithmetic, up to the kernels autotuning picked (test_trainer's bf16 bound)
    assert losses["cuda-graph"][0] == pytest.approx(losses["off"][0], rel=2e-2)
    assert losses["cuda-graph"][-1] < losses["cuda-graph"][0]
    summary = train(_gpu_cfg(graphs="cuda-graph", **fast), tmp_path / "train", progress=False)  # validation too
    assert summary["status"] == "ok" and summary["epochs_completed"] == 2


@pytest.mark.gpu
@needs_cuda
# Inductor compiles DDNet's forward and backward from a cold cache in the capture's warm-up: the H200's compile
# cell spent 81 s in its first epoch, too close to .ci/gpu-check's per-test --timeout 120
@pytest.mark.timeout(300)
def test_the_compiled_model_inside_a_captured_step_trains_like_eager(tmp_path: Path) -> None:
    # --graphs compile-cuda-graph (the speed grid's all-compile-cuda-graph cell): compiled in the capture's
    # warm-up, then replayed as one graph
    losses, runs = {}, {}
    for graphs in ("off", "compile-cuda-graph"):
        runs[graphs] = run = _gpu_run(tmp_path / graphs, loader="device", graphs=graphs)
        losses[graphs] = [float(run.step(lq, hq)) for lq, hq in itertools.islice(run.loader.epoch(0), 4)]
    assert isinstance(runs["compile-cuda-graph"].step, GraphedStep)
    assert runs["compile-cuda-graph"].step.capture_time_s > 0
    # before any update: the same arithmetic but for Inductor's fused kernels' rounding. After the first,
    # Adam's update (about lr * sign(grad)) turns that rounding into whole steps for weights whose gradient is
    # near 0: the H200 saw 0.13 % at the second loss in one call (0.904225 vs 0.903059) and under 0.1 % in another
    assert losses["compile-cuda-graph"][0] == pytest.approx(losses["off"][0], rel=1e-3)
    assert losses["compile-cuda-graph"][1] == pytest.approx(losses["off"][1], rel=1e-2)
    assert losses["compile-cuda-graph"][-1] < losses["compile-cuda-graph"][0]


# ------------------------------------------------------------------- fast-path toggles (CPU semantics)


def _trajectory(cfg: TrainConfig, tmp_path: Path, steps: int = 4) -> list[float]:
    run = build_run(cfg, tmp_path)
    run._build_step()
    return [float(run.step(lq, hq)) for lq, hq in itertools.islice(run.loader.epoch(0), steps)]


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_foreach_and_fused_adam_follow_the_default_trajectory(tmp_path: Path, impl: str) -> None:
    base = _cfg(**{"data.n_train": 8})
    default = _trajectory(base, tmp_path / "d")
    other = _trajectory(base.replace(optimizer_impl=impl), tmp_path / impl)
    # the same update to rounding; Adam's first steps (about lr * sign(grad)) let rounding grow a little
    assert other[:3] == pytest.approx(default[:3], rel=1e-5)
    assert other == pytest.approx(default, rel=1e-3)
    assert other[-1] < other[0]


@pytest.mark.parametrize("loader", ["host", "device"])
def test_channels_last_follows_the_contiguous_trajectory(tmp_path: Path, loader: str) -> None:
    base = _cfg(**{"data.n_train": 8}, loader=loader)
    contiguous = _trajectory(base, tmp_path / "c")
    run = build_run(base.replace(channels_last=True), tmp_path / "cl")
    lq, _ = next(iter(run.loader.epoch(0)))
    assert lq.is_contiguous(memory_format=torch.channels_last)  # the batches really are channels_last
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in run.model.parameters())
    last = _trajectory(base.replace(channels_last=True), tmp_path / "cl2")
    # the same arithmetic in another memory order (other conv kernels, other summation order): equal to
    # rounding before the first update and after it; later, Adam's near-sign first steps amplify rounding
    # in tiny gradients, as for fused Adam above, so only the trend is compared there
    assert last[:2] == pytest.approx(contiguous[:2], rel=1e-3)
    assert last[-1] < last[0] and contiguous[-1] < contiguous[0]
    # the first gradients as whole tensors: in float64 the two memory orders agree to 1e-13 (measured),
    # so any difference is fp32 rounding (amplified here by BatchNorm over a batch of 2: about 0.3 %)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-2)):
        grads = []
        for channels_last in (False, True):
            r = build_run(base.replace(channels_last=channels_last), tmp_path / f"g{channels_last}{dtype}")
            a, b = next(iter(r.loader.epoch(0)))
            model = r.model.to(dtype)
            ((model(a.to(dtype)) - b.to(dtype)) ** 2).mean().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert (grads[1] - grads[0]).norm() <= tol * grads[0].norm(), dtype


def test_compiled_whole_step_follows_the_eager_trajectory(tmp_path: Path) -> None:
    base = _cfg(**{"data.n_train": 8, "data.image_size": 32})
    eager = _trajectory(base, tmp_path / "e", steps=3)
    compiled = _trajectory(base.replace(graphs="compile", compile_scope="step"), tmp_path / "c", steps=3)
    # the first loss (before any update) agrees to rounding; inductor reorders the backward's sums (measured:
    # gradients within 0.4 % per tensor, 9 of 22,223 near-zero ones flip sign), and Adam's first updates,
    # about lr * sign(grad), turn those flips into a few % of loss after one step (measured 3 %)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    assert compiled == pytest.approx(eager, rel=0.15)
    assert compiled[-1] < compiled[0]


def test_cudnn_benchmark_is_set_and_recorded(tmp_path: Path) -> None:
    run = build_run(_cfg(cudnn_benchmark=True), tmp_path)
    assert torch.backends.cudnn.benchmark is True and run.precision.flags["cudnn_benchmark"] is True
    run = build_run(_cfg(), tmp_path / "off")  # the baseline switches it off again
    assert torch.backends.cudnn.benchmark is False and run.precision.flags["cudnn_benchmark"] is False


def test_validation_batch_size_does_not_change_the_numbers(tmp_path: Path) -> None:
    a = train(_cfg(epochs=1, **{"data.n_train": 8}), tmp_path / "a", progress=False)
    b = train(_cfg(epochs=1, val_batch_size=4, **{"data.n_train": 8}), tmp_path / "b", progress=False)
    for key in ("final_val_ms_ssim", "final_val_psnr", "final_val_rmse_hu", "input_ms_ssim"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key


@pytest.mark.parametrize(("changes", "needle"), [
    ({"compile_mode": "max-autotune"}, "--compile-mode max-autotune applies to torch.compile"),
    ({"compile_scope": "step"}, "--compile-scope step compiles the whole step"),
    ({"graphs": "compile-cuda-graph", "compile_mode": "reduce-overhead"}, "cannot sit inside our captured step"),
    ({"optimizer_impl": "apex"}, "--optimizer-impl 'apex' is not one of default, foreach, fused"),
])
def test_fast_path_combinations_that_cannot_work_are_refused(changes: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        _cfg(**changes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_compile_inside_a_cuda_graph_needs_cuda() -> None:
    with pytest.raises(ConfigError, match="--graphs compile-cuda-graph needs a CUDA device"):
        check_runnable(_cfg(graphs="compile-cuda-graph"))


# ----------------------------------------------------------------- the compiled step's first-call check


def _compile_as(wrong: bool):
    """A stand-in for torch.compile: the model itself (a compiler that is right), or its output x1.5."""
    def fake(model, mode=None):
        return (lambda x: model(x) * 1.5) if wrong else model
    return fake


def test_a_compiler_that_gets_the_model_wrong_stops_the_run_at_its_first_step(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", _compile_as(wrong=True))
    cfg = _cfg(**{"data.n_train": 8, "data.image_size": 32}).replace(graphs="compile", epochs=2)
    with pytest.raises(TrainingFailed, match=r"^CompileMismatch: torch.compile's first step computed loss "):
        train(cfg, tmp_path, progress=False)
    summary = read_json(tmp_path / "summary.json")
    assert summary["status"] == "failed" and read_jsonl(tmp_path / "epochs.jsonl") == []
    got, eager = map(float, re.search(r"computed loss (\S+) where eager PyTorch computes (\S+) ",
                                      summary["error"]).groups())
    assert got != pytest.approx(eager, rel=1e-2) and "allowed 1%" in summary["error"]


def test_the_first_call_check_changes_no_number(tmp_path, monkeypatch):
    # a compiler that is right: the checked run must train exactly as the eager one (the check's own forward
    # moves BatchNorm's running statistics, which it puts back)
    cfg = _cfg(**{"data.n_train": 8, "data.image_size": 32}).replace(epochs=2)
    train(cfg, tmp_path / "eager", progress=False)
    monkeypatch.setattr(torch, "compile", _compile_as(wrong=False))
    train(cfg.replace(graphs="compile"), tmp_path / "checked", progress=False)
    fields = ("train_loss", "val_loss", "val_ms_ssim")
    rows = [[{k: r[k] for k in fields} for r in read_jsonl(tmp_path / d / "epochs.jsonl")] for d in ("eager", "checked")]
    assert rows[0] == rows[1]
    weights = [torch.load(tmp_path / d / "weights.pt", weights_only=False)["model"] for d in ("eager", "checked")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # running statistics included
