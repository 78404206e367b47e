"""Grids in ablations/: expansion, counts, names, static validity, and `bench grids` / `bench run --dry-run`."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ablations
from bench.cli import app
from bench.grids import Cell, Grid, load_grid, paper_base, registry, slug
from bench.planning import Overrides, plan_grid
from ddnet.config import TrainConfig
from ddnet.errors import UserError

EXPECTED_COUNTS = {
    "table1": 2, "table2": 4, "fig4c": 11, "fig8a": 16, "fig8b": 16, "fig9": 2, "full": 32, "smoke": 32,
    "gpu_quick": 11, "speed": 14, "demo": 6,
}

TINY_GRID = '''
from bench.grids import Cell, standard_factors
from ddnet.config import DataConfig, ModelConfig, TrainConfig

NAME = "tiny"
DESCRIPTION = "two tiny cells"


def defaults():
    return TrainConfig(model=ModelConfig(base_width=4, growth=4, bottleneck=8),
                       data=DataConfig(image_size=32, n_train=8, n_val=2), epochs=2, batch_size=4,
                       num_workers=0, device="cpu")


def cells(base):
    other = base.replace(**{"sparsity.kind": "random", "sparsity.dense_epochs": 1})
    return [Cell("dense", "dense", standard_factors(base), base),
            Cell("random", "random", standard_factors(other), other)]
'''


@pytest.fixture(scope="module")
def grids():
    return registry()


def test_registry_holds_every_module_in_ablations(grids):
    modules = {p.stem for p in (Path(__file__).parent.parent / "ablations").glob("*.py") if not p.stem.startswith("_")}
    assert set(grids) == modules
    assert set(EXPECTED_COUNTS) <= set(grids)


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_grid_expands_to_expected_count_with_unique_names(grids, name):
    cells = grids[name].cells()
    assert len(cells) == EXPECTED_COUNTS[name]
    names = [c.name for c in cells]
    assert len(set(names)) == len(names)
    for c in cells:
        assert isinstance(c, Cell) and isinstance(c.config, TrainConfig)
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*", c.name)
        assert c.label and c.factors
        assert TrainConfig.from_dict(c.config.to_dict()) == c.config  # valid: it re-validates on the way in


def test_every_grid_also_expands_on_small_overrides(grids):
    # what CI does with the paper grids: a few epochs on small images must stay valid
    for name, grid in grids.items():
        planned = plan_grid(grid, Overrides(epochs=2, image_size=64, n_train=8, batch_size=4))
        assert planned, name
        for p in planned:
            assert TrainConfig.from_dict(p.config.to_dict()) == p.config
            assert p.config.epochs == 2 and p.config.data.image_size == 64


PAPER_GRIDS = ("table1", "table2", "fig4c", "fig8a", "fig8b", "fig9", "full")
"""The grids on `paper_base()`: the paper's regime by default."""


def test_paper_grids_keep_paper_defaults_and_vary_only_their_factors(grids):
    base = paper_base()
    assert (base.epochs, base.batch_size, base.data.image_size, base.data.source) == (50, 32, 512, "synthetic")
    # the paper's public code: 5120 training and 784 validation slices, so 160 steps per epoch at batch 32
    assert (base.data.n_train, base.data.n_val) == (5120, 784)
    assert base.data.n_train // base.batch_size == 160
    for name in PAPER_GRIDS:
        assert grids[name].defaults_fn is None, name  # on paper_base(), not a grid's own defaults
        for c in grids[name].cells():
            cfg = c.config
            assert (cfg.epochs, cfg.data.image_size, cfg.data.n_train, cfg.data.n_val) == (50, 512, 5120, 784), name
            assert cfg.batch_size == (1 if name == "table1" else 32), name
    table1 = grids["table1"].cells()
    assert {c.config.batch_size for c in table1} == {1}
    assert [(c.config.sparsity.kind, c.config.sparsity.dense_epochs) for c in table1] == [("none", 0), ("random", 0)]
    assert table1[1].config.sparsity.amount == 0.5

    table2 = grids["table2"].cells()
    assert [c.config.sparsity.kind for c in table2] == ["none", "random", "structured", "topk"]
    assert all(c.config.sparsity.dense_epochs == 25 for c in table2[1:])
    assert all(c.config.batch_size == 32 and c.config.epochs == 50 for c in table2)


