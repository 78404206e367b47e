"""Images to train and time estimates: from earlier runs (as is, per phase, scaled), calibrations, the clock.

Most tests run a *timed* fake `bench train` (TIMED_FAKE): it follows the run-folder
contract without torch, sleeps a set time per training image, per validation slice and
for its warm-up epoch, and records what it measured (as the real trainer does), with
this machine's env fingerprint. Its epochs then cost what the estimate should predict,
so a real run of a grid can be held against its estimate. One test calibrates with the
real trainer.
"""

from __future__ import annotations

import io
import re
import statistics
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from bench.calibrate import calibrate, calibration_config, calibration_jobs
from bench.cli import app
from bench.cmd_run import total_line
from bench.estimate import (
    CAL_STEPS,
    LAUNCHES,
    Calibration,
    CellEstimate,
    PlanEstimate,
    estimate_plan,
    machine_fingerprint,
    scan_runs,
)
from bench.grid_clock import GridClock
from bench.grids import Cell, Grid, paper_base, registry
from bench.planning import Overrides, cell_sizes, plan_grid
from bench.processes import run_grid
from bench.store import append_jsonl, read_jsonl, write_json
from tests.fake_trainer import make_grid, quiet, tiny_base

REPO = Path(__file__).resolve().parent.parent

# Like tests/fake_trainer.py's FAKE_TRAIN, but each epoch sleeps FAKE_IMAGE_S per training image
# (x FAKE_SPARSE_FACTOR in the sparse phase), FAKE_VAL_S per validation slice and FAKE_WARMUP_S more
# in its launch's first epoch, and records the times it measured, steps, the warm-up flag and
# env.json with $FAKE_FINGERPRINT.
TIMED_FAKE = r'''
import json, os, sys, time
from pathlib import Path
args = sys.argv[1:]
cfg = json.loads(Path(args[args.index("--config") + 1]).read_text())
out = Path(args[args.index("--out") + 1])
resume = "--resume" in args
env = os.environ
rows_path, ck, summ = out / "epochs.jsonl", out / "ckpt.pt", out / "summary.json"
rows = [json.loads(l) for l in rows_path.read_text().splitlines()] if rows_path.exists() else []
start = json.loads(ck.read_text())["epoch"] if (resume and ck.exists()) else 0
rows = [r for r in rows if r["epoch"] <= start]
rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
(out / "config.json").write_text(json.dumps(cfg))
(out / "env.json").write_text(json.dumps({"fingerprint": env["FAKE_FINGERPRINT"], "device": "cpu"}))
summ.write_text(json.dumps({"status": "running", "error": None}))
steps = cfg["data"]["n_train"] // cfg["batch_size"]
sp = cfg["sparsity"]
for e in range(start + 1, cfg["epochs"] + 1):
    sparse = sp["kind"] != "none" and e > sp["dense_epochs"]
    per_image = float(env.get("FAKE_IMAGE_S", "0")) * (float(env.get("FAKE_SPARSE_FACTOR", "1")) if sparse else 1.0)
    t0 = time.perf_counter()
    time.sleep(steps * cfg["batch_size"] * per_image + (float(env.get("FAKE_WARMUP_S", "0")) if e == start + 1 else 0))
    train_s = time.perf_counter() - t0
    v0 = time.perf_counter()
    time.sleep(cfg["data"]["n_val"] * float(env.get("FAKE_VAL_S", "0")))
    val_s = time.perf_counter() - v0
    with open(rows_path, "a") as f:
        f.write(json.dumps({"epoch": e, "phase": "sparse" if sparse else "dense", "time_s": train_s,
                            "val_time_s": val_s, "steps": steps, "warmup": e == start + 1,
                            "step_time_ms_p50": 1000 * steps * cfg["batch_size"] * per_image / max(1, steps),
                            "train_loss": 1.0 / e, "val_ms_ssim": 50.0 + e}) + "\n")
    ck.write_text(json.dumps({"epoch": e}))
summ.write_text(json.dumps({"status": "ok", "error": None, "epochs_completed": cfg["epochs"],
                            "data_load_s": 0.0, "data_cache": "hit", "final_val_ms_ssim": 50.0}))
'''

