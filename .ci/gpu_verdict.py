"""Did a `.ci/gpu-check` call prove every GPU path? `python .ci/gpu_verdict.py OUT_DIR`.

What issue 10 ("first contact with a GPU") asks of a check before it is done.

The criteria, each read from the files the check leaves (nothing is re-measured):

- `pytest -m gpu` passed: pytest-gpu.xml has tests, none failed, errored or skipped (on a GPU no
  `gpu` test has a reason to skip);
- every CUDA-graph cell finished: each run folder under runs/ whose config (config.json, else the
  planned config.request.json) has graphs cuda-graph or compile-cuda-graph has summary.json status
  'ok' (skipped, failed or never started is not), and there is at least one;
- the Fig. 8(a) and Fig. 9 analogues have numbers: report/tables/fig8a.csv a speedup over the same
  model, fig9a.csv a share of copy time or bytes, fig9b.csv a CUDA-graph speedup over its eager cell.

Prints one line per criterion and a last `verdict:` line; writes the same to OUT_DIR/verdict.txt;
exits 0 only when every criterion holds. Standard library only: it runs on a bare GPU image.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

GRAPHED = ("cuda-graph", "compile-cuda-graph")


@dataclass
class Check:
    """One criterion: whether it holds and what the files say."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{self.name:18} {'ok  ' if self.ok else 'FAIL'}  {self.detail}"


def _number(v: object) -> bool:
    try:
        return math.isfinite(float(str(v)))
    except ValueError:
        return False


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def check_pytest(junit: Path) -> Check:
    """pytest-gpu.xml: some tests, none failed, errored or skipped (failing ones named)."""
    name = "pytest -m gpu"
    if not junit.is_file():
        return Check(name, False, f"no {junit.name} (the pytest step did not run)")
    try:
        root = ET.parse(junit).getroot()
    except ET.ParseError as e:
        return Check(name, False, f"{junit.name} is unreadable ({e})")
    cases = root.iter("testcase")
    bad: dict[str, list[str]] = {"failed": [], "error": [], "skipped": []}
    total = 0
    for case in cases:
        total += 1
        for tag, key in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            if case.find(tag) is not None:
                bad[key].append(case.get("name", "?"))
    passed = total - sum(len(v) for v in bad.values())
    detail = (f"{passed} passed, {len(bad['failed'])} failed, {len(bad['error'])} errors, "
              f"{len(bad['skipped'])} skipped")
    named = [f"{k}: {', '.join(v[:4])}{f' and {len(v) - 4} more' if len(v) > 4 else ''}" for k, v in bad.items() if v]
    return Check(name, total > 0 and passed == total, detail + (f" ({'; '.join(named)})" if named else ""))


def _read(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def check_graph_cells(runs: Path) -> Check:
    """Every run folder with CUDA graphs on (config.json, or the planned config.request.json of a cell that
    never started) finished 'ok', and there is one."""
    name = "cuda-graph cells"
    graphed: dict[str, str] = {}
    for folder in sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []:
        cfg = _read(folder / "config.json") or _read(folder / "config.request.json")
        if cfg.get("graphs") in GRAPHED:
            graphed[folder.name] = str(_read(folder / "summary.json").get("status", "no summary"))
    if not graphed:
        return Check(name, False, f"no run folder under {runs} has graphs cuda-graph")
    not_ok = {k: v for k, v in graphed.items() if v != "ok"}
    detail = f"{len(graphed) - len(not_ok)} of {len(graphed)} ok"
    if not_ok:
        named = [f"{k}: {v}" for k, v in not_ok.items()]
        detail += f" ({', '.join(named[:4])}{f' and {len(named) - 4} more' if len(named) > 4 else ''})"
    return Check(name, not not_ok, detail)


def check_table(tables: Path, key: str, what: str, has_number) -> Check:
    """report/tables/<key>.csv has a row for which `has_number(row)` holds."""
    path = tables / f"{key}.csv"
    if not path.is_file():
        return Check(key, False, f"no {path.name} (the report had no cells for it)")
    rows = _rows(path)
    n = sum(1 for r in rows if has_number(r))
    return Check(key, n > 0, f"{n} of {len(rows)} row(s) with {what}")


def verdict(out: Path) -> list[Check]:
    """Every criterion, in the order of the module docstring."""
    tables = out / "report" / "tables"
    return [
        check_pytest(out / "pytest-gpu.xml"),
        check_graph_cells(out / "runs"),
        check_table(tables, "fig8a", "a speedup over the same model", lambda r: _number(r.get("speedup_vs_model_x"))),
        check_table(tables, "fig9a", "a copy share",
                    lambda r: _number(r.get("share_time_pct")) or _number(r.get("share_bytes_pct"))),
        check_table(tables, "fig9b", "a CUDA-graph speedup over eager",
                    lambda r: r.get("graphs") in GRAPHED and _number(r.get("speedup_x"))),
    ]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python .ci/gpu_verdict.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    checks = verdict(out)
    failed = [c.name for c in checks if not c.ok]
    lines = [c.line() for c in checks]
    lines.append("verdict: every criterion holds" if not failed else f"verdict: not met ({', '.join(failed)})")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if out.is_dir():
        (out / "verdict.txt").write_text(text)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
