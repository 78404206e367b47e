"""The report does not claim more than the runs show: time to quality held, not touched; honest labels and peaks.

Each test builds run folders by hand (tests/report_fakes.py) with numbers taken
from or shaped like the H200 runs an audit of `bench report` used, and checks
the numbers the report prints against values worked out here by hand.
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

import bench.report.artifacts.fig4ab as fig4ab
import bench.report.artifacts.fig4c as fig4c
import bench.report.artifacts.fig9b as fig9b
import bench.report.artifacts.table1 as table1
from bench.report.artifacts import ARTIFACTS
from bench.report.build import make_report
from bench.report.options import Options
from bench.stats import censored_median
from tests.report_fakes import _cfg, _row, write_run

# H200 gpu_quick, 5 epochs (results/gpu/h200-2026-11-26): validation MS-SSIM swings by about 10 pp per epoch.
BASE_T, BASE_Q = [3.85, 2.92, 2.85, 2.89, 2.88], [29.5, 36.0, 31.5, 28.1, 40.7]
FP16_T, FP16_Q = [3.06, 1.89, 1.94, 1.87, 1.95], [33.9, 45.2, 25.2, 30.0, 49.3]
# Touches the target on a spike at epoch 2 and ends below it (the combined cell's 45.8 -> 28.8, 18.0).
SPIKE_T, SPIKE_Q = [1.97, 1.97, 1.97, 1.97, 1.97], [31.1, 45.8, 28.8, 18.0, 38.0]
TARGET = 40.7 - 0.5


def _ttq(root, **opts) -> tuple[pd.DataFrame, str]:
    rep = make_report(root, opts=Options(**opts))
    return pd.read_csv(rep.out / "tables" / "ttq.csv"), (rep.out / "tables" / "ttq.md").read_text()


def test_time_to_quality_needs_the_target_held_to_the_end(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "g", "dense", _cfg(epochs=5), BASE_T, BASE_Q)
    write_run(root, "g", "amp-fp16", _cfg(precision="amp-fp16", epochs=5), FP16_T, FP16_Q)
    write_run(root, "g", "spike", _cfg(precision="amp-bf16", epochs=5), SPIKE_T, SPIKE_Q)
    t, md = _ttq(root)
    fp16, spike = _row(t, "amp-fp16"), _row(t, "spike")
    assert fp16["target_ms_ssim_pct"] == pytest.approx(TARGET)
    # fp16 touches 40.2 at epoch 2 (45.2) and falls to 25.2: reached and held only from epoch 5.
    assert fp16["reached_epoch"] == 5 and fp16["ttq_s"] == pytest.approx(sum(FP16_T))
    assert fp16["first_touch_epoch"] == 2 and fp16["first_touch_s"] == pytest.approx(3.06 + 1.89)
    # 15.39 s / 10.71 s = 1.44x, not the 15.39 / 4.95 = 3.11x that the first touch gave.
    assert fp16["speedup_ttq_x"] == pytest.approx(sum(BASE_T) / sum(FP16_T))
    assert fp16["speedup_ttq_x"] == pytest.approx(1.437, abs=1e-3)
    assert "epoch 5 (1/1 repeats); first at the target at epoch 2, then below it" in md
    # The spike run ends at 38.0: not reached, no time, no speedup; its first touch is kept.
    assert spike["repeats_reached"] == 0 and spike["repeats_fell_back"] == 1
    assert pd.isna(spike["ttq_s"]) and pd.isna(spike["speedup_ttq_x"])
    assert spike["first_touch_epoch"] == 2 and spike["first_touch_s"] == pytest.approx(2 * 1.97)
    assert "reached at epoch 2, not held" in md
    assert "stays at or above the target" in md
    speed = pd.read_csv(tmp_path / "runs" / "report" / "tables" / "speed.csv")
    assert _row(speed, "amp-fp16")["ttq_s"] == pytest.approx(sum(FP16_T)) and pd.isna(_row(speed, "spike")["ttq_s"])


def test_censored_median_counts_a_miss_as_never():
    assert censored_median([10.0, 12.0, None]) == 12.0  # 2 of 3: the slower of the two that got there
    assert censored_median([10.0, None, None]) is None  # 1 of 3 is not a time
    assert censored_median([10.0, None]) is None  # half is not a majority
    assert censored_median([3.0, 1.0, 2.0]) == 2.0
    assert censored_median([]) is None


def test_time_to_quality_speedup_only_when_most_repeats_hold_the_target(tmp_path):
    root = tmp_path / "runs"
    for r in range(3):
        write_run(root, "g", "dense", _cfg(epochs=5), [x + 0.01 * r for x in BASE_T], BASE_Q, repeat=r)
    # 'lucky': only repeat 0 holds the target; 'most': repeats 0 and 1 do; 'all': every repeat does.
    for r in range(3):
        times = [x * (1 + 0.02 * r) for x in FP16_T]
        write_run(root, "g", "lucky", _cfg(precision="amp-fp16", epochs=5), times,
                  FP16_Q if r == 0 else SPIKE_Q, repeat=r)
        write_run(root, "g", "most", _cfg(precision="amp-bf16", epochs=5), times,
                  FP16_Q if r < 2 else SPIKE_Q, repeat=r)
        write_run(root, "g", "all", _cfg(precision="tf32", epochs=5), times, FP16_Q, repeat=r)
    t, md = _ttq(root)
    base_s = sum(BASE_T) + 5 * 0.01  # median of the three baseline repeats (repeat 1)
    lucky, most, every = _row(t, "lucky"), _row(t, "most"), _row(t, "all")
    # 1 of 3: the old report gave that one run's 1.44x; now no time and no speedup.
    assert lucky["repeats_reached"] == 1 and pd.isna(lucky["ttq_s"]) and pd.isna(lucky["speedup_ttq_x"])
    assert "1/3 repeats held it, 2 reached it (first at epoch 2) and fell back: fewer than half, no time" in md
    # 2 of 3: median of (t0, t1, never) = t1, the slower of the two; no interval (a repeat missed).
    t1 = sum(FP16_T) * 1.02
    assert most["ttq_s"] == pytest.approx(t1) and most["speedup_ttq_x"] == pytest.approx(base_s / t1)
    assert pd.isna(most["speedup_ttq_lo_x"]) and "1 of 3 cell repeats did not hold" in most["speedup_ttq_verdict"]
    # 3 of 3: an interval over repeats.
    assert every["speedup_ttq_x"] == pytest.approx(base_s / t1)
    assert every["speedup_ttq_lo_x"] < every["speedup_ttq_x"] < every["speedup_ttq_hi_x"]
    assert every["speedup_ttq_verdict"] == "faster"


def test_time_to_quality_gives_no_paper_speedup_for_a_model_that_never_reached_it(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "table1", "dense", _cfg(batch_size=1, epochs=5), BASE_T, BASE_Q)
    write_run(root, "table1", "random-sparse", _cfg(batch_size=1, kind="random", dense_epochs=0, epochs=5),
              FP16_T, FP16_Q)
    t, md = _ttq(root)
    sparse = _row(t, "random-sparse")
    # Table 1's sparse model ended at 42.39 %, below the paper's 97.22 % target: not 235/175 = 1.34x.
    assert pd.isna(sparse["paper_speedup_x"])
    # worded as the paper's own run: this row's target (40.2 % here) is another one
    assert "paper: ended at 42.39 %, below its 97.22 % target" in md and "1.34x" not in md
    assert _row(t, "dense")["paper_speedup_x"] == 1.0


# H200 graph-fp32 vs the eager baseline: capture 1.66 s in epoch 1, outside time_s.
GRAPH_T, GRAPH_CAPTURE = [2.836, 2.813, 2.854, 2.768, 2.804], [1.658, 0.0, 0.0, 0.0, 0.0]


def test_fig9b_mean_epoch_includes_graph_capture(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-off", _cfg(epochs=5), BASE_T, BASE_Q)
    write_run(root, "g", "fp32-graph", _cfg(graphs="cuda-graph", epochs=5), GRAPH_T, BASE_Q, capture=GRAPH_CAPTURE)
    rep = make_report(root, opts=Options())
    row = _row(pd.read_csv(rep.out / "tables" / "fig9b.csv"), "fp32-graph")
    # (14.075 + 1.658) / 5 = 3.147 s with capture vs 15.39 / 5 = 3.078 s eager: the graphs' mean epoch is slower
    # here (it read 2.815 s when capture was left out).
    assert row["epoch_cost_s_mean"] == pytest.approx((sum(GRAPH_T) + 1.658) / 5)
    assert row["eager_epoch_cost_s_mean"] == pytest.approx(sum(BASE_T) / 5)
    assert row["epoch_cost_s_mean"] > row["eager_epoch_cost_s_mean"]
    assert row["epoch_time_s_p50"] == pytest.approx((2.804 + 2.813) / 2)  # steady epochs' time_s, no capture
    md = (rep.out / "tables" / "fig9b.md").read_text()
    assert "epoch mean incl. capture eager / graphs" in md and "| 3.08 s / 3.15 s |" in md


def test_fig9b_gives_a_hybrid_cells_epoch_p50_per_phase(tmp_path):
    # 3 dense epochs at ~2 s, 3 sparse at ~1 s (structured: shrunk layers); steady = epochs 2..6. One median over
    # both phases (2.0, 2.1, 1.0, 1.1, 0.9 -> 1.1 s) is a sparse epoch's and says nothing of the dense ones.
    root = tmp_path / "runs"
    hyb = {"kind": "structured", "dense_epochs": 3, "epochs": 6}
    write_run(root, "g", "hyb-off", _cfg(**hyb), [6.0, 2.0, 2.1, 1.0, 1.1, 0.9], BASE_Q + [41.0])
    write_run(root, "g", "hyb-graph", _cfg(graphs="cuda-graph", **hyb), [5.0, 1.6, 1.8, 0.8, 0.7, 0.9],
              BASE_Q + [41.0], capture=[1.0, 0, 0, 0.5, 0, 0])
    rep = make_report(root, opts=Options())
    row = _row(pd.read_csv(rep.out / "tables" / "fig9b.csv"), "hyb-graph")
    assert row["epoch_time_dense_s_p50"] == pytest.approx(1.7) and row["epoch_time_sparse_s_p50"] == 0.8
    assert row["eager_epoch_time_dense_s_p50"] == pytest.approx(2.05) and row["eager_epoch_time_sparse_s_p50"] == 1.0
    assert row["epoch_time_s_p50"] == 0.9  # the pooled median stays in the CSV
    md = (rep.out / "tables" / "fig9b.md").read_text()
    assert "| 2.0 s dense, 1.0 s sparse / 1.7 s dense, 800 ms sparse |" in md, md
    assert "per phase for a cell with a dense and a sparse phase" in md


def test_speed_and_fig9b_explain_their_within_one_run_intervals(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-off", _cfg(epochs=5), BASE_T, BASE_Q)
    write_run(root, "g", "fp32-graph", _cfg(graphs="cuda-graph", epochs=5), GRAPH_T, BASE_Q, capture=GRAPH_CAPTURE)
    rep = make_report(root, opts=Options())
    for key in ("speed", "fig9b"):  # one repeat a cell: every interval is over one run's epochs, and says so
        md = (rep.out / "tables" / f"{key}.md").read_text()
        assert "] (within one run)" in md and "'(within one run)': an arm had fewer than 3 finished repeats" in md


def test_fig9b_plot_draws_every_pair(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    graphs = {"fp32": ("cuda-graph", "compile"), "amp-bf16": ("cuda-graph",), "amp-fp16": ("cuda-graph",),
              "tf32": ("cuda-graph",)}
    for prec, modes in graphs.items():
        write_run(root, "g", f"{prec}-off", _cfg(precision=prec, epochs=5), BASE_T, BASE_Q)
        for mode in modes:
            write_run(root, "g", f"{prec}-{mode}", _cfg(precision=prec, graphs=mode, epochs=5), GRAPH_T, BASE_Q,
                      capture=GRAPH_CAPTURE)
    figs = []
    save = fig9b.save
    monkeypatch.setattr(fig9b, "save", lambda fig, path: (figs.append(fig), save(fig, path))[1])
    rep = make_report(root, opts=Options())
    assert len(pd.read_csv(rep.out / "tables" / "fig9b.csv")) == 5
    titles = [ax.get_title() for ax in figs[0].axes if ax.get_visible()]
    # five pairs in a 2 x 3 grid (it drew the first three only)
    assert len(titles) == 5 and len(figs[0].axes) == 6
    assert {t.split(" vs ")[0] for t in titles} == {"fp32-cuda-graph", "fp32-compile", "amp-bf16-cuda-graph",
                                                     "amp-fp16-cuda-graph", "tf32-cuda-graph"}


def _with_peak(run_dir, peak: dict, flops_per_image: float = 1e10) -> None:
    """Give a fabricated run a recorded device peak and a training step's FLOPs per image."""
    env = json.loads((run_dir / "env.json").read_text())
    (run_dir / "env.json").write_text(json.dumps({**env, "device_peak": peak}))
    s = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**s, "flops_fwd_bwd_per_image_before_pruning": flops_per_image}))


