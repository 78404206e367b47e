"""bench/report/plotting.py: what a figure's marks say about the numbers behind them."""

from __future__ import annotations

from bench.report.format import WITHIN_RUN
from bench.report.plotting import bars_with_ci, figure


def _rows() -> list[dict]:
    base = {"model": "dense", "speedup_vs_model_x": 1.2, "speedup_vs_model_lo_x": 1.1, "speedup_vs_model_hi_x": 1.3}
    return [{**base, "optimizations": "DoLL", "speedup_vs_model_verdict": "faster"},
            {**base, "optimizations": "MP", "speedup_vs_model_verdict": f"faster{WITHIN_RUN}"}]


def test_an_interval_within_one_run_is_drawn_dashed_and_named_in_the_legend():
    """Fig. 8(a) on a CPU drew '0.83x [0.15, 6.02] (within one run)' with the same whiskers as an interval over
    repeats, under 'bars: ours with 95% CI': the figure dropped what the table says."""
    fig, ax = figure()
    bars_with_ci(ax, _rows(), "optimizations", "model", "speedup_vs_model_x", "speedup_vs_model_lo_x",
                 "speedup_vs_model_hi_x")
    styles = [c.get_linestyle()[0] for c in ax.collections if c.get_segments()]
    assert len(styles) == 2
    solid, dashed = sorted(styles, key=lambda s: s[1] is not None)  # (offset, None) is solid, a dash pattern not
    assert solid[1] is None and dashed[1] is not None
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("within one run" in t for t in labels)


def test_intervals_over_repeats_alone_get_no_within_run_legend():
    fig, ax = figure()
    rows = [r for r in _rows() if r["optimizations"] == "DoLL"]
    bars_with_ci(ax, rows, "optimizations", "model", "speedup_vs_model_x", "speedup_vs_model_lo_x",
                 "speedup_vs_model_hi_x")
    assert not any("within one run" in t.get_text() for t in ax.get_legend().get_texts())