def test_fig4c_splits_scale_with_epochs(grids):
    g = grids["fig4c"]
    cells = g.cells()
    assert [c.factors["dense_epochs"] for c in cells] == list(range(0, 51, 5))
    assert [c.config.sparsity.kind for c in cells] == ["random"] * 10 + ["none"]
    small = g.cells(paper_base().replace(epochs=6))
    assert [c.factors["dense_epochs"] for c in small] == [0, 1, 2, 3, 4, 5, 6]
    assert small[-1].config.sparsity.kind == "none"
    odd = g.cells(paper_base().replace(epochs=25))  # step 2, and the all-dense end point is kept
    assert [c.factors["dense_epochs"] for c in odd][-2:] == [24, 25]


def test_fig8_variants_toggle_one_or_more_optimizations(grids):
    a = grids["fig8a"].cells()
    assert {c.factors["variant"] for c in a} == {"baseline", "MP", "DoLL", "GCO"}
    mp = [c for c in a if c.factors["variant"] == "MP"]
    assert len(mp) == 4 and all(c.config.precision == "amp-fp16" and c.config.loader == "host" for c in mp)
    gco = [c for c in a if c.factors["variant"] == "GCO"]
    assert all(c.config.graphs == "cuda-graph" and c.config.precision == "fp32" for c in gco)
    assert {c.config.sparsity.kind for c in a} == {"none", "random", "structured", "topk"}
    b = grids["fig8b"].cells()
    all3 = [c for c in b if c.factors["variant"] == "MP+DoLL+GCO"]
    assert len(all3) == 4
    assert all((c.config.precision, c.config.loader, c.config.graphs) == ("amp-fp16", "device", "cuda-graph")
               for c in all3)


def test_fig9_profiles_both_loaders(grids):
    cells = grids["fig9"].cells()
    assert [c.config.loader for c in cells] == ["host", "device"]
    assert all(c.config.profile_steps > 0 and c.config.sparsity.kind == "none" for c in cells)


def test_full_and_smoke_are_factorials(grids):
    full = grids["full"].cells()
    combos = {(c.config.precision, c.config.loader, c.config.graphs, c.config.sparsity.kind) for c in full}
    assert len(combos) == 32
    assert {c.config.precision for c in full} == {"fp32", "amp-fp16"}
    assert all(c.config.sparsity.dense_epochs == 25 for c in full if c.config.sparsity.kind != "none")
    smoke = grids["smoke"].cells()
    assert {c.config.precision for c in smoke} == {"fp32", "amp-bf16"}
    cfg = smoke[0].config
    assert (cfg.data.image_size, cfg.data.n_train, cfg.epochs, cfg.batch_size, cfg.num_workers) == (64, 16, 4, 4, 0)
    assert (cfg.model.base_width, cfg.model.growth, cfg.model.bottleneck) == (4, 4, 8)
    assert all(c.config.sparsity.dense_epochs == 2 for c in smoke if c.config.sparsity.kind != "none")


def test_slug():
    assert slug("amp-fp16", "Host", None, "MP+DoLL", 25) == "amp-fp16-host-mp-doll-25"


def test_overrides_beat_fixed_settings_but_not_factors(grids):
    planned = plan_grid(grids["table1"], Overrides(batch_size=4, epochs=3, image_size=64))
    assert {p.config.batch_size for p in planned} == {4}  # table1 fixes batch 1; the user's option wins
    assert {p.config.epochs for p in planned} == {3}
    assert planned[1].config.sparsity.dense_epochs == 0

    def cells(base: TrainConfig) -> list[Cell]:  # a grid that studies the batch size itself
        return [Cell(f"b{b}", f"batch {b}", {"batch_size": b}, base.replace(batch_size=b)) for b in (1, 8)]

    batch_grid = Grid(name="batch", description="", source="test", cells_fn=cells)
    planned = plan_grid(batch_grid, Overrides(batch_size=4, epochs=2))
    assert [p.config.batch_size for p in planned] == [1, 8]
    assert [p.config.epochs for p in planned] == [2, 2]


def test_load_grid_from_path_and_unknown_name(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY_GRID)
    g = load_grid(str(path))
    assert g.name == "tiny" and len(g.cells()) == 2
    assert g.cells()[0].config.data.image_size == 32
    with pytest.raises(UserError, match="known grids: .*smoke"):
        load_grid("no-such-grid")
    broken = tmp_path / "broken.py"
    broken.write_text("def cells(base):\n    return [\n")
    with pytest.raises(UserError, match="failed to import"):
        load_grid(str(broken))


