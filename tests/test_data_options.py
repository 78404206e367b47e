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
from ddnet.errors import UserError
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


def test_a_data_folder_too_small_for_the_batch_names_the_folder_not_n_train(tmp_path, capsys) -> None:
    """With --data DIR the refusal said 'add data (--n-train)', an option a data folder ignores (and warns of)."""
    data = npy_folder(tmp_path / "data")  # 8 training pairs
    args = ["train", "--out", str(tmp_path / "a"), "--data", str(data), *NET, "--batch-size", "16"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err == (f"error: the training set has 8 slices, fewer than --batch-size 16; lower "
                                 f"--batch-size or add slice pairs to {data / 'train'}.\n")
    assert not (tmp_path / "a").exists()
    code, _, err = run_cli(["train", "--out", str(tmp_path / "b"), "--image-size", "32", "--n-train", "8",
                            "--n-val", "4", *NET, "--batch-size", "16"], capsys)
    assert code == 2 and err.endswith("lower --batch-size or add data (--n-train).\n")  # synthetic: it grows


def test_a_grid_over_a_data_folder_too_small_for_the_batch_names_the_folder(tmp_path) -> None:
    """A grid's refusal said 'add data (--n-train)' for a data folder too, an option the folder ignores."""
    data = npy_folder(tmp_path / "data")  # 8 training pairs
    with pytest.raises(UserError) as e:
        plan_grid(registry()["table1"], Overrides(data=str(data), batch_size=16))
    assert str(e.value).endswith(f"the training set has 8 slices, fewer than --batch-size 16; lower --batch-size or "
                                 f"add slice pairs to {data / 'train'}.")
    with pytest.raises(UserError, match=r"lower --batch-size or add data \(--n-train\)\.$"):
        plan_grid(registry()["table1"], Overrides(n_train=8, batch_size=16))  # synthetic data: it grows