CPU_PEAK = {"name": "cpu (measured)", "flops_tflops": {"fp32": 0.2, "tf32": 0.2, "amp-bf16": 1.0},
            "bandwidth_tbs": 0.03, "source": "measured at start (test)", "measured": True}


def test_speed_table_keeps_every_row_when_a_cell_has_no_steady_epoch(tmp_path):
    root = tmp_path / "runs"
    _with_peak(write_run(root, "demo", "dense", _cfg(epochs=5), BASE_T, BASE_Q, extra_row={"images_per_s": 10.0}),
               CPU_PEAK)
    # `bench train --epochs 1`: its only epoch is a warm-up, so it has no steady images/s
    _with_peak(write_run(root, "demo", "one-epoch", _cfg(epochs=1), [23.4], [15.6], extra_row={"images_per_s": 2.7}),
               CPU_PEAK)
    rep = make_report(root, opts=Options())
    assert not any("Speed" in p for e in rep.environments for p in e.problems)
    df = pd.read_csv(rep.out / "tables" / "speed.csv")
    assert list(df["cell"]) == ["dense", "one-epoch"]
    dense, one = df.iloc[0], df.iloc[1]
    # 1e10 FLOP x 10 images/s = 0.1 TFLOP/s of a 0.2 TFLOP/s peak: 50 %
    assert dense["images_per_s"] == pytest.approx(10.0) and dense["pct_of_peak_flops"] == pytest.approx(50.0)
    assert pd.isna(one["images_per_s"]) and pd.isna(one["pct_of_peak_flops"])
    assert one["peak_source"] == dense["peak_source"] and "measured at start (test)" in one["peak_source"]


