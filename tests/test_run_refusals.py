"""`bench run` refuses before it writes anything: an --out in a run or another grid's folder, a batch larger
than the training set, --device cuda without a GPU, factors JSON cannot hold; the dry run refuses as the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from bench import cmd_run
from bench.cli import app
from bench.grids import load_grid
from bench.planning import Overrides, code_version, plan_grid
from bench.processes import CellResult
from tests.test_cmd_run import tiny_grid_file

ONE_CELL = "[Cell('only', 'only', standard_factors(base), base)]"


def _files(root: Path) -> list[str]:
    """Every path under root but the run's lock (an empty file the lock lives on, in a folder that existed)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != ".bench-run.lock")


def _refused(args: list[str], root: Path, needle: str) -> None:
    """The run and its dry run: exit 2, one `error:` line holding `needle`, no file added under `root`."""
    before = _files(root)
    for dry in ([], ["--dry-run"]):
        res = CliRunner().invoke(app, ["run", *args, *dry])
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2, res.output
        assert lines[-1].startswith("error: ") and needle in lines[-1], res.output
        assert not any(line.startswith("Traceback") for line in lines)
        assert _files(root) == before


def test_an_out_in_a_run_folder_or_in_another_grid_is_refused(tmp_path: Path) -> None:
    grid = tiny_grid_file(tmp_path, "cpu", ONE_CELL)
    cell = tmp_path / "runs" / "a" / "dense-0123abcd"
    cell.mkdir(parents=True)
    (cell / "cell.json").write_text("{}")
    (tmp_path / "runs" / "a" / "grid.json").write_text("{}")
    trained = tmp_path / "trained"  # what `bench train` leaves
    trained.mkdir()
    (trained / "config.json").write_text("{}")
    (trained / "summary.json").write_text("{}")
    _refused(["--grid", str(grid), "--out", str(cell)], tmp_path, "is a run folder (it holds cell.json)")
    _refused(["--grid", str(grid), "--out", str(cell / "sub")], tmp_path, f"lies inside {cell}, which is a run folder")
    _refused(["--grid", str(grid), "--out", str(trained)], tmp_path, "is a run folder (it holds summary.json)")
    _refused(["--grid", str(grid), "--out", str(tmp_path / "runs" / "a" / "inner")], tmp_path,
             "another grid's folder")


def test_a_project_folder_with_a_config_json_is_no_run_folder(tmp_path: Path) -> None:
    grid = tiny_grid_file(tmp_path, "cpu", ONE_CELL)
    (tmp_path / "config.json").write_text("{}")  # a user's own file above --out
    res = CliRunner().invoke(app, ["run", "--grid", str(grid), "--out", str(tmp_path / "runs"), "--dry-run"])
    assert res.exit_code == 0 and "to run" in res.output


def test_a_batch_larger_than_the_training_set_is_refused_up_front(tmp_path: Path) -> None:
    grid = tiny_grid_file(tmp_path, "cpu", ONE_CELL)  # 8 training slices
    _refused(["--grid", str(grid), "--out", str(tmp_path / "o"), "--batch-size", "100"], tmp_path,
             "grid 'g', cell 'only': the training set has 8 slices, fewer than --batch-size 100")
    _refused(["--grid", str(grid), "--out", str(tmp_path / "o"), "--n-train", "2"], tmp_path,
             "the training set has 2 slices, fewer than --batch-size 4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_device_cuda_without_a_gpu_is_refused_not_skipped(tmp_path: Path) -> None:
    grid = tiny_grid_file(tmp_path, "cpu", ONE_CELL)
    res = CliRunner().invoke(app, ["run", "--grid", str(grid), "--out", str(tmp_path / "o"), "--device", "cuda"])
    assert res.exit_code == 2 and "--device cuda was asked for but no CUDA device is visible" in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("factor", "kind"), [("numpy.float32(0.01)", "float32"), ("object()", "object")])
def test_a_factor_json_cannot_hold_is_refused(tmp_path: Path, factor: str, kind: str) -> None:
    grid = tiny_grid_file(tmp_path, "cpu", f"[Cell('only', 'only', {{'lr': {factor}}}, base)]")
    grid.write_text("import numpy\n" + grid.read_text())
    _refused(["--grid", str(grid), "--out", str(tmp_path / "o")], tmp_path,
             f"grid 'g' ({grid}), cell 'only': factor 'lr' is a {kind}, which JSON cannot hold")


