"""Bad input and faults, as a hostile but realistic user meets them: one `error:` line, a non-zero exit,
no traceback, and no file that existed before changed. One table of cases across every command."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bench.cli import main
from bench.store import read_json
from bench.training import train
from ddnet.config import DataConfig, ModelConfig, TrainConfig

TINY = ["--image-size", "32", "--n-train", "8", "--n-val", "4", "--batch-size", "4", "--base-width", "4",
        "--growth", "4", "--bottleneck", "8", "--device", "cpu", "--num-workers", "0", "--quiet", "--epochs", "1"]
TINY_NET = TINY[6:]
"""TINY without the synthetic data's sizes, for a run on a data folder (beside one they warn)."""


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run folder (checkpoint, weights, records)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(TrainConfig(model=ModelConfig(base_width=4, growth=4, bottleneck=8),
                      data=DataConfig(image_size=32, n_train=8, n_val=4), epochs=1, batch_size=4, device="cpu",
                      num_workers=0), out, progress=False)
    return out


def _folder_data(root: Path, shape=(32, 32), n: int = 2) -> Path:
    for split in ("train", "val"):
        for kind in ("HQ", "LQ"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                np.save(root / split / kind / f"s{i}.npy", np.zeros(shape, np.float32))
    return root


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def _grid(tmp: Path, body: str) -> str:
    return str(_write(tmp / "g.py", body))


# (id, setup(tmp, finished) -> extra args, args, expected exit code, text the error line must hold)
Case = tuple[str, Callable[[Path, Path], list[str]], list[str], int, str]
NONE: Callable[[Path, Path], list[str]] = lambda t, f: []  # noqa: E731
CASES: list[Case] = [
    # ---------------------------------------------------------------- bench train: options
    ("train-precision", NONE, ["train", "--out", "{t}/o", "--precision", "fp8", *TINY], 2, "--precision 'fp8'"),
    ("train-lr-negative", NONE, ["train", "--out", "{t}/o", "--lr", "-0.1", *TINY], 2, "--lr -0.1"),
    ("train-lr-nan", NONE, ["train", "--out", "{t}/o", "--lr", "nan", *TINY], 2, "--lr nan"),
    ("train-lr-inf", NONE, ["train", "--out", "{t}/o", "--lr", "inf", *TINY], 2, "--lr inf"),
    ("train-width-zero", NONE, ["train", "--out", "{t}/o", *TINY, "--base-width", "0"], 2, "--base-width 0"),
    ("train-width-negative", NONE, ["train", "--out", "{t}/o", *TINY, "--base-width", "-4"], 2, "--base-width -4"),
    ("train-workers", NONE, ["train", "--out", "{t}/o", *TINY, "--num-workers", "-1"], 2, "--num-workers -1"),
    ("train-profile", NONE, ["train", "--out", "{t}/o", *TINY, "--profile-steps", "-5"], 2, "--profile-steps -5"),
    ("train-epochs-text", NONE, ["train", "--out", "{t}/o", *TINY, "--epochs", "ten"], 2, "--epochs"),
    ("train-device", NONE, ["train", "--out", "{t}/o", *TINY, "--device", "tpu"], 2, "--device 'tpu'"),
    ("train-scope", NONE, ["train", "--out", "{t}/o", *TINY, "--scope", "bogus"], 2, "--scope 'bogus'"),
    ("train-image-size", NONE, ["train", "--out", "{t}/o", *TINY, "--image-size", "40"], 2, "divisible by 16"),
    ("train-unknown-option", NONE, ["train", "--out", "{t}/o", "--bogus", "1"], 2, "No such option"),
    ("train-no-sparse-epoch", NONE, ["train", "--out", "{t}/o", *TINY, "--sparsity", "random", "--dense-epochs",
                                     "1"], 2, "no sparse epoch"),
    ("train-dense-epochs-dense", NONE, ["train", "--out", "{t}/o", *TINY, "--dense-epochs", "3"], 2,
     "--dense-epochs shapes pruning, which --sparsity none does not do"),
    ("train-amount-dense", NONE, ["train", "--out", "{t}/o", *TINY, "--amount", "0.9", "--auto-patience", "2"], 2,
     "--amount, --auto-patience shape pruning"),
    ("train-cuda-graph-cpu", NONE, ["train", "--out", "{t}/o", *TINY, "--graphs", "cuda-graph"], 2, "needs a CUDA"),
    ("train-compile-mode", NONE, ["train", "--out", "{t}/o", *TINY, "--compile-mode", "max-autotune"], 2,
     "applies to torch.compile"),
    ("train-preset", NONE, ["train", "--out", "{t}/o", *TINY, "--preset", "quickest"], 2, "--preset 'quickest'"),
    # ---------------------------------------------------------------- bench train: config files
    ("config-list", lambda t, f: ["--config", str(_write(t / "c.json", "[1, 2]"))], ["train", "--out", "{t}/o"],
     2, "JSON object"),
    ("config-string", lambda t, f: ["--config", str(_write(t / "c.json", '"fp32"'))], ["train", "--out", "{t}/o"],
     2, "JSON object"),
    ("config-epochs-text", lambda t, f: ["--config", str(_write(t / "c.json", '{"epochs": "ten"}'))],
     ["train", "--out", "{t}/o"], 2, "--epochs must be an integer"),
    ("config-epochs-float", lambda t, f: ["--config", str(_write(t / "c.json", '{"epochs": 2.7}'))],
     ["train", "--out", "{t}/o"], 2, "got 2.7"),
    ("config-model-null", lambda t, f: ["--config", str(_write(t / "c.json", '{"model": null}'))],
     ["train", "--out", "{t}/o"], 2, "'model' must be"),
    ("config-typo", lambda t, f: ["--config", str(_write(t / "c.json", '{"epoch": 3}'))],
     ["train", "--out", "{t}/o"], 2, "unknown TrainConfig field"),
    ("config-not-json", lambda t, f: ["--config", str(_write(t / "c.json", "{epochs: 3"))],
     ["train", "--out", "{t}/o"], 2, "not valid JSON"),
    ("config-missing", NONE, ["train", "--out", "{t}/o", "--config", "{t}/none.json"], 2, "does not exist"),
    # ---------------------------------------------------------------- bench train: data and folders
    ("train-data-missing", NONE, ["train", "--out", "{t}/o", *TINY, "--data", "{t}/nodata"], 2, "nodata"),
    ("train-data-file", lambda t, f: [str(_write(t / "slices.zip", "x"))], ["train", "--out", "{t}/o", *TINY,
                                                                           "--data"], 2, "is a file, not a folder"),
    ("train-data-unpaired", lambda t, f: [_unpaired(t)], ["train", "--out", "{t}/o", *TINY, "--data"], 2, "s1"),
    ("train-data-overflow", lambda t, f: [_overflow(t)], ["train", "--out", "{t}/o", *TINY, "--data"], 2,
     "float32's range"),
    ("train-data-val-size", lambda t, f: [_val_size(t)], ["train", "--out", "{t}/o", *TINY, "--data"], 2,
     "val slices in"),
    ("train-out-finished", lambda t, f: ["--out", str(f)], ["train", *TINY], 2, "already holds a finished run"),
    ("train-out-empty", NONE, ["train", "--out", "", *TINY], 2, "--out is empty"),
    ("train-out-file", lambda t, f: ["--out", str(_write(t / "afile", "x"))], ["train", *TINY], 2, "is a file"),
    ("train-out-foreign", lambda t, f: ["--out", str(_write(t / "mine" / "notes.txt", "x").parent)],
     ["train", *TINY], 2, "not a bench run"),
    ("train-init-missing", NONE, ["train", "--out", "{t}/o", *TINY, "--init", "{t}/w.pt"], 2, "does not exist"),
    ("train-out-torn-summary", lambda t, f: ["--out", str(_torn_summary(t, f))], ["train", *TINY], 2,
     "summary.json is damaged; add --resume"),
    ("train-resume-corrupt-ckpt", lambda t, f: ["--out", str(_corrupt_run(t, f))], ["train", *TINY, "--resume"], 2,
     "cannot be read as a checkpoint"),
    ("train-resume-config-binary", lambda t, f: ["--out", str(_damaged_config(t, f, b"\x90\xff\xdf" * 40))],
     ["train", "--resume"], 2, "config.json, the run's config that --resume reads, is not a JSON text file"),
    ("train-resume-config-torn", lambda t, f: ["--out", str(_damaged_config(t, f, b'{"epochs": 3, "mod'))],
     ["train", "--resume"], 2, "config.json, the run's config that --resume reads, is not valid JSON"),
    # killed while config.json was being written: --resume alone trained the defaults (128 px, 50 epochs) there
    ("train-resume-alone-no-config", lambda t, f: ["--out", str(_killed_at_config(t))], ["train", "--resume"], 2,
     "config.json, which does not exist: the run was stopped before it wrote its records"),
    ("train-resume-alone-no-folder", NONE, ["train", "--out", "{t}/nowhere", "--resume", "--quiet"], 2,
     "no such folder, so nothing to resume"),
    # ---------------------------------------------------------------- bench eval
    ("eval-missing", NONE, ["eval", "--checkpoint", "{t}/none.pt"], 2, "none.pt"),
    ("eval-not-a-checkpoint", lambda t, f: ["--checkpoint", str(_write(t / "x.pt", b"garbage"))], ["eval"], 2,
     "x.pt"),
    ("eval-split", lambda t, f: ["--checkpoint", str(f / "ckpt.pt")], ["eval", "--split", "train"], 2, "--split"),
    ("eval-device", lambda t, f: ["--checkpoint", str(f / "ckpt.pt")], ["eval", "--device", "tpu"], 2, "--device"),
    ("eval-out-taken", lambda t, f: ["--checkpoint", str(f / "ckpt.pt"), "--out",
                                     str(_write(t / "ev" / "keep.txt", "x").parent)], ["eval"], 2, "not empty"),
    ("eval-out-under-file", lambda t, f: ["--checkpoint", str(f / "ckpt.pt"), "--out",
                                          str(_write(t / "afile", "x") / "ev")], ["eval"], 2, "Not a directory"),
    # 8 px: too small for DDNet's four poolings (any side it accepts, >= 16, has at least 2 MS-SSIM scales)
    ("eval-image-too-small", lambda t, f: ["--checkpoint", str(f / "ckpt.pt")], ["eval", "--image-size", "8"],
     2, "divisible by 16"),
    # ---------------------------------------------------------------- bench data synth
    ("synth-size", NONE, ["data", "synth", "--out", "{t}/d", "--size", "40", "--n", "4"], 2, "divisible by 16"),
    ("synth-mode", NONE, ["data", "synth", "--out", "{t}/d", "--mode", "magic", "--n", "4"], 2, "--mode"),
    ("synth-dose", NONE, ["data", "synth", "--out", "{t}/d", "--dose", "2", "--n", "4"], 2, "--dose"),
    ("synth-out-taken", lambda t, f: ["--out", str(_write(t / "dd" / "keep.txt", "x").parent)],
     ["data", "synth", "--n", "4", "--size", "32"], 2, "dd"),
    ("cache-clear-empty-key", NONE, ["data", "cache", "clear", ""], 2,
     "run `bench data cache clear` without a KEY to remove every entry"),
    ("synth-out-under-file", lambda t, f: ["--out", str(_write(t / "afile", "x") / "sub" / "d")],
     ["data", "synth", "--n", "4", "--size", "32"], 2, "(Not a directory)"),
    # ---------------------------------------------------------------- bench run
    ("run-unknown-grid", NONE, ["run", "--grid", "nosuchgrid", "--out", "{t}/r"], 2, "unknown grid"),
    ("run-grid-raises", lambda t, f: ["--grid", _grid(t, "def cells(base):\n    raise RuntimeError('boom')\n")],
     ["run", "--out", "{t}/r"], 2, "raised RuntimeError: boom"),
    ("run-grid-wrong-type", lambda t, f: ["--grid", _grid(t, "def cells(base):\n    return [1]\n")],
     ["run", "--out", "{t}/r"], 2, "not a Cell"),
    ("run-grid-syntax", lambda t, f: ["--grid", _grid(t, "def cells(base)\n")], ["run", "--out", "{t}/r"], 2,
     "failed to import"),
    ("run-executor", NONE, ["run", "--grid", "smoke", "--out", "{t}/r", "--executor", "pbs"], 2, "--executor 'pbs'"),
    ("run-slurm-option-local", NONE, ["run", "--grid", "smoke", "--out", "{t}/r", "--slurm-time", "5"], 2,
     "only apply with --executor slurm"),
    ("run-slurm-calibrate", NONE, ["run", "--grid", "smoke", "--out", "{t}/r", "--executor", "slurm",
                                   "--calibrate"], 2, "--slurm-time"),
    ("run-stall-negative", NONE, ["run", "--grid", "smoke", "--out", "{t}/r", "--stall-timeout", "-1"], 2,
     "--stall-timeout"),
    # a limit never reached is a watch silently off: refused alike by both runners, dry run or not
    ("run-stall-inf", NONE, ["run", "--grid", "smoke", "--out", "{t}/r", "--stall-timeout", "inf"], 2,
     "--stall-timeout=inf: give a finite number of seconds (>= 0; 0 turns the watch off)"),
    ("run-stall-nan", NONE, ["run", "--grid", "smoke", "--out", "{t}/r", "--stall-timeout", "nan", "--dry-run"], 2,
     "--stall-timeout=nan: give a finite number of seconds (>= 0; 0 turns the watch off)"),
    ("run-slurm-stall-inf", NONE, ["run", "--grid", "smoke", "--out", "{t}/r", "--executor", "slurm",
                                   "--stall-timeout", "inf", "--dry-run"], 2, "0 turns the watch off"),
    ("run-slurm-stall-nan", NONE, ["run", "--grid", "smoke", "--out", "{t}/r", "--executor", "slurm",
                                   "--stall-timeout", "nan"], 2, "--stall-timeout=nan: give a finite number"),
    ("run-slurm-partition", NONE, ["run", "--grid", "smoke", "--out", "{t}/r", "--executor", "slurm",
                                   "--slurm-partition", "gpu a100"], 2, "--slurm-partition='gpu a100'"),
    ("run-slurm-extra", NONE, ["run", "--grid", "smoke", "--out", "{t}/r", "--executor", "slurm",
                               "--slurm-extra=--time=5"], 2, "set --slurm-time instead"),
    ("run-slurm-cluster", NONE, ["run", "--grid", "smoke", "--out", "{t}/r", "--executor", "slurm",
                                 "--slurm-cluster", "pbs"], 2, "choose one of slurm, local, debug"),
    ("run-repeats", NONE, ["run", "--grid", "smoke", "--out", "{t}/r", "--repeats", "0"], 2, "--repeats"),
    ("run-data-missing", NONE, ["run", "--grid", "smoke", "--out", "{t}/r", "--data", "{t}/nodata"], 2, "nodata"),
    ("run-impossible-override", NONE, ["run", "--grid", "table2", "--out", "{t}/r", "--image-size", "40",
                                       "--dry-run"], 2, "divisible by 16"),
    ("run-out-file", lambda t, f: ["--out", str(_write(t / "afile", "x"))], ["run", "--grid", "smoke"], 2,
     "afile is a file, not a folder"),
    ("run-out-under-file", lambda t, f: ["--out", str(_write(t / "afile", "x") / "r")], ["run", "--grid", "smoke"],
     2, "cannot create"),
    # ---------------------------------------------------------------- bench report / status
    ("report-missing", NONE, ["report", "{t}/noresults"], 2, "does not exist"),
    ("report-empty", lambda t, f: [str(_write(t / "empty" / "x.txt", "x").parent)], ["report"], 2,
     "no run folders"),
    ("report-target", lambda t, f: [str(f.parent)], ["report", "--target", "most"], 2, "--target 'most'"),
    ("report-out-under-file", lambda t, f: [str(f.parent), "--out", str(_write(t / "afile", "x") / "rep")],
     ["report"], 2, "afile is a file, not a folder"),
    ("status-missing", NONE, ["status", "{t}/nothing"], 2, "is not a folder"),
    ("unknown-command", NONE, ["trian"], 2, "No such command"),
]


def _unpaired(t: Path) -> str:
    root = _folder_data(t / "unpaired")
    (root / "train" / "LQ" / "s1.npy").unlink()
    return str(root)


def _val_size(t: Path) -> str:
    """Train slices of 64 px, val slices of 32 px: the training size's MS-SSIM setting does not fit val."""
    root = _folder_data(t / "valsize", shape=(64, 64), n=4)
    for kind in ("HQ", "LQ"):
        for i in range(4):
            np.save(root / "val" / kind / f"s{i}.npy", np.zeros((32, 32), np.float32))
    return str(root)


def _overflow(t: Path) -> str:
    root = _folder_data(t / "overflow")
    big = np.zeros((32, 32), np.float64)
    big[0, 0] = 1e300
    np.save(root / "train" / "HQ" / "s1.npy", big)
    return str(root)


def _torn_summary(t: Path, finished: Path) -> Path:
    run = t / "torn"
    run.mkdir()
    for name in ("config.json", "epochs.jsonl", "env.json", "ckpt.pt"):
        (run / name).write_bytes((finished / name).read_bytes())
    (run / "summary.json").write_text('{"status": "runn')
    return run


def _corrupt_run(t: Path, finished: Path) -> Path:
    run = t / "corrupt"
    run.mkdir()
    for name in ("config.json", "epochs.jsonl", "env.json"):
        (run / name).write_bytes((finished / name).read_bytes())
    (run / "summary.json").write_text(json.dumps({"status": "running", "error": None}))
    (run / "ckpt.pt").write_bytes(b"\x80\x04 not a checkpoint")
    return run


def _damaged_config(t: Path, finished: Path, config: bytes) -> Path:
    """A run stopped after its checkpoint whose config.json (what `--resume` alone reads) holds `config`."""
    run = t / "damaged-config"
    run.mkdir()
    for name in ("epochs.jsonl", "env.json", "ckpt.pt"):
        (run / name).write_bytes((finished / name).read_bytes())
    (run / "summary.json").write_text(json.dumps({"status": "running", "error": None}))
    (run / "config.json").write_bytes(config)
    return run


def _killed_at_config(t: Path) -> Path:
    """A `bench train` folder killed while writing its first record: its lock and a temporary config.json."""
    run = t / "killed"
    run.mkdir()
    (run / ".bench-train.lock").write_text("")
    (run / ".config.json.k2ti0v2.tmp").write_text('{"batch_size": 2, "chan')
    return run


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("name", "setup", "args", "code", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, finished, capsys, monkeypatch, name, setup, args,
                                                   code, needle):
    monkeypatch.chdir(tmp_path)
    extra = setup(tmp_path, finished)
    argv = [a.replace("{t}", str(tmp_path)) for a in args] + extra
    before_t, before_f = _digest(tmp_path), _digest(finished)
    try:
        main(argv)
        got = 0
    except SystemExit as e:
        got = int(e.code or 0)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert got == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    # nothing that existed before was changed (new empty folders aside, no new file either)
    after_t = _digest(tmp_path)
    assert {k: v for k, v in after_t.items() if k in before_t} == before_t
    assert set(after_t) - set(before_t) == set(), set(after_t) - set(before_t)
    assert _digest(finished) == before_f
    assert read_json(finished / "summary.json")["status"] == "ok"


def test_the_catalog_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert {c[2][0] for c in CASES} >= {"train", "eval", "data", "run", "report"}


def test_a_real_subprocess_gives_the_same_one_line(tmp_path) -> None:
    res = subprocess.run([sys.executable, "-m", "bench.cli", "train", "--out", str(tmp_path / "o"), "--lr", "nan"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 2 and res.stderr.count("error:") == 1 and "Traceback" not in res.stderr


def _data_with(t: Path, hq: dict[str, bytes | None], lq: dict[str, bytes | None]) -> Path:
    """_folder_data plus extra train files (None: an array of zeros) under HQ and LQ."""
    root = _folder_data(t / "audit", n=4)
    for kind, files in (("HQ", hq), ("LQ", lq)):
        for name, data in files.items():
            path = root / "train" / kind / name
            if data is None:
                np.save(path, np.zeros((32, 32), np.float32))
            else:
                path.write_bytes(data)
    return root


# (id, setup(tmp) -> extra args, args, text the error line must hold, text it must not hold)
DATA_AUDIT: list[tuple[str, Callable[[Path], list[str]], list[str], str, str]] = [
    ("train-data-names-shifted", lambda t: ["--data", str(_data_with(t, {"s4.npy": None}, {"s5.npy": None}))],
     ["train", "--out", "{t}/o", *TINY], "HQ only: s4.npy; LQ only: s5.npy", "sorted position;"),
    ("train-data-npy-garbage", lambda t: ["--data", str(_data_with(t, {"x4.npy": b"\x93NUMPY junk"},
                                                                      {"x4.npy": None}))],
     ["train", "--out", "{t}/o", *TINY], "x4.npy: not a readable NumPy .npy image", "allow_pickle"),
    ("train-data-dcm-garbage", lambda t: ["--data", str(_data_with(t, {"x4.dcm": b"not a dicom"},
                                                                      {"x4.npy": None}))],
     ["train", "--out", "{t}/o", *TINY], "x4.dcm: not a readable DICOM image", "force=True"),
    ("train-data-tif-garbage", lambda t: ["--data", str(_data_with(t, {"x4.tif": b"II*\x00garbage"},
                                                                      {"x4.npy": None}))],
     ["train", "--out", "{t}/o", *TINY], "x4.tif: not a readable TIFF image", "holds 0 images"),
    ("synth-no-val", lambda t: [], ["data", "synth", "--out", "{t}/d", "--n", "4", "--size", "32", "--val-frac", "0",
                                    "--test-frac", "0"], "--val-frac 0", "Traceback"),
    ("cache-clear-unknown", lambda t: [], ["data", "cache", "clear", "deadbeef"], "'deadbeef'", "freed"),
]


@pytest.mark.parametrize(("name", "setup", "args", "needle", "absent"), DATA_AUDIT, ids=[c[0] for c in DATA_AUDIT])
def test_data_audit_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path, capsys, monkeypatch, name, setup,
                                                                     args, needle, absent):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DDNET_BENCH_CACHE", str(tmp_path / "cache"))
    extra = setup(tmp_path)
    before = _digest(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([a.replace("{t}", str(tmp_path)) for a in args] + extra)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0] and absent not in lines[0], lines[0]
    assert _digest(tmp_path) == before


def test_a_corrupt_tif_gives_no_stray_log_line_in_a_real_process(tmp_path) -> None:
    root = _data_with(tmp_path, {"x4.tif": b"II*\x00garbage"}, {"x4.npy": None})
    res = subprocess.run([sys.executable, "-m", "bench.cli", "train", "--out", str(tmp_path / "o"), *TINY_NET,
                          "--data", str(root)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "COLUMNS": "200"})
    print(res.stderr)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert [ln for ln in res.stderr.splitlines() if ln.strip()] == [ln for ln in res.stderr.splitlines()
                                                                     if ln.startswith("error:")]
    assert res.stderr.count("error:") == 1 and "not a readable TIFF image" in res.stderr
