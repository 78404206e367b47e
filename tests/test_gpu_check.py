"""`.ci/gpu-check` on a CPU: the steps that need no GPU, so the script a GPU session runs once is known to work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "gpu-check"


def gpu_check(out: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **env})


# the smoke grid cut to fp32 and two sparsities: 8 cells, of which the 4 cuda-graph ones skip on a CPU. The whole
# smoke grid (32 cells) runs in test_cmd_run; here the check's plumbing is under test, and 16 cells took 234 s of CI
SMALL_GRID = """
from ablations.full import factorial
from ablations.smoke import defaults

NAME = "gpu_check_cpu"
DESCRIPTION = "smoke, fp32 only, dense and structured: .ci/gpu-check's steps on a CPU"


def cells(base):
    return factorial(base, precisions=("fp32",), sparsities=("none", "structured"))
"""


def test_data_grid_report_and_summary_on_a_cpu(tmp_path: Path) -> None:
    grid = tmp_path / "gpu_check_cpu.py"
    grid.write_text(SMALL_GRID)
    res = gpu_check(tmp_path / "gc", GPU_CHECK_STEPS="pytest data grid report summary", GPU_CHECK_GRID=str(grid),
                    GPU_CHECK_GRID_ARGS="--epochs 2", GPU_CHECK_DATA_ARGS="--n 16 --size 32", GPU_CHECK_BUDGET_S="560",
                    GPU_CHECK_TAR=str(tmp_path / "gc.tar.gz"), timeout=700)
    # the budget: CI took 216 s with the 32-cell smoke grid; on a loaded 2-core machine that grid alone once ran
    # past the 301 s that a budget of 400 left it
    assert res.returncode == 0, res.stdout[-3000:]
    out = tmp_path / "gc"
    # the data made in the background was waited for and used by every cell
    assert (out / "data" / "synth.json").is_file() and (out / ".data.rc").read_text().strip() == "0"
    assert "wrote 14/2/0 train/val/test" in (out / "data.log").read_text()
    lines = (out / "summary.txt").read_text().splitlines()
    assert lines[0].split()[:3] == ["cell", "status", "epochs"]
    cells = [ln.split() for ln in lines[1:]]
    assert len(cells) == 8
    ran = [c for c in cells if c[1] == "ok"]
    assert len(ran) == 4 and all(c[2] == "2" for c in ran)
    # wall, start and other seconds: numbers for every cell that ran, the start within the wall
    for c in ran:
        wall, start, other = (float(x) for x in c[-3:])
        assert 0 < start < wall and other > -0.5
        steps_s, gap, gap1, wait1 = c[-7:-3]  # the epoch's steps, the gap outside them and its first part (a
        # GPU's only), the first batch's wait
        assert 0 < float(steps_s) <= float(c[3]) and gap == gap1 == "-" and float(wait1) >= 0  # DoLL waits ~0
    assert (out / "report" / "report.md").is_file()
    for step in ("pytest", "data", "grid", "report", "summary"):
        assert f"  {step:8} ok (" in res.stdout
    assert "  env      not asked" in res.stdout
    # the GPU tests' options are valid: on a CPU every `gpu` test is collected and skips
    junit = (out / "pytest-gpu.xml").read_text()
    assert 'skipped="' in junit and 'failures="0"' in junit and 'errors="0"' in junit
    assert re.search(r"\n\d+ skipped, \d+ deselected in ", (out / "pytest-gpu.log").read_text())
    # the pack: records, report and logs; no checkpoints, traces or slices
    with tarfile.open(tmp_path / "gc.tar.gz") as tar:
        names = tar.getnames()
    assert "./summary.txt" in names and "./data.log" in names and "./report/report.md" in names and "./gpu-check.log" in names
    assert sum(n.endswith("/summary.json") for n in names) == 8
    assert not [n for n in names if n.endswith((".pt", "trace.json")) or n.startswith("./data/")]
    # the verdict step on this CPU folder: issue 10 not met, since every gpu test and cuda-graph cell skipped
    res = gpu_check(out, GPU_CHECK_STEPS="verdict", GPU_CHECK_BUDGET_S="60", timeout=120)
    assert res.returncode == 1 and "  verdict  FAILED, exit 1" in res.stdout, res.stdout[-2000:]
    verdict = (out / "verdict.txt").read_text()
    assert re.search(r"pytest -m gpu +FAIL +0 passed, 0 failed, 0 errors, \d+ skipped \(skipped: ", verdict)
    assert "cuda-graph cells   FAIL  0 of 4 ok (" in verdict and verdict.endswith("fig9b)\n")


def test_a_spent_budget_skips_the_steps_and_fails(tmp_path: Path) -> None:
    res = gpu_check(tmp_path / "gc", GPU_CHECK_STEPS="grid report", GPU_CHECK_BUDGET_S="20", timeout=120)
    assert res.returncode == 1
    assert "  grid     skipped (budget)" in res.stdout
    assert "  report   FAILED" in res.stdout or "  report   skipped (budget)" in res.stdout
    assert not (tmp_path / "gc" / "runs").exists()


def test_the_reserve_for_eval_report_and_summary_is_kept_only_when_they_are_asked(tmp_path: Path) -> None:
    # a pytest-only call on the H200 got 166 s of its 250 s budget: 75 s were kept for steps it did not ask
    alone = gpu_check(tmp_path / "a", GPU_CHECK_STEPS="env", GPU_CHECK_BUDGET_S="100", timeout=120)
    assert "=== env (timeout 60 s," in alone.stdout, alone.stdout[-2000:]
    before_report = gpu_check(tmp_path / "b", GPU_CHECK_STEPS="env report", GPU_CHECK_BUDGET_S="100", timeout=120)
    assert re.search(r"=== env \(timeout 2\d s,", before_report.stdout), before_report.stdout[-2000:]


def test_the_compile_tests_step_runs_pytest_m_gpu_compile_when_asked(tmp_path: Path) -> None:
    res = gpu_check(tmp_path / "gc", GPU_CHECK_STEPS="compiletests", GPU_CHECK_BUDGET_S="200", timeout=300)
    assert res.returncode == 0 and "  compiletests ok (" in res.stdout, res.stdout[-2000:]
    assert re.search(r"=== compiletests \(timeout 1\d\d s,", res.stdout)  # what the budget left, under its 420 s cap
    # on a CPU both compile tests are collected and skip; none of `-m gpu`'s tests is selected
    junit = (tmp_path / "gc" / "pytest-gpu-compile.xml").read_text()
    assert re.search(r'tests="2"', junit) and 'skipped="2"' in junit and 'failures="0"' in junit, junit[:500]
    assert re.search(r"\n2 skipped, \d+ deselected in ", (tmp_path / "gc" / "pytest-gpu-compile.log").read_text())
    # not asked, it does not run: the default steps leave it out
    plain = gpu_check(tmp_path / "plain", GPU_CHECK_STEPS="env", GPU_CHECK_BUDGET_S="100", timeout=120)
    assert "compiletests" not in plain.stdout and not (tmp_path / "plain" / "pytest-gpu-compile.xml").exists()
