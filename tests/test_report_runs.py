"""bench/report/runs.py and cells.py: reading run folders (finished, partial, failed, skipped), phases and warm-ups."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from bench.report.artifacts import ARTIFACTS
from bench.report.build import make_report
from bench.report.cells import group_cells
from bench.report.options import Options
from bench.report.runs import UNKNOWN_ENV, epoch_phase, is_warmup, load_runs, read_run
from tests.report_fakes import (
    FP_A,
    FP_B,
    QUAL,
    _cfg,
    _est,
    _row,
    _rows,
    _times,
    by_cell,
    table,
    views,
    write_run,
)


def test_partial_failed_and_skipped_runs_are_named(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "smoke", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    write_run(root, "smoke", "fp32-host-off-random-hybrid3", _cfg(kind="random", dense_epochs=3),
              _times(10.0, 2)[:2], QUAL[:2], status="running")
    write_run(root, "smoke", "amp-bf16-host-off-dense", _cfg(precision="amp-bf16"), _times(7.0, 3)[:2], QUAL[:2],
              status="failed", error="non-finite loss (nan) at epoch 3")
    write_run(root, "smoke", "fp32-host-cuda-graph-dense", _cfg(graphs="cuda-graph"), [], [], status="skipped",
              reason="--graphs cuda-graph needs a CUDA device", write_env=False)
    rep = make_report(root, opts=Options())
    md = rep.report_md.read_text()
    assert rep.out == root / "report"
    assert "running (partial: 2/6 epochs)" in md
    assert "non-finite loss (nan) at epoch 3" in md
    assert "skipped: --graphs cuda-graph needs a CUDA device" in md
    status = pd.read_csv(rep.out / "tables" / "status.csv")
    assert set(status["status"]) == {"ok", "running", "failed", "skipped"}
    # The skipped cell has no env.json: it belongs to the grid's only machine.
    assert set(status["env"]) == {"env1"}
    t2 = pd.read_csv(rep.out / "tables" / "table2.csv")
    part = _row(t2, "fp32-host-off-random-hybrid3")
    assert part["status"].startswith("running (partial") and pd.isna(part["speedup_x"])
    f8 = pd.read_csv(rep.out / "tables" / "fig8a.csv")
    assert "non-finite loss" in _row(f8, "amp-bf16-host-off-dense")["status"]
    assert pd.isna(_row(f8, "amp-bf16-host-off-dense")["speedup_vs_model_x"])
    # Tables with no cell at all are listed as not run, with a grid that would fill them.
    assert "## Not run" in md
    assert "table1" in rep.not_run and "`bench run --grid table1`" in md
    assert "fig9a" in rep.not_run and "`bench run --grid fig9`" in md


def test_one_warmup_and_phase_rule():
    """The row's `warmup` flag when it has one, else epoch <= the config's warmup_epochs (default 1)."""
    assert is_warmup({"epoch": 5, "warmup": True}, {}) and not is_warmup({"epoch": 1, "warmup": False}, {})
    assert is_warmup({"epoch": 1}, {}) and not is_warmup({"epoch": 2}, {})
    assert is_warmup({"epoch": 2}, {"warmup_epochs": 2}) and not is_warmup({"epoch": 3}, {"warmup_epochs": 2})
    assert epoch_phase({}) == "dense" and epoch_phase({"phase": "sparse"}) == "sparse"


def _strip_warmup_flags(d):
    rows = _rows(d)
    for r in rows:
        del r["warmup"]
    (d / "epochs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_steady_times_skip_warmups_without_the_flag(tmp_path):
    root = tmp_path / "runs"
    times = [30.0, 20.0, 10.0, 11.0, 12.0, 10.5]
    d = write_run(root, "g", "fp32-host-off-random-hybrid4", _cfg(kind="random", dense_epochs=4), times, QUAL)
    (d / "config.json").write_text(json.dumps(dataclasses.replace(
        _cfg(kind="random", dense_epochs=4), warmup_epochs=2).to_dict()))
    _strip_warmup_flags(d)
    run = read_run(d, root)
    assert run.steady_epoch_times() == times[2:]
    assert run.phase_times() == {"dense": [10.0, 11.0], "sparse": [12.0, 10.5]}
    assert run.phase_counts() == {"dense": 4, "sparse": 2}
    assert run.train_time_est_s() == pytest.approx(4 * 10.5 + 2 * 11.25)


def test_repeats_group_into_one_cell_per_machine(tmp_path):
    root = tmp_path / "runs"
    for r in range(3):
        write_run(root / "a", "g", "fp32-host-off-dense", _cfg(), _times(10.0, r), QUAL, repeat=r, fp=FP_A)
    write_run(root / "b", "g", "fp32-host-off-dense", _cfg(), _times(5.0, 9), QUAL, fp=FP_B)
    cells = group_cells(load_runs(root))
    assert [(c.fingerprint, c.name, len(c.runs)) for c in cells] == [
        (FP_A, "fp32-host-off-dense", 3), (FP_B, "fp32-host-off-dense", 1)]
    a = cells[0]
    assert [r.repeat for r in a.ok_runs] == [0, 1, 2]
    per_run = [float(np.median(_times(10.0, r)[1:])) for r in range(3)]
    assert a.epoch_time_p50() == pytest.approx(float(np.median(per_run)))
    assert a.status_text() == "ok (3 repeats)"


def test_a_damaged_epochs_file_is_read_whole_and_flagged(tmp_path):
    root = tmp_path / "runs"
    d = write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1, n=30), [50.0 + i for i in range(30)])
    lines = (d / "epochs.jsonl").read_text().splitlines()
    lines[5] = "garbage that is not json"        # row 6 lost
    lines.insert(10, lines[9])                     # epoch 10 recorded twice
    lines.append('{"epoch": 31, "time_s": 1.0, "val_ms')  # a torn last line
    (d / "epochs.jsonl").write_text("\n".join(lines) + "\n")
    run = load_runs(root)[0]
    assert [r["epoch"] for r in run.epochs] == [e for e in range(1, 31) if e != 6]  # every valid row, once
    assert run.damage is not None
    for part in ("2 unreadable lines", "epoch 10 recorded twice", "epoch 6 missing"):
        assert part in run.damage, run.damage
    rep = make_report(root, opts=Options())
    md = rep.report_md.read_text()
    assert "damaged" in md and "epoch 6 missing" in md
    status = pd.read_csv(rep.out / "tables" / "status.csv").iloc[0]
    assert "recorded twice" in status["damage"] and status["epochs_done"] == 29


def test_epochs_a_finished_run_counts_but_its_file_lacks_are_flagged(tmp_path):
    """An epochs.jsonl cut short (or gone) beside a summary of 10 trained epochs read as a clean run of fewer."""
    root = tmp_path / "runs"
    cut = write_run(root, "g", "cut", _cfg(), _times(10.0, 1, n=10), [50.0 + i for i in range(10)])
    lines = (cut / "epochs.jsonl").read_text().splitlines()
    (cut / "epochs.jsonl").write_text("\n".join(lines[:7]) + "\n")
    gone = write_run(root, "g", "gone", _cfg(), _times(10.0, 2, n=10), [50.0 + i for i in range(10)])
    (gone / "epochs.jsonl").unlink()
    runs = {r.cell_name: r for r in load_runs(root)}
    assert runs["cut"].damage == "epochs.jsonl damaged: epochs 8, 9, 10 missing"
    assert runs["gone"].damage == "epochs.jsonl damaged: epochs 1, 2, 3, 4, 5 missing"
    status = pd.read_csv(make_report(root, opts=Options()).out / "tables" / "status.csv").set_index("cell")
    assert "epochs 8, 9, 10 missing" in status.loc["cut", "damage"] and status.loc["cut", "epochs_done"] == 7
    assert "epochs 1, 2, 3, 4, 5 missing" in status.loc["gone", "damage"]


def test_records_of_bytes_that_are_not_utf8_make_an_unreadable_run_not_a_traceback(tmp_path):
    """A summary.json, config.json, env.json or cell.json (or a grid.json) filled with binary garbage is
    named unreadable like bad JSON is: UnicodeDecodeError used to escape `bench report` as a traceback."""
    root = tmp_path / "runs"
    a = write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    b = write_run(root, "g", "amp-bf16-host-off-dense", _cfg(precision="amp-bf16"), _times(7.0, 2), QUAL)
    garbage = bytes([0x90, 0xff, 0xfe, 0x80]) * 50
    (a / "summary.json").write_bytes(garbage)
    (b / "env.json").write_bytes(garbage)
    (root / "g" / "grid.json").write_bytes(garbage)
    runs = {r.path.name: r for r in load_runs(root)}
    assert runs[a.name].status == "unreadable" and "summary.json unreadable" in runs[a.name].error
    assert runs[b.name].status == "unreadable" and "env.json unreadable" in runs[b.name].error
    rep = make_report(root, opts=Options())
    assert "summary.json unreadable" in rep.report_md.read_text()


def test_records_of_valid_json_but_no_object_name_what_they_hold(tmp_path):
    """A summary.json of `[1, 2]` or `{}` (or an env.json of `[]`) read 'unreadable:' with nothing after it."""
    root = tmp_path / "runs"
    runs_made = {name: write_run(root, "g", name, _cfg(), _times(10.0, i), QUAL)
                 for i, name in enumerate(("listed", "empty", "envlist"))}
    (runs_made["listed"] / "summary.json").write_text("[1, 2]")
    (runs_made["empty"] / "summary.json").write_text("{}")
    (runs_made["envlist"] / "env.json").write_text("[]")
    runs = {r.cell_name: r for r in load_runs(root)}
    assert runs["listed"].error == "summary.json unreadable: it holds a JSON list, not an object"
    assert runs["empty"].error == "summary.json unreadable: it records no status"
    assert runs["envlist"].error == "env.json unreadable: it holds a JSON list, not an object"
    assert all(r.status == "unreadable" for r in runs.values())
    status = pd.read_csv(make_report(root, opts=Options()).out / "tables" / "status.csv").set_index("cell")
    assert status.loc["listed", "message"] == "unreadable: summary.json unreadable: it holds a JSON list, not an object"


def test_runs_of_one_cell_name_with_other_epochs_are_two_cells_never_pooled(tmp_path):
    """The audit's fixture e5: a grid run at 5 epochs, its baseline run again at 10 (same name, same folder tree).

    Pooled as repeats, the baseline's estimate was the median of 50 s and 100 s and MP read 2.27x; the
    5-epoch MP cell must be compared with the 5-epoch baseline only (1.52x).
    """
    root = tmp_path / "runs"
    b5 = write_run(root, "gpu_quick", "dense-baseline", _cfg(epochs=5), [30.0, 10.0, 10.2, 9.8, 10.0], QUAL[:5])
    b10 = write_run(root / "later", "gpu_quick", "dense-baseline", _cfg(epochs=10),
                    [30.0, 10.0, 10.2, 9.8, 10.0] * 2, QUAL[:5] * 2)
    mp = write_run(root, "gpu_quick", "dense-amp-fp16", _cfg(precision="amp-fp16", epochs=5),
                   [20.0, 6.6, 6.7, 6.5, 6.6], QUAL[:5])
    cells = group_cells(load_runs(root))
    assert sorted((c.name, len(c.runs)) for c in cells) == [
        ("dense-amp-fp16", 1), ("dense-baseline [epochs 10]", 1), ("dense-baseline [epochs 5]", 1)]
    base5 = next(c for c in cells if c.name == "dense-baseline [epochs 5]")
    assert base5.status_text() == "ok (1 repeat) [not pooled with 1 other cell(s) of this name: they differ in epochs]"
    assert base5.train_time_est_s() == pytest.approx(_est(b5)) == pytest.approx(50.0)
    row, md = by_cell(table(root, "fig8a"), "dense-amp-fp16")
    assert row["dense_baseline_cell"] == "dense-baseline [epochs 5]"
    assert row["speedup_vs_model_x"] == pytest.approx(_est(b5) / _est(mp)) == pytest.approx(50.0 / 33.0)
    assert _est(b10) == pytest.approx(100.0)  # the 10-epoch baseline, had it been pooled: median(50, 100) / 33
    t = table(root, "ttq")
    assert {r["cell"] for r in t.csv_rows} >= {"dense-baseline [epochs 5]", "dense-baseline [epochs 10]"}


def test_a_run_without_any_config_joins_the_one_cell_of_its_name(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    d = write_run(root, "g", "fp32-host-off-dense", _cfg(), [], [], repeat=1, status="skipped", reason="no time")
    (d / "config.json").unlink()
    cells = group_cells(load_runs(root))
    assert [(c.name, len(c.runs)) for c in cells] == [("fp32-host-off-dense", 2)]
    assert cells[0].status_text() == "1/2 ok; skipped: no time"



def test_a_finished_run_without_config_json_is_unreadable_not_a_run_of_the_defaults(tmp_path):
    """A finished run whose config.json was gone was read with TrainConfig's defaults (50 epochs, fp32, ...) and
    reported `ok` beside its numbers; a skipped one keeps its reason (it has no numbers to misplace)."""
    root = tmp_path / "runs"
    d = write_run(root, "g", "amp-fp16-host-off-dense", _cfg(precision="amp-fp16"), _times(6.0, 2), QUAL)
    (d / "config.json").unlink()
    (run,) = load_runs(root)
    assert run.status == "unreadable" and run.error == "config.json missing: the run's settings are unknown"
    status = pd.read_csv(make_report(root, opts=Options()).out / "tables" / "status.csv").set_index("cell")
    assert status.iloc[0]["message"] == "unreadable: config.json missing: the run's settings are unknown"

def test_a_finished_run_without_env_json_is_not_put_on_another_machine(tmp_path):
    """The audit's fixture e4: an MP run whose env.json was gone was counted on the baseline's machine (1.51x).

    Only a run that never ran an epoch (skipped, not started) is placed on its grid's machine.
    """
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    write_run(root, "g", "amp-fp16-host-off-dense", _cfg(precision="amp-fp16"), _times(6.0, 2), QUAL, write_env=False)
    write_run(root, "g", "fp32-host-cuda-graph-dense", _cfg(graphs="cuda-graph"), [], [], status="skipped",
              reason="--graphs cuda-graph needs a CUDA device", write_env=False)
    runs = {r.cell_name: r for r in load_runs(root)}
    assert runs["amp-fp16-host-off-dense"].fingerprint == UNKNOWN_ENV
    assert runs["fp32-host-cuda-graph-dense"].fingerprint == FP_A
    known, unknown = views(root)
    assert (known.fingerprint, unknown.fingerprint) == (FP_A, UNKNOWN_ENV)
    assert [r["cell"] for r in ARTIFACTS["fig8a"].build(known).csv_rows] == ["fp32-host-cuda-graph-dense"]
    (row,) = ARTIFACTS["fig8a"].build(unknown).csv_rows
    assert row["cell"] == "amp-fp16-host-off-dense" and row["speedup_vs_model_x"] is None
    assert row["speedup_vs_model_ci_method"] == "no baseline cell"
    assert row["status"] == "ok (1 repeat) [no env.json: machine unknown, compared only with other runs without one]"
    report = make_report(root, opts=Options())
    md = report.report_md.read_text()
    assert "`unknown`: runs without env.json" in md and "fingerprint `unknown`" in md
    # its status.csv row says so too (it showed only an env label like the others'); a skipped run that never
    # ran an epoch is placed on its grid's machine and is not flagged
    status = pd.read_csv(report.out / "tables" / "status.csv", keep_default_na=False).set_index("cell")
    assert status.loc["amp-fp16-host-off-dense", "message"] == (
        "no env.json: machine unknown, compared only with other runs without one")
    assert "env.json" not in status.loc["fp32-host-cuda-graph-dense", "message"]
    assert status.loc["fp32-host-off-dense", "message"] == ""
