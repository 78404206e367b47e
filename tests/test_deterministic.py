"""`--deterministic`: the matmul upsampling equals interpolate's, the step uses no op that raises (or
races) on CUDA in deterministic mode, the flags are set, recorded and undone; on a GPU, runs repeat."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import ddnet.model as model_mod
from bench.store import read_json, read_jsonl
from bench.training import build_run, train
from ddnet.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from ddnet.model import DDNet, bilinear_matmul
from ddnet.optim import CUBLAS_DETERMINISTIC, set_deterministic
from ddnet.trainer import INJECT_NAN_ENV, TrainingFailed
from tests.test_training import run_cli

# ops of DDNet's kind that torch.use_deterministic_algorithms documents as raising on CUDA (no deterministic
# kernel): interpolate's backward, adaptive pooling's, padding's, and the reductions that race
CUDA_NONDETERMINISTIC = {
    "aten::upsample_bilinear2d_backward", "aten::upsample_linear1d_backward", "aten::upsample_bicubic2d_backward",
    "aten::upsample_trilinear3d_backward", "aten::_adaptive_avg_pool2d_backward",
    "aten::adaptive_max_pool2d_backward", "aten::avg_pool3d_backward", "aten::reflection_pad2d_backward",
    "aten::replication_pad2d_backward", "aten::grid_sampler_2d_backward", "aten::histc", "aten::bincount",
    "aten::cumsum", "aten::median", "aten::put_", "aten::max_unpool2d", "aten::nll_loss2d_forward",
}


def _cfg(**changes) -> TrainConfig:
    cfg = TrainConfig(model=ModelConfig(base_width=4, growth=4, bottleneck=8),
                      data=DataConfig(image_size=64, n_train=8, n_val=4), epochs=2, batch_size=2, lr=1e-3,
                      device="cpu", num_workers=0)
    return cfg.replace(**changes) if changes else cfg


@pytest.fixture(autouse=True)
def _defaults_after() -> Iterator[None]:
    """Leave the process as torch starts it (the flags are process-wide)."""
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    set_deterministic(False)
    if env is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@pytest.mark.parametrize(("src", "dst"), [((4, 4), (8, 8)), ((32, 32), (64, 64)), ((5, 7), (10, 14)),
                                          ((3, 3), (7, 5)), ((1, 4), (2, 8))])
def test_matmul_upsampling_equals_interpolate_in_value_and_gradient(src, dst) -> None:
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        x = torch.randn(2, 3, *src, dtype=dtype, requires_grad=True)
        ours = bilinear_matmul(x, dst)
        ref = F.interpolate(x, size=dst, mode="bilinear", align_corners=True)
        torch.testing.assert_close(ours, ref, rtol=0, atol=tol)
        g = torch.randn_like(ref)
        (g_ours,), (g_ref,) = torch.autograd.grad(ours, x, g), torch.autograd.grad(ref, x, g)
        torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=10 * tol)


def test_the_upsampling_matrices_are_built_once_per_shape_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[tuple[int, int, torch.dtype]] = []
    real = model_mod._linear_weights

    def counting(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
        built.append((n_in, n_out, like.dtype))
        return real(n_in, n_out, like)

    monkeypatch.setattr(model_mod, "_linear_weights", counting)
    monkeypatch.setattr(model_mod, "_WEIGHTS", {})
    x = torch.randn(2, 3, 5, 7)
    first = bilinear_matmul(x, (10, 14))
    assert sorted(built) == [(5, 10, torch.float32), (7, 14, torch.float32)]
    again = bilinear_matmul(torch.randn(1, 2, 5, 7), (10, 14))  # another batch, same sizes: nothing rebuilt
    assert len(built) == 2 and again.shape == (1, 2, 10, 14)
    torch.testing.assert_close(bilinear_matmul(x, (10, 14)), first, rtol=0, atol=0)
    bilinear_matmul(x.double(), (10, 14))  # another dtype: its own matrices
    assert len(built) == 4
    kept = model_mod._WEIGHTS[(5, 10, torch.device("cpu"), torch.float32)]
    bilinear_matmul(torch.randn(1, 1, 3, 3), (6, 6))  # a new size adds its own, the others stay where they are
    assert len(built) == 5 and model_mod._WEIGHTS[(5, 10, torch.device("cpu"), torch.float32)] is kept


def test_the_upsampling_matrices_copy_no_number_to_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # a CUDA graph capture refuses a host-to-device copy, and torch.tensor(number, device=cuda) is one: the H200
    # check's every --deterministic --graphs cuda-graph run failed on it. Here torch.tensor refuses any device
    # but the CPU's as the capture does, and the matrices are built on the meta device
    real = torch.tensor

    def host_only(*args, **kwargs):
        if torch.device(kwargs.get("device") or "cpu").type != "cpu":
            raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", host_only)
    for dtype in (torch.float16, torch.float32, torch.float64):
        w = model_mod._linear_weights(5, 10, torch.empty(1, device="meta", dtype=dtype))
        assert (w.device.type, w.dtype, w.shape) == ("meta", dtype, (10, 5))
    cpu = model_mod._linear_weights(5, 10, torch.empty(1))  # the values: two nonzeros a row, rows summing to 1
    assert ((cpu != 0).sum(1) <= 2).all() and torch.equal(cpu.sum(1), torch.ones(10))


def test_the_deterministic_model_computes_what_the_paper_model_does() -> None:
    torch.manual_seed(0)
    model = DDNet(ModelConfig(base_width=4, growth=4, bottleneck=8)).double()
    x = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    ref = model(x)
    assert model.set_deterministic(True) is model
    assert all(stage.deterministic for stage in model.decoder)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-12)


def _step_ops(cfg: TrainConfig, tmp_path: Path) -> set[str]:
    run = build_run(cfg, tmp_path)
    run._build_step()
    batches = itertools.islice(run.loader.epoch(0), 2)
    run.step(*next(batches))  # lazily made state (Adam's, the loss window) outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run.step(*next(batches))
    return {e.name for e in prof.events()}


def test_the_deterministic_step_uses_no_op_that_cuda_cannot_run_deterministically(tmp_path: Path) -> None:
    default = _step_ops(_cfg(), tmp_path / "d") & CUDA_NONDETERMINISTIC
    assert default == {"aten::upsample_bilinear2d_backward"}  # the check sees the one DDNet has
    for precision in ("fp32", "amp-bf16"):
        ops = _step_ops(_cfg(deterministic=True, precision=precision), tmp_path / precision)
        assert "aten::mm" in ops or "aten::bmm" in ops  # the upsampling's matrix products ran
        assert not ops & CUDA_NONDETERMINISTIC, precision


def test_the_flags_are_set_recorded_and_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    run = build_run(_cfg(deterministic=True), tmp_path / "on")
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC
    assert run.precision.flags["deterministic"] is True
    assert run.precision.flags["cublas_workspace_config"] == CUBLAS_DETERMINISTIC
    assert all(stage.deterministic for stage in run.model.decoder)
    run = build_run(_cfg(), tmp_path / "off")  # the next run in this process gets torch's defaults back
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert run.precision.flags["deterministic"] is False
    assert not any(stage.deterministic for stage in run.model.decoder)


def test_a_users_cublas_setting_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other setting CUDA documents
    run = build_run(_cfg(deterministic=True), tmp_path)
    assert run.precision.flags["cublas_workspace_config"] == ":16:8"


def test_the_deterministic_step_follows_the_default_trajectory(tmp_path: Path) -> None:
    def losses(cfg: TrainConfig, folder: Path) -> list[float]:
        run = build_run(cfg, folder)
        run._build_step()
        return [float(run.step(lq, hq)) for lq, hq in itertools.islice(run.loader.epoch(0), 4)]

    default = losses(_cfg(), tmp_path / "d")
    det = losses(_cfg(deterministic=True), tmp_path / "det")
    # the upsampling rounds differently (about 1e-7): the first loss agrees to rounding; Adam's first updates
    # (about lr * sign(grad)) let rounding grow a little, as with fused Adam (tests/test_optim.py)
    assert det[0] == pytest.approx(default[0], rel=1e-6)
    assert det == pytest.approx(default, rel=1e-3)
    assert det[-1] < det[0]


def test_bench_train_deterministic_records_its_flags(tmp_path: Path, capsys) -> None:
    code, err = run_cli(["train", "--out", str(tmp_path / "det"), "--deterministic", "--device", "cpu",
                         "--epochs", "2", "--batch-size", "2", "--image-size", "32", "--n-train", "8", "--n-val", "4",
                         "--base-width", "4", "--growth", "4", "--bottleneck", "8", "--num-workers", "0"], capsys)
    assert code == 0, err
    assert read_json(tmp_path / "det" / "config.json")["deterministic"] is True
    env = read_json(tmp_path / "det" / "env.json")
    assert env["flag_deterministic_algorithms"] is True and env["flag_cudnn_deterministic"] is True
    rows = read_jsonl(tmp_path / "det" / "epochs.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_autotuning_is_refused_with_deterministic() -> None:
    with pytest.raises(ConfigError, match="--cudnn-benchmark picks cuDNN's algorithms by timing"):
        _cfg(deterministic=True, cudnn_benchmark=True)


# ------------------------------------------------------------------------------------------ GPU


def _gpu_cfg(**changes) -> TrainConfig:
    return _cfg(device="cuda", deterministic=True, epochs=3, **{"data.n_train": 16, **changes})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "weights.pt", weights_only=False, map_location="cpu")["model"]


@pytest.mark.gpu
@pytest.mark.parametrize("changes", [{}, {"graphs": "cuda-graph", "precision": "amp-fp16", "loader": "device"},
                                     {"precision": "amp-bf16", "channels_last": True}])
def test_deterministic_gpu_runs_repeat_bit_for_bit(tmp_path: Path, changes: dict) -> None:
    for name in ("a", "b"):
        train(_gpu_cfg(**changes), tmp_path / name, progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    losses = [[r["train_loss"] for r in read_jsonl(tmp_path / n / "epochs.jsonl")] for n in ("a", "b")]
    assert losses[0] == losses[1]


@pytest.mark.gpu
def test_a_deterministic_gpu_run_resumes_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train(_gpu_cfg(), tmp_path / "whole", progress=False)
    monkeypatch.setenv(INJECT_NAN_ENV, "2")  # fails after epoch 2; the checkpoint of epoch 1 stays
    with pytest.raises(TrainingFailed):
        train(_gpu_cfg(), tmp_path / "r", progress=False)
    monkeypatch.delenv(INJECT_NAN_ENV)
    train(_gpu_cfg(), tmp_path / "r", resume=True, progress=False)
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "r")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
