"""Options that shape synthetic data (--image-size, --n-train, --n-val, --synth-mode, ...) given beside a data
folder: they do nothing there, and used to be dropped without a word (a user asking for 64 px trained at the
folder's 32 px). `bench train`, `bench eval` and `bench run` warn once, naming them; nothing else changes."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from bench.grids import registry
from bench.planning import Overrides, plan_grid
from bench.store import read_json
from tests.test_eval import run_cli

NET = ["--base-width", "4", "--growth", "4", "--bottleneck", "8", "--batch-size", "4", "--device", "cpu",
       "--num-workers", "0", "--quiet", "--epochs", "1"]


def npy_folder(root: Path) -> Path:
    """train/ (8 pairs) and val/ (4 pairs) of 32 px .npy slices in HU."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for kind in ("HQ", "LQ"):
            (root / split / kind).mkdir(parents=True)
            for i in range(n):
                np.save(root / split / kind / f"s{i:02d}.npy", rng.uniform(-1000, 400, (32, 32)).astype(np.float32))
    return root


def _ours(caught) -> list[str]:
    return [str(w.message) for w in caught if "synthetic data" in str(w.message)]


def test_train_warns_of_synthetic_options_beside_a_data_folder(tmp_path, capsys) -> None:
    data = npy_folder(tmp_path / "data")
    with pytest.warns(UserWarning) as caught:
        code, _, err = run_cli(["train", "--out", str(tmp_path / "a"), "--data", str(data), "--image-size", "64",
                                "--n-train", "4", "--dose", "0.1", *NET], capsys)
    assert code == 0, err
    assert _ours(caught) == [f"--image-size, --n-train, --dose only shape synthetic data: the slices in {data} are "
                             "used as they are, at their own size and count; drop them."]
    with warnings.catch_warnings(record=True) as quiet:  # the folder alone, or the options on synthetic data
        warnings.simplefilter("always")
        assert run_cli(["train", "--out", str(tmp_path / "b"), "--data", str(data), *NET], capsys)[0] == 0
        assert run_cli(["train", "--out", str(tmp_path / "c"), "--image-size", "32", "--n-train", "8",
                        "--n-val", "4", *NET], capsys)[0] == 0
    assert _ours(quiet) == []
    summary = read_json(tmp_path / "a" / "summary.json")  # what it says is so: the folder's 32 px slices, all 4 val
    assert summary["image_side"] == 32 and len(summary["val_slices"]) == 4

    with pytest.warns(UserWarning) as caught:
        code, _, err = run_cli(["eval", "--checkpoint", str(tmp_path / "b" / "ckpt.pt"), "--data", str(data),
                                "--image-size", "64", "--out", str(tmp_path / "e"), "--device", "cpu"], capsys)
    assert code == 0, err
    assert _ours(caught) == [f"--image-size only shapes synthetic data: the slices in {data} are used as they "
                             "are, at their own size and count; drop it."]
    assert read_json(tmp_path / "e" / "eval.json")["n_slices"] == 4


def test_run_warns_of_synthetic_options_beside_a_data_folder(tmp_path) -> None:
    data = npy_folder(tmp_path / "data")
    with pytest.warns(UserWarning) as caught:
        plan_grid(registry()["table1"], Overrides(data=str(data), n_train=4, n_val=2))
    assert _ours(caught) == [f"--n-train, --n-val only shape synthetic data: the slices in {data} are used as "
                             "they are, at their own size and count; drop them."]
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        plan_grid(registry()["table1"], Overrides(data=str(data), epochs=1))
        plan_grid(registry()["table1"], Overrides(n_train=4, n_val=2))
    assert _ours(quiet) == []
