"""The trainer: run folder, learning, resume, toggles, loaders, DDP, refusals, failures."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.cmd_train import PRESETS
from bench.collectors import profile_copies
from bench.store import read_json, read_jsonl
from bench.training import build_run, train
from ddnet import loss
from ddnet.config import DataConfig, ModelConfig, SparsityConfig, TrainConfig
from ddnet.errors import UserError
from ddnet.trainer import INJECT_NAN_ENV, INJECT_ONLY_ENV, TrainingFailed
from tests.test_lockstep import low_fp16_scale

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(base_width=4, growth=4, bottleneck=8)


def tiny_cfg(**changes) -> TrainConfig:
    cfg = TrainConfig(
        model=TINY,
        data=DataConfig(image_size=32, n_train=8, n_val=4),
        epochs=2, batch_size=4, lr=1e-3, device="cpu", num_workers=0,
    )
    return cfg.replace(**changes) if changes else cfg


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_run_folder_contract(tmp_path: Path) -> None:
    summary = train(tiny_cfg(), tmp_path, progress=False)
    for name in ("config.json", "env.json", "epochs.jsonl", "summary.json", "ckpt.pt", "weights.pt"):
        assert (tmp_path / name).is_file(), name
    rows = read_jsonl(tmp_path / "epochs.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("phase", "time_s", "train_loss", "val_loss", "val_ms_ssim", "val_psnr", "val_rmse_hu", "lr",
                    "images_per_s", "data_wait_s", "compute_s"):
            assert key in r, key
        assert 0 <= r["val_ms_ssim"] <= 100 and r["time_s"] > 0 and r["phase"] == "dense"
    assert rows[0]["warmup"] is True and rows[1]["warmup"] is False
    assert rows[1]["lr"] == pytest.approx(rows[0]["lr"] * 0.95)  # ExponentialLR once per epoch
    on_disk = read_json(tmp_path / "summary.json")
    assert on_disk["status"] == "ok" and on_disk == json.loads(json.dumps(summary))
    assert on_disk["params"] == sum(p.numel() for p in
                                    __import__("ddnet.model").model.DDNet(TINY).parameters())
    assert on_disk["sparsity"]["overall"] == 0.0 and on_disk["sparsity"]["kind"] == "none"
    assert on_disk["total_time_s"] >= sum(r["time_s"] for r in rows)
    assert len(on_disk["val_slices"]) == 4
    ms = [s["ms_ssim"] for s in on_disk["val_slices"]]
    assert on_disk["final_val_ms_ssim"] == pytest.approx(sum(ms) / len(ms))
    env = read_json(tmp_path / "env.json")
    assert env["device"] == "cpu" and env["torch_version"] == torch.__version__
    assert read_json(tmp_path / "config.json") == tiny_cfg().to_dict()


def test_fp32_really_turns_tf32_off(tmp_path: Path) -> None:
    train(tiny_cfg(epochs=1), tmp_path, progress=False)
    flags = read_json(tmp_path / "summary.json")["precision_flags"]
    if flags["tf32_api"] == "fp32_precision":
        assert flags["cudnn.conv.fp32_precision"] == "ieee" and flags["cuda.matmul.fp32_precision"] == "ieee"
    else:
        assert flags["cudnn.allow_tf32"] is False


def test_tiny_net_overfits(tmp_path: Path) -> None:
    cfg = tiny_cfg(epochs=25, **{"data.n_train": 4, "batch_size": 4, "lr": 3e-3})
    train(cfg, tmp_path, progress=False)
    losses = [r["train_loss"] for r in read_jsonl(tmp_path / "epochs.jsonl")]
    assert losses[-1] < losses[0] / 4, losses


def test_kill_and_resume_reproduces_the_trajectory(tmp_path: Path) -> None:
    cfg = tiny_cfg(epochs=5)
    ref = tmp_path / "ref"
    train(cfg, ref, progress=False)
    ref_losses = [r["train_loss"] for r in read_jsonl(ref / "epochs.jsonl")]

    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "train", "--config", str(cfg_file),
                             "--out", str(out), "--quiet"], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(read_jsonl(out / "epochs.jsonl")) < 2:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_json(out / "summary.json")["status"] == "running"
    assert len(read_jsonl(out / "epochs.jsonl")) < 5

    refused = cli("train", "--config", str(cfg_file), "--out", str(out), "--quiet")
    assert refused.returncode == 2 and "--resume" in refused.stderr

    done = cli("train", "--config", str(cfg_file), "--out", str(out), "--quiet", "--resume")
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(out / "epochs.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]  # none lost, none duplicated
    assert [r["train_loss"] for r in rows] == pytest.approx(ref_losses, rel=1e-5)

    again = cli("train", "--config", str(cfg_file), "--out", str(out), "--quiet", "--resume")
    assert again.returncode == 2 and "finished run" in again.stderr


COMBOS = [(p, loader, g) for p in ("fp32", "amp-bf16") for loader in ("host", "device") for g in ("off", "compile")]


@pytest.mark.parametrize(("precision", "loader", "graphs"), COMBOS)
def test_cpu_combinations_train_and_loss_falls(tmp_path: Path, precision: str, loader: str, graphs: str) -> None:
    if graphs == "compile" and not _compile_works():
        pytest.skip("torch.compile has no working C++ toolchain here")
    cfg = tiny_cfg(epochs=3, precision=precision, loader=loader, graphs=graphs, **{"data.n_train": 8})
    train(cfg, tmp_path, progress=False)
    losses = [r["train_loss"] for r in read_jsonl(tmp_path / "epochs.jsonl")]
    assert losses[-1] < losses[0], losses
    assert read_json(tmp_path / "config.json")["graphs"] == graphs


def _compile_works() -> bool:
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))
        return True
    except Exception:
        return False


def test_device_and_host_loaders_agree(tmp_path: Path) -> None:
    """On a CPU both loaders draw the same permutation: same batches, same fp32 loss trajectory."""
    runs = {}
    for loader in ("host", "device"):
        cfg = tiny_cfg(epochs=3, loader=loader, **{"data.n_train": 12})
        train(cfg, tmp_path / loader, progress=False)
        runs[loader] = [r["train_loss"] for r in read_jsonl(tmp_path / loader / "epochs.jsonl")]
    assert runs["host"] == pytest.approx(runs["device"], rel=1e-6)

    cfg = tiny_cfg(**{"data.n_train": 12})
    seen = {}
    for loader in ("host", "device"):
        run = build_run(cfg.replace(loader=loader), tmp_path / "x")
        seen[loader] = [run.loader.indices(e) for e in range(3)]
    assert seen["host"] == seen["device"]
    for order in seen["device"]:
        assert len(order) == 12 and sorted(order) == list(range(12))  # none repeated, none dropped
    assert seen["device"][0] != seen["device"][1]  # a new order each epoch


def test_doll_batches_come_from_device_tensors(tmp_path: Path) -> None:
    run = build_run(tiny_cfg(loader="device"), tmp_path)
    lq, hq = next(iter(run.loader.epoch(0)))
    assert lq.device == run.loader.lq.device and lq.shape == (4, 1, 32, 32)
    # each batch row is one staged slice, paired with its own target
    idx = run.loader.indices(0)[:4]
    torch.testing.assert_close(lq, run.loader.lq[idx])
    torch.testing.assert_close(hq, run.loader.hq[idx])


def test_ddp_two_gloo_replicas(tmp_path: Path) -> None:
    cfg = tiny_cfg(epochs=2, loader="device", nproc=2, **{"data.n_train": 8})
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    res = cli("train", "--config", str(cfg_file), "--out", str(tmp_path / "ddp"), "--quiet", timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    s = read_json(tmp_path / "ddp" / "summary.json")
    ranks = sorted(s["ddp_ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["read_files"] is True and ranks[1]["read_files"] is False  # rank 1 got data by broadcast
    a, b = set(ranks[0]["epoch0_indices"]), set(ranks[1]["epoch0_indices"])
    assert a.isdisjoint(b) and a | b == set(range(8))
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]
    assert ranks[0]["weights_abs_checksum"] == ranks[1]["weights_abs_checksum"]
    assert len(read_jsonl(tmp_path / "ddp" / "epochs.jsonl")) == 2  # only rank 0 writes

    # a refusal on rank 0 (the run is finished) ends every replica at once, with one line
    t0 = time.monotonic()
    res = cli("train", "--config", str(cfg_file), "--out", str(tmp_path / "ddp"), "--quiet", timeout=300)
    assert res.returncode == 2 and "already holds a finished run" in res.stderr, res.stderr[-2000:]
    assert res.stderr.count("error:") == 1 and "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 120


def test_compile_recompile_after_the_switch_is_warmup(tmp_path: Path) -> None:
    cfg = tiny_cfg(epochs=4, graphs="compile", sparsity=SparsityConfig(kind="structured", dense_epochs=2))
    train(cfg, tmp_path, progress=False)
    rows = read_jsonl(tmp_path / "epochs.jsonl")
    assert [r["phase"] for r in rows] == ["dense", "dense", "sparse", "sparse"]
    # epoch 1 compiles, epoch 3 recompiles for the shrunk layers: both are warm-up
    assert [r["warmup"] for r in rows] == [True, False, True, False]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks refusals on a CPU-only machine")
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--graphs", "cuda-graph"], "cuda-graph needs a CUDA device"),
        (["--precision", "amp-fp16"], "amp-fp16 needs a CUDA device"),
        (["--precision", "tf32"], "tf32"),
        (["--precision", "fp8"], "--precision 'fp8' is not one of"),
        (["--image-size", "40"], "divisible by 16"),
        (["--sparsity", "random", "--dense-epochs", "2", "--epochs", "2"], "no sparse epoch"),
        (["--data", "/no/such/folder"], "/no/such/folder"),
    ],
)
def test_refusals_are_one_line_and_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "run"
    res = cli("train", "--out", str(out), "--device", "cpu", "--epochs", "2", *args)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (out / "epochs.jsonl").exists()


def test_nan_loss_is_a_recorded_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INJECT_NAN_ENV, "2")  # a test-only fault, not part of the config or its hash
    with pytest.raises(TrainingFailed, match="nan"):
        train(tiny_cfg(epochs=3), tmp_path, progress=False)
    s = read_json(tmp_path / "summary.json")
    assert s["status"] == "failed" and "nan" in s["error"] and s["epochs_completed"] == 1
    assert len(read_jsonl(tmp_path / "epochs.jsonl")) == 1  # the finished epoch is kept


def test_cli_failed_run_exits_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(tiny_cfg(epochs=2).to_dict()))
    monkeypatch.setenv(INJECT_NAN_ENV, "1")
    monkeypatch.setenv(INJECT_ONLY_ENV, str(tmp_path / "r"))
    res = cli("train", "--config", str(cfg_file), "--out", str(tmp_path / "r"), "--quiet")
    assert res.returncode == 3 and "training failed" in res.stderr and "Traceback" not in res.stderr
    # the fault is aimed at one folder: another run in the same environment trains normally
    res = cli("train", "--config", str(cfg_file), "--out", str(tmp_path / "other"), "--quiet")
    assert res.returncode == 0, res.stderr


def test_hybrid_schedule_phases_and_masks_hold(tmp_path: Path) -> None:
    cfg = tiny_cfg(epochs=4, sparsity=SparsityConfig(kind="topk", amount=0.5, dense_epochs=2))
    summary = train(cfg, tmp_path, progress=False)
    rows = read_jsonl(tmp_path / "epochs.jsonl")
    assert [r["phase"] for r in rows] == ["dense", "dense", "sparse", "sparse"]
    assert rows[1]["sparsity"] == 0.0 and rows[2]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert rows[2]["prune_time_s"] > 0 and rows[3]["prune_time_s"] == 0
    assert summary["switch_epoch"] == 2 and summary["sparsity"]["kind"] == "masked"
    assert summary["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    # the exported weights keep every pruned zero after two sparse epochs of Adam
    weights = torch.load(tmp_path / "weights.pt", weights_only=False)["model"]
    conv = [v for k, v in weights.items() if k.endswith("conv.weight")]
    zeros = sum(int((w == 0).sum()) for w in conv)
    assert zeros / sum(w.numel() for w in conv) == pytest.approx(0.5, abs=1e-3)
    # a dense model's lr schedule continues through the switch
    assert rows[2]["lr"] == pytest.approx(rows[1]["lr"] * 0.95)


def test_dense_epochs_zero_prunes_before_training(tmp_path: Path) -> None:
    cfg = tiny_cfg(epochs=2, sparsity=SparsityConfig(kind="random", amount=0.5, dense_epochs=0))
    summary = train(cfg, tmp_path, progress=False)
    rows = read_jsonl(tmp_path / "epochs.jsonl")
    assert [r["phase"] for r in rows] == ["sparse", "sparse"] and summary["switch_epoch"] == 0
    assert rows[0]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_structured_run_shrinks_and_resumes(tmp_path: Path) -> None:
    cfg = tiny_cfg(epochs=3, sparsity=SparsityConfig(kind="structured", amount=0.5, dense_epochs=1))
    summary = train(cfg, tmp_path, progress=False)
    assert summary["sparsity"]["kind"] == "structural"
    assert summary["params"] < summary["sparsity"]["report"]["params_before"]
    assert summary["flops_fwd_per_image"] < summary["flops_fwd_per_image_before_pruning"]
    rows = read_jsonl(tmp_path / "epochs.jsonl")
    assert rows[-1]["sparsity"] > 0 and rows[0]["sparsity"] == 0


def test_auto_switch_on_a_run(tmp_path: Path) -> None:
    cfg = tiny_cfg(epochs=8, sparsity=SparsityConfig(kind="random", amount=0.5, dense_epochs="auto",
                                                      auto_patience=2))
    summary = train(cfg, tmp_path, progress=False)
    rows = read_jsonl(tmp_path / "epochs.jsonl")
    k = summary["switch_epoch"]
    assert k is not None and 1 <= k <= 7 and summary["switch_rule"]
    assert [r["phase"] for r in rows] == ["dense"] * k + ["sparse"] * (8 - k)


# ----------------------------------------------------------------- GPU only


def _gpu_cfg(**changes) -> TrainConfig:
    return tiny_cfg(device="cuda", **{"data.image_size": 64, "data.n_train": 40, **changes})


def _losses_over_steps(cfg: TrainConfig, tmp_path: Path, steps: int = 5) -> list[float]:
    run = low_fp16_scale(build_run(cfg, tmp_path))  # fp16: updates from the first steps, not the fifth
    run._build_step()
    # one batch at a time: DoLL bound to a graph gathers every batch into the same static buffers
    return [float(run.step(lq, hq)) for lq, hq in itertools.islice(run.loader.epoch(0), steps)]


@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "rel", "channels_last"), [
    # fp32: capturable Adam (tensor lr, on-device step count) rounds differently from the eager one
    ("fp32", 1e-4, False), ("fp32", 1e-4, True), ("amp-bf16", 2e-2, False), ("amp-fp16", 1e-2, False)])
def test_graphed_step_matches_eager(tmp_path: Path, precision: str, rel: float, channels_last: bool) -> None:
    eager = _losses_over_steps(_gpu_cfg(precision=precision, loader="device", channels_last=channels_last),
                               tmp_path / "e")
    graphed = _losses_over_steps(_gpu_cfg(precision=precision, loader="device", graphs="cuda-graph",
                                          channels_last=channels_last), tmp_path / "g")
    # the loss before any update and after the first one: the same arithmetic, so equal to rounding
    assert graphed[:2] == pytest.approx(eager[:2], rel=rel)
    # later steps drift apart: Adam's first updates are about lr * sign(grad), so a rounding difference
    # in a near-zero gradient (cuDNN's backward is not deterministic) flips a whole lr step. Seen on an
    # H200 (tiny net, lr 1e-3): 0.04 % at step 3, up to 2.7 % (fp32) and 6.5 % (bf16) at step 5. So only
    # the trend is compared here; tests/test_lockstep.py compares every step's update from the same state
    assert graphed[-1] < graphed[0] and eager[-1] < eager[0]


@pytest.mark.gpu
def test_device_loader_no_htod_after_staging(tmp_path: Path) -> None:
    loss._WIN_CACHE.clear()  # pass alone too: nothing warmed by an earlier test
    run = build_run(_gpu_cfg(loader="device"), tmp_path)
    run._build_step()
    n_steps = len(run.loader)
    batches = run.loader.epoch(1)

    def steps(k: int) -> None:
        for _ in range(k):
            run.step(*next(batches))

    # profile_copies runs one unprofiled warm-up step (lazy state is made there, as in an epoch's
    # first step), then reads the memcpy bytes from the trace
    copies = profile_copies(steps, n_steps=n_steps - 1, out_dir=tmp_path, device=run.device)
    lq = run.loader.lq
    batch_bytes = lq[: run.cfg.batch_size].numel() * lq.element_size()
    assert copies["copies_unsized_count"] == 0
    # no per-step copy: at most one small copy per epoch, far below one batch, whatever the steps
    assert copies["copies_HtoD_count"] <= 1, copies
    assert copies["copies_HtoD_bytes"] < batch_bytes, copies


@pytest.mark.gpu
def test_graphs_compose_with_pruning_and_fp16(tmp_path: Path) -> None:
    cfg = _gpu_cfg(epochs=3, precision="amp-fp16", graphs="cuda-graph", loader="device",
                   sparsity=SparsityConfig(kind="topk", amount=0.5, dense_epochs=1))
    summary = train(cfg, tmp_path, progress=False)
    rows = read_jsonl(tmp_path / "epochs.jsonl")
    assert rows[0]["capture_time_s"] > 0 and rows[1]["capture_time_s"] > 0  # recaptured after pruning
    assert summary["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)


def test_init_starts_from_a_checkpoint(tmp_path: Path) -> None:
    train(tiny_cfg(epochs=1), tmp_path / "a", progress=False)
    saved = torch.load(tmp_path / "a" / "weights.pt", weights_only=False)["model"]
    run = build_run(tiny_cfg(init=str(tmp_path / "a" / "weights.pt")), tmp_path / "b")
    for k, v in run.model.state_dict().items():
        torch.testing.assert_close(v, saved[k], msg=k)
    fresh = build_run(tiny_cfg(seed=1), tmp_path / "c")
    assert not torch.equal(fresh.model.stem.conv.weight, run.model.stem.conv.weight)


def test_init_with_other_widths_is_refused(tmp_path: Path) -> None:
    train(tiny_cfg(epochs=1), tmp_path / "a", progress=False)
    res = cli("train", "--out", str(tmp_path / "b"), "--device", "cpu", "--epochs", "1",
              "--init", str(tmp_path / "a" / "weights.pt"), "--image-size", "32", "--n-train", "4",
              "--batch-size", "4")
    assert res.returncode == 2 and "does not match" in res.stderr and "Traceback" not in res.stderr


def test_profiled_copy_window_is_outside_the_timed_epochs(tmp_path: Path) -> None:
    cfg = tiny_cfg(epochs=1, loader="device", profile_steps=2)
    summary = train(cfg, tmp_path, progress=False)
    copies = read_json(tmp_path / "copies.json")
    assert copies == summary["copies"] and copies["copies_device"] == "cpu" and copies["copies_steps"] == 2
    assert copies["copies_total_bytes"] > 0
    assert json.loads((tmp_path / "trace.json").read_text())  # the Chrome trace parses
    # the window must not change what training produced: exported weights equal the last checkpoint's
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"]
    weights = torch.load(tmp_path / "weights.pt", weights_only=False)["model"]
    for k in ckpt:
        torch.testing.assert_close(weights[k], ckpt[k], msg=k)
    assert len(read_jsonl(tmp_path / "epochs.jsonl")) == 1


def test_channels_last_trains_like_contiguous(tmp_path: Path) -> None:
    losses = {}
    for cl in (False, True):
        train(tiny_cfg(epochs=2, channels_last=cl), tmp_path / str(cl), progress=False)
        losses[cl] = [r["train_loss"] for r in read_jsonl(tmp_path / str(cl) / "epochs.jsonl")]
    # channels_last kernels accumulate in another order: the first epoch agrees closely, then the
    # tiny net's high learning rate lets the rounding differences grow (measured ~1 % by epoch 2)
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-3)
    assert losses[True][1] < losses[True][0] and losses[True][1] == pytest.approx(losses[False][1], rel=5e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_presets_rest_on_a_measurement_and_refuse_what_cannot_run(tmp_path: Path) -> None:
    assert PRESETS["fastest"] == {"precision": "amp-fp16"}  # see README: the fastest cell measured on an H200
    res = cli("train", "--preset", "fastest", "--out", str(tmp_path / "a"), "--device", "cpu")
    assert res.returncode == 2 and "measured on a GPU" in res.stderr and res.stderr.count("error:") == 1
    res = cli("train", "--preset", "quickest", "--out", str(tmp_path / "b"))
    assert res.returncode == 2 and "--preset 'quickest' is not one of fastest" in res.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_init_with_other_widths_names_them_not_pruning(tmp_path: Path) -> None:
    # a dense checkpoint of another bottleneck (same base width) was called "pruned structurally"
    train(tiny_cfg(epochs=1), tmp_path / "a", progress=False)
    with pytest.raises(UserError) as e:
        build_run(tiny_cfg(model=ModelConfig(base_width=4, growth=4, bottleneck=16),
                           init=str(tmp_path / "a" / "ckpt.pt")), tmp_path / "b")
    line = str(e.value)
    assert "pruned structurally" not in line
    assert ("built with --bottleneck 8 (this run: --bottleneck 16); set --bottleneck to the checkpoint's width"
            in line)


def test_checkpoint_every_is_what_the_readme_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README's run folder said `ckpt.pt` (atomic, every epoch), silent on --checkpoint-every N."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "`ckpt.pt` (atomic, every epoch; every N with `--checkpoint-every N`, and always at the end)" in readme
    monkeypatch.setenv(INJECT_NAN_ENV, "4")  # the run fails in epoch 4: its checkpoint is the last one written
    with pytest.raises(TrainingFailed):
        train(tiny_cfg(epochs=5, checkpoint_every=2), tmp_path / "a", progress=False)
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["epoch"] == 2  # not 3
    monkeypatch.delenv(INJECT_NAN_ENV)
    train(tiny_cfg(epochs=3, checkpoint_every=2), tmp_path / "b", progress=False)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["epoch"] == 3  # the end, off the stride
