"""bench/report/artifacts/: each paper table and figure, recomputed from hand-made run folders (tests/report_fakes.py)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from bench.grids import registry
from bench.report.artifact import Artifact, register
from bench.report.artifacts import ARTIFACTS
from bench.report.build import make_report
from bench.report.options import Options
from bench.report.setting import Setting
from tests.report_fakes import (
    QUAL,
    _cell_est,
    _cfg,
    _csv,
    _epoch_p50,
    _est,
    _row,
    _rows,
    _times,
    write_run,
)

# ---------------------------------------------------------------------------------- the fabricated grid


def test_table1_numbers_match_the_folders(main_report):
    root, rep = main_report
    df = _csv(root, "table1")
    dense, sparse = _row(df, "dense", "table1"), _row(df, "random-sparse", "table1")
    assert dense["ms_ssim_pct"] == pytest.approx(97.0) and sparse["ms_ssim_pct"] == pytest.approx(42.0)
    assert sparse["ms_ssim_std_pct"] == pytest.approx(1.5)
    assert dense["paper_ms_ssim_pct"] == 97.22 and dense["paper_time_min"] == 235
    assert sparse["paper_ms_ssim_pct"] == 42.39 and sparse["paper_time_min"] == 175
    assert sparse["paper_speedup_x"] == pytest.approx(235 / 175)
    dd, sd = root / "table1" / "dense-r0", root / "table1" / "random-sparse-r0"
    assert sparse["epoch_time_s_p50"] == pytest.approx(_epoch_p50(sd))
    assert sparse["speedup_x"] == pytest.approx(_epoch_p50(dd) / _epoch_p50(sd))
    total = lambda d: sum(r["time_s"] for r in _rows(d))  # noqa: E731
    assert sparse["speedup_total_x"] == pytest.approx(total(dd) / total(sd))
    assert sparse["drop_pp"] == pytest.approx(55.0)
    assert sparse["drop_rel_pct"] == pytest.approx(100 * 55.0 / 97.0)
    # One run per arm: the interval is over 5 vs 5 non-warm-up epochs of those runs, and says so.
    assert sparse["speedup_ci_method"] == "epochs (5 vs 5), within one run per arm"
    assert sparse["speedup_verdict"].endswith("(within one run)")
    assert sparse["speedup_lo_x"] <= sparse["speedup_x"] <= sparse["speedup_hi_x"]
    # The 'full' grid at batch 4 has no cell pruned before training: it is not in Table 1.
    assert set(df["grid"]) == {"table1"}


def test_table2_speedups_and_drops_match_the_folders(main_report):
    root, _ = main_report
    df = _csv(root, "table2")
    base = _cell_est(root, "full", "fp32-host-off-dense")
    rnd = _row(df, "fp32-host-off-random-hybrid3")
    assert rnd["speedup_x"] == pytest.approx(base / _cell_est(root, "full", "fp32-host-off-random-hybrid3"))
    assert rnd["speedup_ci_method"] == "repeats (3 vs 3)"
    assert rnd["speedup_lo_x"] <= rnd["speedup_x"] <= rnd["speedup_hi_x"]
    assert rnd["speedup_verdict"] == "faster"
    assert rnd["paper_speedup_x"] == 1.14 and rnd["paper_ms_ssim_pct"] == 97.30
    assert rnd["ms_ssim_pct"] == pytest.approx(89.8)
    assert rnd["drop_pp"] == pytest.approx(0.2)
    assert rnd["drop_rel_pct"] == pytest.approx(100 * 0.2 / 90.0)
    assert rnd["speedup_total_ours_over_paper"] == pytest.approx(rnd["speedup_total_x"] / 1.14)
    # Per-phase medians of the hybrid schedule.
    d0 = root / "full" / "fp32-host-off-random-hybrid3-r0"
    sparse_p50 = float(np.median([
        float(np.median([r["time_s"] for r in _rows(d) if r["phase"] == "sparse" and not r["warmup"]]))
        for d in sorted((root / "full").glob("fp32-host-off-random-hybrid3-r*"))
    ]))
    assert rnd["epoch_time_sparse_s_p50"] == pytest.approx(sparse_p50)
    assert d0.exists()
    topk = _row(df, "fp32-host-off-topk-hybrid3")  # 1 repeat vs 3: epochs of the median baseline run
    assert topk["speedup_x"] == pytest.approx(base / _est(root / "full" / "fp32-host-off-topk-hybrid3-r0"))
    assert topk["speedup_ci_method"].startswith("epochs (")
    assert topk["paper_accuracy_drop_pct"] == 0.02
    st = _row(df, "fp32-host-off-structured-hybrid3")
    assert st["paper_ms_ssim_pct"] == 97.75
    assert _row(df, "fp32-host-off-random-auto")["switch_epoch"] == 2


def test_fig8_speedups_verdicts_and_paper_columns(main_report):
    root, _ = main_report
    a = _csv(root, "fig8a")
    base = _cell_est(root, "full", "fp32-host-off-dense")
    amp = _row(a, "amp-bf16-host-off-dense")
    assert amp["speedup_vs_model_x"] == pytest.approx(base / _cell_est(root, "full", "amp-bf16-host-off-dense"))
    assert amp["speedup_vs_model_verdict"] == "faster" and amp["speedup_vs_model_lo_x"] > 1.0
    assert amp["paper_vs_model_x"] == 1.49
    assert amp["ours_over_paper_total_vs_model"] == pytest.approx(amp["speedup_total_vs_model_x"] / 1.49)
    dev = _row(a, "fp32-device-off-dense")
    assert dev["speedup_vs_model_x"] == pytest.approx(1.0)
    assert dev["speedup_vs_model_lo_x"] <= 1.0 <= dev["speedup_vs_model_hi_x"]
    assert dev["speedup_vs_model_verdict"] == "no measurable change"
    assert dev["paper_vs_model_x"] == 1.21
    gco = _row(a, "fp32-host-cuda-graph-dense")
    assert gco["paper_vs_model_x"] == 1.16
    b = _csv(root, "fig8b")
    combo = _row(b, "amp-bf16-device-cuda-graph-random-hybrid3")
    assert combo["model_baseline_cell"] == "fp32-host-off-random-hybrid3"
    assert combo["dense_baseline_cell"] == "fp32-host-off-dense"
    est = _est(root / "full" / "amp-bf16-device-cuda-graph-random-hybrid3-r0")
    assert combo["speedup_vs_model_x"] == pytest.approx(_cell_est(root, "full", "fp32-host-off-random-hybrid3") / est)
    assert combo["speedup_vs_dense_x"] == pytest.approx(base / est)
    assert combo["paper_vs_model_x"] == 1.6 and combo["paper_vs_dense_x"] == 1.94
    md = (root / "report" / "report.md").read_text()
    assert "no measurable change" in md


def test_ours_over_paper_is_in_total_time_in_every_table(main_report):
    """Audit D12: Table 1 divided the total-time speedup by the paper's, Table 2 and Fig. 8 the epoch one.
    The paper measures total time to train (Section 5; Table 1 quotes times): every table uses that now."""
    root, _ = main_report
    total = lambda d: sum(r["time_s"] + r["capture_time_s"] + r["prune_time_s"] for r in _rows(d))  # noqa: E731
    full = root / "full"

    def cell_total(cell: str, staging: float = 0.0) -> float:
        return float(np.median([total(d) + staging for d in sorted(full.glob(f"{cell}-r*"))]))

    base = cell_total("fp32-host-off-dense")
    t2 = _row(_csv(root, "table2"), "fp32-host-off-random-hybrid3")
    assert t2["speedup_total_ours_over_paper"] == pytest.approx(base / cell_total("fp32-host-off-random-hybrid3") / 1.14)
    t1 = _row(_csv(root, "table1"), "random-sparse", "table1")
    assert t1["speedup_total_ours_over_paper"] == pytest.approx(t1["speedup_total_x"] / (235 / 175))
    a = _csv(root, "fig8a")
    dev = _row(a, "fp32-device-off-dense")  # DoLL: same epochs as the baseline plus 0.5 s of staging
    ours_total = base / cell_total("fp32-device-off-dense", staging=0.5)
    assert dev["speedup_total_vs_model_x"] == pytest.approx(ours_total) and ours_total < 1.0
    assert dev["ours_over_paper_total_vs_model"] == pytest.approx(ours_total / 1.21)
    assert dev["ours_over_paper_total_vs_model"] != pytest.approx(dev["speedup_vs_model_x"] / 1.21)
    combo = _row(_csv(root, "fig8b"), "amp-bf16-device-cuda-graph-random-hybrid3")
    assert combo["ours_over_paper_total_vs_dense"] == pytest.approx(combo["speedup_total_vs_dense_x"] / 1.94)
    for key in ("table1", "table2", "fig8a", "fig8b"):
        md = (root / "report" / "tables" / f"{key}.md").read_text()
        assert "| ours/paper (total time) |" in md and "| ours/paper |" not in md, key


def test_fig9_copies_and_graph_epochs(main_report):
    root, _ = main_report
    df = _csv(root, "fig9a")
    host = df[(df["cell"] == "host-profile") & (df["kind"] == "HtoD")].iloc[0]
    assert host["share_time_pct"] == pytest.approx(100 * 60 / 93)
    assert host["bytes"] == 7_000_000
    assert host["paper_share_pct"] == 60 and host["paper_htod_gb"] == 7
    dev = df[(df["cell"] == "device-profile") & (df["kind"] == "DtoD")].iloc[0]
    assert dev["share_time_pct"] == pytest.approx(100 * 64 / 93) and dev["paper_share_pct"] == 64
    assert set(df["measure"]) == {"CUDA memcpy/memset activities"}
    b = _csv(root, "fig9b")
    g = _row(b, "fp32-host-cuda-graph-dense")
    assert g["eager_cell"] == "fp32-host-off-dense"
    assert g["capture_time_s"] == pytest.approx(2.5)
    ep = pd.read_csv(root / "report" / "tables" / "fig9b_epochs.csv")
    g1 = ep[(ep["cell"] == "fp32-host-cuda-graph-dense") & (ep["epoch"] == 1)].iloc[0]
    assert g1["capture_time_s"] == pytest.approx(2.5)
    assert g1["time_s"] == pytest.approx(_rows(root / "full" / "fp32-host-cuda-graph-dense-r0")[0]["time_s"])
    e1 = ep[(ep["cell"] == "fp32-host-off-dense") & (ep["epoch"] == 3)].iloc[0]
    assert e1["time_s"] == pytest.approx(float(np.median(
        [_rows(d)[2]["time_s"] for d in sorted((root / "full").glob("fp32-host-off-dense-r*"))])))


def test_fig4_time_to_quality_memory_and_sparsity(main_report):
    root, _ = main_report
    c = _csv(root, "fig4c")
    auto = _row(c, "fp32-host-off-random-auto")
    assert auto["dense_epochs_run"] == 2 and auto["sparse_epochs_run"] == 4
    assert _row(c, "fp32-host-off-random-hybrid3")["dense_epochs_run"] == 3
    curves = pd.read_csv(root / "report" / "tables" / "fig4ab_curves.csv")
    assert set(curves[curves["cell"] == "fp32-host-off-random-auto"]["switch_epoch"]) == {2}

    t = _csv(root, "ttq")
    target = 90.0 - 0.5  # baseline's final MS-SSIM minus the default tolerance
    amp = _row(t, "amp-bf16-host-off-dense")
    assert amp["target_ms_ssim_pct"] == pytest.approx(target)
    # amp's curve is QUAL - 0.1: 89.9 >= 89.5 first at epoch 6.
    assert amp["reached_epoch"] == 6
    per_run = [sum(r["time_s"] + r["capture_time_s"] + r["prune_time_s"] for r in _rows(d))
               for d in sorted((root / "full").glob("amp-bf16-host-off-dense-r*"))]
    assert amp["ttq_s"] == pytest.approx(float(np.median(per_run)))
    topk = _row(t, "fp32-host-off-topk-hybrid3")  # 89.0 never reaches 89.5
    assert topk["repeats_reached"] == 0 and pd.isna(topk["ttq_s"])
    md = (root / "report" / "report.md").read_text()
    assert "never reached" in md
    t1 = _row(t, "random-sparse", "table1")
    assert t1["target_ms_ssim_pct"] == pytest.approx(96.5)  # its own grid's baseline (97.0) - 0.5

    m = _csv(root, "memory")
    assert _row(m, "amp-bf16-host-off-dense")["primary_measure"] == "host RSS (process)"
    assert _row(m, "amp-bf16-host-off-dense")["fp32_over_this"] == pytest.approx(1.0 / 0.6)
    assert pd.isna(_row(m, "amp-bf16-host-off-dense")["paper_gb"])  # batch 4 at 32 px: not the paper's 62 / 27 GB

    s = _csv(root, "sparsity")
    assert "simulated" in _row(s, "fp32-host-off-random-hybrid3")["note"]
    st = _row(s, "fp32-host-off-structured-hybrid3")
    assert st["sparsity_kind_measured"] == "structural"
    assert st["params"] == 600 and st["params_dense_baseline"] == 1000
    assert st["flops_fwd_per_image"] == 1.2e6 and st["flops_fwd_per_image_before_pruning"] == 2.0e6


def test_target_option_sets_time_to_quality_target(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    rep = make_report(root, opts=Options(target_pct=80.0))
    row = pd.read_csv(rep.out / "tables" / "ttq.csv").iloc[0]
    assert row["target_ms_ssim_pct"] == 80.0 and row["reached_epoch"] == 3
    rows = _rows(root / "g" / "fp32-host-off-dense-r0")
    assert row["ttq_s"] == pytest.approx(sum(r["time_s"] for r in rows[:3]))


def test_fig9b_epoch_warmup_flags_follow_the_run_rule(tmp_path):
    """Rows without a `warmup` flag are warm-ups up to the config's warmup_epochs, in fig9b as in the speedups."""
    root = tmp_path / "runs"
    for cell, graphs in (("fp32-host-off-dense", "off"), ("fp32-host-cuda-graph-dense", "cuda-graph")):
        cfg = dataclasses.replace(_cfg(graphs=graphs), warmup_epochs=2)
        d = write_run(root, "g", cell, cfg, _times(10.0, 1), QUAL)
        rows = _rows(d)
        for r in rows:
            del r["warmup"]
        (d / "epochs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = make_report(root, opts=Options())
    ep = pd.read_csv(rep.out / "tables" / "fig9b_epochs.csv")
    for _, row in ep.iterrows():
        assert bool(row["warmup"]) == (row["epoch"] <= 2), row.to_dict()
    assert set(ep["phase"]) == {"dense"}


# ---------------------------------------------------------------------------------- the registry


def test_registry_holds_every_artifact_in_report_order():
    assert list(ARTIFACTS) == ["table1", "table2", "fig8a", "fig8b", "fig9a", "fig9b", "fig4c", "fig4ab",
                               "memory", "ttq", "speed", "sparsity", "wall"]
    for key, a in ARTIFACTS.items():
        assert a.key == key and a.title and callable(a.build)
    assert {k for k, a in ARTIFACTS.items() if a.plot is None} == {"sparsity"}
    assert {k for k, a in ARTIFACTS.items() if a.needs is None} == {"ttq", "speed", "sparsity", "wall"}
    grids = set(registry())
    for a in ARTIFACTS.values():
        # The fallback names real grids, and every artifact that can be 'not run' names at least one.
        assert set(a.fills) <= grids, a.key
        assert bool(a.fills) == (a.needs is not None), a.key


def test_register_refuses_a_second_artifact_with_the_same_key():
    with pytest.raises(ValueError, match="registered twice"):
        register(Artifact(key="table1", title="again", build=lambda env: None))
    assert ARTIFACTS["table1"].title == "Table 1 analogue"


def test_needs_are_decided_from_settings():
    dense, sparse0 = Setting(), Setting().replace(sparsity="random", dense_epochs=0)
    t1 = ARTIFACTS["table1"].needs
    assert not t1.filled_by([(dense, 0)]) and t1.filled_by([(dense, 0), (sparse0, 0)])
    assert ARTIFACTS["table2"].needs.filled_by([(Setting().replace(sparsity="topk", dense_epochs=3), 0)])
    assert not ARTIFACTS["table2"].needs.filled_by([(sparse0, 0)])
    assert ARTIFACTS["fig9a"].needs.filled_by([(dense, 5)]) and not ARTIFACTS["fig9a"].needs.filled_by([(dense, 0)])
    assert ARTIFACTS["fig8a"].needs.filled_by([(Setting().replace(precision="amp-bf16"), 0)])
    assert not ARTIFACTS["fig8b"].needs.filled_by([(Setting().replace(precision="amp-bf16"), 0)])
    assert ARTIFACTS["fig8b"].needs.filled_by([(Setting().replace(precision="amp-bf16", loader="device"), 0)])
    assert ARTIFACTS["fig9b"].needs.filled_by([(Setting().replace(graphs="compile"), 0)])
    assert ARTIFACTS["memory"].needs.filled_by([(Setting().replace(precision="tf32"), 0)])


def test_quality_stands_beside_the_input_and_the_paper_scale(tmp_path):
    root = tmp_path / "runs"
    floor = {"input_ms_ssim": 93.4, "input_ms_ssim_paper_code": 96.3, "val_ms_ssim_paper_code": 97.5,
             "val_ms_ssim_paper_code_std": 0.4}
    write_run(root, "table2", "dense", _cfg(), _times(10.0, 1), QUAL, extra_row=floor)
    write_run(root, "table2", "random-hybrid3", _cfg(kind="random", dense_epochs=3), _times(9.0, 2),
              [q - 0.5 for q in QUAL], extra_row=floor)
    rep = make_report(root, opts=Options())
    row = _row(pd.read_csv(rep.out / "tables" / "table2.csv"), "random-hybrid3")
    assert row["ms_ssim_paper_code_pct"] == 97.5 and row["input_ms_ssim_pct"] == 93.4
    assert row["input_ms_ssim_paper_code_pct"] == 96.3 and bool(row["beats_input"]) is False  # 89.5 < 93.4
    md = (rep.out / "tables" / "table2.md").read_text()
    assert "97.50 ± 0.40 (input 96.30)" in md  # the paper's scale beside the paper's number
    assert "89.50 ± 1.50 (input 93.40)" in md  # the standard one beside it, with its own floor
    assert "paper's code" in (rep.out / "report.md").read_text() or "paper's scale" in md


def test_time_to_quality_can_target_beating_the_input(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL,
              extra_row={"input_ms_ssim": 84.0})
    rep = make_report(root, opts=Options(target_input=True))
    row = pd.read_csv(rep.out / "tables" / "ttq.csv").iloc[0]
    assert row["target_ms_ssim_pct"] == 84.0 and row["reached_epoch"] == 4  # QUAL: 50, 70, 80, 85, ...
    assert "input" in row["target_rule"]


def test_speed_ranks_cells_and_measures_the_distance_to_the_peaks(tmp_path):
    root = tmp_path / "runs"
    peak = {"name": "Test GPU", "flops_tflops": {"fp32": 20.0, "amp-bf16": 400.0}, "bandwidth_tbs": 2.0,
            "source": "test datasheet", "measured": False}
    for cell, cfg, center in (("base", _cfg(), 10.0), ("bf16", _cfg(precision="amp-bf16"), 5.0)):
        d = write_run(root, "speed", cell, cfg, _times(center, 3), QUAL,
                      extra_row={"images_per_s": 1000.0 / center})
        env = json.loads((d / "env.json").read_text())
        (d / "env.json").write_text(json.dumps({**env, "device_peak": peak}))
        s = json.loads((d / "summary.json").read_text())
        (d / "summary.json").write_text(json.dumps({**s, "flops_fwd_bwd_per_image_before_pruning": 1e11,
                                                    "bytes_per_image_est": 4e9}))
    rep = make_report(root, opts=Options())
    df = pd.read_csv(rep.out / "tables" / "speed.csv")
    assert list(df["cell"]) == ["bf16", "base"]  # ranked by images/s
    base, bf16 = df.iloc[1], df.iloc[0]
    assert base["images_per_s"] == pytest.approx(100.0) and bf16["images_per_s"] == pytest.approx(200.0)
    # 1e11 FLOP x 100 images/s = 10 TFLOP/s = 50 % of the fp32 peak; bf16: 20 of 400 = 5 %
    assert base["achieved_tflops"] == pytest.approx(10.0) and base["pct_of_peak_flops"] == pytest.approx(50.0)
    assert bf16["pct_of_peak_flops"] == pytest.approx(5.0)
    # 4 GB x 100 images/s = 0.4 TB/s = 20 % of 2 TB/s; the floor is 2e12 / 4e9 = 500 images/s
    assert base["pct_of_peak_bandwidth"] == pytest.approx(20.0)
    assert base["bandwidth_floor_images_per_s"] == pytest.approx(500.0)
    md = (rep.out / "tables" / "speed.md").read_text()
    assert "10 (50.0%)" in md and "test datasheet" in md


def test_speed_leaves_the_peak_columns_empty_for_an_unknown_device(tmp_path):
    root = tmp_path / "runs"
    d = write_run(root, "speed", "base", _cfg(), _times(10.0, 3), QUAL, extra_row={"images_per_s": 100.0})
    env = json.loads((d / "env.json").read_text())
    (d / "env.json").write_text(json.dumps({**env, "device_peak": {"name": "Mystery GPU", "unknown": True}}))
    row = pd.read_csv(make_report(root, opts=Options()).out / "tables" / "speed.csv").iloc[0]
    assert row["images_per_s"] == pytest.approx(100.0) and pd.isna(row["pct_of_peak_flops"])


# ---------------------------------------------------------------------------------- where the wall time went


def _with_timeline(run_dir, **parts) -> None:
    s = json.loads((run_dir / "summary.json").read_text())
    s["timeline_s"] = {"startup": None, "build": 2.0, "record_env": 0.5, "epochs": 10.0, "validation": 1.0,
                       "fit_other": 3.0, **parts}
    s["timeline_s"]["fit"] = s["timeline_s"]["epochs"] + s["timeline_s"]["validation"] + s["timeline_s"]["fit_other"]
    (run_dir / "summary.json").write_text(json.dumps(s))


def test_wall_table_medians_each_part_over_repeats(tmp_path):
    root = tmp_path / "runs"
    a = [write_run(root, "g", "dense", _cfg(), _times(1.0, seed), QUAL, repeat=seed) for seed in range(3)]
    for run_dir, startup, epochs in zip(a, (1.0, 3.0, 2.0), (9.0, 11.0, 10.0), strict=True):
        _with_timeline(run_dir, startup=startup, epochs=epochs)
        # bench run's record of the process: a failed first launch, then the one that finished (0.7 s more)
        inside = startup + 2.0 + 0.5 + epochs + 1.0 + 3.0
        (run_dir / "launches.jsonl").write_text(json.dumps({"wall_s": 99.0, "exit_code": 3}) + "\n"
                                                + json.dumps({"wall_s": inside + 0.7, "exit_code": 0}) + "\n")
    b = write_run(root, "g", "graph", _cfg(graphs="cuda-graph"), _times(0.8, 7), QUAL)
    _with_timeline(b, startup=None, fit_other=5.0)
    write_run(root, "g", "old", _cfg(precision="amp-bf16"), _times(0.9, 8), QUAL)  # recorded before timeline_s
    rep = make_report(root, opts=Options())
    rows = {r["cell"]: r for r in pd.read_csv(rep.out / "tables" / "wall.csv").to_dict("records")}
    assert set(rows) == {"dense", "graph"}
    d = rows["dense"]
    assert (d["startup_s"], d["build_s"], d["epochs_s"], d["validation_s"], d["other_s"]) == (2.0, 2.5, 10.0, 1.0, 3.0)
    assert d["spawn_exit_s"] == pytest.approx(0.7)
    assert d["wall_s"] == pytest.approx(19.2) and d["epochs_share_pct"] == pytest.approx(100 * 10 / 19.2)
    g = rows["graph"]
    # an in-process run has no start-up nor launch: the wall is the parts that were measured
    assert np.isnan(g["startup_s"]) and np.isnan(g["spawn_exit_s"]) and g["wall_s"] == pytest.approx(2.5 + 10 + 1 + 5)
    assert (rep.out / "figures" / "wall.png").is_file()
    md = (rep.out / "tables" / "wall.md").read_text()
    assert "| g | dense | 2.0 s | 2.5 s | 10.0 s | 1.0 s | 3.0 s | 700 ms | 19.2 s | 52.1 % |" in md


def test_the_sparsity_table_names_the_layers_a_pattern_left_dense(tmp_path):
    """README: under 2:4 the layers whose input channels are not a multiple of 4 (the 1-channel stem) 'are
    listed in the report and left dense'; the sparsity table said nothing of them."""
    root = tmp_path / "runs"
    cfg = _cfg(kind="random")
    cfg = dataclasses.replace(cfg, sparsity=dataclasses.replace(cfg.sparsity, pattern="2:4"))
    d = write_run(root, "g", "random-24", cfg, _times(10.0, 1), QUAL)
    s = json.loads((d / "summary.json").read_text())
    s["sparsity"]["report"] = {"layers_left_dense": {"stem.conv": "2:4 needs input channels divisible by 4, "
                                                                   "layer has 1"}}
    (d / "summary.json").write_text(json.dumps(s))
    write_run(root, "g", "topk", _cfg(kind="topk"), _times(10.0, 2), QUAL)  # nothing left dense
    rep = make_report(root, opts=Options())
    df = _csv(root, "sparsity").set_index("cell")
    assert df.loc["random-24", "layers_left_dense"] == "stem.conv (2:4 needs input channels divisible by 4, layer has 1)"
    assert pd.isna(df.loc["topk", "layers_left_dense"])
    md = (rep.out / "tables" / "sparsity.md").read_text()
    assert "left dense: stem.conv (2:4 needs input channels divisible by 4, layer has 1)" in md
    assert md.count("left dense") == 1
