"""The second user audit of `bench report` (tiny CPU grids): targets from a baseline that learned nothing, runs
whose process has ended, noise bands on a still-moving final phase, images/s against the speedup, the raw CSV
and the Fig. 4(c) baselines. Every number is recomputed here from the fabricated epochs."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from bench.report.artifacts import fig4c
from bench.report.artifacts.fig4c import baseline_lines
from bench.report.build import make_report
from bench.report.cells import still_changing
from bench.report.options import Options
from bench.report.runs import read_run
from ddnet.errors import UserError
from tests.report_fakes import QUAL, _cfg, _cli, _times, by_cell, table, write_run

INPUT = {"input_ms_ssim": 99.36}


def _summary(d: Path, **changes) -> None:
    s = json.loads((d / "summary.json").read_text())
    (d / "summary.json").write_text(json.dumps({**s, **changes}))


# ---------------------------------------------------------------------------------- 1. time-to-quality target


def test_no_target_from_a_baseline_that_ended_at_zero(tmp_path):
    """A baseline that ended at 0 % (input 99.36 %) set the target -0.50 %: every cell 'reached' it at epoch 1,
    with 5x speedups. Now that context has no target, no time and no speedup, and one note says why."""
    root = tmp_path / "runs"
    write_run(root, "k", "fp32-host-off-dense", _cfg(), _times(10.0, 1), [0, 87.5, 86.7, 87.5, 88.9, 0.0],
              extra_row=INPUT)
    write_run(root, "k", "fp32-host-off-random-hybrid3", _cfg(kind="random", dense_epochs=3), _times(2.0, 2),
              [0, 87.5, 86.7, 80, 81, 77.3], extra_row=INPUT)
    t = table(root, "ttq")
    for cell in ("fp32-host-off-dense", "fp32-host-off-random-hybrid3"):
        row, md = by_cell(t, cell)
        assert row["target_ms_ssim_pct"] is None and row["ttq_s"] is None and row["reached_epoch"] is None
        assert row["speedup_ttq_x"] is None and md["reached and held"] == "no target (see the notes)"
        assert "ended at 0.00%: minus 0.5 pp leaves no target above 0%" in row["target_rule"]
    (note,) = [n for n in t.notes if n.startswith("No target")]
    assert "fp32-host-off-dense, fp32-host-off-random-hybrid3" in note and "0.00%" in note
    speed = table(root, "speed")
    hyb, _ = by_cell(speed, "fp32-host-off-random-hybrid3")
    assert hyb["ttq_s"] is None and hyb["speedup_ttq_x"] is None and hyb["ttq_missing"].startswith("no target: ")


def test_no_target_at_or_below_zero_and_a_good_baseline_still_sets_one(tmp_path):
    root = tmp_path / "runs"
    # no input recorded (older runs): a baseline at 0.3 % would set -0.2 %
    write_run(root, "a", "fp32-host-off-dense", _cfg(), _times(10.0, 1), [0, 0, 0, 0, 0, 0.3])
    t = table(root, "ttq")
    row, _ = by_cell(t, "fp32-host-off-dense")
    assert row["target_ms_ssim_pct"] is None and "leaves no target above 0%" in row["target_rule"]
    # a baseline that beat its input (90 > 84): baseline - 0.5 pp, reached and held from epoch 6
    root = tmp_path / "good"
    write_run(root, "b", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL, extra_row={"input_ms_ssim": 84.0})
    row, _ = by_cell(table(root, "ttq"), "fp32-host-off-dense")
    assert row["target_ms_ssim_pct"] == pytest.approx(89.5) and row["reached_epoch"] == 6
    assert not any("below the low-dose input" in n for n in table(root, "ttq").notes)


def test_a_baseline_below_its_input_sets_a_target_and_the_table_says_so(tmp_path):
    # short runs on small data seldom beat the input (99.36 %): the time to the baseline's quality is still a
    # speed measure, marked as such
    root = tmp_path / "runs"
    write_run(root, "k", "fp32-host-off-dense", _cfg(), _times(10.0, 1), [0, 87.5, 86.7, 87.5, 88.9, 89.17],
              extra_row=INPUT)
    t = table(root, "ttq")
    row, _ = by_cell(t, "fp32-host-off-dense")
    assert row["target_ms_ssim_pct"] == pytest.approx(88.67) and row["reached_epoch"] == 5
    assert row["target_rule"] == ("dense fp32 baseline 89.17% - 0.5 pp; below the low-dose input's own MS-SSIM "
                                  "(99.36%)")
    (note,) = [n for n in t.notes if "below the low-dose input" in n]
    assert note.startswith("The target of fp32-host-off-dense was set by a dense fp32 baseline that ended below")


@pytest.mark.parametrize("bad", ["150", "0", "-5", "nan", "inf"])
def test_a_target_outside_0_100_is_one_error_line(tmp_path, capsys, bad):
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    code, _, err = _cli(["report", str(root), "--target", bad], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"error: --target {bad}") and "(0, 100]" in lines[0]
    assert not (root / "report").exists()
    with pytest.raises(UserError, match=r"\(0, 100\]"):
        make_report(root, opts=Options(target_pct=150.0))


# ---------------------------------------------------------------------------------- 2. liveness, not started


def _ended_process() -> dict:
    """The writer record of a process of this host that has ended."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    created = psutil.Process(p.pid).create_time()
    p.wait()
    return {"host": socket.gethostname(), "pid": p.pid, "created": created}


