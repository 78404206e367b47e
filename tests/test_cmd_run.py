"""`bench run` and `bench grids` end to end: the dry run, a SIGKILL mid-grid, the smoke grid on this machine.

The slow tests use the real trainer on tiny data.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from bench import cmd_run
from bench.cli import app
from bench.estimate import estimate_plan
from bench.grids import load_grid, registry
from bench.planning import plan_grid
from bench.store import append_jsonl, read_json, read_jsonl, write_json, writer_record

REPO = Path(__file__).resolve().parent.parent


def tiny_grid_file(folder: Path, device: str, cells: str) -> Path:
    """A grid file `g.py` of tiny 32 px cells on `device`; `cells`: the expression `cells(base)` returns."""
    path = folder / "g.py"
    path.write_text(
        "from bench.grids import Cell, standard_factors\n"
        "from ddnet.config import TrainConfig, DataConfig, ModelConfig\n"
        "NAME = 'g'\n"
        "def defaults():\n"
        "    return TrainConfig(model=ModelConfig(base_width=4, growth=4, bottleneck=8),\n"
        "        data=DataConfig(image_size=32, n_train=8, n_val=2), epochs=2, batch_size=4, num_workers=0, "
        f"device={device!r})\n"
        "def cells(base):\n"
        f"    return {cells}\n"
    )
    return path


def test_dry_run_in_cli_writes_nothing_and_shows_state(tmp_path, fake, monkeypatch):
    cmd, _ = fake
    monkeypatch.setenv("DDNET_BENCH_CACHE", str(tmp_path / "cache"))  # no split made yet
    grid_file = tiny_grid_file(tmp_path, "cpu", "[Cell('only', 'only', standard_factors(base), base)]")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", "--grid", str(grid_file), "--out", str(out), "--dry-run"])
    assert res.exit_code == 0 and "to run" in res.output and not out.exists()
    # its size and cost: 8 slices of 32 px, 2 steps x batch 4 x 2 epochs = 16 images; no earlier run: unknown
    assert "8 x 32 px" in res.output and "2 x 4 x 2" in res.output and "16 images" in res.output
    assert re.search(r"[│|]\s*unknown\s*[│|]", res.output)
    assert "total: 1 cell(s) to run, 16 images to train, time unknown (1 unknown); for the unknown ones use " \
           "--calibrate" in res.output
    res = CliRunner().invoke(app, ["run", "--grid", str(grid_file), "--out", str(out), "--dry-run",
                                   "--n-train", "12", "--n-val", "3", "--epochs", "5"])
    assert res.exit_code == 0 and "12 x 32 px" in res.output and "3 x 4 x 5" in res.output  # 12 // 4 steps
    assert "60 images" in res.output and "(12 x 32 px + 3 x 32 px slices)" in res.output



def test_a_grid_of_more_runs_than_max_cells_is_refused_before_anything_is_written(tmp_path, fake, monkeypatch):
    """A slip in a grid file's factor lists (or --repeats 500) started thousands of cells without a word."""
    monkeypatch.setenv("DDNET_BENCH_CACHE", str(tmp_path / "cache"))
    grid_file = tiny_grid_file(tmp_path, "cpu", "[Cell(f'c{i}', f'c{i}', standard_factors(base), base.replace("
                                                "lr=1e-4 * (i + 1))) for i in range(3)]")
    out = tmp_path / "out"
    for executor in ("local", "slurm"):
        res = CliRunner().invoke(app, ["run", "--grid", str(grid_file), "--out", str(out), "--repeats", "2",
                                       "--max-cells", "5", "--executor", executor])
        assert res.exit_code == 2 and not out.exists(), res.output
        assert ("error: grid g expands to 6 runs (3 cells x 2 repeats), more than --max-cells 5; check the grid "
                "file's factor lists and --repeats with --dry-run") in " ".join(res.output.split())
        assert "pass --max-cells 6 to run them all" in res.output
    res = CliRunner().invoke(app, ["run", "--grid", str(grid_file), "--out", str(out), "--repeats", "2",
                                   "--max-cells", "5", "--dry-run"])  # the plan still shows, with the note
    assert res.exit_code == 0 and not out.exists() and "6 cell(s) to run" in res.output, res.output
    assert "note: `bench run` would stop here: grid g expands to 6 runs" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["run", "--grid", str(grid_file), "--out", str(out), "--max-cells", "3",
                                   "--dry-run"])  # at the limit: no note
    assert res.exit_code == 0 and "would stop here" not in res.output
    res = CliRunner().invoke(app, ["run", "--grid", str(grid_file), "--out", str(out), "--max-cells", "0"])
    assert res.exit_code == 2 and "--max-cells 0 must be at least 1" in res.output