def test_duplicate_cell_names_are_refused(tmp_path):
    path = tmp_path / "dup.py"
    path.write_text(TINY_GRID.replace('Cell("random", "random"', 'Cell("dense", "random"'))
    with pytest.raises(UserError, match="used twice"):
        load_grid(str(path)).cells()


def test_cli_grids_lists_every_grid_with_counts():
    result = CliRunner().invoke(app, ["grids"])
    assert result.exit_code == 0, result.output
    for name, n in EXPECTED_COUNTS.items():
        assert re.search(rf"\b{name}\b\s*[│|]\s*{n}\b", result.output), name


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_cli_dry_run_lists_every_cell_and_writes_nothing(tmp_path, name):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--grid", name, "--dry-run", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = re.findall(r"^[│|]\s*(\d+)\s*[│|]", result.output, flags=re.M)
    assert len(rows) == EXPECTED_COUNTS[name]
    assert f"{EXPECTED_COUNTS[name]} cells" in result.output
    assert not out.exists()


@pytest.mark.parametrize("name", PAPER_GRIDS)
def test_cli_dry_run_of_a_paper_grid_shows_the_paper_scale_and_the_total(tmp_path, name):
    result = CliRunner().invoke(app, ["run", "--grid", name, "--dry-run", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    steps, batch = (5120, 1) if name == "table1" else (160, 32)
    # every row: 5120 slices of 512 px, steps x batch x 50 epochs, 256,000 images to train
    n = EXPECTED_COUNTS[name]
    rows = re.findall(r"^[│|]\s*\d+\s*[│|][^│|]*[│|][^│|]*[│|]\s*5120 x 512 px\s*[│|].*\n"
                      r"^[│|]\s*[│|][^│|]*[│|][^│|]*[│|]\s*(\d+) x (\d+) x (\d+)\s*[│|].*\n"
                      r"^[│|]\s*[│|][^│|]*[│|][^│|]*[│|]\s*([\d,]+) images\s*[│|]", result.output, flags=re.M)
    assert rows == [(str(steps), str(batch), "50", "256,000")] * n
    total = re.search(r"^total: (\d+) cell\(s\) to run, ([\d,]+) images to train, "
                      r"(time unknown|estimated .+|nothing to do)", result.output, flags=re.M)
    assert total, result.output
    to_run = n - len(re.findall(r"skip: ", result.output))  # fig8b without CUDA: none
    assert int(total.group(1)) == to_run and int(total.group(2).replace(",", "")) == to_run * 256_000
    if to_run:  # the one-time data line: the paper's two splits
        assert re.search(r"^data: .*5120 x 512 px \+ 784 x 512 px slices|^data: all 2 synthetic split",
                         result.output, flags=re.M)


def test_cli_dry_run_marks_cuda_cells_skipped_without_cuda(tmp_path):
    result = CliRunner().invoke(app, ["run", "--grid", "smoke", "--dry-run", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0
    n_skip = len(re.findall(r"skip: needs CUDA", result.output))
    assert n_skip == (0 if torch.cuda.is_available() else 16)


def test_cli_dry_run_with_repeats_and_path(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY_GRID)
    result = CliRunner().invoke(app, ["run", "--grid", str(path), "--dry-run", "--repeats", "3",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert len(re.findall(r"-r[012]-[0-9a-f]{8}", result.output)) == 6


def test_cli_unknown_grid_is_one_line_listing_known_ones():
    result = CliRunner().invoke(app, ["run", "--grid", "tabel9", "--dry-run"])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("error: unknown grid 'tabel9'")
    for name in EXPECTED_COUNTS:
        assert name in lines[0]


@pytest.mark.parametrize(("body", "needle"), [
    ("def cells(base):\n    raise RuntimeError('boom')\n", "cells(base) raised RuntimeError: boom"),
    ("def cells(base):\n    return [base]\n", "returned TrainConfig, not a Cell"),
    ("def cells(base):\n    return 'x'\n", "must return a non-empty list of Cell"),
    ("def defaults():\n    return 3\n\ndef cells(base):\n    return []\n", "defaults() returned int, not a TrainConfig"),
    ("def defaults():\n    raise KeyError('k')\n\ndef cells(base):\n    return []\n", "defaults() raised KeyError"),
    ("def cells(base):\n    return [base.replace(epochs=0)]\n", "cells() made an invalid config: --epochs 0 must be at least 1"),
])
def test_a_broken_grid_file_is_one_line_naming_it(tmp_path, body, needle):
    path = tmp_path / "broken.py"
    path.write_text(body)
    with pytest.raises(UserError) as err:
        load_grid(str(path)).cells()
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert "broken" in str(err.value) or str(path) in str(err.value)


ONE_CELL_TAIL = '''

def cells(base):
    cfg = base.replace(**{"data.image_size": 32, "data.n_train": 8, "data.n_val": 2, "batch_size": 4})
    return [Cell("only", "only", standard_factors(cfg), cfg)]
'''
HEAD = "from bench.grids import Cell, standard_factors\nNAME = 'mine'\n"


@pytest.mark.parametrize(("text", "needle"), [
    # a non-function defaults used to be ignored: the paper's 512 px base ran instead, silently
    (HEAD + "defaults = 3\n" + ONE_CELL_TAIL, "defaults is not a function (it is int); define `def defaults()"),
    # a NAME with a slash made the default --out results/runs/my/grid
    (HEAD.replace("'mine'", "'my/grid'") + ONE_CELL_TAIL, "NAME 'my/grid' is not a folder-safe name"),
    (HEAD.replace("'mine'", "3") + ONE_CELL_TAIL, "NAME 3 is not a folder-safe name"),
    # a tuple read 'returned no cells'
    (HEAD + ONE_CELL_TAIL.replace("return [Cell(", "return (Cell(").replace("cfg)]", "cfg),)"),
     "cells(base) returned a tuple, not a list"),
    # a field set after the config was made (cfg.lr = -1) failed later, inside the estimates, naming no cell
    (HEAD + ONE_CELL_TAIL.replace("    return [", "    cfg.lr = -1\n    return ["),
     "cell 'only': invalid config: --lr -1 must be a positive finite number"),
    (HEAD + ONE_CELL_TAIL.replace('Cell("only", "only"', 'Cell("only", 3'), "cell 'only': label must be text, got int"),
    # sys.exit in a grid file ended bench silently
    ("import sys\nsys.exit(3)\n", "failed to import: SystemExit: 3 (line 2); fix the grid file."),
    (HEAD + "def cells(base):\n    x = 1\n    raise ValueError('oops')\n", "cells(base) raised ValueError: oops (line 5)"),
    ("import no_such_module_here\n" + HEAD + ONE_CELL_TAIL,
     "failed to import: ModuleNotFoundError: No module named 'no_such_module_here' (line 1)"),
    (HEAD + ONE_CELL_TAIL.replace('"data.image_size": 32', '"data.image_size": 40'),
     "cells() made an invalid config: --image-size 40 must be divisible by 16 (four 2x poolings) (line 6)."),
    # a factor that says the cell trains what its config does not: cell.json, grid.json and the plan said amp-bf16
    (HEAD + ONE_CELL_TAIL.replace("standard_factors(cfg), cfg)", '{**standard_factors(cfg), "precision": "amp-bf16"}, cfg)'),
     "cell 'only': factor precision='amp-bf16' but its config trains precision='fp32'; set the config with "
     "cfg.replace(...) and the factors with standard_factors(cfg)"),
])
def test_a_grid_file_mistake_is_one_line_with_its_line_and_fix(tmp_path, text, needle):
    path = tmp_path / "mine.py"
    path.write_text(text)
    result = CliRunner().invoke(app, ["run", "--grid", str(path), "--dry-run", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert needle in lines[0], lines[0]
    assert str(path) in lines[0], lines[0]  # the file to fix (cells() returning a tuple named only 'mine')
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_a_grid_path_that_is_a_folder_or_lacks_py_says_so(tmp_path):
    (tmp_path / "mine.py").write_text(HEAD + ONE_CELL_TAIL)
    with pytest.raises(UserError, match=r"is a folder; give the path to a \.py grid file \(it holds mine\.py\)"):
        load_grid(str(tmp_path))  # used to read 'does not exist'
    with pytest.raises(UserError, match=r"does not exist \(did you mean .*mine\.py\?\)"):
        load_grid(str(tmp_path / "mine"))
    assert load_grid(str(tmp_path / "mine.py")).name == "mine"


def test_a_grid_file_named_like_a_shipped_grid_is_refused(tmp_path):
    """Its default --out results/runs/smoke and its grid.json would be the shipped smoke grid's."""
    path = tmp_path / "mysmoke.py"
    path.write_text(HEAD.replace("'mine'", "'smoke'") + ONE_CELL_TAIL)
    with pytest.raises(UserError, match=r"is named 'smoke', like the shipped grid ablations/smoke\.py; give it a "
                                        r"NAME of its own"):
        load_grid(str(path))
    shipped = Path(__file__).resolve().parent.parent / "ablations" / "smoke.py"
    assert load_grid(str(shipped)).name == "smoke"  # the shipped file itself, by path, is fine


@pytest.fixture
def more_ablations(tmp_path, monkeypatch):
    """Grid files that sit in `ablations/` as far as the registry sees (a second folder on its package path),
    so no test writes into the repository; they are unloaded afterwards."""
    folder = tmp_path / "more_ablations"
    folder.mkdir()
    written: list[str] = []

    def add(files: dict[str, str]) -> None:
        for stem, text in files.items():
            (folder / f"{stem}.py").write_text(text)
            written.append(stem)
        importlib.invalidate_caches()

    monkeypatch.setattr(ablations, "__path__", [*ablations.__path__, str(folder)])
    yield add
    for stem in written:
        sys.modules.pop(f"ablations.{stem}", None)


def test_a_broken_file_in_ablations_stops_neither_the_listing_nor_other_grids(more_ablations, tmp_path):
    """A syntax error in one file of ablations/ was a traceback from `bench grids` and from `bench run` of
    every grid; a file without cells() (or whose cells() failed) hid every grid from `bench grids`; a copy
    of demo.py that kept NAME 'demo' silently replaced the shipped demo grid."""
    more_ablations({
        "zz_audit_good": TINY_GRID.replace('NAME = "tiny"', 'NAME = "zz_audit_good"'),
        "zz_audit_syntax": "NAME = 'zz_audit_syntax'\ndef cells(base)\n    return []\n",
        "zz_audit_nocells": "NAME = 'zz_audit_nocells'\nDESCRIPTION = 'forgot cells'\n",
        "zz_audit_copy": TINY_GRID.replace('NAME = "tiny"', 'NAME = "demo"'),
    })
    listing = CliRunner().invoke(app, ["grids"])
    assert listing.exit_code == 2, listing.output
    assert "Traceback" not in listing.output
    assert re.search(r"\bzz_audit_good\b\s*[│|]\s*2\b", listing.output)
    assert re.search(r"\bdemo\b\s*[│|]\s*6\b", listing.output)  # the shipped demo, not the copy's 2 cells
    errors = sorted(ln for ln in listing.output.splitlines() if ln.startswith("error: "))
    assert errors == [
        "error: grid ablations/zz_audit_nocells.py defines no cells(base) function; add `def cells(base): ...`.",
        "error: grid file ablations/zz_audit_copy.py is named 'demo', like ablations/demo.py; give it a NAME of "
        "its own (e.g. NAME = 'zz_audit_copy').",
        "error: grid file ablations/zz_audit_syntax.py failed to import: SyntaxError: expected ':' "
        "(zz_audit_syntax.py, line 2); fix the grid file.",
    ]
    for name, cells in (("zz_audit_good", 2), ("demo", 6)):
        ok = CliRunner().invoke(app, ["run", "--grid", name, "--dry-run", "--out", str(tmp_path / name)])
        assert ok.exit_code == 0, ok.output
        assert f"{cells} cells" in ok.output
    for name, line in (("zz_audit_syntax", errors[2]), ("zz_audit_nocells", errors[0]), ("zz_audit_copy", errors[1])):
        bad = CliRunner().invoke(app, ["run", "--grid", name, "--dry-run", "--out", str(tmp_path / name)])
        assert bad.exit_code == 2 and "Traceback" not in bad.output
        assert [ln for ln in bad.output.splitlines() if ln.strip()] == [line]
        assert not (tmp_path / name).exists()


def test_two_files_in_ablations_with_one_name_are_refused_naming_both(more_ablations, tmp_path):
    more_ablations({stem: TINY_GRID.replace('NAME = "tiny"', 'NAME = "zz-audit-twin"') for stem in ("zz_t1", "zz_t2")})
    bad = CliRunner().invoke(app, ["run", "--grid", "zz-audit-twin", "--dry-run", "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2
    assert bad.output.strip() == ("error: grid 'zz-audit-twin' is defined by ablations/zz_t1.py and "
                                  "ablations/zz_t2.py; give each a NAME of its own.")
