"""`bench run`: folders, hashing, order, resume bookkeeping, failures, and (slow) end to end with the trainer.

The fast tests run the runner against a fake `bench train` (a small script that
follows the run-folder contract without torch); the slow ones use the real
trainer on tiny data, including a SIGKILL in the middle of a grid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from bench.cli import app
from bench.grids import Cell, Grid, standard_factors
from bench.runner import Overrides, cell_hash, code_version, plan_grid, run_grid, run_order
from bench.store import read_json, read_jsonl, write_json
from ddnet.config import DataConfig, ModelConfig, TrainConfig
from ddnet.errors import UserError

REPO = Path(__file__).resolve().parent.parent

# A stand-in for `bench train` with the same folder contract: epochs.jsonl rows, a JSON "ckpt.pt"
# written after each row, summary.json; --resume drops rows past the checkpoint. It logs each
# launch to $FAKE_CALLS, crashes without a summary when its folder name contains $FAKE_CRASH,
# and sleeps $FAKE_EPOCH_S per epoch.
FAKE_TRAIN = r'''
import json, os, sys, time
from pathlib import Path
args = sys.argv[1:]
cfg = json.loads(Path(args[args.index("--config") + 1]).read_text())
out = Path(args[args.index("--out") + 1])
resume = "--resume" in args
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps({"folder": out.name, "resume": resume}) + "\n")
summ, rows_path, ck = out / "summary.json", out / "epochs.jsonl", out / "ckpt.pt"
if summ.exists() and json.loads(summ.read_text())["status"] == "ok":
    print("error: already finished"); sys.exit(2)
rows = [json.loads(l) for l in rows_path.read_text().splitlines()] if rows_path.exists() else []
if rows and not resume:
    print("error: holds epochs; add --resume"); sys.exit(2)
start = json.loads(ck.read_text())["epoch"] if (resume and ck.exists()) else 0
rows = [r for r in rows if r["epoch"] <= start]
rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
(out / "config.json").write_text(json.dumps(cfg))
summ.write_text(json.dumps({"status": "running", "error": None}))
for e in range(start + 1, cfg["epochs"] + 1):
    time.sleep(float(os.environ.get("FAKE_EPOCH_S", "0")))
    if os.environ.get("FAKE_CRASH") and os.environ["FAKE_CRASH"] in out.name and e == 2:
        print("segfault-like crash"); sys.stdout.flush(); os._exit(9)
    if cfg.get("fail_at_epoch") == e:
        summ.write_text(json.dumps({"status": "failed", "error": f"train loss became nan at epoch {e}",
                                    "epochs_completed": e - 1}))
        print("error: training failed"); sys.exit(3)
    with open(rows_path, "a") as f:
        f.write(json.dumps({"epoch": e, "phase": "dense", "train_loss": 1.0 / e, "val_ms_ssim": 50.0 + e,
                            "time_s": 0.01}) + "\n")
    ck.write_text(json.dumps({"epoch": e}))
summ.write_text(json.dumps({"status": "ok", "error": None, "epochs_completed": cfg["epochs"],
                            "total_time_s": 0.01 * cfg["epochs"], "final_val_ms_ssim": 50.0 + cfg["epochs"]}))
print("done")
'''


def tiny_base() -> TrainConfig:
    return TrainConfig(model=ModelConfig(base_width=4, growth=4, bottleneck=8),
                       data=DataConfig(image_size=32, n_train=8, n_val=2), epochs=2, batch_size=4,
                       num_workers=0, device="cpu")


def make_grid(n: int = 3, fail: str | None = None, cuda_cell: bool = False) -> Grid:
    def cells(base: TrainConfig) -> list[Cell]:
        out = []
        for i in range(n):
            cfg = base.replace(lr=1e-4 * (i + 1))
            if fail == f"c{i}":
                cfg = cfg.replace(fail_at_epoch=1)
            out.append(Cell(f"c{i}", f"cell {i}", {**standard_factors(cfg), "lr": cfg.lr}, cfg))
        if cuda_cell:
            cfg = base.replace(graphs="cuda-graph")
            out.append(Cell("graph", "needs cuda", standard_factors(cfg), cfg))
        return out

    return Grid(name="fake", description="fake grid", source="test", cells_fn=cells, defaults_fn=tiny_base)


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.delenv("FAKE_CRASH", raising=False)

    def launched() -> list[dict]:
        return read_jsonl(calls)

    return [sys.executable, str(script)], launched


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"), width=160)


# ------------------------------------------------------------------ fast: fake trainer


def test_folders_records_and_no_rerun_of_finished_cells(tmp_path, fake):
    cmd, launched = fake
    out = tmp_path / "out"
    results = run_grid(make_grid(3), out, command=cmd, console=quiet())
    assert [r.status for r in results] == ["ok", "ok", "ok"]
    assert [r.epochs_completed for r in results] == [2, 2, 2]
    grid = read_json(out / "grid.json")
    assert grid["grid"] == "fake" and len(grid["cells"]) == 3 and grid["order"] == [r.folder for r in results]
    for r in results:
        d = out / r.folder
        assert r.folder.rsplit("-", 1)[0] in ("c0", "c1", "c2")
        cell = read_json(d / "cell.json")
        assert cell["grid"] == "fake" and cell["repeat"] == 0 and cell["factors"]["lr"] > 0
        assert read_json(d / "config.request.json") == TrainConfig.from_dict(read_json(d / "config.request.json")).to_dict()
        assert [row["epoch"] for row in read_jsonl(d / "epochs.jsonl")] == [1, 2]
        assert "=== bench run" in (d / "train.log").read_text()
    assert len(launched()) == 3
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".bench-run.lock"}
    again = run_grid(make_grid(3), out, command=cmd, console=quiet())
    assert [r.action for r in again] == ["reused"] * 3 and [r.status for r in again] == ["ok"] * 3
    assert len(launched()) == 3  # nothing launched the second time
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after


def test_hash_covers_config_and_code_version():
    cfg = tiny_base()
    assert cell_hash(cfg, "1") == cell_hash(TrainConfig.from_dict(cfg.to_dict()), "1")
    assert cell_hash(cfg, "1") != cell_hash(cfg.replace(lr=2e-4), "1")
    assert cell_hash(cfg, "1") != cell_hash(cfg, "2")
    v = code_version()
    assert v.startswith("0.") and "dirty" not in v
    if (REPO / ".git").exists():
        assert "+g" in v


def test_unfinished_cell_resumes_from_checkpoint_without_duplicate_rows(tmp_path, fake):
    cmd, launched = fake
    out = tmp_path / "out"
    grid = make_grid(2)
    planned = plan_grid(grid, version=code_version())
    # c0 was killed after epoch 1 had been checkpointed and while epoch 2's row was half written
    d0 = out / planned[0].folder
    d0.mkdir(parents=True)
    (d0 / "epochs.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.0}) + "\n")
    (d0 / "ckpt.pt").write_text(json.dumps({"epoch": 1}))
    write_json(d0 / "summary.json", {"status": "running", "error": None})
    # c1 was killed after its first epoch row but before the first checkpoint
    d1 = out / planned[1].folder
    d1.mkdir(parents=True)
    (d1 / "epochs.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 9.0}) + "\n")
    results = run_grid(grid, out, command=cmd, console=quiet())
    assert [r.status for r in results] == ["ok", "ok"]
    assert [r.action for r in results] == ["resumed", "ran"]
    assert [c["resume"] for c in launched()] == [True, False]
    rows0 = read_jsonl(d0 / "epochs.jsonl")
    assert [r["epoch"] for r in rows0] == [1, 2] and rows0[0]["train_loss"] == 1.0  # epoch 1 kept, not redone
    rows1 = read_jsonl(d1 / "epochs.jsonl")
    assert [r["epoch"] for r in rows1] == [1, 2] and rows1[0]["train_loss"] == 1.0  # the orphan row was dropped


def test_failed_and_crashed_cells_are_recorded_and_the_grid_goes_on(tmp_path, fake, monkeypatch):
    cmd, launched = fake
    monkeypatch.setenv("FAKE_CRASH", "c2-")
    out = tmp_path / "out"
    results = run_grid(make_grid(4, fail="c1"), out, command=cmd, console=quiet())
    assert [r.status for r in results] == ["ok", "failed", "failed", "ok"]
    failed = read_json(out / results[1].folder / "summary.json")
    assert failed["status"] == "failed" and "nan" in failed["error"]
    crashed = read_json(out / results[2].folder / "summary.json")
    assert crashed["status"] == "failed" and crashed["exit_code"] == 9
    assert "exited with code 9" in crashed["error"] and "segfault-like crash" in crashed["error"]
    assert crashed["epochs_completed"] == 1 and crashed["log_tail"]
    # a re-run leaves failures alone (no retry by default) ...
    n = len(launched())
    again = run_grid(make_grid(4, fail="c1"), out, command=cmd, console=quiet())
    assert [r.status for r in again] == ["ok", "failed", "failed", "ok"] and len(launched()) == n
    # ... unless asked; the crashed cell resumes from its epoch-1 checkpoint
    monkeypatch.delenv("FAKE_CRASH")
    retried = run_grid(make_grid(4, fail="c1"), out, command=cmd, console=quiet(), retry_failed=True)
    assert [r.status for r in retried] == ["ok", "failed", "ok", "ok"]
    assert launched()[-1] == {"folder": results[2].folder, "resume": True}
    assert [r["epoch"] for r in read_jsonl(out / results[2].folder / "epochs.jsonl")] == [1, 2]


def test_a_cell_past_its_timeout_is_stopped_recorded_and_resumable(tmp_path, fake, monkeypatch):
    cmd, launched = fake
    monkeypatch.setenv("FAKE_EPOCH_S", "0.4")
    out = tmp_path / "out"
    t0 = time.monotonic()
    results = run_grid(make_grid(2), out, Overrides(epochs=50), command=cmd, console=quiet(), cell_timeout_s=1.5)
    assert time.monotonic() - t0 < 60  # 2 x 50 epochs x 0.4 s would take 40 s; each stops after ~1.5 s
    assert [r.status for r in results] == ["failed", "failed"]
    s = read_json(out / results[0].folder / "summary.json")
    assert "--cell-timeout of 1.5 s" in s["error"] and 1 <= s["epochs_completed"] < 50
    monkeypatch.setenv("FAKE_EPOCH_S", "0")
    retried = run_grid(make_grid(2), out, Overrides(epochs=50), command=cmd, console=quiet(), retry_failed=True)
    assert [r.status for r in retried] == ["ok", "ok"] and launched()[-1]["resume"] is True
    assert [r["epoch"] for r in read_jsonl(out / results[0].folder / "epochs.jsonl")] == list(range(1, 51))


def test_cells_this_machine_cannot_run_are_recorded_as_skipped(tmp_path, fake, monkeypatch):
    import bench.runner as runner

    cmd, launched = fake
    # decide as a CPU-only machine would, whatever this one has
    monkeypatch.setattr(runner, "skip_reason_for",
                        lambda cfg: "needs CUDA (--graphs cuda-graph needs a CUDA device)"
                        if cfg.graphs == "cuda-graph" else None)
    out = tmp_path / "out"
    results = run_grid(make_grid(1, cuda_cell=True), out, command=cmd, console=quiet())
    assert [r.status for r in results] == ["ok", "skipped"]
    d = out / results[1].folder
    s = read_json(d / "summary.json")
    assert s["status"] == "skipped" and s["reason"].startswith("needs CUDA")
    assert read_json(d / "config.json")["graphs"] == "cuda-graph"
    assert read_json(d / "cell.json")["cell"] == "graph"
    assert [c["folder"] for c in launched()] == [results[0].folder]


def test_repeats_interleave_rounds_with_seeds_and_reuse_the_recorded_order(tmp_path, fake):
    cmd, launched = fake
    grid = make_grid(4)
    planned = plan_grid(grid, Overrides(seed=7), repeats=3)
    assert len(planned) == 12
    assert {p.config.seed for p in planned} == {7, 8, 9}
    assert all(f"-r{p.repeat}-" in p.folder and p.config.seed == 7 + p.repeat for p in planned)
    order = run_order(planned, seed=7)
    assert order == run_order(planned, seed=7)  # seeded
    rounds = [{p.folder for p in planned if p.repeat == k} for k in range(3)]
    assert [set(order[4 * k:4 * k + 4]) for k in range(3)] == rounds  # round by round
    shuffles = [[f.split("-r")[0] for f in order[4 * k:4 * k + 4]] for k in range(3)]
    assert any(s != ["c0", "c1", "c2", "c3"] for s in shuffles)

    out = tmp_path / "out"
    results = run_grid(grid, out, Overrides(seed=7), repeats=3, command=cmd, console=quiet())
    assert [c["folder"] for c in launched()] == order == read_json(out / "grid.json")["order"]
    assert len(results) == 12 and all(r.status == "ok" for r in results)
    with pytest.raises(UserError, match=str(out)):
        run_grid(grid, out, Overrides(seed=7), repeats=2, command=cmd, console=quiet())
    with pytest.raises(UserError, match="--resume"):
        run_grid(grid, out, Overrides(seed=7), repeats=3, resume=False, command=cmd, console=quiet())


def test_interrupt_stops_the_cell_without_marking_it_failed_and_a_rerun_resumes(tmp_path, fake, monkeypatch):
    cmd, launched = fake
    out = tmp_path / "out"
    driver = (
        "import sys\n"
        "from pathlib import Path\n"
        "from tests.test_runner import make_grid, quiet\n"
        "from bench.runner import Overrides, run_grid\n"
        "try:\n"
        f"    run_grid(make_grid(2), Path({str(out)!r}), Overrides(epochs=40), command={cmd!r}, console=quiet())\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
    )
    env = {**os.environ, "FAKE_EPOCH_S": "0.05"}
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = [r for f in out.glob("c0-*/epochs.jsonl") for r in read_jsonl(f)]
            if len(rows) >= 3:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: runner and cell both get it
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (d0,) = out.glob("c0-*")
    assert read_json(d0 / "summary.json")["status"] == "running"  # unfinished, not failed
    assert not list(out.glob("c1-*"))
    n_rows = len(read_jsonl(d0 / "epochs.jsonl"))
    assert 3 <= n_rows < 40
    results = run_grid(make_grid(2), out, Overrides(epochs=40), command=cmd, console=quiet())
    assert [r.status for r in results] == ["ok", "ok"] and results[0].action == "resumed"
    assert [r["epoch"] for r in read_jsonl(d0 / "epochs.jsonl")] == list(range(1, 41))


def test_a_second_runner_on_the_same_folder_is_refused(tmp_path, fake):
    import fcntl

    cmd, _ = fake
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".bench-run.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="another `bench run`"):
            run_grid(make_grid(1), out, command=cmd, console=quiet())


def test_dry_run_in_cli_writes_nothing_and_shows_state(tmp_path, fake):
    cmd, _ = fake
    grid_file = tmp_path / "g.py"
    grid_file.write_text(
        "from bench.grids import Cell, standard_factors\n"
        "from ddnet.config import TrainConfig, DataConfig, ModelConfig\n"
        "NAME = 'g'\n"
        "def defaults():\n"
        "    return TrainConfig(model=ModelConfig(base_width=4, growth=4, bottleneck=8),\n"
        "        data=DataConfig(image_size=32, n_train=8, n_val=2), epochs=2, batch_size=4, num_workers=0, device='cpu')\n"
        "def cells(base):\n"
        "    return [Cell('only', 'only', standard_factors(base), base)]\n"
    )
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", "--grid", str(grid_file), "--out", str(out), "--dry-run"])
    assert res.exit_code == 0 and "to run" in res.output and not out.exists()


# ------------------------------------------------------------------ slow: the real trainer

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
                          ("broken", {"fail_at_epoch": 1}),
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
    # its own process group: the SIGKILL below takes the runner and its running cell down together
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
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

    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
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
    import torch

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
