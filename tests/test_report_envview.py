"""bench/report/envview.py and environments.py: baselines and speedups within one machine, never across machines."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bench.report.build import make_report
from bench.report.options import Options
from bench.stats import NO_VERDICT
from tests.report_fakes import (
    FP_A,
    FP_B,
    QUAL,
    _cfg,
    _epoch_p50,
    _est,
    _row,
    _rows,
    _times,
    by_cell,
    table,
    write_run,
)


def test_warmup_only_phase_and_zero_quality_baseline(tmp_path):
    """Smoke-sized runs: a hybrid whose dense phase is one warm-up epoch, and MS-SSIM 0 everywhere."""
    root = tmp_path / "runs"
    write_run(root, "smoke", "fp32-host-off-dense", _cfg(epochs=2), [5.0, 0.8], [0.0, 0.0])
    write_run(root, "smoke", "fp32-host-off-random-hybrid1", _cfg(kind="random", dense_epochs=1, epochs=2),
              [1.3, 0.1], [0.0, 0.0], prune_s=0.05)
    rep = make_report(root, opts=Options())
    md = rep.report_md.read_text()
    assert "Rendering problems" not in md
    row = _row(pd.read_csv(rep.out / "tables" / "table2.csv"), "fp32-host-off-random-hybrid1")
    # The warm-up epoch is never passed off as the dense phase's steady time.
    assert pd.isna(row["speedup_x"])
    assert "only warm-up epochs" in row["speedup_ci_method"] and "only warm-up epochs" in md
    assert row["speedup_total_x"] == pytest.approx(5.8 / 1.45)
    assert row["drop_pp"] == 0.0 and pd.isna(row["drop_rel_pct"])


def test_two_environments_are_never_mixed(tmp_path):
    root = tmp_path / "runs"
    for fp, amp_c in ((FP_A, 5.0), (FP_B, 8.0)):
        write_run(root / fp[:1], "fig8a", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL, fp=fp)
        write_run(root / fp[:1], "fig8a", "amp-bf16-host-off-dense", _cfg(precision="amp-bf16"), _times(amp_c, 2),
                  QUAL, fp=fp)
    # Grid 'solo': its baseline ran on A only (4x slower than fig8a's), its arms on B only. The batch-4 arm is
    # compared with B's own fig8a baseline (same machine and context), never with A's; the batch-8 arm has no
    # baseline on B at all, and A's does not count.
    write_run(root / "a", "solo", "fp32-host-off-dense", _cfg(), _times(40.0, 3), QUAL, fp=FP_A)
    write_run(root / "a", "solo", "fp32-host-off-dense-b8", _cfg(batch_size=8), _times(40.0, 3), QUAL, fp=FP_A)
    write_run(root / "b", "solo", "fp32-device-off-dense", _cfg(loader="device"), _times(5.0, 4), QUAL, fp=FP_B)
    write_run(root / "b", "solo", "fp32-device-off-dense-b8", _cfg(loader="device", batch_size=8), _times(5.0, 4),
              QUAL, fp=FP_B)
    rep = make_report(root, opts=Options())
    df = pd.read_csv(rep.out / "tables" / "fig8a.csv")
    amp = df[(df["cell"] == "amp-bf16-host-off-dense")].set_index("fingerprint")
    for fp in (FP_A, FP_B):
        d = root / fp[:1] / "fig8a"
        expected = _epoch_p50(d / "fp32-host-off-dense-r0") / _epoch_p50(d / "amp-bf16-host-off-dense-r0")
        assert amp.loc[fp, "speedup_vs_model_x"] == pytest.approx(expected)
    assert amp.loc[FP_A, "env"] != amp.loc[FP_B, "env"]
    solo = _row(df, "fp32-device-off-dense")
    assert solo["fingerprint"] == FP_B and solo["dense_baseline_cell"] == "fig8a/fp32-host-off-dense"
    assert solo["speedup_vs_model_x"] == pytest.approx(
        _epoch_p50(root / "b" / "fig8a" / "fp32-host-off-dense-r0")
        / _epoch_p50(root / "b" / "solo" / "fp32-device-off-dense-r0"))  # about 2, not A's 8
    b8 = _row(df, "fp32-device-off-dense-b8")
    assert b8["fingerprint"] == FP_B and pd.isna(b8["speedup_vs_model_x"])
    assert b8["speedup_vs_model_ci_method"] == "no baseline cell"
    md = rep.report_md.read_text()
    assert md.count("## Results on env") == 2
    assert len(pd.read_csv(rep.out / "tables" / "environments.csv")) == 2
    assert {p.name for p in (rep.out / "figures").glob("fig8a-*.png")} == {"fig8a-env1.png", "fig8a-env2.png"}


def test_a_grid_without_baselines_is_compared_with_another_grids(tmp_path):
    """A grid's own baseline first; a grid without one (fig8b by design) takes another grid's of the same
    context on the same machine (here two grids have one: the first by name, deterministically)."""
    root = tmp_path / "runs"
    base = write_run(root, "fig8a", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    amp = write_run(root, "fig8a", "amp-fp16-host-off-dense", _cfg(precision="amp-fp16"), _times(6.0, 2), QUAL)
    combo = write_run(root, "fig8b", "amp-bf16-device-cuda-graph-dense",
                      _cfg(precision="amp-bf16", loader="device", graphs="cuda-graph"), _times(5.0, 3), QUAL)
    mpgco = write_run(root, "fig8b", "amp-fp16-host-cuda-graph-dense", _cfg(precision="amp-fp16", graphs="cuda-graph"),
                      _times(5.5, 4), QUAL)
    # Same context, another grid that sorts first: fig8a's own baseline still wins for fig8a's rows.
    other = write_run(root, "aaa", "fp32-host-off-dense", _cfg(), _times(20.0, 5), QUAL)
    # Another context (batch 8): never a baseline for these cells.
    write_run(root, "zzz", "fp32-host-off-dense", _cfg(batch_size=8), _times(1.0, 6), QUAL)
    b = table(root, "fig8b")
    for cell, d in (("amp-bf16-device-cuda-graph-dense", combo), ("amp-fp16-host-cuda-graph-dense", mpgco)):
        row, md = by_cell(b, cell)
        assert row["dense_baseline_cell"] == row["model_baseline_cell"] == "aaa/fp32-host-off-dense"
        assert row["speedup_vs_dense_x"] == pytest.approx(_est(other) / _est(d))
    a = table(root, "fig8a")
    row, _ = by_cell(a, "amp-fp16-host-off-dense")
    assert row["dense_baseline_cell"] == "fp32-host-off-dense"
    assert row["speedup_vs_model_x"] == pytest.approx(_est(base) / _est(amp))
    assert any("Grid fig8b" in n and "from grid aaa" in n for n in b.notes), b.notes
    assert not any("from grid" in n for n in a.notes)
    ttq = {r["cell"]: r for r in table(root, "ttq").csv_rows}
    assert ttq["amp-bf16-device-cuda-graph-dense"]["target_ms_ssim_pct"] == pytest.approx(QUAL[-1] - 0.5)


def test_fig8b_speedups_come_from_the_one_other_grid_with_a_baseline(tmp_path):
    """The audit's fixture e3: the baseline ran in grid fig8a, the combinations in fig8b (no baseline cells by
    design): every fig8b speedup was '—'; now they are over fig8a's baseline."""
    root = tmp_path / "runs"
    base = write_run(root, "fig8a", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    combo = write_run(root, "fig8b", "amp-bf16-device-cuda-graph-dense",
                      _cfg(precision="amp-bf16", loader="device", graphs="cuda-graph"), _times(5.0, 3), QUAL)
    row, md = by_cell(table(root, "fig8b"), "amp-bf16-device-cuda-graph-dense")
    assert row["dense_baseline_cell"] == "fig8a/fp32-host-off-dense"
    assert row["speedup_vs_dense_x"] == pytest.approx(_est(base) / _est(combo))
    assert row["speedup_vs_model_x"] == pytest.approx(_est(base) / _est(combo))
    assert md["vs dense fp32 (95% CI)"].startswith(f"{_est(base) / _est(combo):.2f}x [")


def _welch_on_logs(base: list[float], arm: list[float], point: float) -> tuple[float, float]:
    """Welch's 95% t-interval for median(base) / median(arm) on log times, widened to hold `point`."""
    lb, la = np.log(base), np.log(arm)
    vb, va = lb.var(ddof=1) / lb.size, la.var(ddof=1) / la.size
    df = (va + vb) ** 2 / (va**2 / (la.size - 1) + vb**2 / (lb.size - 1))
    half = float(sps.t.ppf(0.975, df)) * math.sqrt(va + vb)
    centre = float(lb.mean() - la.mean())
    return min(math.exp(centre - half), point), max(math.exp(centre + half), point)


def _steady(d) -> list[float]:
    return [r["time_s"] for r in _rows(d) if not r["warmup"]]


def test_one_repeat_intervals_are_marked_as_within_one_run(tmp_path):
    """Audit D7: one run per arm gives an interval over that run's epochs; it must never read as a verdict
    over runs: its verdict, method and table text say 'within one run', and a note explains it."""
    root = tmp_path / "runs"
    base = write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    gco = write_run(root, "g", "fp32-host-cuda-graph-dense", _cfg(graphs="cuda-graph"), _times(9.0, 2), QUAL)
    t = table(root, "fig8a")
    row, md = by_cell(t, "fp32-host-cuda-graph-dense")
    point = _epoch_p50(base) / _epoch_p50(gco)
    lo, hi = _welch_on_logs(_steady(base), _steady(gco), point)
    assert row["speedup_vs_model_x"] == pytest.approx(point)
    assert (row["speedup_vs_model_lo_x"], row["speedup_vs_model_hi_x"]) == (pytest.approx(lo), pytest.approx(hi))
    assert lo > 1.0 and row["speedup_vs_model_verdict"] == "faster (within one run)"
    assert row["speedup_vs_model_ci_method"] == "epochs (5 vs 5), within one run per arm"
    assert md["vs same model (95% CI)"] == f"{point:.2f}x [{lo:.2f}, {hi:.2f}] (within one run)"
    assert any(n.startswith("'(within one run)'") and "--repeats 3" in n for n in t.notes), t.notes


def test_two_repeats_are_never_pooled_as_independent_epochs(tmp_path):
    """Audit D7 (fixture e2): an arm with 2 repeats 30% apart read [1.18, 1.49] from 8 pooled epochs; two runs
    are too few for an interval over runs, and their epochs are not independent samples: no interval."""
    root = tmp_path / "runs"
    base = write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    amp = [write_run(root, "g", "amp-bf16-host-off-dense", _cfg(precision="amp-bf16"), _times(10.0 / f, 2 + i), QUAL,
                     repeat=i) for i, f in enumerate((1.0, 1.3))]
    t = table(root, "fig8a")
    row, md = by_cell(t, "amp-bf16-host-off-dense")
    point = _est(base) / float(np.median([_est(d) for d in amp]))
    assert row["speedup_vs_model_x"] == pytest.approx(point)
    assert row["speedup_vs_model_lo_x"] is None and row["speedup_vs_model_hi_x"] is None
    assert row["speedup_vs_model_verdict"] == NO_VERDICT
    assert "exactly 2 repeats" in row["speedup_vs_model_ci_method"]
    assert md["vs same model (95% CI)"] == f"{point:.2f}x (no CI)"
    assert any("exactly 2 repeats" in n for n in t.notes)


def test_three_repeats_against_one_take_the_median_run_only(tmp_path):
    """3 baseline repeats (run-to-run factors 0.9, 1.0, 1.1) against 1 arm run: the within-run interval is over
    the median baseline run's epochs, not over the 15 epochs of three processes pooled as one sample."""
    root = tmp_path / "runs"
    base = [write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0 * f, 10 + i), QUAL, repeat=i)
            for i, f in enumerate((0.9, 1.0, 1.1))]
    dev = write_run(root, "g", "fp32-device-off-dense", _cfg(loader="device"), _times(9.0, 20), QUAL)
    row, md = by_cell(table(root, "fig8a"), "fp32-device-off-dense")
    mid = base[1]
    point = _est(mid) / _est(dev)
    lo, hi = _welch_on_logs(_steady(mid), _steady(dev), point)
    assert row["speedup_vs_model_x"] == pytest.approx(point)
    assert (row["speedup_vs_model_lo_x"], row["speedup_vs_model_hi_x"]) == (pytest.approx(lo), pytest.approx(hi))
    assert row["speedup_vs_model_ci_method"] == "epochs (5 vs 5), within one run per arm"
    assert md["vs same model (95% CI)"].endswith("(within one run)")


