"""bench/report/command.py: `bench report` from the command line, on hand-made folders and on a real smoke grid."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.report.build import make_report
from ddnet.errors import UserError
from tests.report_fakes import QUAL, _cfg, _cli, _est, _row, _rows, _times, write_run


def test_importing_the_report_command_loads_nothing_heavy():
    """`bench --help` and every `bench run` cell process import bench.report: it must stay cheap."""
    code = ("import sys, bench.report; "
            "print(sorted(m for m in ('torch', 'pandas', 'matplotlib', 'seaborn') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_report_help_lists_every_option(capsys):
    code, out, _ = _cli(["report", "--help"], capsys)
    assert code == 0
    for opt in ("RESULTS_DIR", "--out", "--force", "--tolerance", "--target"):
        assert opt in out, opt


def test_empty_or_missing_folder_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        code, _, err = _cli(["report", str(folder)], capsys)
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("error: ") and str(folder) in lines[0]
        assert "bench run --grid smoke" in lines[0]
    with pytest.raises(UserError, match="no run folders"):
        make_report(tmp_path / "empty")


def test_existing_report_is_not_overwritten_without_force(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    code, out, _ = _cli(["report", str(root)], capsys)
    assert code == 0 and "report.md" in out
    marker = root / "report" / "report.md"
    before = marker.read_text()
    code, _, err = _cli(["report", str(root)], capsys)
    assert code == 2 and "--force" in err and marker.read_text() == before
    code, _, _ = _cli(["report", str(root), "--force"], capsys)
    assert code == 0 and marker.exists()
    # --force never deletes a folder that is not a report.
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a report folder"):
        make_report(root, other, force=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_a_report_that_fails_midway_leaves_the_earlier_one_whole(tmp_path, capsys, monkeypatch):
    import bench.report.build as build  # noqa: PLC0415

    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    assert _cli(["report", str(root)], capsys)[0] == 0
    before = {p.relative_to(root): p.read_bytes() for p in (root / "report").rglob("*") if p.is_file()}
    assert Path("report/report.md") in before
    real, written = build._write_csv, []

    def fills_up(path, rows):  # the disk fills after the first CSV
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(path)
        return real(path, rows)

    monkeypatch.setattr(build, "_write_csv", fills_up)
    code, _, err = _cli(["report", str(root), "--force"], capsys)
    lines = err.strip().splitlines()
    assert code == 4 and lines[-1].startswith("error: a write failed: the disk") and "Traceback" not in err
    assert written and written[0].parent.parent.name.startswith(".report.tmp-")  # written aside ...
    after = {p.relative_to(root): p.read_bytes() for p in (root / "report").rglob("*") if p.is_file()}
    assert after == before  # ... so the earlier report is untouched
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # and nothing is left aside
    monkeypatch.undo()  # space freed: the same command works
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = root / f".report.tmp-{int(dead.stdout)}"  # what a `bench report` killed mid-way leaves
    (stale / "tables").mkdir(parents=True)
    code, _, _ = _cli(["report", str(root), "--force"], capsys)
    assert not stale.exists()
    assert code == 0 and {p.relative_to(root) for p in (root / "report").rglob("*") if p.is_file()} == set(before)


# ---------------------------------------------------------------------------------- end to end


SMOKE_EPOCHS = 4  # 2 dense + 2 sparse epochs for the hybrid cells: each phase has a non-warm-up epoch


@pytest.fixture(scope="module")
def smoke_runs(smoke_grid):
    """The session's real `bench run --grid smoke` on the CPU (conftest.py), shared with the runner tests."""
    out, res = smoke_grid
    assert list(out.rglob("summary.json")), res.stdout[-2000:] + res.stderr[-2000:]
    return out


