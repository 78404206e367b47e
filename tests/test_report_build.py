"""bench/report/build.py and markdown.py: the report folder (report.md, tables, figures) from hand-made run folders."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.report.build import make_report
from bench.report.options import Options
from tests.report_fakes import _csv, _rows


def test_report_markdown_header_plots_and_files(main_report):
    root, rep = main_report
    out = root / "report"
    md = (out / "report.md").read_text()
    for title in ("Table 1 analogue", "Table 2 analogue", "Fig. 8(a)", "Fig. 8(b)", "Fig. 9(a)", "Fig. 9(b)",
                  "Fig. 4(c)", "Fig. 4(a,b)", "Peak memory", "Time to quality", "Sparsity"):
        assert title in md, title
    assert "Test CPU aa" in md and "abcdef1234 (dirty)" in md and "2.9-test" in md
    assert "## Not run" not in md and rep.not_run == {}
    assert "Rendering problems" not in md
    pngs = sorted((out / "figures").glob("*.png"))
    assert {p.stem for p in pngs} >= {"table1", "table2", "fig8a", "fig8b", "fig9a", "fig9b", "fig4c", "fig4ab",
                                      "memory", "ttq"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{p.name}" in md
    for key in ("table1", "table2", "fig8a", "status", "environments"):
        assert (out / "tables" / f"{key}.csv").exists()
    assert (out / "tables" / "table2.md").read_text().count("|") > 10
    raw = pd.read_csv(out / "tables" / "epochs_raw.csv")
    assert len(raw) == sum(len(_rows(p.parent)) for p in root.rglob("epochs.jsonl"))
    one = raw[(raw["cell"] == "fp32-host-off-dense") & (raw["repeat"] == 2) & (raw["epoch"] == 4)].iloc[0]
    assert one["time_s"] == pytest.approx(_rows(root / "full" / "fp32-host-off-dense-r2")[3]["time_s"])


def test_same_inputs_give_the_same_intervals(main_report, tmp_path):
    root, _ = main_report
    again = make_report(root, tmp_path / "again", opts=Options())
    a = _csv(root, "table2")
    b = pd.read_csv(again.out / "tables" / "table2.csv")
    # hybrid cells with one repeat have 2 steady dense-phase epochs: too few for a verdict (NaN) since the
    # interval needs 3 samples per arm; the 3-repeat random hybrid has one
    assert a["speedup_lo_x"].notna().sum() >= 1
    assert a["speedup_lo_x"].equals(b["speedup_lo_x"]) and a["speedup_hi_x"].equals(b["speedup_hi_x"])