def test_accuracy_changes_carry_their_noise_band(tmp_path):
    """Audit D8: a change in final MS-SSIM is one noisy sample (DoLL read -15.59 pp on a run whose epochs swing
    10-30 pp). Each change carries 2 x sqrt(s_cell^2 + s_base^2), s over the last 3 epochs of each run (or over
    repeats when both arms have 3), and reads 'within noise' when it falls inside."""
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), [50, 70, 80, 86, 92, 90.0])
    write_run(root, "g", "fp32-device-off-dense", _cfg(loader="device"), _times(9.0, 2), [50, 70, 80, 90, 80, 84.0])
    write_run(root, "g", "amp-bf16-host-off-dense", _cfg(precision="amp-bf16"), _times(6.0, 3),
              [40, 50, 60, 70, 70.5, 70.2])
    for i, (b, a) in enumerate(((89.0, 88.0), (90.0, 90.5), (91.0, 89.0))):  # grid r: 3 repeats per arm
        write_run(root, "r", "fp32-host-off-dense", _cfg(), _times(10.0, 10 + i), [*QUAL[:5], b], repeat=i)
        write_run(root, "r", "fp32-host-cuda-graph-dense", _cfg(graphs="cuda-graph"), _times(9.0, 20 + i),
                  [*QUAL[:5], a], repeat=i)
    t = table(root, "fig8a")
    sd = lambda v: float(np.std(v, ddof=1))  # noqa: E731
    doll, doll_md = by_cell(t, "fp32-device-off-dense")
    band = 2 * math.sqrt(sd([86, 92, 90]) ** 2 + sd([90, 80, 84]) ** 2)
    assert doll["drop_vs_model_pp"] == pytest.approx(6.0)
    assert doll["drop_vs_model_noise_pp"] == pytest.approx(band) == pytest.approx(11.78, abs=0.01)
    assert doll["drop_vs_model_within_noise"] is True and doll["drop_vs_model_noise_basis"] == "last 3 epochs"
    assert doll_md["MS-SSIM change vs same model"] == f"-6.00 pp ± {band:.2f}, within noise"
    amp, amp_md = by_cell(t, "amp-bf16-host-off-dense")
    band = 2 * math.sqrt(sd([86, 92, 90]) ** 2 + sd([70, 70.5, 70.2]) ** 2)
    assert amp["drop_vs_model_pp"] == pytest.approx(19.8) and amp["drop_vs_model_within_noise"] is False
    assert amp_md["MS-SSIM change vs same model"] == f"-19.80 pp ± {band:.2f}"
    gco, _ = by_cell(t, "fp32-host-cuda-graph-dense")
    assert gco["drop_vs_model_pp"] == pytest.approx(90.0 - 89.0)  # medians over repeats
    assert gco["drop_vs_model_noise_pp"] == pytest.approx(2 * math.sqrt(sd([89, 90, 91]) ** 2 + sd([88, 90.5, 89]) ** 2))
    assert gco["drop_vs_model_noise_basis"] == "3 vs 3 repeats" and gco["drop_vs_model_within_noise"] is True
    assert any(n.startswith("'± N'") and "(here: 3 vs 3 repeats; last 3 epochs)" in n for n in t.notes), t.notes


