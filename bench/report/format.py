"""Text formatting for `bench report`: numbers with units, table-cell texts, and Markdown.

Pure functions of plain values (no pandas, no plotting): every artifact
formats its Markdown rows with these, so the same number reads the same way
in every table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

WITHIN_RUN = " (within one run)"
"""Appended to a speedup's verdict, method and text when its interval is over one run's epochs per arm."""


def is_num(v: Any) -> bool:
    """A finite int or float (bools excluded)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def fmt_num(v: Any, digits: int = 2, suffix: str = "") -> str:
    """'1.23' (+suffix) for a number, '—' for None/NaN."""
    if not is_num(v):
        return "—"
    return f"{v:.{digits}f}{suffix}"


def fmt_pm(mean: Any, std: Any, digits: int = 2) -> str:
    """'97.22 ± 1.49', or the mean alone when there is no spread."""
    if not is_num(mean):
        return "—"
    if not is_num(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_quality(row: dict[str, Any], scale: str = "") -> str:
    """'96.10 ± 1.20 (input 93.40)': a quality beside the low-dose input's (the floor a denoiser must beat).

    `scale` '' is the standard MS-SSIM (`ms_ssim_pct`), '_paper_code' the paper code's (`ms_ssim_paper_code_pct`).
    """
    text = fmt_pm(row.get(f"ms_ssim{scale}_pct"), row.get(f"ms_ssim{scale}_std_pct"))
    floor = row.get(f"input_ms_ssim{scale}_pct")
    return f"{text} (input {floor:.2f})" if text != "—" and is_num(floor) else text


def fmt_time(seconds: Any) -> str:
    """Seconds as '850 ms', '12.3 s', '4.5 min' or '1.25 h'."""
    if not is_num(seconds):
        return "—"
    s = float(seconds)
    if s < 1.0:
        return f"{s * 1e3:.0f} ms"
    if s < 120.0:
        return f"{s:.1f} s"
    if s < 7200.0:
        return f"{s / 60.0:.1f} min"
    return f"{s / 3600.0:.2f} h"


def fmt_bytes(n: Any) -> str:
    """Bytes as '512 B', '1.5 MB', '7.00 GB' (decimal units, as the paper's GB)."""
    if not is_num(n):
        return "—"
    n = float(n)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_x(point: Any, lo: Any = None, hi: Any = None, verdict: str | None = None) -> str:
    """'1.23x [1.10, 1.35]' with the verdict when the interval contains 1.0."""
    if not is_num(point):
        return "—"
    s = f"{point:.2f}x"
    if is_num(lo) and is_num(hi):
        s += f" [{lo:.2f}, {hi:.2f}]"
    if verdict == "no measurable change":
        s += " no measurable change"
    elif verdict and verdict.startswith("no interval"):
        s += " (no CI)"
    return s


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return fmt_num(v, 3)
    text = str(v)
    # A pipe would split the Markdown cell; newlines would end the row.
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of `rows` (dicts) over `columns` (default: keys of the first row)."""
    if not rows:
        return "_(no rows)_\n"
    cols = list(columns) if columns is not None else list(rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def bullets(items: Sequence[str]) -> str:
    """A Markdown list, one line per item, ending with a newline (a blank line follows in the join)."""
    return "".join(f"- {x}\n" for x in items)


# ---------------------------------------------------------------------- table-cell texts


def fmt_speedup(row: dict[str, Any], prefix: str = "speedup") -> str:
    """A row's `<prefix>_x` with its interval and verdict: 'baseline', 'n/a (<why>)' or '1.23x [1.10, 1.35]'.

    An interval over one run's epochs per arm (its verdict ends in `WITHIN_RUN`) reads
    '1.06x [1.04, 1.07] (within one run)': never a bare interval that could pass for one over runs.
    """
    if row.get(f"{prefix}_verdict") == "baseline":
        return "baseline"
    method = str(row.get(f"{prefix}_ci_method") or "")
    if not is_num(row.get(f"{prefix}_x")) and "warm-up" in method:
        return f"n/a ({method})"
    verdict = str(row.get(f"{prefix}_verdict") or "")
    within = verdict.endswith(WITHIN_RUN)
    text = fmt_x(row.get(f"{prefix}_x"), row.get(f"{prefix}_lo_x"), row.get(f"{prefix}_hi_x"),
                 verdict.removesuffix(WITHIN_RUN) or None)
    return text + WITHIN_RUN if within and text != "—" else text


def fmt_pp(v: Any) -> str:
    """A difference in percentage points, signed: '+0.20 pp' ('—' for no number)."""
    # round first so that -0.001 prints as +0.00, not -0.00
    return f"{round(float(v), 2) + 0.0:+.2f} pp" if is_num(v) else "—"


def fmt_noise(noise: Any, within: Any, changing: Any = None) -> str:
    """' ± 18.67, within noise': the chance band of an MS-SSIM change (pp); ', still changing' when a run's last
    epochs trend (no band can be measured, `bench.report.cells.still_changing`); '' when there is none."""
    if not is_num(noise):
        return ", still changing" if changing is True else ""
    return f" ± {float(noise):.2f}" + (", within noise" if within else "")


def fmt_drop(row: dict[str, Any]) -> str:
    """A row's MS-SSIM drop from its baseline: '+0.20 pp (+0.22%)', the pp alone when there is no relative drop.

    With a noise band (`drop_noise_pp`): '-6.28 pp (-15.45%) ± 18.67, within noise'.
    """
    if not is_num(row.get("drop_pp")):
        return "—"
    rel = row.get("drop_rel_pct")
    noise = fmt_noise(row.get("drop_noise_pp"), row.get("drop_within_noise"), row.get("drop_still_changing"))
    if not is_num(rel):  # a baseline at MS-SSIM 0 has no relative drop
        return fmt_pp(row["drop_pp"]) + noise
    return f"{fmt_pp(row['drop_pp'])} ({round(float(rel), 2) + 0.0:+.2f}%){noise}"


def fmt_int(v: Any) -> str:
    """'1,234' for a number, '—' for None/NaN."""
    return f"{int(v):,}" if is_num(v) else "—"