def test_a_running_summary_whose_process_ended_reads_stopped(tmp_path):
    """`bench report` read 'running (partial: 2/6 epochs)' where `bench status` said the process had ended."""
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    ended = write_run(root, "g", "fp32-device-off-dense", _cfg(loader="device"), _times(9.0, 2)[:2], QUAL[:2],
                      status="running")
    _summary(ended, writer=_ended_process())
    lost = write_run(root, "g", "amp-bf16-host-off-dense", _cfg(precision="amp-bf16"), _times(6.0, 3)[:3], QUAL[:3],
                     status="running")
    _summary(lost, interrupted="a replica was lost")
    live = write_run(root, "g", "fp32-host-cuda-graph-dense", _cfg(graphs="cuda-graph"), _times(9.0, 4)[:1],
                     QUAL[:1], status="running")
    me = psutil.Process()
    _summary(live, writer={"host": socket.gethostname(), "pid": me.pid, "created": me.create_time()})
    away = write_run(root, "g", "tf32-host-off-dense", _cfg(precision="tf32"), _times(8.0, 5)[:2], QUAL[:2],
                     status="running")
    _summary(away, writer={"host": "node-elsewhere-17", "pid": 4242, "created": 1.0e9})
    rep = make_report(root, opts=Options())
    status = pd.read_csv(rep.out / "tables" / "status.csv").set_index("path")
    assert status.loc["g/fp32-device-off-dense-r0", "status"] == "stopped"
    assert status.loc["g/fp32-device-off-dense-r0", "message"] == (
        "stopped (partial: 2/6 epochs): its process has ended; `bench run` (the same command) resumes it")
    assert status.loc["g/amp-bf16-host-off-dense-r0", "message"].startswith(
        "stopped (partial: 3/6 epochs): its process has ended (a replica was lost);")
    assert status.loc["g/fp32-host-cuda-graph-dense-r0", "status"] == "running"  # its process is this one
    assert status.loc["g/fp32-host-cuda-graph-dense-r0", "message"] == "running (partial: 1/6 epochs)"
    assert status.loc["g/tf32-host-off-dense-r0", "status"] == "running"  # cannot be told from here: said so
    assert status.loc["g/tf32-host-off-dense-r0", "message"].startswith(
        "running (partial: 2/6 epochs) on node-elsewhere-17, as its summary says: this host cannot see that process")
    (ended / "cell.json").unlink()  # a run `bench train` made on its own: that command resumes it
    alone = read_run(ended, root)
    assert alone.status_text().endswith(f"its process has ended; `bench train --out {ended} --resume` resumes it")
    md = rep.report_md.read_text()
    assert "1 ok, 2 running, 2 stopped." in md and "running (partial: 2/6 epochs) |" not in md