def test_the_noise_band_never_spans_a_pruning(tmp_path):
    """A pruned net's chance swing is measured on its final phase alone. Across the pruning, a net pruned before
    its last epoch (97.6 % the epoch before, 39.8 % after, as in the demo grid) had a 66.81 pp band that called
    its 57.8 pp collapse 'within noise'; now it has no band, and a note says why."""
    root = tmp_path / "runs"
    write_run(root, "h", "fp32-host-off-dense", _cfg(), _times(10.0, 1), [50, 70, 80, 86, 92, 90.0])
    write_run(root, "h", "fp32-host-off-random-hybrid5", _cfg(kind="random", dense_epochs=5), _times(10.0, 2),
              [50, 70, 80, 97, 97.6, 39.8])
    write_run(root, "h", "fp32-host-off-random-hybrid3", _cfg(kind="random", dense_epochs=3), _times(10.0, 3),
              [50, 70, 80, 30, 84, 88.0])
    write_run(root, "h", "fp32-host-off-random-hybrid4", _cfg(kind="random", dense_epochs=4), _times(10.0, 4),
              [50, 70, 80, 97, 88, 88.5])
    t = table(root, "table2")
    sd = lambda v: float(np.std(v, ddof=1))  # noqa: E731
    last, last_md = by_cell(t, "fp32-host-off-random-hybrid5")
    assert last["drop_pp"] == pytest.approx(90.0 - 39.8)
    assert last["drop_noise_pp"] is None and last["drop_within_noise"] is None
    assert "±" not in last_md["drop vs dense (ours)"] and "within noise" not in last_md["drop vs dense (ours)"]
    # three sparse epochs: all three count, the dense epochs before them none
    three, three_md = by_cell(t, "fp32-host-off-random-hybrid3")
    band = 2 * math.sqrt(sd([86, 92, 90]) ** 2 + sd([30, 84, 88]) ** 2)
    assert three["drop_noise_pp"] == pytest.approx(band) and three["drop_within_noise"] is True
    assert three_md["drop vs dense (ours)"].endswith(f"± {band:.2f}, within noise")
    # two settled sparse epochs: those two, not the dense epoch 4 before them (97 would widen the band); two that
    # moved by more than 1 pp (84, 88) are still changing, with no band (tests/test_report_usage.py)
    two, _ = by_cell(t, "fp32-host-off-random-hybrid4")
    assert two["drop_noise_pp"] == pytest.approx(2 * math.sqrt(sd([86, 92, 90]) ** 2 + sd([88, 88.5]) ** 2))
    (note,) = [n for n in t.notes if n.startswith("'± N'")]
    assert "never across a pruning (here: last 3 epochs)" in note and "A change without a band" in note


