"""Planning a grid run: folder hashes, code version, repeats and their order, the recorded grid.json."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import ddnet
from bench import planning
from bench.grids import Cell, Grid, registry
from bench.planning import (
    Overrides,
    cell_hash,
    code_version,
    dry_run_refusal,
    exclusive,
    plan_grid,
    run_order,
)
from bench.processes import run_grid
from bench.store import read_json
from ddnet.config import TrainConfig
from ddnet.errors import UserError
from tests.fake_trainer import make_grid, quiet, tiny_base

REPO = Path(__file__).resolve().parent.parent


def test_hash_covers_config_and_code_version():
    cfg = tiny_base()
    assert cell_hash(cfg, "1") == cell_hash(TrainConfig.from_dict(cfg.to_dict()), "1")
    assert cell_hash(cfg, "1") != cell_hash(cfg.replace(lr=2e-4), "1")
    assert cell_hash(cfg, "1") != cell_hash(cfg, "2")
    v = code_version()
    assert v.startswith("0.") and "dirty" not in v
    if (REPO / ".git").exists():
        assert "+g" in v


def test_code_version_is_the_package_version_and_this_checkouts_commit():
    v = code_version()
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        assert v == f"{ddnet.__version__}+g{head[:12]}"
    else:
        assert v == ddnet.__version__


def test_code_version_ignores_a_commit_that_git_did_not_give(monkeypatch):
    # git_state falls back to DDNET_BENCH_GIT_COMMIT outside our checkout; cells must not be re-keyed by it
    state = {"git_commit": "0123456789abcdef", "git_dirty": None, "git_dirty_files": None,
             "git_commit_source": "DDNET_BENCH_GIT_COMMIT"}
    monkeypatch.setattr(planning, "git_state", lambda repo=None: state)
    code_version.cache_clear()
    try:
        assert code_version() == ddnet.__version__
    finally:
        code_version.cache_clear()


def test_repeats_interleave_rounds_with_seeds_and_reuse_the_recorded_order(tmp_path, fake):
    cmd, launched = fake
    grid = make_grid(4)
    planned = plan_grid(grid, Overrides(seed=7), repeats=3)
    assert len(planned) == 12
    assert {p.config.seed for p in planned} == {7, 8, 9}
    assert all(f"-r{p.repeat}-" in p.folder and p.config.seed == 7 + p.repeat for p in planned)
    order = run_order(planned, seed=7)
    assert order == run_order(planned, seed=7)  # seeded
    rounds = [{p.folder for p in planned if p.repeat == k} for k in range(3)]
    assert [set(order[4 * k:4 * k + 4]) for k in range(3)] == rounds  # round by round
    shuffles = [[f.split("-r")[0] for f in order[4 * k:4 * k + 4]] for k in range(3)]
    assert any(s != ["c0", "c1", "c2", "c3"] for s in shuffles)

    out = tmp_path / "out"
    results = run_grid(grid, out, Overrides(seed=7), repeats=3, command=cmd, console=quiet())
    assert [c["folder"] for c in launched()] == order == read_json(out / "grid.json")["order"]
    assert len(results) == 12 and all(r.status == "ok" for r in results)
    with pytest.raises(UserError, match=str(out)):
        run_grid(grid, out, Overrides(seed=7), repeats=2, command=cmd, console=quiet())
    with pytest.raises(UserError, match="drop --no-resume to continue it"):
        run_grid(grid, out, Overrides(seed=7), repeats=3, resume=False, command=cmd, console=quiet())



def test_overrides_set_the_data_sizes_for_short_runs_of_paper_grids():
    planned = plan_grid(registry()["table2"], Overrides(epochs=2, n_train=64, n_val=8, image_size=64))
    assert {(p.config.data.n_train, p.config.data.n_val, p.config.data.image_size, p.config.epochs)
            for p in planned} == {(64, 8, 64, 2)}
    assert Overrides(n_val=8).fields() == {"data.n_val": 8}


def test_a_changed_grid_file_is_refused_naming_the_cells_that_differ(tmp_path):
    """A cell added to the grid file and one whose config changed: the refusal used to say only that the cell
    set differs, not which cells, so the user could not tell an edited grid file from mistyped options."""
    record = {"grid": "mine", "code_version": "v1", "cells": ["dense-11111111", "random-22222222"],
              "order": ["dense-11111111", "random-22222222"]}
    planned = ["dense-11111111", "random-33333333", "topk-44444444"]
    with pytest.raises(UserError) as err:
        planning.check_recorded(tmp_path, record, planned, "v1")
    msg = str(err.value)
    assert ("the grid or its options changed (planned now, not recorded: random-33333333, topk-44444444; "
            "recorded, not planned now: random-22222222): run it with the grid file and options") in msg
    many = [f"c{i}-0000000{i}" for i in range(5)]
    with pytest.raises(UserError, match=r"planned now, not recorded: c0-00000000, c1-00000001, c2-00000002 and 2 "
                                        r"more\)"):
        planning.check_recorded(tmp_path, {**record, "cells": [], "order": []}, many, "v1")
    assert planning.check_recorded(tmp_path, record, record["cells"][::-1], "v1") == record["order"]


def _grid(cells) -> Grid:
    return Grid(name="fake", description="fake grid", source="test", cells_fn=cells, defaults_fn=tiny_base)


def test_a_label_edited_in_the_grid_file_reaches_cell_json_and_grid_json(tmp_path, fake):
    """The label is not part of a cell's folder name, so an edited label used to leave the old one in cell.json
    and grid.json, where the report and `bench status` read it."""
    cmd, _ = fake

    def labelled(label: str) -> Grid:
        return _grid(lambda base: [Cell("c0", label, {"lr": base.lr}, base),
                                   Cell("c1", "second", {"lr": 2e-4}, base.replace(lr=2e-4))])

    out = tmp_path / "out"
    run_grid(labelled("old words"), out, Overrides(), command=cmd, console=quiet())
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    before = read_json(out / "grid.json")
    assert [c["label"] for c in before["cells"]] == ["old words", "second"]
    # each cell's epochs, which `bench status` shows for a cell the runner has not reached
    assert [c["epochs"] for c in before["cells"]] == [
        read_json(out / c["folder"] / "config.request.json")["epochs"] for c in before["cells"]]
    results = run_grid(labelled("new words"), out, Overrides(), command=cmd, console=quiet())
    assert [r.status for r in results] == ["ok", "ok"]  # finished cells, not rerun
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == folders
    after = read_json(out / "grid.json")
    assert [c["label"] for c in after["cells"]] == ["new words", "second"]
    assert {k: v for k, v in after.items() if k != "cells"} == {k: v for k, v in before.items() if k != "cells"}
    c0 = next(f for f in folders if f.startswith("c0-"))
    assert read_json(out / c0 / "cell.json")["label"] == "new words"
    (out / c0 / "cell.json").write_text("{not json")  # an unreadable record is made again, not kept
    planning.prepare_cell(plan_grid(labelled("new words"))[0], out, "fake", code_version())
    assert read_json(out / c0 / "cell.json")["label"] == "new words"


def test_a_rerun_mends_a_finished_cells_damaged_or_lost_cell_json(tmp_path, fake):
    """A finished cell is not prepared again by any executor, so its damaged cell.json stayed damaged (status
    said 'unreadable: cell.json', the report lost its label) until a label in the grid file changed."""
    cmd, _ = fake
    grid = _grid(lambda base: [Cell("c0", "first", {"lr": base.lr}, base),
                               Cell("c1", "second", {"lr": 2e-4}, base.replace(lr=2e-4))])
    out = tmp_path / "out"
    run_grid(grid, out, Overrides(), command=cmd, console=quiet())
    c0, c1 = (next(p for p in out.iterdir() if p.name.startswith(f"{c}-")) for c in ("c0", "c1"))
    good = read_json(c0 / "cell.json")
    (c0 / "cell.json").write_text("{not json")
    (c1 / "cell.json").unlink()
    results = run_grid(grid, out, Overrides(), command=cmd, console=quiet())
    assert [r.status for r in results] == ["ok", "ok"]  # finished, not rerun
    assert read_json(c0 / "cell.json") == good
    assert read_json(c1 / "cell.json")["label"] == "second"


def test_cells_that_train_the_same_config_are_warned_of_once(recwarn):
    """Two cells with one config ran twice with no word: a copy-paste slip in a grid file, or repeats by hand."""
    twins = _grid(lambda base: [Cell("a", "a", {}, base), Cell("b", "b", {}, base.replace(lr=base.lr)),
                                Cell("c", "c", {}, base.replace(lr=2e-4))])
    with pytest.warns(UserWarning, match=r"grid 'fake': 1 cell\(s\) train the same config as an earlier one "
                                         r"\('b' = 'a'\); each still runs .* use --repeats"):
        planned = plan_grid(twins, repeats=2)
    assert len(planned) == 6  # both still run; the repeats (other seeds) are no twins
    recwarn.clear()
    plan_grid(make_grid(3), repeats=2)
    plan_grid(registry()["demo"])
    assert not [w for w in recwarn if "same config" in str(w.message)]
    with pytest.warns(UserWarning, match=r"as an earlier one with the options given \('random-hybrid1' = "
                                         r"'random-last-epoch'\)"):
        plan_grid(registry()["demo"], Overrides(epochs=2))  # half of 2 epochs dense is all but the last


def test_a_dry_run_into_a_folder_another_bench_run_holds_says_the_run_would_stop(tmp_path):
    """While a grid ran, a dry run into its --out planned it with no word that `bench run` there would be
    refused ('another `bench run` is using ...'), as it says for a folder of another cell set."""
    out = tmp_path / "o"
    with exclusive(out):  # what the running `bench run` holds (an flock: another open file here conflicts too)
        assert dry_run_refusal(out, []) == (f"note: `bench run` would stop here: another `bench run` is using {out}; "
                                            "wait for it or pick another --out.")
    assert dry_run_refusal(out, []) is None