GRID_FILE = '''
from tests.fake_trainer import make_grid

_g = make_grid(2)
NAME = "fake"
defaults = _g.defaults_fn
cells = _g.cells_fn
'''

RATIO_TOLERANCE = 2.0
"""A real run of a grid must take between 1/2 and 2 times its estimate (a loose bound: a shared CI machine's
process start varies; the arithmetic of the estimate itself is checked exactly)."""


@pytest.fixture()
def timed(tmp_path, monkeypatch):
    """The timed fake's command, with this machine's fingerprint and an empty data cache."""
    script = tmp_path / "timed_fake.py"
    script.write_text(TIMED_FAKE)
    monkeypatch.setenv("FAKE_FINGERPRINT", machine_fingerprint())
    monkeypatch.setenv("DDNET_BENCH_CACHE", str(tmp_path / "cache"))
    for name, value in (("FAKE_IMAGE_S", "0.02"), ("FAKE_VAL_S", "0.01"), ("FAKE_WARMUP_S", "0.1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("FAKE_SPARSE_FACTOR", raising=False)
    return [sys.executable, str(script)]


def steady_median(folder: Path) -> float:
    rows = [r for r in read_jsonl(folder / "epochs.jsonl") if not r["warmup"]]
    return statistics.median(r["time_s"] + r["val_time_s"] for r in rows)


def make_run(folder: Path, cfg, rows: list[dict], launches: list[dict], fingerprint: str | None = None,
             cell: str | None = None) -> None:
    """A run folder written by hand: config, env, epochs, launches (and cell.json when `cell`)."""
    folder.mkdir(parents=True)
    write_json(folder / "config.json", cfg.to_dict())
    write_json(folder / "env.json", {"fingerprint": fingerprint or machine_fingerprint(), "device": "cpu"})
    for r in rows:
        append_jsonl(folder / "epochs.jsonl", r)
    for launch in launches:
        append_jsonl(folder / LAUNCHES, launch)
    if cell:
        write_json(folder / "cell.json", {"cell": cell})


# ------------------------------------------------------------------ images


def test_images_to_train_are_steps_times_batch_times_epochs():
    paper = paper_base()
    z = cell_sizes(paper)
    assert (z.n_train, z.n_val, z.side, z.batch, z.steps) == (5120, 784, 512, 32, 160)
    est = CellEstimate(folder="x", sizes=z, epochs=paper.epochs, epochs_left=paper.epochs, state="to run")
    assert est.images == est.images_left == 160 * 32 * 50 == 256_000
    odd = cell_sizes(paper.replace(**{"data.n_train": 5130}))  # the last partial batch is dropped
    assert odd.steps == 160 and odd.images_per_epoch == 5120
    ddp = cell_sizes(paper.replace(nproc=4))  # the batch is the global one: 8 per replica, 160 steps
    assert (ddp.steps, ddp.images_per_epoch) == (160, 5120)
    table1 = registry()["table1"].cells()[0].config
    assert cell_sizes(table1).steps == 5120 and cell_sizes(table1).images_per_epoch * table1.epochs == 256_000


# ------------------------------------------------------------------ from earlier runs


def test_estimate_from_earlier_runs_is_epochs_times_the_median_and_a_real_run_agrees(tmp_path, timed):
    grid = make_grid(2)
    out = tmp_path / "out"
    run_grid(grid, out, command=timed, console=quiet())  # 2 epochs per cell
    assert all(len(read_jsonl(d / LAUNCHES)) == 1 for d in out.glob("c*-*"))

    planned = plan_grid(grid, Overrides(epochs=6))
    est = estimate_plan(planned, out)
    for p in planned:
        e = est.cells[p.folder]
        (source,) = out.glob(f"{p.cell.name}-*")  # the same cell's 2-epoch folder
        median = steady_median(source)  # epoch 2 (epoch 1 is warm-up)
        launch = read_jsonl(source / LAUNCHES)[0]
        assert e.kind == "measured" and e.source == f"from 1 earlier epochs of {source.name}"
        assert e.epoch_s == median and e.epochs_s == 6 * median  # exact: it is arithmetic
        assert e.overhead_s == pytest.approx(launch["wall_s"] - 2 * median, rel=1e-9)
        assert e.seconds == e.overhead_s + e.epochs_s
        assert e.images == 8 * 6 and e.epochs_left == 6
    # the total: the cells and the (tiny, nominal) generation of their 8 + 2 synthetic slices
    assert est.unknown == 0 and est.total_s == pytest.approx(sum(c.seconds for c in est.cells.values()), abs=0.01)

    # the dry run prints the same, per cell and in total
    grid_file = tmp_path / "fake_grid.py"
    grid_file.write_text(GRID_FILE)
    res = CliRunner().invoke(app, ["run", "--grid", str(grid_file), "--out", str(out), "--epochs", "6", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert res.output.count("(from 1 earlier epochs of c") == 2
    assert len(re.findall(r"8 x 32 px\s*[│|]", res.output)) == 2 and res.output.count("2 x 4 x 6") == 2
    assert res.output.count("48 images") == 2
    m = re.search(r"total: 2 cell\(s\) to run, 96 images to train, estimated ([\d.]+) s with the data generation "
                  r"\(2 measured\)", res.output)
    assert m and float(m.group(1)) == pytest.approx(est.total_s, abs=0.05)

    # and a real run of it takes about that long (the tolerance is RATIO_TOLERANCE either way)
    t0 = time.monotonic()
    results = run_grid(grid, tmp_path / "out6", Overrides(epochs=6), command=timed, console=quiet())
    took = time.monotonic() - t0
    assert [r.status for r in results] == ["ok", "ok"]
    assert 1 / RATIO_TOLERANCE <= took / est.total_s <= RATIO_TOLERANCE, (took, est.total_s)


def test_hybrid_cells_are_estimated_per_phase_and_a_resumed_cell_by_its_epochs_left(tmp_path):
    base = tiny_base().replace(epochs=4, **{"sparsity.kind": "topk", "sparsity.dense_epochs": 2})
    rows = [{"epoch": 1, "phase": "dense", "time_s": 9.0, "val_time_s": 1.0, "warmup": True},
            {"epoch": 2, "phase": "dense", "time_s": 3.0, "val_time_s": 1.0, "warmup": False},
            {"epoch": 3, "phase": "sparse", "time_s": 1.5, "val_time_s": 0.5, "warmup": False},
            {"epoch": 4, "phase": "sparse", "time_s": 1.0, "val_time_s": 1.0, "warmup": False}]
    launches = [{"wall_s": 30.0, "exit_code": 0, "epochs_before": 0, "epochs_after": 4}]
    out = tmp_path / "out"
    make_run(out / "earlier", base, rows, launches)
    def cells(b):
        return [Cell("topk", "topk", {"sparsity": "topk"}, b)]

    grid = Grid(name="g", description="", source="test", cells_fn=cells, defaults_fn=lambda: base)
    (p,) = plan_grid(grid, Overrides(epochs=10))  # dense_epochs stays 2: 2 dense + 8 sparse epochs
    e = estimate_plan([p], out).cells[p.folder]
    # dense 4.0 s, sparse median(2.0, 2.0) = 2.0 s; overhead = 30 - (4 + 4 + 2 + 2) = 18 s
    assert (e.kind, e.epochs_s, e.overhead_s, e.seconds) == ("measured", 2 * 4.0 + 8 * 2.0, 18.0, 42.0)
    assert e.source == "from 3 earlier epochs of earlier"
    # the cell itself ran 3 of its epochs and was killed: 7 sparse epochs are left, at its own times
    mine = out / p.folder
    make_run(mine, p.config, rows[:3], [{"wall_s": 20.0, "exit_code": -9, "epochs_before": 0, "epochs_after": 3}])
    (mine / "ckpt.pt").write_text("{}")
    e = estimate_plan([p], out).cells[p.folder]
    assert e.epochs_left == 7 and e.source == "from 2 earlier epochs of this cell"
    # its only launch was killed, so its start-up is what its records hold: the warm-up excess (10 - 4 s)
    assert e.epochs_s == 7 * 2.0 and e.overhead_s == 6.0


def test_each_phase_comes_from_a_run_that_measured_it_or_from_its_calibration(tmp_path):
    base = tiny_base().replace(epochs=10)
    dense_rows = [{"epoch": 1, "phase": "dense", "time_s": 9.0, "val_time_s": 1.0, "warmup": True},
                  {"epoch": 2, "phase": "dense", "time_s": 3.0, "val_time_s": 1.0, "warmup": False}]
    sparse_rows = [{"epoch": 1, "phase": "sparse", "time_s": 5.0, "val_time_s": 1.0, "warmup": True},
                   {"epoch": 2, "phase": "sparse", "time_s": 1.5, "val_time_s": 0.5, "warmup": False}]
    launch = [{"wall_s": 20.0, "exit_code": 0, "epochs_before": 0, "epochs_after": 2}]
    out = tmp_path / "out"
    make_run(out / "dense", base, dense_rows, launch)  # a dense model: 4.0 s a steady epoch, start-up 12 s
    pruned = base.replace(**{"sparsity.kind": "random", "sparsity.dense_epochs": 0})
    make_run(out / "from-start", pruned, sparse_rows, launch)  # random, pruned before training: 2.0 s

    def hybrid(kind: str) -> Cell:
        cfg = base.replace(**{"sparsity.kind": kind, "sparsity.dense_epochs": 2})
        return Cell(kind, kind, {"sparsity": kind}, cfg)

    grid = Grid(name="g", description="", source="test", defaults_fn=lambda: base,
                cells_fn=lambda b: [hybrid("random"), hybrid("structured")])
    rnd, struct = plan_grid(grid)
    est = estimate_plan([rnd, struct], out)
    # random: its 2 dense epochs are a dense model's, its 8 sparse ones the pruned-from-start run's
    e = est.cells[rnd.folder]
    assert (e.kind, e.source) == ("measured", "by phase: dense from dense, sparse from from-start")
    assert (e.epochs_s, e.epoch_s, e.overhead_s, e.seconds) == (2 * 4.0 + 8 * 2.0, 2.0, 12.0, 36.0)
    # structured: nothing measured its sparse phase (masks are not structured pruning), so it is unknown ...
    assert est.cells[struct.folder].source == "unknown"
    # ... and --calibrate times only that phase; the dense one is measured
    jobs = calibration_jobs([rnd, struct], out)
    assert [[ph for _, ph in users] for _, users in jobs.values()] == [["sparse"]]
    (cal_cfg, [(key, _)]), = jobs.values()
    assert cal_cfg.sparsity.kind == "structured" and cal_cfg.sparsity.dense_epochs == 0
    cal = Calibration(train_s=0.9, step_s=0.3, val_s=0.5, n_val=2, overhead_s=7.0)
    e = estimate_plan([struct], out, calibrations={(key, "sparse"): cal}).cells[struct.folder]
    assert (e.kind, e.source) == ("calibrated", f"by phase: dense from dense, sparse calibrated ({CAL_STEPS} steps)")
    # a sparse epoch of 2 steps: the timed 3-step epoch less a median step, and validation
    assert e.epochs_s == pytest.approx(2 * 4.0 + 8 * (0.9 - 0.3 + 0.5)) and e.overhead_s == 12.0  # it starts dense


def test_a_masked_sparse_phase_no_run_measured_is_timed_at_the_dense_epochs(tmp_path):
    """Random and topk masks leave the dense kernels running, so once a dense model of the same configuration
    has run (a grid's dense cell), their sparse phases are estimated at its epochs, and the source and the
    total say so; structured pruning shrinks the layers, so it stays unknown; a measured sparse run or a
    calibration of the phase comes first."""
    base = tiny_base().replace(epochs=10)
    dense_rows = [{"epoch": 1, "phase": "dense", "time_s": 9.0, "val_time_s": 1.0, "warmup": True},
                  {"epoch": 2, "phase": "dense", "time_s": 3.0, "val_time_s": 1.0, "warmup": False}]
    out = tmp_path / "out"
    make_run(out / "dense", base, dense_rows, [{"wall_s": 20.0, "exit_code": 0, "epochs_before": 0,
                                                "epochs_after": 2}])  # 4.0 s a steady epoch, start-up 12 s

    def cell(kind: str, dense_epochs: int) -> Cell:
        cfg = base.replace(**{"sparsity.kind": kind, "sparsity.dense_epochs": dense_epochs})
        return Cell(f"{kind}-{dense_epochs}", f"{kind}-{dense_epochs}", {"sparsity": kind}, cfg)

    grid = Grid(name="g", description="", source="test", defaults_fn=lambda: base,
                cells_fn=lambda b: [cell("random", 2), cell("topk", 0), cell("structured", 2)])
    rnd, topk, struct = plan_grid(grid)
    est = estimate_plan([rnd, topk, struct], out)
    e = est.cells[rnd.folder]
    assert (e.kind, e.source) == ("masked as dense", "by phase: dense from dense, sparse at the dense epochs of "
                                  "dense (masked weights run dense kernels)")
    assert (e.epochs_s, e.epoch_s, e.overhead_s, e.seconds) == (10 * 4.0, 4.0, 12.0, 52.0)
    e = est.cells[topk.folder]  # pruned before training: every epoch is sparse, the launch's start-up the dense one's
    assert (e.kind, e.source) == ("masked as dense", "by phase: sparse at the dense epochs of dense (masked "
                                  "weights run dense kernels)")
    assert (e.epochs_s, e.overhead_s) == (10 * 4.0, 12.0)
    assert est.cells[struct.folder].source == "unknown"
    line = total_line(est)  # 52 s each (and the data generation, if any is to make)
    assert line.startswith("total: 3 cell(s) to run, 240 images to train, estimated at least 1m4") and \
        "(2 masked as dense, 1 unknown); for the unknown ones use --calibrate" in line
    # --calibrate still times every sparse phase no run measured, masked or not, and its calibration is used
    jobs = calibration_jobs([rnd, topk, struct], out)
    assert sorted(cal.sparsity.kind for cal, _ in jobs.values()) == ["random", "structured", "topk"]
    (key, phase), = next(users for cal, users in jobs.values() if cal.sparsity.kind == "random")
    cal = Calibration(train_s=0.9, step_s=0.3, val_s=0.5, n_val=2, overhead_s=7.0)
    e = estimate_plan([rnd], out, calibrations={(key, phase): cal}).cells[rnd.folder]
    assert (e.kind, e.source) == ("calibrated", f"by phase: dense from dense, sparse calibrated ({CAL_STEPS} steps)")
    # a run that measured the random sparse phase replaces the stand-in
    sparse_rows = [{"epoch": 1, "phase": "sparse", "time_s": 5.0, "val_time_s": 1.0, "warmup": True},
                   {"epoch": 2, "phase": "sparse", "time_s": 4.5, "val_time_s": 0.5, "warmup": False}]
    make_run(out / "random-from-start", base.replace(**{"sparsity.kind": "random"}), sparse_rows, [])
    e = estimate_plan([rnd], out).cells[rnd.folder]
    assert (e.kind, e.source) == ("measured", "by phase: dense from dense, sparse from random-from-start")
    assert e.epochs_s == 2 * 4.0 + 8 * 5.0


def test_other_sizes_are_scaled_from_the_closest_run_and_other_machines_are_ignored(tmp_path):
    base = tiny_base()  # 8 slices of 32 px, batch 4: 8 images per epoch; 2 validation slices
    rows = [{"epoch": 1, "time_s": 2.0, "val_time_s": 0.5, "warmup": True},
            {"epoch": 2, "time_s": 1.0, "val_time_s": 0.25, "warmup": False}]
    out = tmp_path / "out"
    make_run(out / "small", base, rows, [{"wall_s": 5.0, "exit_code": 0, "epochs_before": 0, "epochs_after": 2}])
    make_run(out / "elsewhere", base.replace(**{"data.n_train": 32}), rows, [], fingerprint="another-machine")
    g = make_grid(1)
    (p,) = plan_grid(g, Overrides(n_train=32, n_val=4, epochs=3))  # 4x the images, 2x the validation slices
    est = estimate_plan([p], out)
    e = est.cells[p.folder]
    assert e.kind == "scaled" and e.source.startswith("scaled from small (1 epochs at 8 x 32 px, b4): x4 images")
    assert e.epoch_s == 1.0 * 4 + 0.25 * 2 and e.epochs_s == 3 * e.epoch_s
    assert e.overhead_s == pytest.approx(5.0 - 2 * 1.25)
    assert est.other_machines == 1
    # nothing of the same toggles (channels_last here): unknown, said so, and the total says 'time unknown'
    other = base.replace(channels_last=True)
    grid = Grid(name="g", description="", source="test", defaults_fn=lambda: other,
                cells_fn=lambda b: [Cell("cl", "channels_last", {"channels_last": True}, b)])
    (q,) = plan_grid(grid)
    est = estimate_plan([q], out)
    assert est.cells[q.folder].seconds is None and est.cells[q.folder].source == "unknown"
    assert "time unknown" in total_line(est) and "--calibrate" in total_line(est)


# ------------------------------------------------------------------ calibration


def test_calibration_times_each_distinct_configuration_once_and_scales_it(tmp_path, timed):
    grid = make_grid(2)  # two cells of one timing configuration (they differ in lr only)
    planned = plan_grid(grid, Overrides(n_train=40, epochs=5))
    out = tmp_path / "out"
    text = io.StringIO()
    cals = calibrate(planned, out, command=timed, console=Console(file=text, width=160))
    assert "calibrating 1 configuration(s)" in text.getvalue() and "ms per step" in text.getvalue()
    assert len(cals) == 1  # both cells need the dense phase of one configuration: timed once
    cal = next(iter(cals.values()))
    assert cal.error is None and cal.steps == CAL_STEPS and cal.n_val == 2
    est = estimate_plan(planned, out, calibrations=cals)
    for p in planned:
        e = est.cells[p.folder]
        assert e.kind == "calibrated" and e.source == f"calibrated: {CAL_STEPS} steps"
        # 10 steps: the timed epoch (3 steps) and 7 median steps more, and validation per slice
        assert e.epoch_s == max(0.0, cal.train_s + (10 - CAL_STEPS) * cal.step_s) + cal.val_s * 2 / 2
        assert e.epoch_s == pytest.approx(40 * 0.02 + 2 * 0.01, rel=0.25)
    cfg = calibration_config(planned[0].config.replace(**{"sparsity.kind": "topk", "sparsity.dense_epochs": 2}),
                             "dense")
    assert (cfg.epochs, cfg.data.n_train, cfg.sparsity.kind) == (2, CAL_STEPS * 4, "none")
    # an earlier run of the configuration makes calibrating it unnecessary
    run_grid(make_grid(1), out, Overrides(n_train=40, epochs=2), command=timed, console=quiet())
    assert calibrate(planned, out, command=timed, console=quiet()) == {}


def test_a_failed_calibration_leaves_the_cell_unknown_with_the_reason(tmp_path, timed):
    planned = plan_grid(make_grid(1))
    broken = [sys.executable, "-c", "print('error: no GPU here'); raise SystemExit(3)"]
    cals = calibrate(planned, tmp_path / "out", command=broken, console=quiet())
    assert [c.error for c in cals.values()] == ["exited with code 3: error: no GPU here"]
    e = estimate_plan(planned, tmp_path / "out", calibrations=cals).cells[planned[0].folder]
    assert e.seconds is None and e.source == "unknown (calibration failed: exited with code 3: error: no GPU here)"


@pytest.mark.slow
def test_cli_dry_run_calibrates_with_the_real_trainer(tmp_path):
    grid_file = tmp_path / "fake_grid.py"
    grid_file.write_text(GRID_FILE)
    res = CliRunner().invoke(app, ["run", "--grid", str(grid_file), "--out", str(tmp_path / "o"), "--dry-run",
                                   "--calibrate", "--epochs", "3"])
    assert res.exit_code == 0, res.output
    assert "calibrating 1 configuration(s)" in res.output
    assert res.output.count(f"calibrated: {CAL_STEPS} steps") == 2
    assert re.search(r"total: 2 cell\(s\) to run, 48 images to train, estimated ([\d.]+ s|\d+m\d\ds)"
                     r"( with the data generation)? \(2 calibrated\)", res.output), res.output
    assert not (tmp_path / "o").exists()  # a dry run writes nothing, calibrating or not


# ------------------------------------------------------------------ the clock


def plan_of(**seconds: float | None) -> PlanEstimate:
    z = cell_sizes(tiny_base())
    return PlanEstimate(cells={f: CellEstimate(folder=f, sizes=z, epochs=4, epochs_left=4, state="to run", seconds=s)
                               for f, s in seconds.items()}, data_s=5.0)


def test_grid_clock_counts_finished_cells_as_measured_and_follows_the_running_one():
    clock = GridClock(plan_of(a=10.0, b=20.0, c=None), now=100.0)
    assert clock.remaining(100.0) == (35.0, 1)  # 10 + 20 + data 5, one unknown
    assert clock.text(100.0) == "elapsed 0.0 s, ~35.0 s left + 1 cell(s) of unknown time"
    clock.cell_started("a", 100.0)
    clock.cell_progress([], 4)
    assert clock.remaining(104.0) == (6.0 + 20.0 + 5.0, 1)  # a: its estimate less the time it has run
    row = {"time_s": 2.0, "val_time_s": 0.5}
    clock.cell_progress([{**row, "warmup": True}, {**row, "warmup": False}], 4)
    assert clock.remaining(106.0) == (2 * 2.5 + 20.0, 1)  # its own steady epochs now; the data is made
    # rows without a warm-up flag follow bench.store.is_warmup: epoch 1 is the warm-up, epoch 2 is steady
    clock.cell_progress([{**row, "epoch": 1, "time_s": 9.0}, {**row, "epoch": 2, "time_s": 3.0}], 4)
    assert clock.remaining(106.0) == (2 * 3.5 + 20.0, 1)
    clock.cell_finished("a")  # took 30 s, not 10: the elapsed time says so, and a is out of the remaining
    assert clock.remaining(130.0) == (20.0, 1) and clock.text(130.0).startswith("elapsed 30.0 s, ~20.0 s left")
    clock.plan = plan_of(a=0.0, b=25.0, c=8.0)  # run_grid's refresh: a finished cell measured c's config
    assert clock.text(130.0) == "elapsed 30.0 s, ~33.0 s left"
    for f in "bc":
        clock.cell_finished(f)
    assert clock.text(200.0) == "elapsed 1m40s, nothing left"


def test_grid_clock_counts_a_resumed_cells_start_up_until_it_writes_an_epoch():
    """A cell resumed (--retry-failed, or after a kill) with 2 of its 4 epochs done, planned at 24 s (its launch's
    start-up and 2 epochs): the clock read ~6 s left from the earlier launch's epochs alone (2 x 3 s) from the
    moment it started, while the launch took 28 s."""
    plan = plan_of(a=24.0)
    plan.data_s = 0.0
    clock = GridClock(plan, now=100.0)
    clock.cell_started("a", 100.0)
    row = {"phase": "dense", "val_time_s": 0.5}
    before = [{**row, "epoch": 1, "time_s": 20.0, "warmup": True}, {**row, "epoch": 2, "time_s": 2.5, "warmup": False}]
    clock.cell_progress(before, 4)  # the runner's first look, at launch: the rows already there
    assert clock.remaining(104.0) == (20.0, 0)  # the plan's 24 s less the 4 s it has run
    assert clock.text(104.0) == "elapsed 4.0 s, ~20.0 s left"
    clock.cell_progress([*before, {**row, "epoch": 3, "time_s": 2.5, "warmup": False}], 4)
    assert clock.remaining(120.0) == (3.0, 0)  # an epoch of its own: its epochs now, 1 left


def test_grid_clock_past_a_cells_estimate_still_counts_its_epochs_to_come():
    """A cell planned at 10 s (2 s start-up, 4 epochs of 2 s) on a machine that slowed down: once it had run
    10 s the clock read 'nothing left' with all its epochs ahead (seen: '... 37.2 s | grid elapsed 1m58s,
    nothing left' after epoch 1 of 4)."""
    plan = plan_of(a=10.0)
    plan.data_s = 0.0
    plan.cells["a"].epochs_s = 8.0
    clock = GridClock(plan, now=100.0)
    clock.cell_started("a", 100.0)
    clock.cell_progress([], 4)
    assert clock.remaining(101.0) == (9.0, 0)  # within its estimate: the estimate less the time run
    assert clock.remaining(130.0) == (8.0, 0)  # past it: 4 epochs to come at the plan's 2 s
    assert clock.text(130.0) == "elapsed 30.0 s, ~8.0 s left"
    clock.cell_progress([{"epoch": 1, "phase": "dense", "time_s": 37.0, "val_time_s": 0.2, "warmup": True}], 4)
    assert clock.remaining(140.0) == (6.0, 0)  # the warm-up epoch is done: 3 to come


def test_the_plain_display_shows_the_grids_elapsed_and_remaining_time(tmp_path, timed):
    out = tmp_path / "out"
    run_grid(make_grid(2), out, command=timed, console=quiet())
    text = io.StringIO()
    run_grid(make_grid(2), tmp_path / "out4", Overrides(epochs=4), command=timed,
             console=Console(file=text, width=200), estimate_from=[out])
    lines = text.getvalue().splitlines()
    starts = [ln for ln in lines if ln.startswith("[")]
    assert len(starts) == 2 and all(re.search(r"\(grid: elapsed [\d.]+ s, ~[\d.]+ s left\)$", ln) for ln in starts)
    epochs = [ln for ln in lines if ln.strip().startswith("epoch ")]
    assert len(epochs) == 8 and all(re.search(r"\| grid elapsed [\d.]+ s, (~[\d.]+ s left|nothing left)$", ln)
                                    for ln in epochs)
    ends = [ln for ln in lines if "-> ok" in ln]
    assert re.search(r"grid 1/2 cells, elapsed [\d.]+ s, ~[\d.]+ s left$", ends[0])
    assert ends[1].endswith("nothing left")
    assert "estimated" not in text.getvalue()  # no on_plan given: run_grid itself prints no plan


def test_a_calibration_key_is_per_phase(tmp_path):
    hybrid = tiny_base().replace(**{"sparsity.kind": "random", "sparsity.dense_epochs": 1})
    assert calibration_config(hybrid, "sparse").sparsity.kind == "random"
    assert calibration_config(hybrid, "sparse").sparsity.dense_epochs == 0
    assert scan_runs(tmp_path / "nothing") == []
    assert Calibration(train_s=0.3, step_s=0.1, val_s=0.2, n_val=2).epoch_s(cell_sizes(tiny_base())) == \
        pytest.approx(0.3 - 0.1 + 0.2)


def test_a_phase_no_run_measured_says_which_phase_stands_in_for_it(tmp_path):
    """A hybrid cell stopped after its dense epochs, with no sparse run anywhere: its sparse epochs left are
    estimated at its dense epochs' time; the source used to read plainly 'from 1 earlier epochs of this cell'."""
    cfg = tiny_base().replace(epochs=4, **{"sparsity.kind": "topk", "sparsity.dense_epochs": 2})

    def cells(b):
        return [Cell("topk", "topk", {"sparsity": "topk"}, b)]

    (p,) = plan_grid(Grid(name="g", description="", source="test", cells_fn=cells, defaults_fn=lambda: cfg))
    out = tmp_path / "out"
    rows = [{"epoch": 1, "phase": "dense", "time_s": 9.0, "val_time_s": 1.0, "warmup": True},
            {"epoch": 2, "phase": "dense", "time_s": 3.0, "val_time_s": 1.0, "warmup": False}]
    make_run(out / p.folder, p.config, rows, [])
    (out / p.folder / "ckpt.pt").write_text("{}")
    e = estimate_plan([p], out).cells[p.folder]
    assert e.epochs_left == 2 and e.epochs_s == 2 * 4.0
    assert e.source == "from 1 earlier epochs of this cell; its dense epochs stand in for the sparse ones"