def test_every_shipped_grid_is_within_the_cell_guard_even_with_three_repeats():
    """`bench run --grid full --repeats 3` must never need --max-cells."""
    sizes = {name: len(g.cells()) for name, g in registry().items()}
    assert sizes and max(sizes.values()) * 3 <= cmd_run.MAX_CELLS, sizes


def test_the_dry_run_says_what_the_run_will_do_with_each_cell_it_finds(tmp_path, monkeypatch):
    """An interrupted cell read 'running (existing)' in the plan, as if it were running now."""
    monkeypatch.setenv("DDNET_BENCH_CACHE", str(tmp_path / "cache"))
    names = ("fresh", "done", "kept", "stopped", "early", "alive")
    grid_file = tiny_grid_file(tmp_path, "cpu", "[Cell(n, n, standard_factors(base), base.replace(lr=1e-4 * (i + 1)))"
                                                f" for i, n in enumerate({names!r})]")
    out = tmp_path / "out"
    planned = plan_grid(load_grid(str(grid_file)))
    folders = {p.cell.name: out / p.folder for p in planned}
    dead = {"host": socket.gethostname(), "pid": 2 ** 22 + 1, "created": 1.0}
    for name, summary, rows in (("done", {"status": "ok"}, 2), ("kept", {"status": "failed", "error": "x"}, 0),
                                ("stopped", {"status": "running", "writer": dead}, 1),
                                ("early", {"status": "running", "writer": dead}, 0),
                                ("alive", {"status": "running", "writer": writer_record()}, 1)):
        folders[name].mkdir(parents=True)
        write_json(folders[name] / "summary.json", summary)
        for k in range(rows):
            append_jsonl(folders[name] / "epochs.jsonl", {"epoch": k, "train_loss": 0.1, "epoch_time_s": 1.0})
        if rows:
            (folders[name] / "ckpt.pt").write_bytes(b"")
    res = CliRunner().invoke(app, ["run", "--grid", str(grid_file), "--out", str(out), "--dry-run"])
    assert res.exit_code == 0 and "running (existing)" not in res.output, res.output

    def states(retry_failed: bool) -> dict[str, str]:
        wide = Console(file=io.StringIO(), width=400)  # one line per row
        cmd_run.print_plan(wide, load_grid(str(grid_file)), planned, [p.folder for p in planned], out,
                           estimate_plan(planned, out, retry_failed))
        lines = wide.file.getvalue().splitlines()
        return {n: next(line for line in lines if f.name in line).split("│")[-2].strip() for n, f in folders.items()}

    assert states(False) == {
        "fresh": "to run", "done": "ok (existing)", "kept": "failed (existing): kept; --retry-failed runs it again",
        "stopped": "stopped: resumes, 1 of 2 epochs left", "early": "stopped before its first checkpoint: starts again",
        "alive": "running now (in another process)"}
    assert states(True)["kept"] == "failed (existing): retried"

# ------------------------------------------------------------------ slow: the real trainer


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a visible GPU")
def test_a_real_cell_planned_on_a_gpu_that_is_gone_stops_the_grid_resumable(tmp_path, monkeypatch):
    from bench import processes  # noqa: PLC0415

    grid_file = tiny_grid_file(tmp_path, "auto", "[Cell(n, n, standard_factors(base.replace(lr=lr)), "
                               "base.replace(lr=lr)) for n, lr in (('a', 1e-4), ('b', 2e-4))]")
    monkeypatch.setattr(processes, "resolve_device", lambda name: "cuda")  # this runner saw a GPU at the start
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", "--grid", str(grid_file), "--out", str(out)])
    # the first cell's real `bench train` finds no GPU: it exits 5 before training, nothing runs on the CPU
    assert res.exit_code == 5, res.output
    assert "the grid's GPU is no longer visible" in res.output and "exited" not in res.output
    started = [d for d in out.iterdir() if (d / "train.log").exists()]
    assert len(started) == 1 and not (started[0] / "epochs.jsonl").exists()
    assert "planned on a CUDA device but none is visible now" in (started[0] / "train.log").read_text()
    monkeypatch.undo()  # the same grid on a machine that had no GPU: it runs on the CPU, as asked ('auto')
    res = CliRunner().invoke(app, ["run", "--grid", str(grid_file), "--out", str(out)])
    assert res.exit_code == 0 and "2 ok" in res.output, res.output


KILL_GRID = '''
from bench.grids import Cell, standard_factors
from ddnet.config import DataConfig, ModelConfig, TrainConfig

NAME = "killme"
DESCRIPTION = "tiny cells for the kill/failure test"


def defaults():
    return TrainConfig(model=ModelConfig(base_width=4, growth=4, bottleneck=8),
                       data=DataConfig(image_size=32, n_train=8, n_val=2), epochs=2, batch_size=4,
                       num_workers=0, device="cpu")


def cells(base):
    out = []
    for name, changes in (("dense", {}), ("random", {"sparsity.kind": "random", "sparsity.dense_epochs": 1}),
                          ("broken", {"lr": 2e-3}),  # fails: the test injects a NaN loss into this cell
                          ("topk", {"sparsity.kind": "topk", "sparsity.dense_epochs": 1})):
        cfg = base.replace(**changes)
        out.append(Cell(name, name, standard_factors(cfg), cfg))
    return out
'''


