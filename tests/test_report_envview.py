"""bench/report/envview.py and environments.py: baselines and speedups within one machine, never across machines."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.report.build import make_report
from bench.report.options import Options
from tests.report_fakes import FP_A, FP_B, QUAL, _cfg, _epoch_p50, _row, _times, write_run


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
    # Grid 'solo': the baseline ran on A only, the arm on B only: no ratio may be formed.
    write_run(root / "a", "solo", "fp32-host-off-dense", _cfg(), _times(10.0, 3), QUAL, fp=FP_A)
    write_run(root / "b", "solo", "fp32-device-off-dense", _cfg(loader="device"), _times(5.0, 4), QUAL, fp=FP_B)
    rep = make_report(root, opts=Options())
    df = pd.read_csv(rep.out / "tables" / "fig8a.csv")
    amp = df[(df["cell"] == "amp-bf16-host-off-dense")].set_index("fingerprint")
    for fp in (FP_A, FP_B):
        d = root / fp[:1] / "fig8a"
        expected = _epoch_p50(d / "fp32-host-off-dense-r0") / _epoch_p50(d / "amp-bf16-host-off-dense-r0")
        assert amp.loc[fp, "speedup_vs_model_x"] == pytest.approx(expected)
    assert amp.loc[FP_A, "env"] != amp.loc[FP_B, "env"]
    solo = df[df["cell"] == "fp32-device-off-dense"].iloc[0]
    assert solo["fingerprint"] == FP_B and pd.isna(solo["speedup_vs_model_x"])
    assert solo["speedup_vs_model_ci_method"] == "no baseline cell"
    md = rep.report_md.read_text()
    assert md.count("## Results on env") == 2
    assert len(pd.read_csv(rep.out / "tables" / "environments.csv")) == 2
    assert {p.name for p in (rep.out / "figures").glob("fig8a-*.png")} == {"fig8a-env1.png", "fig8a-env2.png"}
