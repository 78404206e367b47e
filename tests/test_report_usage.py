"""`bench report` as a user meets it: options and odd run folders, each checked against what the report prints."""

from __future__ import annotations

from bench.report.options import Options
from tests.report_fakes import QUAL, _cfg, _times, table, write_run


def test_target_input_note_names_the_input_not_the_baseline(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL, extra_row={"input_ms_ssim": 84.0})
    t = table(root, "ttq", Options(target_input=True))
    assert t.csv_rows[0]["target_ms_ssim_pct"] == 84.0
    target_note = next(n for n in t.notes if n.startswith("Target:"))
    assert "--target input" in target_note and "low-dose input" in target_note
    assert "baseline's final MS-SSIM minus" not in target_note  # it once named the rule --target input replaces