def _total(d: Path) -> float:
    return json.loads((d / "summary.json").read_text())["total_time_s"]


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_end_to_end_smoke_grid_report(smoke_runs, capsys):
    out = smoke_runs
    code, stdout, err = _cli(["report", str(out), "--out", str(out / "report")], capsys)
    assert code == 0, err
    assert "report.md" in stdout
    rdir = out / "report"
    md = (rdir / "report.md").read_text()
    summaries = {p.parent: json.loads(p.read_text()) for p in out.rglob("summary.json")}
    assert summaries and any(s["status"] == "ok" for s in summaries.values())
    status = pd.read_csv(rdir / "tables" / "status.csv")
    assert len(status) == len(summaries)
    for s in summaries.values():
        if s["status"] == "skipped":  # cuda-graph cells on a CPU
            assert f"skipped: {s['reason']}" in md
        elif s["status"] == "failed":
            assert s["error"].splitlines()[0][:40] in md

    def cell_dir(name: str) -> Path:
        hits = [d for d in summaries if json.loads((d / "cell.json").read_text())["cell"] == name]
        assert len(hits) == 1, name
        return hits[0]

    base = cell_dir("fp32-host-off-dense")
    assert summaries[base]["status"] == "ok"
    assert _est(base) == pytest.approx(SMOKE_EPOCHS * float(np.median([r["time_s"] for r in _rows(base)[1:]])))

    # Table 2: the three sparsity types, hybrid 2 + 2, against the dense baseline.
    t2 = pd.read_csv(rdir / "tables" / "table2.csv")
    assert set(t2["sparsity"]) == {"random", "structured", "topk"}
    for _, row in t2.iterrows():
        d = cell_dir(row["cell"])
        if summaries[d]["status"] != "ok":
            assert pd.isna(row["speedup_x"])
            continue
        assert row["speedup_x"] == pytest.approx(_est(base) / _est(d))
        assert row["speedup_total_x"] == pytest.approx(_total(base) / _total(d))
        last, blast = _rows(d)[-1], _rows(base)[-1]
        assert row["ms_ssim_pct"] == pytest.approx(last["val_ms_ssim"])
        assert row["drop_pp"] == pytest.approx(blast["val_ms_ssim"] - last["val_ms_ssim"])
        assert row["switch_epoch"] == SMOKE_EPOCHS // 2

    # Fig. 8(a): each optimization alone over the same model without it.
    f8 = pd.read_csv(rdir / "tables" / "fig8a.csv")
    for name, model_base, paper in (("amp-bf16-host-off-dense", "fp32-host-off-dense", 1.49),
                                    ("fp32-device-off-dense", "fp32-host-off-dense", 1.21),
                                    ("amp-bf16-host-off-topk-hybrid2", "fp32-host-off-topk-hybrid2", 1.34)):
        row = _row(f8, name)
        if summaries[cell_dir(name)]["status"] == "ok" and summaries[cell_dir(model_base)]["status"] == "ok":
            assert row["model_baseline_cell"] == model_base
            assert row["speedup_vs_model_x"] == pytest.approx(_est(cell_dir(model_base)) / _est(cell_dir(name)))
        assert row["paper_vs_model_x"] == paper

    # Time to quality against the baseline's own final value minus 0.5 pp.
    t = pd.read_csv(rdir / "tables" / "ttq.csv")
    b = _row(t, "fp32-host-off-dense")
    assert b["target_ms_ssim_pct"] == pytest.approx(summaries[base]["final_val_ms_ssim"] - 0.5)
    rows = _rows(base)
    # reached = the first epoch from which every later validation stays at or above the target
    held = next(i for i in range(len(rows)) if all(r["val_ms_ssim"] >= b["target_ms_ssim_pct"] for r in rows[i:]))
    assert b["reached_epoch"] == rows[held]["epoch"]
    spent = summaries[base].get("staging_time_s") or 0.0
    spent += sum(r["time_s"] + r["capture_time_s"] + r["prune_time_s"] for r in rows[: held + 1])
    assert b["ttq_s"] == pytest.approx(spent)

    # CPU runs: memory is host RSS, named as such; masked sparsity is called simulated.
    m = pd.read_csv(rdir / "tables" / "memory.csv")
    assert set(m["primary_measure"]) == {"host RSS (process)"}
    sp = pd.read_csv(rdir / "tables" / "sparsity.csv")
    for _, row in sp.iterrows():
        if row["sparsity_kind_measured"] == "masked":
            assert "simulated" in row["note"]
    assert (rdir / "figures" / "table2.png").exists() and (rdir / "figures" / "fig8a.png").exists()


def test_target_is_a_number_or_input(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL, extra_row={"input_ms_ssim": 84.0})
    code, _, err = _cli(["report", str(root), "--target", "bogus"], capsys)
    assert code == 2 and "--target 'bogus' is neither a number" in err and "Traceback" not in err
    code, out, err = _cli(["report", str(root), "--target", "input"], capsys)
    assert code == 0, err
