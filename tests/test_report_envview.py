"""bench/report/envview.py and environments.py: baselines and speedups within one machine, never across machines."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.report.build import make_report
from bench.report.options import Options
from tests.report_fakes import (
    FP_A,
    FP_B,
    QUAL,
    _cfg,
    _epoch_p50,
    _est,
    _row,
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
