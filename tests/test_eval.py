"""`bench eval` (bench/cmd_eval.py): reproduces training's validation numbers, writes its files,
reads the original DDNet weights, and refuses bad input with one line."""

from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench import signals
from bench.cli import main
from ddnet.convert import load_model_weights
from ddnet.errors import UserError
from ddnet.loss import choose_msssim, slice_metrics
from ddnet.precision import set_fp32_precision

FIXTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/ddnet-2d-dect/weights_50_1.pt"
REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`bench ARGS` in this process through the console entry point; (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run folder written by `bench train` (1 epoch, 64 px, base width 4).

    lr 1e-2 so that one epoch already gives a non-zero validation MS-SSIM (with the
    default lr a width-4 net still scores 0 %), which makes the comparison below bite.
    """
    out = tmp_path_factory.mktemp("train") / "run"
    args = ["train", "--data", "synthetic", "--image-size", "64", "--n-train", "8", "--n-val", "4",
            "--epochs", "1", "--batch-size", "4", "--base-width", "4", "--lr", "1e-2", "--device", "cpu",
            "--num-workers", "0", "--quiet", "--out", str(out)]
    try:
        main(args)
    except SystemExit as e:
        assert not e.code, f"bench train failed with exit {e.code}"
    assert (out / "ckpt.pt").is_file()
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eval_reproduces_the_validation_recorded_by_training(trained: Path, capsys) -> None:
    epoch = json.loads((trained / "epochs.jsonl").read_text().splitlines()[-1])
    summary = json.loads((trained / "summary.json").read_text())
    code, out, err = run_cli(["eval", "--checkpoint", str(trained / "ckpt.pt"), "--device", "cpu"], capsys)
    assert code == 0, err
    folder = trained / "eval-val"  # default: beside the checkpoint
    result = json.loads((folder / "eval.json").read_text())
    # the same slices (regenerated from the checkpoint's data config), the same metric code
    assert result["n_slices"] == 4
    assert result["output_ms_ssim_pct_mean"] == pytest.approx(epoch["val_ms_ssim"], abs=1e-4)
    assert result["output_ms_ssim_pct_std"] == pytest.approx(epoch["val_ms_ssim_std"], abs=1e-4)
    assert result["output_psnr_db_mean"] == pytest.approx(epoch["val_psnr"], abs=1e-4)
    assert result["output_rmse_hu_mean"] == pytest.approx(epoch["val_rmse_hu"], rel=1e-5)
    assert epoch["val_ms_ssim"] > 1.0 or epoch["val_psnr"] != 0.0  # a comparison of real numbers
    rows = _rows(folder / "slices.csv")
    assert [r["name"] for r in rows] == [s["name"] for s in summary["val_slices"]]
    for r, s in zip(rows, summary["val_slices"], strict=True):
        assert float(r["output_ms_ssim_pct"]) == pytest.approx(s["ms_ssim"], abs=1e-4)
        assert float(r["output_psnr_db"]) == pytest.approx(s["psnr"], abs=1e-4)
    assert result["msssim_setting"] == summary["msssim_setting"]
    ck = result["checkpoint"]
    assert (ck["layout"], ck["format"], ck["epoch"]) == ("ours", "ddnet-bench-ckpt/1", 1)
    assert result["normalisation"]["normalisation"] == "window"
    assert result["normalisation"]["source"] == "checkpoint"
    # the paper code's MS-SSIM and the input floor: the same numbers in training's records and in eval
    assert result["output_ms_ssim_paper_code_pct_mean"] == pytest.approx(epoch["val_ms_ssim_paper_code"], abs=1e-4)
    for ours, theirs in (("input_ms_ssim_pct_mean", "input_ms_ssim"), ("input_psnr_db_mean", "input_psnr"),
                         ("input_rmse_hu_mean", "input_rmse_hu"),
                         ("input_ms_ssim_paper_code_pct_mean", "input_ms_ssim_paper_code")):
        assert result[ours] == pytest.approx(epoch[theirs], rel=1e-5), ours
        assert summary[theirs] == epoch[theirs]
    # the input scores do not depend on the network: LQ vs HQ of the same slices
    assert 0.0 < result["input_ms_ssim_pct_mean"] <= 100.0
    assert "MS-SSIM (%)" in out and "+/-" in out
    assert (folder / "strip.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_anti_correlated_output_scores_0_standard_ms_ssim_and_not_0_on_the_paper_scale() -> None:
    """Why an undertrained net reads 0.00 %: the standard MS-SSIM relu's each scale's contrast term."""
    target = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    target = torch.nn.functional.avg_pool2d(target, 5, 1, 2)  # some structure at the coarse scales too
    scores = slice_metrics(1.0 - target, target, torch.full((2,), 2048.0), choose_msssim(64))
    assert scores["ms_ssim_pct"].tolist() == [0.0, 0.0]
    assert (scores["ms_ssim_paper_code_pct"] > 1.0).all()


def test_an_undertrained_net_scoring_0_is_counted_and_explained(tmp_path: Path, capsys) -> None:
    """A width-4 net after 1 epoch at the default lr scores 0 % on every slice (anti-correlated at the coarse
    scales); eval.json counts them and the output says why, with the paper-scale score beside."""
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--data", "synthetic", "--image-size", "64", "--n-train", "8", "--n-val", "4",
                            "--epochs", "1", "--batch-size", "4", "--base-width", "4", "--device", "cpu",
                            "--num-workers", "0", "--quiet", "--out", str(run)], capsys)
    assert code == 0, err
    code, out, err = run_cli(["eval", "--checkpoint", str(run / "ckpt.pt"), "--device", "cpu"], capsys)
    assert code == 0, err
    result = json.loads((run / "eval-val" / "eval.json").read_text())
    assert result["output_ms_ssim_pct_mean"] == 0.0 and result["output_ms_ssim_zero_slices"] == 4
    assert result["input_ms_ssim_zero_slices"] == 0
    text = " ".join(out.split())  # rich folds long lines
    paper = f"{result['output_ms_ssim_paper_code_pct_mean']:.2f} %"
    assert "note: 4 of 4 output slice(s) score 0 % MS-SSIM" in text and f"gives {paper}" in text
    assert result["output_ms_ssim_paper_code_pct_mean"] > 1.0


def test_a_net_scoring_above_0_gets_no_note(trained: Path, tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(["eval", "--checkpoint", str(trained / "ckpt.pt"), "--device", "cpu",
                              "--out", str(tmp_path / "e")], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert result["output_ms_ssim_zero_slices"] == 0 and result["output_ms_ssim_pct_mean"] > 0.0
    assert "score 0 % MS-SSIM" not in out


def test_exported_weights_give_the_same_numbers(trained: Path, tmp_path: Path, capsys) -> None:
    """weights.pt holds no data config: eval finds config.json beside it and regenerates the same set."""
    code, _, err = run_cli(["eval", "--checkpoint", str(trained / "weights.pt"), "--device", "cpu",
                            "--out", str(tmp_path / "w")], capsys)
    assert code == 0, err
    epoch = json.loads((trained / "epochs.jsonl").read_text().splitlines()[-1])
    result = json.loads((tmp_path / "w" / "eval.json").read_text())
    assert result["checkpoint"]["format"] == "ddnet-bench-weights/1"
    assert result["output_ms_ssim_pct_mean"] == pytest.approx(epoch["val_ms_ssim"], abs=1e-4)
    assert result["output_psnr_db_mean"] == pytest.approx(epoch["val_psnr"], abs=1e-4)


def test_an_earlier_evaluation_is_never_overwritten(trained: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "ev"
    args = ["eval", "--checkpoint", str(trained / "ckpt.pt"), "--device", "cpu", "--out", str(folder),
            "--split", "test", "--batch-size", "3"]
    assert run_cli(args, capsys)[0] == 0
    before = (folder / "eval.json").read_bytes()
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert err.strip().startswith("error: ") and "already exists" in err and len(err.strip().splitlines()) == 1
    assert (folder / "eval.json").read_bytes() == before
    result = json.loads(before)
    assert result["data"]["split"] == "test" and result["batch_size"] == 3


def test_a_full_disk_leaves_the_folder_empty_and_the_same_command_then_works(trained: Path, tmp_path: Path,
                                                                              capsys, monkeypatch) -> None:
    import bench.cmd_eval as cmd_eval  # noqa: PLC0415

    def full(path, *args):  # the disk fills while the strip (the last file) is written
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    folder = tmp_path / "ev"
    args = ["eval", "--checkpoint", str(trained / "ckpt.pt"), "--device", "cpu", "--out", str(folder)]
    monkeypatch.setattr(cmd_eval, "write_strip", full)
    code, _, err = run_cli(args, capsys)
    assert code == 4 and err.strip().startswith("error: a write failed: the disk") and len(err.strip().splitlines()) == 1
    assert folder.is_dir() and not list(folder.iterdir())  # nothing half written is left to refuse a rerun
    monkeypatch.undo()  # space freed
    assert run_cli(args, capsys)[0] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["eval.json", "slices.csv", "strip.png"]



@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_an_interrupted_eval_is_one_line_and_leaves_nothing_to_refuse_a_rerun(trained: Path, tmp_path: Path, capsys,
                                                                            monkeypatch, signame: str) -> None:
    """Ctrl-C during `bench eval` exited 130 without a word; SIGTERM while it wrote left half its files, so the
    same command then refused the folder as an earlier evaluation."""
    import bench.cmd_eval as cmd_eval  # noqa: PLC0415

    def stopped(path, *args):  # the signal comes while the strip (the last file) is written
        Path(path).write_bytes(b"\x89PNG half")
        os.kill(os.getpid(), getattr(signal, signame))
        time.sleep(5)

    died: list[int] = []
    monkeypatch.setattr(signals, "die_by_sigterm", lambda: died.append(1))  # the real one ends this process
    folder = tmp_path / "ev"
    args = ["eval", "--checkpoint", str(trained / "ckpt.pt"), "--device", "cpu", "--out", str(folder)]
    monkeypatch.setattr(cmd_eval, "write_strip", stopped)
    code, _, err = run_cli(args, capsys)
    how = "stopped by SIGTERM" if signame == "SIGTERM" else "interrupted"
    assert code == 130 and died == ([1] if signame == "SIGTERM" else [])
    assert err.strip() == (f"{how}: no evaluation was written (what was begun is removed); run the same command "
                           f"again to evaluate {trained / 'ckpt.pt'}.")
    assert folder.is_dir() and not list(folder.iterdir())
    monkeypatch.undo()
    assert run_cli(args, capsys)[0] == 0  # the same command then works

def test_normalisation_override_is_recorded(trained: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["eval", "--checkpoint", str(trained / "ckpt.pt"), "--device", "cpu",
                            "--normalisation", "minmax", "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "m" / "eval.json").read_text())
    assert result["normalisation"] == {"normalisation": "minmax", "hu_window": None, "source": "--normalisation"}
    assert result["data"]["config"]["normalisation"] == "minmax"


# ---------------------------------------------------------------------------- bad input
def test_missing_checkpoint_gives_one_error_line_through_the_real_entry_point(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cli", "eval", "--checkpoint", str(tmp_path / "nope.pt"),
         "--data", "synthetic", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not exist" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_run_folder_given_as_the_checkpoint_names_the_file_to_pass(tmp_path: Path) -> None:
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(UserError, match=re.escape(f"checkpoint {tmp_path} is a folder; pass a file in it, e.g. "
                                                  f"{tmp_path / 'weights.pt'}")):
        load_model_weights(tmp_path)


def test_a_folder_given_as_the_checkpoint_names_only_a_file_it_holds(tmp_path: Path) -> None:
    """A folder without weights.pt was answered 'pass a file in it, e.g. DIR/weights.pt', a file not there."""
    with pytest.raises(UserError, match=re.escape(f"checkpoint {tmp_path} is a folder that holds no weights.pt or "
                                                  "ckpt.pt; pass the path of a checkpoint file")):
        load_model_weights(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    with pytest.raises(UserError, match=re.escape(f"pass a file in it, e.g. {tmp_path / 'ckpt.pt'} ")):
        load_model_weights(tmp_path)


@pytest.mark.parametrize("kind", ["text", "pickled-list", "tensor-list"])
def test_not_a_checkpoint_gives_one_error_line(tmp_path: Path, kind: str, capsys) -> None:
    path = tmp_path / "file.pt"
    if kind == "text":
        path.write_text("epoch,loss\n1,0.5\n")
    elif kind == "pickled-list":
        path.write_bytes(pickle.dumps(["a", 1, 2.0]))
    else:
        torch.save([torch.zeros(3)], path)
    code, out, err = run_cli(["eval", "--checkpoint", str(path), "--data", "synthetic",
                              "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    lines = (out + err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0]
    assert not (tmp_path / "o").exists()


def test_bad_options_are_refused(trained: Path, tmp_path: Path, capsys) -> None:
    for extra, words in [(["--split", "train"], "--split"), (["--normalisation", "zscore"], "--normalisation"),
                         (["--image-size", "50"], "divisible by 16"),
                         (["--batch-size", "0"], "--batch-size 0 must be at least 1.")]:
        code, _, err = run_cli(["eval", "--checkpoint", str(trained / "ckpt.pt"), "--device", "cpu",
                                "--out", str(tmp_path / "o"), *extra], capsys)
        assert code == 2 and err.startswith("error: ") and words in err, (extra, err)


# ---------------------------------------------------------------------------- the original weights
@pytest.mark.skipif(not FIXTURE.exists(), reason=f"original DDNet weights fixture not found at {FIXTURE}")
def test_eval_of_the_original_weights(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "orig"
    code, out, err = run_cli(["eval", "--checkpoint", str(FIXTURE), "--data", "synthetic", "--image-size", "64",
                              "--n-val", "3", "--device", "cpu", "--out", str(folder)], capsys)
    assert code == 0, err
    assert {p.name for p in folder.iterdir()} == {"slices.csv", "eval.json", "strip.png"}
    result = json.loads((folder / "eval.json").read_text())
    assert result["checkpoint"]["layout"] == "original"
    assert result["checkpoint"]["format"] == "state-dict"
    assert result["normalisation"]["normalisation"] == "minmax"
    assert result["data"]["config"]["normalisation"] == "minmax"
    assert result["checkpoint"]["params"] == 566_451
    rows = _rows(folder / "slices.csv")
    assert len(rows) == 3
    assert set(rows[0]) == {"name", "input_ms_ssim_pct", "input_psnr_db", "input_rmse_hu",
                            "output_ms_ssim_pct", "output_psnr_db", "output_rmse_hu",
                            "input_ms_ssim_paper_code_pct", "output_ms_ssim_paper_code_pct"}
    # the paper code's scale reads higher than the standard one on the same pairs (its bracket and (v+1)/2)
    assert result["output_ms_ssim_paper_code_pct_mean"] > result["output_ms_ssim_pct_mean"]
    # a trained network, not noise: far above what an untrained DDNet scores here (0 %)
    assert result["output_ms_ssim_pct_mean"] > 50.0

    with Image.open(folder / "strip.png") as im:
        assert im.width > 400 and im.height > 200
    assert "original layout" in out


def _set_tf32_everywhere() -> None:
    """What an earlier caller in the process might have left: TF32 on (new API where it exists)."""
    set_fp32_precision("tf32")


def test_eval_runs_and_records_true_fp32(trained: Path, tmp_path: Path, capsys) -> None:
    _set_tf32_everywhere()
    code, _, err = run_cli(["eval", "--checkpoint", str(trained / "ckpt.pt"), "--device", "cpu",
                            "--out", str(tmp_path / "e")], capsys)
    assert code == 0, err
    flags = json.loads((tmp_path / "e" / "eval.json").read_text())["precision_flags"]
    if flags["tf32_api"] == "fp32_precision":
        assert flags["cudnn.conv.fp32_precision"] == "ieee" and flags["cuda.matmul.fp32_precision"] == "ieee"
    else:
        assert flags["cudnn.allow_tf32"] is False and flags["cuda.matmul.allow_tf32"] is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eval_on_cuda_matches_cpu(trained: Path, tmp_path: Path, capsys) -> None:
    results = {}
    for dev in ("cpu", "cuda"):
        _set_tf32_everywhere()  # eval must switch TF32 off itself, not rely on an earlier test's flags
        code, _, err = run_cli(["eval", "--checkpoint", str(trained / "ckpt.pt"), "--device", dev,
                                "--out", str(tmp_path / dev)], capsys)
        assert code == 0, err
        results[dev] = json.loads((tmp_path / dev / "eval.json").read_text())
    assert results["cuda"]["device"] == "cuda"
    assert results["cuda"]["precision_flags"] == results["cpu"]["precision_flags"]
    for key in ("output_ms_ssim_pct_mean", "output_psnr_db_mean", "input_ms_ssim_pct_mean"):
        assert results["cuda"][key] == pytest.approx(results["cpu"][key], abs=1e-2), key


def test_eval_of_a_run_without_its_checkpoint_yet_says_why(tmp_path, capsys) -> None:
    """A run stopped in its first epoch has no ckpt.pt, and an unfinished one no weights.pt: eval said only that
    the file does not exist, as if the path were mistyped."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    for name in ("ckpt.pt", "weights.pt"):
        code, _, err = run_cli(["eval", "--checkpoint", str(run / name), "--device", "cpu"], capsys)
        assert code == 2 and err.count("\n") == 1
        assert (f"error: {run} is a run with no checkpoint yet: it has not finished its first epoch (stopped before, "
                f"or still in it); resume it with `bench train --out {run} --resume`, then evaluate.") in err
    (run / "ckpt.pt").write_bytes(b"")
    code, _, err = run_cli(["eval", "--checkpoint", str(run / "weights.pt"), "--device", "cpu"], capsys)
    assert code == 2 and f"{run} has no weights.pt yet: the run has not finished; evaluate {run / 'ckpt.pt'}" in err
    assert not any(p.name.startswith("eval-") for p in run.iterdir())
    code, _, err = run_cli(["eval", "--checkpoint", str(tmp_path / "typo.pt"), "--device", "cpu"], capsys)
    assert code == 2 and "typo.pt does not exist" in err  # not a run folder: as before


def test_eval_of_a_run_folder_without_weights_says_what_the_run_lacks(tmp_path, capsys) -> None:
    """`--checkpoint RUN` on a run without weights.pt named RUN/weights.pt as the file to pass, which is not there."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    code, _, err = run_cli(["eval", "--checkpoint", str(run), "--device", "cpu"], capsys)
    assert code == 2 and err == (f"error: {run} is a run with no checkpoint yet: it has not finished its first "
                                 "epoch (stopped before, or still in it); resume it with `bench train --out "
                                 f"{run} --resume`, then evaluate.\n")
    (run / "ckpt.pt").write_bytes(b"")
    code, _, err = run_cli(["eval", "--checkpoint", str(run), "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"{run} has no weights.pt yet: the run has not finished; evaluate {run / 'ckpt.pt'}" in err
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.pt", "config.json"]


def test_a_plain_state_dict_says_its_normalisation_is_a_guess(trained: Path, tmp_path: Path, capsys) -> None:
    """README: a plain state dict gets the data default (window), 'said so'; only eval.json said it."""
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(trained / "weights.pt", weights_only=False)["model"], plain)
    args = ["eval", "--device", "cpu", "--image-size", "32", "--n-val", "2"]
    guess = ("plain.pt does not say which normalisation it was trained with; using window: pass "
             "--normalisation minmax or window to choose.")
    with pytest.warns(UserWarning, match=re.escape(guess)):
        code, _, err = run_cli([*args, "--checkpoint", str(plain), "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "eval.json").read_text())["normalisation"]["normalisation"] == "window"
    for extra, out in ((["--checkpoint", str(plain), "--normalisation", "window"], "b"),  # chosen, not guessed
                       (["--checkpoint", str(trained / "weights.pt")], "c")):  # ours records it
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            code, _, err = run_cli([*args, *extra, "--out", str(tmp_path / out)], capsys)
        assert code == 0, err
        assert not [w for w in seen if "does not say" in str(w.message)]


def test_eval_of_a_failed_runs_weights_says_it_failed_not_that_it_is_unfinished(tmp_path, capsys) -> None:
    """A failed run has no weights.pt: eval said 'the run has not finished' and to resume it, as if it ran on."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "ckpt.pt").write_bytes(b"")
    (run / "summary.json").write_text(json.dumps({"status": "failed", "error": "train loss became nan at epoch 3"}))
    code, _, err = run_cli(["eval", "--checkpoint", str(run / "weights.pt"), "--device", "cpu"], capsys)
    assert code == 2 and err == (f"error: {run} failed (train loss became nan at epoch 3), so it has no weights.pt; "
                                 f"evaluate {run / 'ckpt.pt'} (its last checkpoint), or fix the cause and resume it "
                                 f"with `bench train --out {run} --resume`.\n")
