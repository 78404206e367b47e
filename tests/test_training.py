"""The harness side of a run (bench/training.py): who owns a run folder, what it refuses, and faults."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench.status as status
import bench.training as training
import ddnet.checkpoint as checkpoint
import ddnet.trainer as trainer
from bench.cli import main
from bench.store import ALIVE_EVERY_S, ALIVE_NAME, alive_mark, read_json, read_jsonl
from bench.training import train
from ddnet.config import DataConfig, ModelConfig, TrainConfig
from ddnet.trainer import TrainingFailed

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--image-size", "32", "--n-train", "8", "--n-val", "4", "--batch-size", "4", "--base-width", "4",
             "--growth", "4", "--bottleneck", "8", "--lr", "1e-3", "--device", "cpu", "--num-workers", "0", "--quiet"]


def tiny_cfg(**changes) -> TrainConfig:
    cfg = TrainConfig(model=ModelConfig(base_width=4, growth=4, bottleneck=8),
                      data=DataConfig(image_size=32, n_train=8, n_val=4), epochs=2, batch_size=4, lr=1e-3,
                      device="cpu", num_workers=0)
    return cfg.replace(**changes) if changes else cfg


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_two_trainings_into_one_folder_the_second_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "bench.cli", "train", "--out", str(out), "--epochs", "6", *TINY_ARGS]
    first = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    second = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    _, first_err = first.communicate(timeout=600)
    # either may take the folder first (on a loaded machine the first can still be importing torch): one trains,
    # the other is refused
    (won, won_err), (lost, lost_err) = sorted([(first.returncode, first_err), (second.returncode, second.stderr)])
    assert won == 0, won_err
    assert lost == 2, lost_err
    assert "another `bench train` is writing" in lost_err or "already holds a finished run" in lost_err
    rows = read_jsonl(out / "epochs.jsonl")
    assert [r["epoch"] for r in rows] == list(range(1, 7))  # exactly one run's rows
    assert read_json(out / "summary.json")["status"] == "ok"
    assert not list(out.glob(".*.tmp"))  # no temporary file left behind


def test_a_folder_that_is_not_a_run_is_refused_and_left_untouched(tmp_path: Path, capsys) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "notes.txt").write_text("my notes")
    before = digest(out)
    code, err = run_cli(["train", "--out", str(out), "--epochs", "1", *TINY_ARGS], capsys)
    assert code == 2 and "holds a run of a different configuration" in one_error_line(err)
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("1,2,3")
    code, err = run_cli(["train", "--out", str(other), "--epochs", "1", *TINY_ARGS], capsys)
    assert code == 2 and "not a bench run (data.csv)" in one_error_line(err)
    assert digest(out) == before and digest(other) == {"data.csv": hashlib.sha256(b"1,2,3").hexdigest()}


def test_an_empty_out_and_a_file_are_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["train", "--out", "", "--epochs", "1", *TINY_ARGS], capsys)
    assert code == 2 and "--out is empty" in one_error_line(err)
    (tmp_path / "f").write_text("x")
    code, err = run_cli(["train", "--out", str(tmp_path / "f"), "--epochs", "1", *TINY_ARGS], capsys)
    assert code == 2 and "is a file" in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_a_failed_run_is_not_silently_reused(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "r"
    monkeypatch.setenv("DDNET_BENCH_INJECT_NAN_EPOCH", "2")
    code, err = run_cli(["train", "--out", str(out), "--epochs", "3", *TINY_ARGS], capsys)
    assert code == 3
    monkeypatch.delenv("DDNET_BENCH_INJECT_NAN_EPOCH")
    failed = digest(out)
    code, err = run_cli(["train", "--out", str(out), "--epochs", "3", *TINY_ARGS], capsys)
    line = one_error_line(err)
    assert code == 2 and "holds a failed run" in line and "--resume" in line
    assert digest(out) == failed  # the failure record is still there
    code, err = run_cli(["train", "--out", str(out), "--epochs", "3", "--resume", *TINY_ARGS], capsys)
    assert code == 0, err
    assert [r["epoch"] for r in read_jsonl(out / "epochs.jsonl")] == [1, 2, 3]


def test_a_bad_data_folder_leaves_no_folder_behind(tmp_path: Path, capsys) -> None:
    out = tmp_path / "new"
    code, err = run_cli(["train", "--out", str(out), "--data", str(tmp_path / "missing"), "--epochs", "1",
                         *TINY_ARGS], capsys)
    assert code == 2 and str(tmp_path / "missing") in one_error_line(err)
    assert not out.exists()


def test_a_corrupt_checkpoint_names_the_file_and_the_fix(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    train(tiny_cfg(epochs=3, checkpoint_every=1), out, progress=False)
    summary = read_json(out / "summary.json")
    (out / "summary.json").write_text(json.dumps({**summary, "status": "running"}))  # as if killed
    (out / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    code, err = run_cli(["train", "--out", str(out), "--epochs", "3", "--resume", *TINY_ARGS], capsys)
    line = one_error_line(err)
    assert code == 2 and str(out / "ckpt.pt") in line and "delete it to restart" in line


def test_resumed_after_its_last_epoch_the_summary_is_complete(tmp_path: Path) -> None:
    out = tmp_path / "r"
    whole = train(tiny_cfg(epochs=2), out, progress=False)
    # killed after the last epoch row and checkpoint, before the summary: resume writes it
    (out / "summary.json").write_text(json.dumps({"status": "running", "error": None}))
    (out / "weights.pt").unlink()
    resumed = train(tiny_cfg(epochs=2), out, resume=True, progress=False)
    assert resumed["status"] == "ok" and resumed["epochs_completed"] == 2
    assert resumed["val_slices"] == whole["val_slices"] and len(resumed["val_slices"]) == 4
    for key in ("final_val_ms_ssim", "input_ms_ssim", "final_val_ms_ssim_paper_code"):
        assert resumed[key] == whole[key], key
    assert (out / "weights.pt").is_file()


class _FillsUp:
    """A file opened for writing on a disk that fills up: it takes half of the first write, then fails."""

    def __init__(self, path, mode):
        self.f = open(path, mode)  # noqa: SIM115 - closed in __exit__

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(bytes(data)[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("where", ["epoch row", "checkpoint"])
def test_a_full_disk_mid_run_leaves_it_resumable_with_no_temp_file(tmp_path: Path, monkeypatch, where: str) -> None:
    if where == "epoch row":
        real = training.append_jsonl

        def full_at_epoch_2(path, row):
            if row["epoch"] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            real(path, row)

        monkeypatch.setattr(training, "append_jsonl", full_at_epoch_2)
    else:  # the epoch-2 checkpoint is half written when the disk fills
        saves = []

        def fills_at_the_second(path, mode="r", *args, **kwargs):
            saves.append(path)
            return _FillsUp(path, mode) if len(saves) == 2 else open(path, mode, *args, **kwargs)

        monkeypatch.setattr(checkpoint, "open", fills_at_the_second, raising=False)
    out = tmp_path / "r"
    with pytest.raises(OSError) as err:
        train(tiny_cfg(epochs=3), out, progress=False)
    assert err.value.errno == errno.ENOSPC  # as itself: not a TrainingFailed, and never torch's "unexpected pos"
    # not recorded as failed (a rerun with --resume continues; `bench run` needs no --retry-failed)
    s = read_json(out / "summary.json")
    assert (s["status"], s["error"], s["writer"]["pid"]) == ("running", None, os.getpid())
    assert torch.load(out / "ckpt.pt", weights_only=False)["epoch"] == 1 == s["checkpoint_epoch"]  # for status
    assert len(read_jsonl(out / "epochs.jsonl")) == (2 if where == "checkpoint" else 1)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # the half-written checkpoint is gone
    monkeypatch.undo()  # space freed
    resumed = train(tiny_cfg(epochs=3), out, resume=True, progress=False)
    assert resumed["status"] == "ok" and [r["epoch"] for r in read_jsonl(out / "epochs.jsonl")] == [1, 2, 3]
    train(tiny_cfg(epochs=3), tmp_path / "whole", progress=False)
    ours, whole = (torch.load(d / "weights.pt", weights_only=False)["model"] for d in (out, tmp_path / "whole"))
    assert all(torch.equal(ours[k], whole[k]) for k in whole)  # the resume lost nothing


def test_the_running_summary_names_the_epoch_a_resume_restarts_from(tmp_path: Path, monkeypatch) -> None:
    """With --checkpoint-every 2 a run stopped in epoch 4 has 3 rows and a checkpoint of epoch 2; its summary
    says so (`bench status` reads it), also after a resume that stops again before its next checkpoint."""
    real, calls = trainer.validate, []

    def stopped_in_epoch_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "validate", stopped_in_epoch_4)
    out, cfg = tmp_path / "r", tiny_cfg(epochs=5, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=False)
    assert [r["epoch"] for r in read_jsonl(out / "epochs.jsonl")] == [1, 2, 3]
    assert read_json(out / "summary.json")["checkpoint_epoch"] == 2
    # what `bench status` says of this run once its process has ended (here the writer is pytest, still alive)
    monkeypatch.setattr(status, "writer_alive", lambda writer: False)
    [row] = status.cell_status_rows(out)
    assert row["status"] == "stopped"
    assert row["detail"].startswith("3/5 epochs done (2 of them in its checkpoint: the resume retrains from epoch 3)")
    calls[:] = [1, 1]  # the resume validates epochs 3 and 4: stopped in epoch 4 again, by the restored checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, resume=True, progress=False)
    assert [r["epoch"] for r in read_jsonl(out / "epochs.jsonl")] == [1, 2, 3]
    assert read_json(out / "summary.json")["checkpoint_epoch"] == 2


def test_disk_full_at_the_start_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(training, "write_json", full)
    code, err = run_cli(["train", "--out", str(tmp_path / "r"), "--epochs", "1", *TINY_ARGS], capsys)
    line = one_error_line(err)
    assert code == 4 and "No space left on device" in line and "--resume" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a visible GPU")
def test_a_cell_planned_on_a_gpu_never_falls_back_to_the_cpu(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("DDNET_BENCH_PLANNED_DEVICE", "cuda")  # bench run saw a GPU when the grid started
    args = ["train", "--out", str(tmp_path / "r"), "--epochs", "1", *TINY_ARGS]
    auto = [a if a != "cpu" else "auto" for a in args]  # --device auto: would resolve to this CPU
    code, err = run_cli(auto, capsys)
    assert code == 5 and "planned on a CUDA device but none is visible now" in one_error_line(err)
    assert not (tmp_path / "r").exists()
    code, err = run_cli(args, capsys)  # a cell that asked for the CPU runs on it
    assert code == 0 and read_json(tmp_path / "r" / "summary.json")["status"] == "ok"


def test_a_nan_validation_metric_is_a_failure_never_ok(tmp_path: Path, monkeypatch) -> None:
    real = trainer.validate

    def nan_metric(*args, **kwargs):
        out = real(*args, **kwargs)
        out["val_ms_ssim"] = float("nan")
        return out

    monkeypatch.setattr(trainer, "validate", nan_metric)
    with pytest.raises(TrainingFailed, match="val_ms_ssim"):
        train(tiny_cfg(epochs=1), tmp_path / "r", progress=False)
    assert read_json(tmp_path / "r" / "summary.json")["status"] == "failed"


def test_instruments_are_the_harness_collectors(tmp_path: Path) -> None:
    tools = training.standard_instruments(tmp_path)(torch.device("cpu"), tiny_cfg(warmup_epochs=2), True)
    assert type(tools.timer).__name__ == "TimeCollector" and tools.timer.warmup_epochs == 2
    assert type(tools.memory).__name__ == "MemoryCollector"


def test_runs_share_generated_data_and_record_its_load_time(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DDNET_BENCH_CACHE", str(tmp_path / "cache"))
    first = train(tiny_cfg(epochs=1), tmp_path / "a", progress=False)
    second = train(tiny_cfg(epochs=1, lr=2e-3), tmp_path / "b", progress=False)  # another cell, the same data
    assert first["data_cache"] == "miss" and second["data_cache"] == "hit"
    assert first["data_load_s"] > 0 and second["data_load_s"] > 0
    assert first["total_time_s"] == pytest.approx(first["train_time_s"] + first["capture_time_s"]
                                                  + first["prune_time_s"] + first["staging_time_s"])


def test_graphs_under_a_multi_process_torchrun_are_refused_before_the_group_forms(tmp_path):
    # each node's --nproc is 1 (what check_runnable sees); the world torchrun describes is 2. A torchrun
    # replica ends with os._exit (bench.cmd_train._hard_exit), so this runs in its own process
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "COLUMNS": "200"}
    res = subprocess.run([sys.executable, "-m", "bench.cli", "train", "--out", str(tmp_path / "o"), "--graphs",
                          "compile", "--device", "cpu", "--epochs", "1", "--image-size", "32", "--n-train", "8",
                          "--n-val", "4", "--batch-size", "4", "--quiet"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2 and res.stderr.count("error:") == 1, res.stderr
    assert "--graphs compile with 2 replicas (torchrun) is not supported" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()


def test_the_timeline_accounts_for_a_launched_process(tmp_path: Path) -> None:
    out = tmp_path / "run"
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "bench.cli", "train", "--out", str(out), "--epochs", "3", *TINY_ARGS],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    wall = time.time() - t0
    assert res.returncode == 0, res.stderr
    tl = read_json(out / "summary.json")["timeline_s"]
    rows = read_jsonl(out / "epochs.jsonl")
    assert tl["epochs"] == pytest.approx(sum(r["time_s"] for r in rows), abs=2e-3)
    assert tl["validation"] == pytest.approx(sum(r["val_time_s"] for r in rows), abs=2e-3)
    assert tl["fit_other"] == pytest.approx(tl["fit"] - tl["epochs"] - tl["validation"], abs=2e-3)
    parts = [tl[k] for k in ("startup", "build", "record_env", "fit")]
    assert all(v >= 0 for v in parts) and tl["fit_other"] >= 0
    assert tl["startup"] > 0.2  # the interpreter and torch's import, at least
    # the process's spawn and exit are all the launcher sees beyond these (create_time: 10 ms ticks)
    assert sum(parts) <= wall + 0.05
    assert sum(parts) > 0.5 * wall


def test_an_in_process_run_has_no_startup(tmp_path: Path) -> None:
    summary = train(tiny_cfg(epochs=1), tmp_path / "run", progress=False)
    tl = summary["timeline_s"]
    assert tl["startup"] is None and tl["fit"] >= tl["epochs"] > 0


def test_the_run_shows_a_sign_of_life_at_every_step_and_touches_its_file_at_most_every_ten_seconds(
        tmp_path: Path, monkeypatch) -> None:
    calls: list[int] = []
    original = training.RunFolder.alive

    def counted(self: training.RunFolder) -> None:
        calls.append(len(read_jsonl(self.out / "epochs.jsonl")))
        original(self)

    monkeypatch.setattr(training.RunFolder, "alive", counted)
    out = tmp_path / "r"
    train(tiny_cfg(epochs=3), out, progress=False)
    steps = [r["steps"] for r in read_jsonl(out / "epochs.jsonl")]
    assert steps == [2, 2, 2]  # 8 slices, batch 4
    # at the start, once the step is built, then at every step of every epoch (the rows written before it)
    assert calls == [0, 0, 0, 0, 1, 1, 2, 2]
    assert alive_mark(out) is not None

    clock = [1000.0]
    monkeypatch.setattr(training.time, "monotonic", lambda: clock[0])
    sink = training.RunFolder(out)
    sink.alive()
    os.utime(out / ALIVE_NAME, ns=(0, 0))
    clock[0] += ALIVE_EVERY_S - 0.5
    sink.alive()
    assert alive_mark(out) == 0  # not again within ALIVE_EVERY_S
    clock[0] += 1.0
    sink.alive()
    assert alive_mark(out) > 0