def test_speed_table_says_why_a_cell_has_no_time_to_quality(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "fig8a", "dense", _cfg(epochs=5), BASE_T, BASE_Q)
    write_run(root, "fig8a", "spike", _cfg(precision="amp-bf16", epochs=5), SPIKE_T, SPIKE_Q)
    write_run(root, "fig8a", "low", _cfg(precision="amp-fp16", epochs=5), SPIKE_T, [q - 20 for q in BASE_Q])
    # a cell with no dense fp32 baseline of its context (another batch size) in any grid: there is no target
    # at all, which is not 'not reached'
    write_run(root, "fig8b", "combined", _cfg(precision="amp-bf16", loader="device", epochs=5).replace(batch_size=8),
              SPIKE_T, FP16_Q)
    rep = make_report(root, opts=Options())
    df = pd.read_csv(rep.out / "tables" / "speed.csv")
    assert _row(df, "combined")["ttq_missing"] == "no target: no finished dense fp32 baseline to set a target"
    assert _row(df, "spike")["ttq_missing"] == "reached at epoch 2, not held"
    assert _row(df, "low")["ttq_missing"] == "never reached (1 repeat)"
    assert pd.isna(_row(df, "dense")["ttq_missing"]) and _row(df, "dense")["ttq_s"] == pytest.approx(sum(BASE_T))
    md = (rep.out / "tables" / "speed.md").read_text()
    assert "no target: no finished dense fp32 baseline to set a target" in md and "not reached" not in md