def test_cells_in_grid_json_without_a_folder_count_as_not_started(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    cells = [{"folder": f"{c}-r0", "cell": c, "grid": "g", "repeat": 0}
             for c in ("fp32-host-off-dense", "fp32-host-off-topk-hybrid3", "fp32-device-off-dense")]
    (root / "g" / "grid.json").write_text(json.dumps({"grid": "g", "cells": cells, "order": [c["folder"] for c in cells]}))
    rep = make_report(root, opts=Options())
    status = pd.read_csv(rep.out / "tables" / "status.csv")
    assert list(status["status"]) == ["ok", "not started", "not started"]
    assert list(status["cell"]) == ["fp32-host-off-dense", "fp32-host-off-topk-hybrid3", "fp32-device-off-dense"]
    assert list(status["env"]) == ["env1"] * 3 and list(status["epochs"].fillna(-1)) == [6, -1, -1]
    md = rep.report_md.read_text()
    assert "2 not started, 1 ok." in md and "| env1 | g | fp32-device-off-dense | 0 | not started |" in md


# ---------------------------------------------------------------------------------- 3. still changing


@pytest.mark.parametrize(("values", "changing"), [
    ([0.0, 0.0, 77.3], True),      # the audit's random-hybrid: recovering after pruning
    ([60.0, 70.0, 80.0], True),    # a steady climb
    ([88.0, 86.0, 83.5], True),    # a steady fall, not slowing
    ([87.9, 88.2, 60.0], True),    # a jump at the end
    ([30.0, 84.0, 88.0], False),   # a recovery that has slowed down
    ([86.0, 92.0, 90.0], False),   # scattered both ways
    ([89.0, 89.1, 89.2], False),   # drifts by less than 1 pp
    ([84.0, 88.0], True),          # two values: one step, no earlier spread to call it a swing
    ([84.0, 84.5], False),         # two values within 1 pp: settled
    ([84.0], False),               # one value: no band at all
])
def test_still_changing(values, changing):
    assert still_changing(values) is changing


def test_a_still_moving_final_phase_has_no_band_and_no_within_noise(tmp_path):
    """random-hybrid read '+11.85 pp (+13.29%) ± 89.30, within noise' from sparse epochs 0, 0, 77.3."""
    root = tmp_path / "runs"
    write_run(root, "k", "fp32-host-off-dense", _cfg(), _times(10.0, 1), [0, 87.5, 86.7, 87.5, 88.9, 89.17])
    write_run(root, "k", "fp32-host-off-random-hybrid3", _cfg(kind="random", dense_epochs=3), _times(2.0, 2),
              [0, 87.5, 86.7, 0.0, 0.0, 77.32])
    write_run(root, "k", "fp32-host-off-topk-hybrid3", _cfg(kind="topk", dense_epochs=3), _times(2.0, 3),
              [0, 87.5, 86.7, 81.54, 81.74, 81.36])
    t = table(root, "table2")
    rnd, rnd_md = by_cell(t, "fp32-host-off-random-hybrid3")
    assert rnd["drop_pp"] == pytest.approx(89.17 - 77.32)
    assert rnd["drop_noise_pp"] is None and rnd["drop_within_noise"] is None and rnd["drop_still_changing"] is True
    assert rnd_md["drop vs dense (ours)"] == "+11.85 pp (+13.29%), still changing"
    # the steady top-K keeps its band: 2 x sqrt(sd(87.5, 88.9, 89.17)^2 + sd(81.54, 81.74, 81.36)^2)
    top, top_md = by_cell(t, "fp32-host-off-topk-hybrid3")
    sd = lambda v: float(np.std(v, ddof=1))  # noqa: E731
    band = 2 * math.sqrt(sd([87.5, 88.9, 89.17]) ** 2 + sd([81.54, 81.74, 81.36]) ** 2)
    assert top["drop_noise_pp"] == pytest.approx(band) and top["drop_still_changing"] is False
    assert top_md["drop vs dense (ours)"] == f"+7.81 pp (+8.76%) ± {band:.2f}"
    (note,) = [n for n in t.notes if n.startswith("'± N'")]
    assert "'still changing'" in note and "fp32-host-off-random-hybrid3: 0.00, 0.00, 77.32" in note
    assert "A change without a band" not in note  # that sentence is for a one-epoch final phase


# ---------------------------------------------------------------------------------- 4. images/s and speedup


def test_speed_images_per_s_is_consistent_with_the_speedup(tmp_path):
    """images/s came from the mean epoch time, the speedup from medians: 26.6 vs 9.9 images/s (2.7x) beside
    1.79x. Now images/s = the run's images over its training-time estimate, and their ratio is the speedup."""
    root = tmp_path / "runs"
    base_t = [30.0, 10.0, 10.0, 30.0, 10.0, 10.0]  # one slow steady epoch: mean 14 s, median 10 s
    hyb_t = [30.0, 10.0, 10.0, 2.0, 2.0, 6.0]  # dense phase median 10 s, sparse 2 s
    for cell, cfg, times in (("fp32-host-off-dense", _cfg(), base_t),
                             ("fp32-host-off-random-hybrid3", _cfg(kind="random", dense_epochs=3), hyb_t)):
        d = write_run(root, "s", cell, cfg, times, QUAL)
        rows = [json.loads(x) for x in (d / "epochs.jsonl").read_text().splitlines()]
        (d / "epochs.jsonl").write_text("".join(json.dumps({**r, "images_per_s": 64 / r["time_s"]}) + "\n"
                                                for r in rows))
    t = table(root, "speed")
    base, _ = by_cell(t, "fp32-host-off-dense")
    hyb, hyb_md = by_cell(t, "fp32-host-off-random-hybrid3")
    assert base["images_per_s"] == pytest.approx(6 * 64 / (6 * 10.0))  # not 5 x 64 / 70 s = 4.57
    assert hyb["images_per_s"] == pytest.approx(6 * 64 / (3 * 10.0 + 3 * 2.0))
    assert hyb["speedup_x"] == pytest.approx(60.0 / 36.0)
    assert hyb["images_per_s"] / base["images_per_s"] == pytest.approx(hyb["speedup_x"])
    assert hyb_md["images/s"] == "10.7" and hyb_md["vs dense fp32 (95% CI)"].startswith("1.67x")
    # FLOPs per image: 3 x the counted forward (2e6), the same in both phases here
    assert hyb["flops_fwd_bwd_per_image"] == pytest.approx(6e6)


# ---------------------------------------------------------------------------------- 5. raw CSV, Fig. 4(c)


def test_epochs_raw_keeps_the_paper_scale_metric(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL,
              extra_row={"val_ms_ssim_paper_code": 95.5, "val_ms_ssim_paper_code_std": 0.7})
    raw = pd.read_csv(make_report(root, opts=Options()).out / "tables" / "epochs_raw.csv")
    assert list(raw["val_ms_ssim_paper_code"]) == [95.5] * 6 and list(raw["val_ms_ssim_paper_code_std"]) == [0.7] * 6
    assert list(raw["val_ms_ssim"]) == QUAL


def test_fig4c_draws_each_dense_baseline_apart(tmp_path, monkeypatch):
    """Two dense baselines of other run lengths were two identical black dashed lines."""
    root = tmp_path / "runs"
    for epochs, q in ((6, QUAL), (4, [60.0, 70.0, 75.0, 78.0])):
        write_run(root / f"e{epochs}", "f", "fp32-host-off-dense", _cfg(epochs=epochs), _times(10.0, epochs, n=epochs),
                  q)
        write_run(root / f"e{epochs}", "f", "fp32-host-off-random-hybrid2", _cfg(kind="random", dense_epochs=2, epochs=epochs),
                  _times(8.0, 10 + epochs, n=epochs), [x - 1 for x in q])
    t = table(root, "fig4c")
    lines = baseline_lines(t.csv_rows, grids=False, lengths=True)
    assert [(v, label) for v, label, _ in lines] == [(78.0, "dense baseline (ours, 4 epochs)"),
                                                     (90.0, "dense baseline (ours, 6 epochs)")]
    assert len({str(style) for _, _, style in lines}) == 2
    # two baselines of one length and grid (other data or batch): told apart by their value
    same = baseline_lines([{**r, "epochs": 6} for r in t.csv_rows], grids=False, lengths=False)
    assert [label for _, label, _ in same] == ["dense baseline (ours): 78.00 %", "dense baseline (ours): 90.00 %"]
    figs = []
    monkeypatch.setattr(fig4c, "save", lambda fig, path, save=fig4c.save: (figs.append(fig), save(fig, path))[1])
    rep = make_report(root, opts=Options())
    assert (rep.out / "figures" / "fig4c.png").exists() and not any(p for e in rep.environments for p in e.problems)
    drawn = {line.get_label(): line.get_linestyle() for line in figs[0].axes[0].get_lines()
             if line.get_label().startswith("dense baseline")}
    assert set(drawn) == {"dense baseline (ours, 4 epochs)", "dense baseline (ours, 6 epochs)"}
    assert len(set(drawn.values())) == 2  # not two identical dashed lines