@pytest.mark.parametrize("old_code", [True, False])
def test_a_folder_of_another_cell_set_is_refused_and_the_dry_run_says_so(tmp_path: Path, old_code: bool) -> None:
    grid = tiny_grid_file(tmp_path, "cpu", ONE_CELL)
    out = tmp_path / "o"
    out.mkdir()
    version = "0.0+gdeadbeef0000" if old_code else code_version()
    (out / "grid.json").write_text(json.dumps({"grid": "g", "code_version": version, "cells": ["only-0000"],
                                               "order": ["only-0000"]}))
    needle = ("it was planned by code 0.0+gdeadbeef0000 and this is" if old_code
              else "recorded, not planned now: only-0000): run it with the grid file and options it was started with")
    before = _files(tmp_path)
    res = CliRunner().invoke(app, ["run", "--grid", str(grid), "--out", str(out)])
    assert res.exit_code == 2 and res.output.startswith("error: ") and needle in res.output
    # a dry run plans other options into a grid's folder to estimate them from its epochs: it plans, and warns
    res = CliRunner().invoke(app, ["run", "--grid", str(grid), "--out", str(out), "--dry-run"])
    assert res.exit_code == 0 and "note: `bench run` with these options would stop here: " in res.output
    assert needle in " ".join(res.output.split())
    assert _files(tmp_path) == before


def test_no_resume_into_a_grids_folder_is_refused_and_the_dry_run_says_so(tmp_path: Path) -> None:
    grid = tiny_grid_file(tmp_path, "cpu", ONE_CELL)
    out = tmp_path / "o"
    out.mkdir()
    folders = [p.folder for p in plan_grid(load_grid(str(grid)), Overrides(), 1)]  # the same cells: no other refusal
    (out / "grid.json").write_text(json.dumps({"grid": "g", "code_version": code_version(), "cells": folders,
                                               "order": folders}))
    needle = f"{out} already holds a run of this grid; drop --no-resume to continue it, or pick another --out."
    before = _files(tmp_path)
    res = CliRunner().invoke(app, ["run", "--grid", str(grid), "--out", str(out), "--no-resume"])
    assert res.exit_code == 2 and needle in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["run", "--grid", str(grid), "--out", str(out), "--no-resume", "--dry-run"])
    assert res.exit_code == 0 and "note: `bench run` with these options would stop here: " in res.output
    assert needle in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["run", "--grid", str(grid), "--out", str(out), "--dry-run"])  # resumed: no note
    assert res.exit_code == 0 and "would stop here" not in res.output
    assert _files(tmp_path) == before


def test_estimate_from_a_folder_that_is_not_there_is_refused(tmp_path: Path) -> None:
    grid = tiny_grid_file(tmp_path, "cpu", ONE_CELL)
    _refused(["--grid", str(grid), "--out", str(tmp_path / "o"), "--estimate-from", str(tmp_path / "nope")],
             tmp_path, f"--estimate-from {tmp_path / 'nope'} is not a folder")


@pytest.mark.parametrize(("status", "hint"), [("failed", True), ("stopped", False)])
def test_the_closing_line_names_retry_failed_for_failed_cells(tmp_path: Path, status: str, hint: bool) -> None:
    console = Console(record=True, width=200)
    cells = [CellResult("a-1", "a", "ok", "ran"), CellResult("b-2", "b", status, "ran", error="boom")]
    with pytest.raises(typer.Exit) as e:
        cmd_run._finish(console, cells, tmp_path)
    assert e.value.exit_code == 1
    text = console.export_text()
    assert f"1 cell(s) did not finish ok; see their train.log under {tmp_path}." in text
    assert ("add --retry-failed to resume them from their last checkpoint" in " ".join(text.split())) is hint


@pytest.mark.parametrize(("damage", "why"), [(b"\x86\xff" * 50, "UnicodeDecodeError"),
                                             (b'{"grid": "tiny", "ce', "JSONDecodeError")])
def test_a_damaged_grid_json_is_one_line_not_a_traceback(tmp_path: Path, damage: bytes, why: str) -> None:
    """grid.json torn or filled with garbage (a bad disk, another writer): `bench run` into its folder ended in a
    traceback. It is one line naming the file and the fix, and nothing is written (the dry run plans and closes
    with that line as a note)."""
    grid = tiny_grid_file(tmp_path, "cpu", ONE_CELL)
    out = tmp_path / "runs"
    out.mkdir()
    (out / "grid.json").write_bytes(damage)
    res = CliRunner().invoke(app, ["run", "--grid", str(grid), "--out", str(out)])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and not any(line.startswith("Traceback") for line in lines), res.output
    assert lines[-1].startswith(f"error: {out / 'grid.json'} is damaged ({why}); it records the grid's cells"), lines
    assert "restore it, or run the grid into a new --out" in lines[-1]
    assert _files(out) == ["grid.json"] and (out / "grid.json").read_bytes() == damage
    dry = CliRunner().invoke(app, ["run", "--grid", str(grid), "--out", str(out), "--dry-run"])
    assert dry.exit_code == 0, dry.output  # it plans, and closes with the run's refusal
    assert f"note: `bench run` would stop here: {out / 'grid.json'} is damaged ({why})" in " ".join(
        dry.output.split()), dry.output
    assert _files(out) == ["grid.json"] and (out / "grid.json").read_bytes() == damage
