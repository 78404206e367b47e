"""`bench train --resume` as a user meets it: `--resume` alone continues the run as configured, a refusal
names what differs, a data folder given relative works from anywhere, Ctrl-C says how to go on, and a
structurally pruned checkpoint given to --init is named for what it is; SIGTERM (a Slurm time limit, `kill`)
says the same as Ctrl-C and still ends the process by SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench.cmd_train as cmd_train
import bench.training as training
from bench import signals
from bench.cli import main
from bench.store import lock_held, read_json, read_jsonl, take_lock
from bench.training import LOCK_NAME, config_differences, train
from ddnet.config import ConfigError, SparsityConfig
from tests.test_data_options import npy_folder
from tests.test_training import TINY_ARGS, one_error_line, run_cli, tiny_cfg


def _killed_after_epoch_1(out: Path, args: list[str], capsys, monkeypatch) -> None:
    """Run 3 epochs, failing at epoch 2 (the checkpoint of epoch 1 stays): a run to resume."""
    monkeypatch.setenv("DDNET_BENCH_INJECT_NAN_EPOCH", "2")
    code, _ = run_cli(["train", "--out", str(out), "--epochs", "3", *args], capsys)
    assert code == 3
    monkeypatch.delenv("DDNET_BENCH_INJECT_NAN_EPOCH")


def test_resume_alone_continues_the_run_as_configured(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "r"
    _killed_after_epoch_1(out, TINY_ARGS, capsys, monkeypatch)
    code, err = run_cli(["train", "--out", str(out), "--resume", "--quiet"], capsys)
    assert code == 0, err
    assert [r["epoch"] for r in read_jsonl(out / "epochs.jsonl")] == [1, 2, 3]
    whole = tmp_path / "whole"
    assert run_cli(["train", "--out", str(whole), "--epochs", "3", *TINY_ARGS], capsys)[0] == 0
    ours, ref = (torch.load(d / "weights.pt", weights_only=False)["model"] for d in (out, whole))
    assert all(torch.equal(ours[k], ref[k]) for k in ref)  # the same trajectory as the run never stopped


def test_a_refused_resume_names_what_differs_and_the_way_on(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "r"
    _killed_after_epoch_1(out, TINY_ARGS, capsys, monkeypatch)
    code, err = run_cli(["train", "--out", str(out), "--resume", "--epochs", "5", *TINY_ARGS], capsys)
    line = one_error_line(err)
    assert code == 2 and "holds a run of a different configuration (epochs: 3 there, 5 here)" in line
    assert f"run `bench train --out {out} --resume` alone" in line
    assert config_differences({"a": 1, "data": {"n": 2, "s": "x"}}, {"a": 1, "data": {"n": 3, "s": "x"}}) == \
        ["data.n: 2 there, 3 here"]


def test_a_relative_data_folder_is_recorded_absolute(tmp_path: Path, capsys, monkeypatch) -> None:
    data = npy_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r"
    args = [a for a in TINY_ARGS if a not in ("--image-size", "32")]
    _killed_after_epoch_1(out, ["--data", "data", *args], capsys, monkeypatch)
    assert read_json(out / "config.json")["data"]["source"] == str(data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # from another folder, the same data under its name from here
    code, err = run_cli(["train", "--out", str(out), "--resume", "--epochs", "3", "--data", "../data", *args], capsys)
    assert code == 0, err
    assert [r["epoch"] for r in read_jsonl(out / "epochs.jsonl")] == [1, 2, 3]


def test_ctrl_c_says_the_run_stays_resumable(tmp_path: Path, capsys, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cmd_train, "train", interrupted)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "ckpt.pt").write_bytes(b"")
    code, err = run_cli(["train", "--out", str(tmp_path / "r"), "--epochs", "2", *TINY_ARGS], capsys)
    assert code == 130
    assert f"interrupted: {tmp_path / 'r'} stays resumable; run the same command with --resume" in err
    # before its first checkpoint there is nothing to resume: it said so all the same
    code, err = run_cli(["train", "--out", str(tmp_path / "n"), "--epochs", "2", *TINY_ARGS], capsys)
    assert code == 130 and "--resume" not in err
    assert (f"interrupted before the first checkpoint of {tmp_path / 'n'}: nothing trained is kept; run the same "
            "command again to start it.") in err



def test_sigterm_says_the_run_stays_resumable_and_still_ends_by_sigterm(tmp_path: Path) -> None:
    """SIGTERM's default action ended `bench train` without a word; now it unwinds like Ctrl-C (the line says
    how to go on) and the process still dies by SIGTERM, as a grid runner or Slurm expects."""
    out = tmp_path / "r"
    args = [a for a in TINY_ARGS if a != "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "train", "--out", str(out), "--epochs", "20",
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and not read_jsonl(out / "epochs.jsonl"):
            time.sleep(0.05)
        assert proc.poll() is None, "bench train ended before its first epoch"
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, err
    assert f"stopped by SIGTERM: {out} stays resumable; run the same command with --resume" in err
    assert "Traceback" not in err
    done = len(read_jsonl(out / "epochs.jsonl"))
    assert 1 <= done < 20 and read_json(out / "summary.json")["status"] == "running"  # not failed
    assert not lock_held(out / LOCK_NAME) and not list(out.glob(".*.tmp"))
    res = subprocess.run([sys.executable, "-m", "bench.cli", "train", "--out", str(out), "--resume", "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert [r["epoch"] for r in read_jsonl(out / "epochs.jsonl")] == list(range(1, 21))



def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_replicas_of_a_stopped_nproc_run_never_train_on_as_orphans(tmp_path: Path, signum: int) -> None:
    """`kill` (or SIGKILL) of `bench train --nproc 2` started as `nohup ... &` starts it (SIGINT ignored) left
    both replicas training on as orphans, holding the folder's lock (on a GPU node, the GPUs); a SIGINT to it
    alone waited for them to finish every epoch. Now they end with it: stopped on SIGTERM or SIGINT, and by
    the system (PR_SET_PDEATHSIG) when it dies outright."""
    psutil = pytest.importorskip("psutil")
    out, log = tmp_path / "r", tmp_path / "stderr.txt"
    with open(log, "w") as f:  # a file, not a pipe: reading a pipe would wait for orphans that hold it too
        proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "train", "--out", str(out), "--epochs",
                                 "5000", "--nproc", "2", *TINY_ARGS], stdout=subprocess.DEVNULL, stderr=f,
                                preexec_fn=_ignore_sigint if signum != signal.SIGINT else None)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not read_jsonl(out / "epochs.jsonl"):
            time.sleep(0.05)
        assert proc.poll() is None, "bench train ended before its first epoch"
        replicas = psutil.Process(proc.pid).children(recursive=True)
        assert len(replicas) >= 2
        t0 = time.monotonic()
        proc.send_signal(signum)
        proc.wait(timeout=120)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    gone_by = time.monotonic() + 30
    while time.monotonic() < gone_by and any(_live(r) for r in replicas):
        time.sleep(0.1)
    assert not any(_live(r) for r in replicas), "a replica trains on"
    assert len(read_jsonl(out / "epochs.jsonl")) < 5000
    if signum == signal.SIGKILL:
        return
    assert took < 60, took  # not the 5000 epochs
    err = log.read_text()
    said = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
    assert proc.returncode == (-signal.SIGTERM if signum == signal.SIGTERM else 130), err
    assert f"{said}: {out} stays resumable" in err and "Traceback" not in err


def _live(p) -> bool:
    psutil = pytest.importorskip("psutil")
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

def test_sigterm_before_the_first_checkpoint_says_nothing_is_kept(tmp_path: Path, capsys, monkeypatch) -> None:
    died: list[int] = []

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, in the main thread
        time.sleep(5)
        raise AssertionError("SIGTERM did not unwind the training")

    def die() -> None:  # the real one ends this process by SIGTERM: the subprocess test above checks it
        died.append(1)
        raise SystemExit(143)

    monkeypatch.setattr(cmd_train, "train", terminated)
    monkeypatch.setattr(signals, "die_by_sigterm", die)
    before = signal.getsignal(signal.SIGTERM)
    code, err = run_cli(["train", "--out", str(tmp_path / "n"), "--epochs", "2", *TINY_ARGS], capsys)
    assert code == 143 and died == [1]
    assert (f"stopped by SIGTERM before the first checkpoint of {tmp_path / 'n'}: nothing trained is kept; run "
            "the same command again to start it.") in err
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back

def test_init_from_a_structurally_pruned_checkpoint_says_so(tmp_path: Path, capsys) -> None:
    train(tiny_cfg(epochs=2, sparsity=SparsityConfig(kind="structured", dense_epochs=1)), tmp_path / "s",
          progress=False)
    code, err = run_cli(["train", "--out", str(tmp_path / "b"), "--epochs", "1", "--init",
                         str(tmp_path / "s" / "weights.pt"), *TINY_ARGS], capsys)
    line = one_error_line(err)
    assert code == 2 and "it was pruned structurally" in line and "set --base-width" not in line
    assert not (tmp_path / "b").exists()
    train(tiny_cfg(epochs=1), tmp_path / "d", progress=False)  # dense, base width 4
    code, err = run_cli(["train", "--out", str(tmp_path / "c"), "--epochs", "1", "--init",
                         str(tmp_path / "d" / "weights.pt"), *TINY_ARGS, "--base-width", "8"], capsys)
    assert code == 2 and "set --base-width to the checkpoint's width" in one_error_line(err)


@pytest.mark.parametrize("given", [["--epochs", "5"], ["--epochs", "3"], ["--config", "CFG"]])
def test_options_given_with_resume_are_still_checked(tmp_path: Path, capsys, monkeypatch, given) -> None:
    """Options beside --resume apply over the run's config.json: one that differs is refused by name alone (they
    used to apply over the defaults, so `--resume --epochs 5` was refused for batch_size, image_size, n_train,
    ... too), and one that agrees resumes."""
    out = tmp_path / "r"
    _killed_after_epoch_1(out, TINY_ARGS, capsys, monkeypatch)
    given = [str(out / "config.json") if g == "CFG" else g for g in given]
    code, err = run_cli(["train", "--out", str(out), "--resume", "--quiet", *given], capsys)
    if given == ["--epochs", "5"]:
        line = one_error_line(err)
        assert code == 2 and "(epochs: 3 there, 5 here)" in line and "batch_size" not in line, line
    else:
        assert code == 0, err
        assert [r["epoch"] for r in read_jsonl(out / "epochs.jsonl")] == [1, 2, 3]


def test_a_folder_another_run_is_writing_is_named_so_before_its_contents(tmp_path: Path, capsys,
                                                                         monkeypatch) -> None:
    out = tmp_path / "r"
    _killed_after_epoch_1(out, TINY_ARGS, capsys, monkeypatch)  # epochs on disk: "add --resume" otherwise
    with take_lock(out / LOCK_NAME, "fix", "busy"):  # as a running `bench train` holds it
        for resume in ([], ["--resume"]):
            code, err = run_cli(["train", "--out", str(out), "--epochs", "3", *resume, *TINY_ARGS], capsys)
            assert code == 2 and f"another `bench train` is writing {out}" in one_error_line(err)
    assert not lock_held(out / LOCK_NAME)


def test_our_warnings_are_one_line_and_auto_switch_needs_two_epochs(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "bench.cli", "train", "--out", str(tmp_path / "r"), "--epochs", "1",
            *[a if a != "32" else "64" for a in TINY_ARGS]]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr
    assert "warning: 64 px images are too small for the standard MS-SSIM" in res.stderr
    assert "UserWarning" not in res.stderr and "self.loss_fn" not in res.stderr  # no file:line, no source line
    # two spawned replicas: the same line, once (rank 0 says it for both), and no Python formatting either
    res = subprocess.run([*args[:5], str(tmp_path / "r2"), *args[6:], "--nproc", "2"], capture_output=True,
                         text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("warning: 64 px images are too small for the standard MS-SSIM") == 1, res.stderr
    assert "UserWarning" not in res.stderr and "self.loss_fn" not in res.stderr, res.stderr
    with pytest.raises(ConfigError, match="--dense-epochs auto needs a dense and a sparse epoch, so --epochs 2"):
        tiny_cfg(epochs=1, sparsity=SparsityConfig(kind="topk", dense_epochs="auto"))


def test_a_run_that_would_time_no_epoch_is_warned_and_only_it(tmp_path: Path, capsys) -> None:
    with pytest.warns(UserWarning, match="--warmup-epochs 2 marks all 2 epochs as warm-up") as seen:
        code, err = run_cli(["train", "--out", str(tmp_path / "a"), "--epochs", "2", "--warmup-epochs", "2",
                             *TINY_ARGS], capsys)
    assert code == 0, err
    assert all(r["warmup"] for r in read_jsonl(tmp_path / "a" / "epochs.jsonl"))  # what the warning says
    assert len([w for w in seen if "warm-up" in str(w.message)]) == 1
    code, err = run_cli(["train", "--out", str(tmp_path / "b"), "--epochs", "3", "--warmup-epochs", "2",
                         *TINY_ARGS], capsys)
    assert code == 0, err
    assert [r["warmup"] for r in read_jsonl(tmp_path / "b" / "epochs.jsonl")] == [True, True, False]


def test_the_closing_line_says_what_pruning_did(tmp_path: Path, capsys) -> None:
    """A structurally pruned net holds no zeros: 'sparsity 0.000 (structural)' read as if nothing were pruned."""
    runs = {"s": ["--epochs", "2", "--sparsity", "structured", "--dense-epochs", "1"],
            "m": ["--epochs", "2", "--sparsity", "topk", "--dense-epochs", "1"], "d": ["--epochs", "1"]}
    done = {}
    for name, args in runs.items():
        main(["train", "--out", str(tmp_path / name), *args, *TINY_ARGS])
        out = capsys.readouterr().out
        done[name] = out[out.index(" %), ") + 5:out.index(f" -> {tmp_path / name}")]
    report = read_json(tmp_path / "s" / "summary.json")["sparsity"]["report"]
    before, after = report["params_before"], report["params_after"]
    assert after < before and read_json(tmp_path / "s" / "summary.json")["params"] == after
    assert done["s"] == f"structural: {100 * (before - after) / before:.1f} % of parameters removed ({before:,} -> {after:,})"
    assert done["m"] == "sparsity 0.500 (masked)" and done["d"] == "dense"


def test_a_damaged_epoch_row_is_warned_of_on_resume_and_the_epochs_still_counted(tmp_path: Path, capsys) -> None:
    """A run stopped after its checkpoint of epoch 3 whose epochs.jsonl lost epoch 2's row to a damaged line: the
    resume said "done: 2 epochs" and recorded epochs_completed 2 of 3 trained, dropping the line without a word."""
    out = tmp_path / "r"
    assert run_cli(["train", "--out", str(out), "--epochs", "3", *TINY_ARGS], capsys)[0] == 0
    lines = (out / "epochs.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"epoch": 2, "phase": "den\x00\x00 garbage\n'
    (out / "epochs.jsonl").write_text("".join(lines))
    (out / "summary.json").write_text('{"status": "running", "error": null}')  # stopped before its summary
    with pytest.warns(UserWarning, match=r"epochs.jsonl holds no readable row for epoch\(s\) 2 of the 3 its "
                      r"checkpoint holds \(a damaged line\): their records are lost"):
        code, err = run_cli(["train", "--out", str(out), "--resume"], capsys)
    assert code == 0, err
    summary = read_json(out / "summary.json")
    assert summary["status"] == "ok" and summary["epochs_completed"] == 3
    assert [r["epoch"] for r in read_jsonl(out / "epochs.jsonl")] == [1, 3]


def test_a_run_folder_moved_away_mid_run_is_not_recorded_failed_nor_made_again(tmp_path: Path, capsys,
                                                                                 monkeypatch) -> None:
    """--out renamed while the run wrote into it: the run was recorded 'failed' (FileNotFoundError) in a folder
    made again at the old path, beside the moved one. Now: one line, nothing made, the moved folder resumes."""
    out, moved = tmp_path / "r", tmp_path / "moved"
    first_row = training.RunFolder.epoch

    def epoch_then_move(self, row):
        first_row(self, row)
        if row["epoch"] == 1:
            out.rename(moved)

    monkeypatch.setattr(training.RunFolder, "epoch", epoch_then_move)
    code, err = run_cli(["train", "--out", str(out), "--epochs", "2", *TINY_ARGS], capsys)
    line = one_error_line(err)
    assert code == 3 and f"{out} was moved or deleted while the run wrote into it" in line, err
    assert "nothing is recorded as failed" in line and "training failed" not in line
    assert not out.exists()  # no folder made again to hold a 'failed' summary
    assert read_json(moved / "summary.json")["status"] == "running"
    monkeypatch.setattr(training.RunFolder, "epoch", first_row)
    code, err = run_cli(["train", "--out", str(moved), "--resume"], capsys)
    assert code == 0, err
    assert [r["epoch"] for r in read_jsonl(moved / "epochs.jsonl")] == [1, 2]


def test_a_resume_removes_the_temporary_files_a_kill_left_mid_write(tmp_path: Path, capsys) -> None:
    """A kill while ckpt.pt, weights.pt or a JSON record was being written leaves its temporary file (as large as
    the checkpoint); resumes used to keep every one, so a run killed now and then filled its disk."""
    out = tmp_path / "r"
    assert run_cli(["train", "--out", str(out), "--epochs", "1", *TINY_ARGS], capsys)[0] == 0
    (out / "summary.json").write_text('{"status": "running", "error": null}')  # killed before its summary
    left = [out / ".ckpt.pt.4242.ab12cd34.tmp", out / ".weights.pt.4242.ef56ab78.tmp", out / ".summary.json.x1y2.tmp"]
    for tmp in left:
        tmp.write_bytes(b"\x80half a checkpoint")
    foreign = out / ".notes.tmp"
    foreign.write_text("not ours")
    code, err = run_cli(["train", "--out", str(out), "--resume"], capsys)
    assert code == 0, err
    assert not any(tmp.exists() for tmp in left)
    assert foreign.exists() and read_json(out / "summary.json")["status"] == "ok"


def test_init_given_a_folder_names_the_checkpoint_in_it(tmp_path: Path, capsys) -> None:
    """`--init RUN_FOLDER` said '--init RUN_FOLDER does not exist', of a folder that is there."""
    run = tmp_path / "run"
    run.mkdir()
    code, err = run_cli(["train", "--out", str(tmp_path / "a"), "--epochs", "1", "--init", str(run), *TINY_ARGS],
                        capsys)
    assert code == 2 and one_error_line(err) == (f"error: --init {run} is a folder that holds no weights.pt or "
                                                 "ckpt.pt; pass a checkpoint file (ckpt.pt, weights.pt or an "
                                                 "original DDNet state dict).")
    (run / "ckpt.pt").write_bytes(b"")
    code, err = run_cli(["train", "--out", str(tmp_path / "a"), "--epochs", "1", "--init", str(run), *TINY_ARGS],
                        capsys)
    assert code == 2 and one_error_line(err) == (f"error: --init {run} is a folder; pass the checkpoint file in "
                                                 f"it, e.g. --init {run / 'ckpt.pt'}.")
    code, err = run_cli(["train", "--out", str(tmp_path / "a"), "--epochs", "1", "--init", str(tmp_path / "no"),
                         *TINY_ARGS], capsys)
    assert code == 2 and "does not exist" in one_error_line(err) and not (tmp_path / "a").exists()