def test_a_cpu_gets_one_peak_the_median_of_its_runs_measurements(tmp_path):
    root = tmp_path / "runs"
    # three runs on one shared CPU measured 0.1, 0.2 and 0.3 TFLOP/s fp32 at start; each reaches 0.1 TFLOP/s
    for cell, prec, fp32 in (("a", "fp32", 0.1), ("b", "tf32", 0.3), ("c", "amp-bf16", 0.2)):
        d = write_run(root, "demo", cell, _cfg(precision=prec, epochs=5), BASE_T, BASE_Q,
                      extra_row={"images_per_s": 10.0})
        _with_peak(d, {**CPU_PEAK, "flops_tflops": {"fp32": fp32, "tf32": fp32, "amp-bf16": 5 * fp32},
                       "bandwidth_tbs": 0.01 * fp32 / 0.1})
    rep = make_report(root, opts=Options())
    df = pd.read_csv(rep.out / "tables" / "speed.csv")
    # one peak for all: fp32/tf32 0.2 TFLOP/s and bf16 1.0 (each cell read 100 %, 33 % against its own)
    assert _row(df, "a")["pct_of_peak_flops"] == pytest.approx(50.0)
    assert _row(df, "b")["pct_of_peak_flops"] == pytest.approx(50.0)
    assert _row(df, "c")["pct_of_peak_flops"] == pytest.approx(10.0)
    assert set(df["peak_tflops"].round(6)) == {0.2, 1.0}
    md = (rep.out / "tables" / "speed.md").read_text()
    assert "median of 3 runs' measurements: amp-bf16 1 TFLOP/s (runs 0.5-1.5), fp32 0.2 TFLOP/s (runs 0.1-0.3)" in md
    assert "bandwidth 0.02 TB/s (runs 0.01-0.03)" in md