# Fig. 9(a) picks the paper's cells with envview.paper_model_with
def test_fig9a_puts_the_papers_shares_beside_its_two_loaders_alone(tmp_path):
    root = tmp_path / "runs"
    t, q = [3.0, 2.0, 2.0, 2.0, 2.0, 2.0], [50, 70, 80, 86, 92, 90.0]
    copies = {"copies_device": "cuda", "copies_steps": 3, "copies_HtoD_bytes": 6e8, "copies_HtoD_share_bytes": 0.6,
              "copies_HtoD_share_time": 0.9, "copies_HtoD_time_ms": 4.0, "copies_HtoD_count": 6}
    write_run(root, "p", "host", _cfg(profile_steps=3), t, q, copies=copies)
    write_run(root, "p", "doll", _cfg(loader="device", profile_steps=3), t, q, copies=copies)
    write_run(root, "p", "host-fp16-graph", _cfg(precision="amp-fp16", graphs="cuda-graph", profile_steps=3), t, q,
              copies=copies)
    rep = make_report(root, opts=Options())
    f = pd.read_csv(rep.out / "tables" / "fig9a.csv").set_index("cell")
    assert f.loc["host", "paper_share_pct"] == 60 and f.loc["doll", "paper_share_pct"] == 7
    assert f.loc["host", "paper_htod_gb"] == 7
    assert pd.isna(f.loc["host-fp16-graph", "paper_share_pct"]) and pd.isna(f.loc["host-fp16-graph", "paper_htod_gb"])
    assert "host-fp16-graph: profiled with more on than the loader" in (rep.out / "tables" / "fig9a.md").read_text()