def cell_dirs(out: Path) -> list[Path]:
    """Cell folders (they hold cell.json); a report written into the same folder is not a cell."""
    return sorted(p for p in out.iterdir() if p.is_dir() and (p / "cell.json").exists())


def assert_complete(d: Path, epochs: int) -> None:
    for name in ("config.json", "env.json", "epochs.jsonl", "summary.json", "cell.json", "train.log"):
        assert (d / name).exists(), f"{d.name} lacks {name}"
    rows = read_jsonl(d / "epochs.jsonl")
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1)), d.name  # each epoch once, none lost
    assert read_json(d / "summary.json")["status"] == "ok"


def status(d: Path) -> str | None:
    try:
        return read_json(d / "summary.json").get("status")
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_kill_mid_grid_then_rerun_finishes_and_a_failing_cell_does_not_stop_the_grid(tmp_path):
    grid = tmp_path / "killme.py"
    grid.write_text(KILL_GRID)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "bench.cli", "run", "--grid", str(grid), "--out", str(out)]
    # a NaN loss in the 'broken' cell's first epoch: a test-only fault, aimed by its folder name
    env = {**os.environ, "DDNET_BENCH_INJECT_NAN_EPOCH": "1", "DDNET_BENCH_INJECT_ONLY": f"{os.sep}broken-"}
    # its own process group: the SIGKILL below takes the runner and its running cell down together
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    finished: dict[Path, tuple[int, str]] = {}
    try:
        deadline = time.monotonic() + 400
        done: list[Path] = []
        started: list[Path] = []
        while time.monotonic() < deadline and proc.poll() is None:
            dirs = cell_dirs(out) if out.exists() else []
            done = [d for d in dirs if status(d) == "ok"]
            started = [d for d in dirs if d not in done and (d / "train.log").exists()]
            if done and started:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the grid ended before it could be killed"
        assert done and started
        for d in done:
            finished[d] = ((d / "epochs.jsonl").stat().st_mtime_ns, (d / "epochs.jsonl").read_text())
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert all(status(d) != "ok" for d in started)

    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 1, res.stdout + res.stderr  # the broken cell failed, at the end
    assert "1 failed, 3 ok" in res.stdout
    dirs = {d.name.rsplit("-", 1)[0]: d for d in cell_dirs(out)}
    assert set(dirs) == {"dense", "random", "broken", "topk"}
    for name in ("dense", "random", "topk"):  # topk comes after the failing cell: the grid went on
        assert_complete(dirs[name], 2)
        assert read_json(dirs[name] / "cell.json")["grid"] == "killme"
    for d, (mtime, text) in finished.items():  # finished before the kill: untouched, launched once
        assert (d / "epochs.jsonl").stat().st_mtime_ns == mtime and (d / "epochs.jsonl").read_text() == text
        assert (d / "train.log").read_text().count("=== bench run") == 1
    broken = read_json(dirs["broken"] / "summary.json")
    assert broken["status"] == "failed" and "nan" in broken["error"].lower()
    assert read_jsonl(dirs["broken"] / "epochs.jsonl") == []
    assert "broken" in res.stdout and "train loss became nan" in res.stdout  # log tail shown to the user
    assert read_json(out / "grid.json")["order"][2].startswith("broken-")


@pytest.mark.slow
@pytest.mark.timeout(2700)  # the shared smoke run: 16 cells of ~5-10 s each on a quiet 2-core CPU
def test_smoke_grid_end_to_end_on_this_machine(smoke_grid):
    out, res = smoke_grid
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    dirs = cell_dirs(out)
    assert len(dirs) == 32
    skipped = 0
    learned = []
    for d in dirs:
        s = read_json(d / "summary.json")
        if s["status"] == "skipped":
            skipped += 1
            assert s["reason"].startswith("needs CUDA") and (d / "config.json").exists()
            assert read_json(d / "config.json")["graphs"] == "cuda-graph"
        else:
            assert_complete(d, 4)
            assert isinstance(s["final_val_ms_ssim"], float) and 0.0 <= s["final_val_ms_ssim"] <= 100.0
            learned.append(s["final_val_ms_ssim"])
            assert read_json(d / "cell.json")["factors"]["precision"] in ("fp32", "amp-bf16")
    # smoke's lr (1e-2) is chosen so that the tiny net gets past 0 % validation MS-SSIM in 4 epochs
    assert max(learned) > 10.0, learned
    assert skipped == (0 if torch.cuda.is_available() else 16)
