"""bench/report/format.py: numbers with units, table-cell texts and Markdown, as every table prints them."""

from __future__ import annotations

from bench.report.format import (
    bullets,
    fmt_bytes,
    fmt_drop,
    fmt_int,
    fmt_num,
    fmt_pm,
    fmt_pp,
    fmt_speedup,
    fmt_time,
    fmt_x,
    is_num,
    md_table,
)
from bench.stats import NO_INTERVAL


def test_numbers_with_units():
    assert fmt_time(0.85) == "850 ms" and fmt_time(12.34) == "12.3 s"
    assert fmt_time(270.0) == "4.5 min" and fmt_time(9000.0) == "2.50 h" and fmt_time(None) == "—"
    assert fmt_bytes(512) == "512 B" and fmt_bytes(1.5e6) == "1.50 MB" and fmt_bytes(7e9) == "7.00 GB"
    assert fmt_int(1234.0) == "1,234" and fmt_int(None) == "—"
    assert fmt_num(float("nan")) == "—" and fmt_num(1.5, 1, " GiB") == "1.5 GiB"
    assert fmt_pm(97.221, 1.49) == "97.22 ± 1.49" and fmt_pm(97.2, None) == "97.20"
    assert not is_num(True) and not is_num(float("inf")) and is_num(0)


def test_speedup_and_drop_texts():
    assert fmt_speedup({"speedup_verdict": "baseline"}) == "baseline"
    why = "phase dense has only warm-up epochs: run more epochs"
    assert fmt_speedup({"speedup_x": None, "speedup_ci_method": why}) == f"n/a ({why})"
    assert fmt_speedup({"speedup_x": 1.234, "speedup_lo_x": 1.1, "speedup_hi_x": 1.35,
                        "speedup_verdict": "faster"}) == "1.23x [1.10, 1.35]"
    assert fmt_speedup({"speedup_total_x": 1.0, "speedup_total_lo_x": 0.9, "speedup_total_hi_x": 1.1,
                        "speedup_total_verdict": "no measurable change"},
                       "speedup_total") == "1.00x [0.90, 1.10] no measurable change"
    assert fmt_x(1.5, verdict=NO_INTERVAL) == "1.50x (no CI)"
    # an interval over one run's epochs never reads as one over runs
    assert fmt_speedup({"speedup_x": 1.06, "speedup_lo_x": 1.04, "speedup_hi_x": 1.07,
                        "speedup_verdict": "faster (within one run)"}) == "1.06x [1.04, 1.07] (within one run)"
    assert fmt_speedup({"speedup_x": 1.0, "speedup_lo_x": 0.98, "speedup_hi_x": 1.02,
                        "speedup_verdict": "no measurable change (within one run)"}) \
        == "1.00x [0.98, 1.02] no measurable change (within one run)"
    assert fmt_pp(-0.001) == "+0.00 pp" and fmt_pp(None) == "—"
    assert fmt_drop({"drop_pp": 0.2, "drop_rel_pct": 100 * 0.2 / 90}) == "+0.20 pp (+0.22%)"
    assert fmt_drop({"drop_pp": 0.0, "drop_rel_pct": None}) == "+0.00 pp"
    assert fmt_drop({"drop_pp": 6.281, "drop_rel_pct": 15.446, "drop_noise_pp": 18.672,
                     "drop_within_noise": True}) == "+6.28 pp (+15.45%) ± 18.67, within noise"
    assert fmt_drop({"drop_pp": 19.8, "drop_rel_pct": None, "drop_noise_pp": 6.1,
                     "drop_within_noise": False}) == "+19.80 pp ± 6.10"


def test_markdown_table_escapes_pipes_and_newlines():
    md = md_table([{"a": "x|y", "b": "1\n2", "c": None, "d": 1.23456}])
    assert md.splitlines() == ["| a | b | c | d |", "|---|---|---|---|", "| x\\|y | 1 2 | — | 1.235 |"]
    assert md_table([]) == "_(no rows)_\n"
    assert bullets(["a", "b"]) == "- a\n- b\n"
