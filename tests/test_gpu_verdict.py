""".ci/gpu_verdict.py: issue 10's "done when", read from a gpu-check OUT_DIR (the H200 check's real files, and
hand-made folders for each criterion)."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "gpu_verdict.py"
H200 = ROOT / "results" / "gpu" / "h200-2026-11-26"

_spec = importlib.util.spec_from_file_location("gpu_verdict", SCRIPT)
gv = importlib.util.module_from_spec(_spec)
sys.modules["gpu_verdict"] = gv  # dataclasses looks its module up by name
_spec.loader.exec_module(gv)


def _junit(path: Path, cases: dict[str, str]) -> None:
    """A pytest junit file: test name -> 'pass' | 'failure' | 'error' | 'skipped'."""
    body = "".join(f'<testcase classname="tests.t" name="{n}" time="0.1">'
                   + ("" if k == "pass" else f'<{k} message="m"/>') + "</testcase>" for n, k in cases.items())
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{len(cases)}">{body}'
                    "</testsuite></testsuites>")


def _cell(runs: Path, name: str, graphs: str, status: str | None, planned_only: bool = False) -> None:
    d = runs / name
    d.mkdir(parents=True)
    (d / ("config.request.json" if planned_only else "config.json")).write_text(json.dumps({"graphs": graphs}))
    if status is not None:
        (d / "summary.json").write_text(json.dumps({"status": status}))


def _table(tables: Path, key: str, rows: list[dict[str, object]]) -> None:
    tables.mkdir(parents=True, exist_ok=True)
    with (tables / f"{key}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """An OUT_DIR that meets every criterion."""
    out = tmp_path / "gc"
    out.mkdir()
    _junit(out / "pytest-gpu.xml", {"test_a": "pass", "test_b[cuda]": "pass"})
    _cell(out / "runs", "dense-graph-fp32", "cuda-graph", "ok")
    _cell(out / "runs", "dense-baseline", "off", "ok")
    _cell(out / "runs", "dense-compile", "compile", "failed")  # not a CUDA-graph cell: not a criterion
    tables = out / "report" / "tables"
    _table(tables, "fig8a", [{"cell": "dense-doll", "speedup_vs_model_x": 1.05}])
    _table(tables, "fig9a", [{"cell": "dense-baseline", "share_time_pct": "", "share_bytes_pct": 61.1}])
    _table(tables, "fig9b", [{"cell": "dense-compile", "graphs": "compile", "speedup_x": 1.4},
                             {"cell": "dense-graph-fp32", "graphs": "cuda-graph", "speedup_x": 1.03}])
    return out


def _by_name(out: Path) -> dict[str, object]:
    return {c.name: c for c in gv.verdict(out)}


def test_a_folder_meeting_every_criterion_passes_and_writes_its_verdict(good: Path) -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), str(good)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
    assert res.stdout.splitlines()[-1] == "verdict: every criterion holds"
    assert (good / "verdict.txt").read_text() == res.stdout
    checks = _by_name(good)
    assert checks["pytest -m gpu"].detail == "2 passed, 0 failed, 0 errors, 0 skipped"
    assert checks["cuda-graph cells"].detail == "1 of 1 ok"
    assert checks["fig9b"].detail == "1 of 2 row(s) with a CUDA-graph speedup over eager"


@pytest.mark.parametrize(("spoil", "failing", "said"), [
    (lambda o: _junit(o / "pytest-gpu.xml", {"test_a": "pass", "test_lockstep[fp32]": "failure"}),
     "pytest -m gpu", "1 passed, 1 failed, 0 errors, 0 skipped (failed: test_lockstep[fp32])"),
    # on a GPU no gpu test may skip: a skip means a path was not proved
    (lambda o: _junit(o / "pytest-gpu.xml", {"test_a": "skipped"}), "pytest -m gpu",
     "0 passed, 0 failed, 0 errors, 1 skipped (skipped: test_a)"),
    (lambda o: _junit(o / "pytest-gpu.xml", {}), "pytest -m gpu", "0 passed"),
    (lambda o: (o / "pytest-gpu.xml").write_text("<testsuites><testsuite"), "pytest -m gpu", "is unreadable"),
    (lambda o: (o / "pytest-gpu.xml").unlink(), "pytest -m gpu", "the pytest step did not run"),
    (lambda o: _cell(o / "runs", "dense-graph-amp-bf16", "cuda-graph", "failed"), "cuda-graph cells",
     "1 of 2 ok (dense-graph-amp-bf16: failed)"),
    # cut by the budget before it started: planned, never run
    (lambda o: _cell(o / "runs", "combined", "compile-cuda-graph", None, planned_only=True), "cuda-graph cells",
     "1 of 2 ok (combined: no summary)"),
    (lambda o: shutil.rmtree(o / "runs" / "dense-graph-fp32"), "cuda-graph cells", "no run folder under"),
    (lambda o: _table(o / "report" / "tables", "fig8a", [{"cell": "x", "speedup_vs_model_x": ""}]), "fig8a",
     "0 of 1 row(s)"),
    (lambda o: (o / "report" / "tables" / "fig9a.csv").unlink(), "fig9a", "no fig9a.csv"),
    (lambda o: _table(o / "report" / "tables", "fig9b", [{"graphs": "compile", "speedup_x": 1.4},
                                                         {"graphs": "cuda-graph", "speedup_x": "nan"}]),
     "fig9b", "0 of 2 row(s)"),
])
def test_each_criterion_fails_alone_and_says_why(good: Path, spoil, failing: str, said: str) -> None:
    spoil(good)
    checks = gv.verdict(good)
    assert [c.name for c in checks if not c.ok] == [failing]
    assert said in _by_name(good)[failing].detail
    assert gv.main([str(good)]) == 1
    assert (good / "verdict.txt").read_text().splitlines()[-1] == f"verdict: not met ({failing})"


def test_the_h200_check_of_2026_11_26_is_not_done_for_its_three_failed_tests(tmp_path: Path) -> None:
    # its real files: every cuda-graph cell ok and the figures filled, but pytest -m gpu had 3 failures
    out = tmp_path / "h200"
    shutil.copytree(H200 / "runs", out / "runs")
    shutil.copytree(H200 / "report", out / "report")
    shutil.copy(H200 / "logs" / "pytest-gpu-call2.xml", out / "pytest-gpu.xml")
    checks = _by_name(out)
    assert not checks["pytest -m gpu"].ok
    assert checks["pytest -m gpu"].detail.startswith("13 passed, 3 failed, 0 errors, 0 skipped (failed: "
                                                      "test_graphed_step_matches_eager[")
    assert checks["cuda-graph cells"].ok and checks["cuda-graph cells"].detail == "4 of 4 ok"
    assert all(checks[k].ok for k in ("fig8a", "fig9a", "fig9b"))


def test_usage(capsys) -> None:
    assert gv.main([]) == 2 and "usage:" in capsys.readouterr().err