def test_an_epoch_with_time_zero_is_dropped_alone_and_flagged(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root, "fig8a", "dense", _cfg(epochs=5), BASE_T, BASE_Q)
    write_run(root, "fig8a", "amp-fp16", _cfg(precision="amp-fp16", epochs=5), FP16_T, FP16_Q)
    tf32_t = [3.475, 2.584, 0.0, 2.599, 2.496]  # the H200 tf32 run with epoch 3's time_s set to 0.0
    write_run(root, "fig8a", "tf32", _cfg(precision="tf32", epochs=5), tf32_t, BASE_Q)
    rep = make_report(root, opts=Options())
    assert not any(e.problems for e in rep.environments)
    f8 = pd.read_csv(rep.out / "tables" / "fig8a.csv")
    # 5 x median(2.92, 2.85, 2.89, 2.88) over 5 x median(2.584, 2.599, 2.496): epoch 3 left out, not the table
    assert _row(f8, "tf32")["speedup_vs_model_x"] == pytest.approx(2.885 / 2.584)
    assert _row(f8, "amp-fp16")["speedup_vs_model_x"] == pytest.approx(2.885 / 1.915)
    assert "epochs.jsonl damaged: epoch 3 (time_s 0) not > 0: left out of the times" in _row(f8, "tf32")["status"]
    assert set(pd.read_csv(rep.out / "tables" / "speed.csv")["cell"]) == {"dense", "amp-fp16", "tf32"}
    raw = pd.read_csv(rep.out / "tables" / "epochs_raw.csv")
    e3 = raw[(raw["cell"] == "tf32") & (raw["epoch"] == 3)].iloc[0]
    assert pd.isna(e3["time_s"]) and e3["time_s_invalid"] == 0.0 and e3["val_ms_ssim"] == BASE_Q[2]
    assert "fig8a" not in rep.not_run
    assert "tf32-r0: epoch 3 (time_s 0) not > 0" in capsys.readouterr().err


def test_a_table_that_fails_to_render_is_not_listed_as_not_run(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    write_run(root, "fig8a", "dense", _cfg(epochs=5), BASE_T, BASE_Q)
    write_run(root, "fig8a", "amp-fp16", _cfg(precision="amp-fp16", epochs=5), FP16_T, FP16_Q)

    def boom(env):
        raise KeyError("peak_source")

    monkeypatch.setitem(ARTIFACTS, "fig8a", dataclasses.replace(ARTIFACTS["fig8a"], build=boom))
    rep = make_report(root, opts=Options())
    label = rep.environments[0].label
    assert rep.failed == {"fig8a": [label]} and "fig8a" not in rep.not_run
    md = (rep.out / "report.md").read_text()
    assert "## Could not be rendered\n\nTheir runs are there" in md and f"- Fig. 8(a) analogue: on {label}." in md
    not_run = md.split("## Not run", 1)[1].split("## Paper sources", 1)[0]
    assert "Fig. 8(a)" not in not_run and "Fig. 8(b) analogue: not run" in not_run


def test_quality_plot_compares_the_paper_with_our_paper_scale_value(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    paper_scale = {"val_ms_ssim_paper_code": 79.0, "val_ms_ssim_paper_code_std": 0.5}
    write_run(root, "table1", "dense", _cfg(batch_size=1, epochs=5), BASE_T, [50, 52, 55, 56, 57.93],
              extra_row=paper_scale)
    write_run(root, "table1", "random-sparse", _cfg(batch_size=1, kind="random", dense_epochs=0, epochs=5), FP16_T,
              [30, 35, 38, 40, 41.0], extra_row={"val_ms_ssim_paper_code": 60.0})
    figs = []
    save = table1.save
    monkeypatch.setattr(table1, "save", lambda fig, path: (figs.append(fig), save(fig, path))[1])
    make_report(root, opts=Options())
    quality, speed = figs[0].axes[:2]
    heights = {c.get_label(): [round(b.get_height(), 2) for b in c] for c in quality.containers
               if c.get_label() and not c.get_label().startswith("_")}
    # the demo's dense cell: 57.93 standard, 79.00 on the paper's scale, beside the paper's 97.22
    assert heights["ours, paper's scale (± std over slices)"] == [79.0, 60.0]
    assert heights["ours, standard (± std over slices)"] == [57.93, 41.0]
    assert heights["paper"] == [97.22, 42.39]
    scale = next(c for c in quality.containers if c.get_label().startswith("ours, paper's scale"))
    # the sparse run recorded no spread on the paper's scale: its bar is hatched, the dense one is not
    assert [b.get_hatch() for b in scale] == [None, "//"]
    assert "hatched: no spread recorded" in [t.get_text() for t in quality.get_legend().get_texts()]
    # one repeat each: the total-time speedup has no interval, and its bar says so
    assert [round(p.get_height(), 2) for p in speed.patches if p.get_hatch() == "//" and p.get_height() > 0] == [
        round(sum(BASE_T) / sum(FP16_T), 2)]  # the sparse bar; the baseline's 1.0 is no estimate
    assert "hatched: no CI" in [t.get_text() for t in speed.get_legend().get_texts()]


def test_the_papers_gpu_is_named_as_the_paper_names_it(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "fig8a", "dense", _cfg(epochs=5), BASE_T, BASE_Q)
    write_run(root, "fig8a", "amp-fp16", _cfg(precision="amp-fp16", epochs=5), FP16_T, FP16_Q)
    rep = make_report(root, opts=Options())
    md = (rep.out / "report.md").read_text()
    # the paper says "Nvidia Ampere GPU"; A100 is an inference
    assert "Paper columns quote Chaturvedi, Cao, Feng on an Ampere GPU (likely A100;" in md
    assert "Paper (Fig. 8, Ampere GPU (likely A100)): MP 1.49x" in md
    assert "(A100," not in md and "Fig. 8, A100" not in md


def test_structural_pruning_shows_the_fraction_of_parameters_removed(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "g", "dense", _cfg(epochs=5), BASE_T, BASE_Q)
    d = write_run(root, "g", "structured-hybrid2", _cfg(kind="structured", dense_epochs=2, epochs=5), BASE_T, BASE_Q)
    # the H200 run's record: narrowed layers hold no zeros (overall 0.0), 566,451 -> 287,459 parameters
    s = json.loads((d / "summary.json").read_text())
    s["params"] = 287459
    s["sparsity"].update(overall=0.0, report={"params_before": 566451, "params_after": 287459,
                                              "params_removed": 278992})
    (d / "summary.json").write_text(json.dumps(s))
    write_run(root, "g", "random-hybrid2", _cfg(kind="random", dense_epochs=2, epochs=5), BASE_T, BASE_Q)
    rep = make_report(root, opts=Options())
    df = pd.read_csv(rep.out / "tables" / "sparsity.csv")
    st = _row(df, "structured-hybrid2")
    assert st["params_removed_fraction"] == pytest.approx(278992 / 566451)  # 0.493, not 0.000
    assert pd.isna(_row(df, "random-hybrid2")["params_removed_fraction"])
    md = (rep.out / "tables" / "sparsity.md").read_text()
    assert "| 0.493 of params removed |" in md and "| 0.500 |" in md  # masked: the zeros' share, as before


def test_the_paper_stands_beside_its_own_sparse_models_only(tmp_path):
    """The paper's 1.14x (Table 2) is for 50 % pruned after 25 of 50 epochs. A net pruned before its last epoch
    (the demo's random-last-epoch), Fig. 4(c)'s other splits, 70 % or a 2:4 pattern got that 1.14x and an
    ours/paper ratio too; they get no paper number now, in every table, and a note names them."""
    root = tmp_path / "runs"
    q = [50, 70, 80, 86, 92, 90.0]
    write_run(root, "h", "dense", _cfg(), [3.0, 2.0, 2.0, 2.0, 2.0, 2.0], q)
    hybrid = _cfg(kind="random", dense_epochs=3)
    cells = {"random-hybrid3": hybrid, "random-last-epoch": _cfg(kind="random", dense_epochs=5),
             "random70-hybrid3": hybrid.replace(**{"sparsity.amount": 0.7}),
             "topk24-hybrid3": _cfg(kind="topk", dense_epochs=3).replace(**{"sparsity.pattern": "2:4"}),
             "random-graph-amp-doll-hybrid5": _cfg(kind="random", dense_epochs=5, precision="amp-bf16",
                                                   loader="device", graphs="cuda-graph")}
    for name, cfg in cells.items():
        write_run(root, "h", name, cfg, [3.0, 1.9, 1.9, 1.9, 1.9, 1.9], q)
    rep = make_report(root, opts=Options())
    t2 = pd.read_csv(rep.out / "tables" / "table2.csv").set_index("cell")
    assert t2.loc["random-hybrid3", "paper_speedup_x"] == pytest.approx(1.14)
    assert t2.loc["random-hybrid3", "speedup_total_ours_over_paper"] == pytest.approx(
        t2.loc["random-hybrid3", "speedup_total_x"] / 1.14)
    for other in ("random-last-epoch", "random70-hybrid3", "topk24-hybrid3"):
        assert t2.loc[other, ["paper_speedup_x", "paper_ms_ssim_pct", "speedup_total_ours_over_paper"]].isna().all()
    md = (rep.out / "tables" / "table2.md").read_text()
    note = ("random-last-epoch, random70-hybrid3, topk24-hybrid3 prune another amount, in a 2:4 pattern or at "
            "another epoch: the paper has no number for that")
    assert note in md
    ttq = pd.read_csv(rep.out / "tables" / "ttq.csv").set_index("cell")
    assert ttq.loc["random-hybrid3", "paper_speedup_x"] == pytest.approx(1.14)
    assert ttq.loc[["random-last-epoch", "random70-hybrid3", "random-graph-amp-doll-hybrid5"],
                   "paper_speedup_x"].isna().all()
    # Fig. 8(b): all three on a net pruned at another epoch than the paper's has neither paper speedup
    f8 = pd.read_csv(rep.out / "tables" / "fig8b.csv").set_index("cell")
    assert f8.loc["random-graph-amp-doll-hybrid5", ["paper_vs_model_x", "paper_vs_dense_x"]].isna().all()
    assert "random-graph-amp-doll-hybrid5 prunes another amount" in (rep.out / "tables" / "fig8b.md").read_text()


def test_the_papers_memory_figures_stand_beside_cells_measured_as_it_measured(tmp_path):
    """62 GB (fp32) / 27 GB (mixed precision) are the paper's batch-32, 512 px models with mixed precision alone.
    Beside the H200's DoLL + graphs + bf16 cell (staged set and graph pool in its peak) or a batch-4 cell they
    compared nothing, yet read '27 GB, paper fp32 / MP 2.30x'."""
    root = tmp_path / "runs"
    paper_size = {"data.image_size": 512}
    t, q = [3.0, 2.0, 2.0, 2.0, 2.0, 2.0], [50, 70, 80, 86, 92, 90.0]
    write_run(root, "m", "dense", _cfg(batch_size=32).replace(**paper_size), t, q, rss_gib=26.0)
    write_run(root, "m", "amp", _cfg(batch_size=32, precision="amp-bf16").replace(**paper_size), t, q, rss_gib=15.5)
    write_run(root, "m", "hybrid-amp", _cfg(batch_size=32, precision="amp-fp16", kind="topk", dense_epochs=3)
              .replace(**paper_size), t, q, rss_gib=15.0)
    write_run(root, "m", "amp-doll-graph", _cfg(batch_size=32, precision="amp-bf16", loader="device",
                                                 graphs="cuda-graph").replace(**paper_size), t, q, rss_gib=21.9)
    write_run(root, "m", "amp-b4", _cfg(precision="amp-bf16").replace(**paper_size), t, q, rss_gib=2.0)
    write_run(root, "m", "amp-64px", _cfg(batch_size=32, precision="amp-bf16").replace(**{"data.image_size": 64}),
              t, q, rss_gib=1.0)
    rep = make_report(root, opts=Options())
    m = pd.read_csv(rep.out / "tables" / "memory.csv").set_index("cell")
    assert m.loc["dense", "paper_gb"] == 62 and m.loc["amp", "paper_gb"] == 27 and m.loc["hybrid-amp", "paper_gb"] == 27
    assert m.loc["amp", "paper_fp32_over_mp"] == pytest.approx(62 / 27)
    for other in ("amp-doll-graph", "amp-b4", "amp-64px"):
        assert pd.isna(m.loc[other, "paper_gb"]) and pd.isna(m.loc[other, "paper_fp32_over_mp"]), other
    assert "batch 32, 512 px" in (rep.out / "tables" / "memory.md").read_text()


def test_the_papers_gco_and_sparse_speedups_stand_beside_their_own_pairs_only(tmp_path):
    """Fig. 9(b): the paper's 1.16x is GCO alone over the same model eager. It stood beside graphs on top of
    bf16 (the H200's 1.01x pair) and beside a graphs cell with no eager counterpart. Fig. 8's sparse numbers
    are for its hybrid models: a net pruned before training with fp16 got its 1.34x."""
    root = tmp_path / "runs"
    t, q = [3.0, 2.0, 2.0, 2.0, 2.0, 2.0], [50, 70, 80, 86, 92, 90.0]
    write_run(root, "g", "dense", _cfg(), t, q)
    write_run(root, "g", "graph", _cfg(graphs="cuda-graph"), [3.0, 1.8, 1.8, 1.8, 1.8, 1.8], q)
    write_run(root, "g", "bf16", _cfg(precision="amp-bf16"), [3.0, 1.5, 1.5, 1.5, 1.5, 1.5], q)
    write_run(root, "g", "bf16-graph", _cfg(precision="amp-bf16", graphs="cuda-graph"), [3.0, 1.5] + [1.49] * 4, q)
    write_run(root, "g", "doll-graph", _cfg(loader="device", graphs="cuda-graph"), [3.0] + [1.7] * 5, q)
    write_run(root, "g", "scratch", _cfg(kind="random", dense_epochs=0), t, q)
    write_run(root, "g", "scratch-fp16", _cfg(kind="random", dense_epochs=0, precision="amp-fp16"), [3.0] + [1.4] * 5,
              q)
    write_run(root, "g", "hybrid", _cfg(kind="random", dense_epochs=3), t, q)
    write_run(root, "g", "hybrid-fp16", _cfg(kind="random", dense_epochs=3, precision="amp-fp16"), [3.0] + [1.4] * 5,
              q)
    rep = make_report(root, opts=Options())
    f9 = pd.read_csv(rep.out / "tables" / "fig9b.csv").set_index("cell")
    assert f9.loc["graph", "paper_gco_x"] == pytest.approx(1.16)
    assert f9.loc[["bf16-graph", "doll-graph"], "paper_gco_x"].isna().all()
    assert pd.isna(f9.loc["doll-graph", "eager_cell"]) and f9.loc["bf16-graph", "eager_cell"] == "bf16"
    f8 = pd.read_csv(rep.out / "tables" / "fig8a.csv").set_index("cell")
    assert f8.loc["hybrid-fp16", "paper_vs_model_x"] == pytest.approx(1.34)
    assert pd.isna(f8.loc["scratch-fp16", "paper_vs_model_x"])
    assert f8.loc["scratch-fp16", "speedup_vs_model_x"] > 1  # ours is still measured


def test_tables_1_and_2_say_when_ours_ran_at_another_batch_or_length_than_the_paper(tmp_path):
    root = tmp_path / "runs"
    t, q = [3.0, 2.0, 2.0, 2.0, 2.0, 2.0], [50, 70, 80, 86, 92, 90.0]
    write_run(root, "g", "dense", _cfg(), t, q)
    write_run(root, "g", "scratch", _cfg(kind="random", dense_epochs=0), t, q)
    write_run(root, "g", "hybrid", _cfg(kind="random", dense_epochs=3), t, q)
    rep = make_report(root, opts=Options())
    t1, t2 = ((rep.out / "tables" / f"{k}.md").read_text() for k in ("table1", "table2"))
    assert "Ours ran at batch 4, 6 epochs; the paper's Table 1 at batch 1, 50 epochs" in t1
    assert "Ours ran at batch 4, 6 epochs; the paper's Table 2 at batch 32, 50 epochs" in t2
    # at the paper's own batch and length: nothing to say
    root = tmp_path / "paper"
    write_run(root, "g", "dense", _cfg(batch_size=32, epochs=50), [3.0] + [2.0] * 49, [90.0] * 50)
    write_run(root, "g", "hybrid", _cfg(batch_size=32, epochs=50, kind="topk", dense_epochs=25), [3.0] + [2.0] * 49,
              [90.0] * 50)
    rep = make_report(root, opts=Options())
    assert "Ours ran at" not in (rep.out / "tables" / "table2.md").read_text()


def test_fig4_plots_never_average_other_models_and_mark_the_paper_per_run_length(tmp_path, monkeypatch):
    """Fig. 4(c) drew one line per sparsity kind: 50 % and 70 % at the same split were averaged into one point
    (90 and 40.7 -> 65.35), and the axis, baseline and paper mark came from the first row's run length. Fig. 4(b)
    scaled the paper's 28/50 to the longest run only."""
    root = tmp_path / "runs"
    t6, t12 = [3.0] + [2.0] * 5, [3.0] + [2.0] * 11
    write_run(root, "e6", "dense", _cfg(), t6, [50, 70, 80, 86, 92, 90.0])
    write_run(root, "e6", "r50-3", _cfg(kind="random", dense_epochs=3), t6, [50, 70, 80, 86, 92, 90.0])
    write_run(root, "e6", "r70-3", _cfg(kind="random", dense_epochs=3).replace(**{"sparsity.amount": 0.7}), t6,
              [50, 60, 40, 41, 40.5, 40.7])
    write_run(root, "e12", "dense", _cfg(epochs=12), t12, [60.0] * 12)
    write_run(root, "e12", "r50-6", _cfg(epochs=12, kind="random", dense_epochs=6), t12, [55.0] * 12)
    figs = {}
    for mod in (fig4c, fig4ab):
        monkeypatch.setattr(mod, "save", lambda fig, path, mod=mod, save=mod.save: (figs.setdefault(mod, fig),
                                                                                    save(fig, path))[1])
    make_report(root, opts=Options())
    ax = figs[fig4c].axes[0]
    points = {(round(float(x), 3), round(float(y), 2)) for line in ax.get_lines() for x, y in line.get_xydata()
              if line.get_marker() == "o"}
    assert points == {(0.5, 90.0), (0.5, 40.7), (0.5, 55.0)}  # each model its own point, none averaged
    labels = ax.get_legend_handles_labels()[1]
    assert {"e6: random 50%, 6 epochs", "e6: random 70%, 6 epochs", "e12: random 50%, 12 epochs"} <= set(labels)
    assert {"dense baseline (ours, e6, 6 epochs)", "dense baseline (ours, e12, 12 epochs)"} <= set(labels)
    marks = sorted(float(line.get_xdata()[0]) for line in figs[fig4ab].axes[1].get_lines()
                   if line.get_linestyle() == "--")
    assert marks == pytest.approx([28 / 50 * 6, 28 / 50 * 12])
