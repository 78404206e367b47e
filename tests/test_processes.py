"""Running a grid's cells as processes: folders, reuse, resume, failures, timeouts, skips, signals, the lock.

These run against a fake `bench train` (tests/fake_trainer.py) that follows the
run-folder contract without torch; tests/test_cmd_run.py has the real trainer.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from bench import cell_log, cmd_run, planning, processes
from bench.cell_log import (
    LAUNCHES,
    OPEN_LAUNCH,
    STALL_FACTOR,
    STALL_FLOOR_S,
    STARTUP_STALL_S,
    DeviceGone,
    StallWatch,
    stall_limit_s,
)
from bench.cli import main as cli_main
from bench.estimate import machine_fingerprint
from bench.planning import Overrides, code_version, plan_grid
from bench.processes import run_grid
from bench.status import cell_status_rows
from bench.store import ALIVE_NAME, read_json, read_jsonl, write_json
from ddnet.config import TrainConfig
from ddnet.errors import UserError
from tests.fake_trainer import make_grid, quiet
from tests.test_estimate import TIMED_FAKE

REPO = Path(__file__).resolve().parent.parent


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
        (launch,) = read_jsonl(d / LAUNCHES)  # for the estimates: this launch's wall time and epochs
        assert launch["exit_code"] == 0 and launch["resume"] is False and launch["wall_s"] > 0
        assert (launch["epochs_before"], launch["epochs_after"]) == (0, 2)
    assert len(launched()) == 3
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".bench-run.lock"}
    again = run_grid(make_grid(3), out, command=cmd, console=quiet())
    assert [r.action for r in again] == ["reused"] * 3 and [r.status for r in again] == ["ok"] * 3
    assert len(launched()) == 3  # nothing launched the second time
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after



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
    (launch0,) = read_jsonl(d0 / LAUNCHES)
    assert (launch0["resume"], launch0["epochs_before"], launch0["epochs_after"]) == (True, 1, 2)
    (launch1,) = read_jsonl(d1 / LAUNCHES)
    assert (launch1["resume"], launch1["epochs_before"], launch1["epochs_after"]) == (False, 0, 2)


def test_failed_and_crashed_cells_are_recorded_and_the_grid_goes_on(tmp_path, fake, monkeypatch):
    cmd, launched = fake
    monkeypatch.setenv("FAKE_CRASH", "c2-")
    monkeypatch.setenv("FAKE_FAIL", "c1-")
    out = tmp_path / "out"
    results = run_grid(make_grid(4), out, command=cmd, console=quiet())
    assert [r.status for r in results] == ["ok", "failed", "failed", "ok"]
    failed = read_json(out / results[1].folder / "summary.json")
    assert failed["status"] == "failed" and "nan" in failed["error"]
    crashed = read_json(out / results[2].folder / "summary.json")
    assert crashed["status"] == "failed" and crashed["exit_code"] == 9
    assert "exited with code 9" in crashed["error"] and "segfault-like crash" in crashed["error"]
    assert crashed["epochs_completed"] == 1 and crashed["log_tail"]
    # a re-run leaves failures alone (no retry by default) ...
    n = len(launched())
    again = run_grid(make_grid(4), out, command=cmd, console=quiet())
    assert [r.status for r in again] == ["ok", "failed", "failed", "ok"] and len(launched()) == n
    # ... unless asked; the crashed cell resumes from its epoch-1 checkpoint
    monkeypatch.delenv("FAKE_CRASH")
    retried = run_grid(make_grid(4), out, command=cmd, console=quiet(), retry_failed=True)
    assert [r.status for r in retried] == ["ok", "failed", "ok", "ok"]
    assert launched()[-1] == {"folder": results[2].folder, "resume": True, "planned_device": "cpu"}
    assert [r["epoch"] for r in read_jsonl(out / results[2].folder / "epochs.jsonl")] == [1, 2]


def test_a_full_disk_stops_the_grid_and_leaves_the_cell_resumable(tmp_path, fake, monkeypatch):
    cmd, launched = fake
    monkeypatch.setenv("FAKE_FULL", "c1-")  # c1 cannot write its epoch-2 checkpoint: bench train exits 4
    out = tmp_path / "out"
    with pytest.raises(OSError) as err:
        run_grid(make_grid(3), out, command=cmd, console=quiet())
    assert err.value.errno == errno.ENOSPC and "c1-" in err.value.filename
    (d1,) = out.glob("c1-*")
    assert read_json(d1 / "summary.json")["status"] == "running"  # not failed: the disk's fault
    assert [r["epoch"] for r in read_jsonl(d1 / "epochs.jsonl")] == [1]
    assert [c["folder"][:3] for c in launched()] == ["c0-", "c1-"]  # c2 never started: it would fail alike
    # space freed: the same command resumes c1 from its checkpoint (no --retry-failed needed) and runs c2
    monkeypatch.delenv("FAKE_FULL")
    results = run_grid(make_grid(3), out, command=cmd, console=quiet())
    assert [(r.status, r.action) for r in results] == [("ok", "reused"), ("ok", "resumed"), ("ok", "ran")]
    assert [r["epoch"] for r in read_jsonl(d1 / "epochs.jsonl")] == [1, 2]


def test_oom_kills_reads_the_memory_cgroups_counter_in_v1_and_v2(tmp_path):
    from bench.cell_log import oom_kills  # noqa: PLC0415

    def layout(cgroup: str, files: dict[str, str]) -> Path:
        root = tmp_path / f"root{len(list(tmp_path.iterdir()))}"
        (root / "proc/self").mkdir(parents=True)
        (root / "proc/self/cgroup").write_text(cgroup)
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        return root

    job = "slurm_vm/uid_0/job_7/step_batch/task_0"
    v1 = layout(f"6:freezer:/{job}\n4:memory:/{job}\n0::/\n",
                {f"sys/fs/cgroup/memory/{job}/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"})
    assert oom_kills(v1) == 2
    v2 = layout(f"0::/{job}\n", {f"sys/fs/cgroup/{job}/memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n"})
    assert oom_kills(v2) == 1
    hybrid = layout(f"4:memory:/\n0::/{job}\n",  # v1 memory at the root without the file, v2 beside it
                    {f"sys/fs/cgroup/unified/{job}/memory.events": "oom_kill 5\n"})
    assert oom_kills(hybrid) == 5
    assert oom_kills(layout("0::/\n", {})) is None  # no counter to read
    assert oom_kills(tmp_path / "nowhere") is None  # no /proc (not Linux)


def test_a_cell_the_oom_killer_ended_is_failed_with_the_fix(tmp_path, fake, monkeypatch):
    from bench import cell_log  # noqa: PLC0415

    cmd, _ = fake
    monkeypatch.setenv("FAKE_CRASH", "c1-")  # c1 dies in epoch 2 without a word, as a process the killer ended
    kills = iter([0, 0, 1, 1])  # the cgroup's count: before c0, before c1, after c1 (one kill), before c2
    monkeypatch.setattr(cell_log, "oom_kills", lambda root=None: next(kills))
    monkeypatch.setattr(processes, "oom_kills", cell_log.oom_kills)
    results = run_grid(make_grid(3), tmp_path / "out", command=cmd, console=quiet())
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert results[1].error.startswith("cell process exited with code 9 after the out-of-memory killer struck at "
                                       "its memory limit"), results[1].error
    assert results[1].error.endswith(": segfault-like crash")  # the log's telling line, as for any crash



@pytest.mark.parametrize("signum, said", [(signal.SIGTERM, "killed by signal SIGTERM"),
                                          (signal.SIGINT, "killed by signal SIGINT")])
def test_a_cell_stopped_from_outside_the_runner_stays_resumable(tmp_path, fake, monkeypatch, signum, said):
    """`kill <cell pid>` ended the cell's process by SIGTERM: `bench train` says it stays resumable, but the runner
    recorded it failed, so the same command skipped it until --retry-failed. SIGKILL stays a failure (the
    out-of-memory killer's signal)."""
    cmd, launched = fake
    monkeypatch.setenv("FAKE_TERM", "c1-")
    monkeypatch.setenv("FAKE_TERM_SIGNAL", str(int(signum)))
    out = tmp_path / "out"
    results = run_grid(make_grid(3), out, command=cmd, console=quiet())
    assert [r.status for r in results] == ["ok", "stopped", "ok"]  # the grid went on
    assert results[1].error == f"stopped from outside the runner ({said})"
    (d1,) = out.glob("c1-*")
    assert read_json(d1 / "summary.json")["status"] == "running"  # nothing recorded as failed
    monkeypatch.delenv("FAKE_TERM")
    results = run_grid(make_grid(3), out, command=cmd, console=quiet())
    assert [(r.status, r.action) for r in results] == [("ok", "reused"), ("ok", "resumed"), ("ok", "reused")]
    assert [r["epoch"] for r in read_jsonl(d1 / "epochs.jsonl")] == [1, 2]


def test_a_cell_killed_outright_from_outside_is_still_failed(tmp_path, fake, monkeypatch):
    cmd, launched = fake
    monkeypatch.setenv("FAKE_TERM", "c1-")
    monkeypatch.setenv("FAKE_TERM_SIGNAL", str(int(signal.SIGKILL)))
    monkeypatch.setattr(processes, "oom_kills", lambda root=None: None)
    results = run_grid(make_grid(2), tmp_path / "out", command=cmd, console=quiet())
    assert [r.status for r in results] == ["ok", "failed"]
    assert "killed by signal SIGKILL" in results[1].error

def test_a_lost_replica_leaves_the_cell_resumable_and_the_grid_goes_on(tmp_path, fake, monkeypatch):
    cmd, launched = fake
    monkeypatch.setenv("FAKE_LOST", "c1-")  # c1's DDP group breaks in epoch 2, no replica says why: exit 6
    out = tmp_path / "out"
    results = run_grid(make_grid(3), out, command=cmd, console=quiet())
    assert [r.status for r in results] == ["ok", "stopped", "ok"]  # not failed, and c2 still ran
    assert results[1].error == "lost the other replicas (RuntimeError: Connection reset by peer)"
    (d1,) = out.glob("c1-*")
    summary = read_json(d1 / "summary.json")
    assert summary["status"] == "running" and summary["interrupted"].startswith("lost the other replicas")
    rows = cell_status_rows(out)
    assert rows[1]["status"] == "stopped" and "(stopped: lost the other replicas" in rows[1]["detail"], rows[1]
    # the same command resumes c1 from its checkpoint, without --retry-failed
    monkeypatch.delenv("FAKE_LOST")
    results = run_grid(make_grid(3), out, command=cmd, console=quiet())
    assert [(r.status, r.action) for r in results] == [("ok", "reused"), ("ok", "resumed"), ("ok", "reused")]
    assert launched()[-1]["resume"] is True and [r["epoch"] for r in read_jsonl(d1 / "epochs.jsonl")] == [1, 2]


def test_a_gpu_gone_mid_grid_stops_it_and_no_cell_falls_back_to_the_cpu(tmp_path, fake, monkeypatch):
    cmd, launched = fake
    # the grid starts on a machine with a GPU: every cell is told so (bench train then refuses to run without one)
    monkeypatch.setattr(processes, "resolve_device", lambda name: "cuda")
    monkeypatch.setenv("FAKE_NO_GPU", "c1-")  # c1's process finds no GPU: bench train exits 5
    out = tmp_path / "out"
    with pytest.raises(DeviceGone, match="GPU is no longer visible .*c1-.*run the same command again") as err:
        run_grid(make_grid(3), out, command=cmd, console=quiet())
    assert err.value.exit_code == 5
    assert [(c["folder"][:3], c["planned_device"]) for c in launched()] == [("c0-", "cuda"), ("c1-", "cuda")]
    (d1,) = out.glob("c1-*")
    assert read_json(d1 / "summary.json")["status"] == "running"  # resumable, not failed
    monkeypatch.delenv("FAKE_NO_GPU")  # the GPU is back
    results = run_grid(make_grid(3), out, command=cmd, console=quiet())
    assert [(r.status, r.action) for r in results] == [("ok", "reused"), ("ok", "resumed"), ("ok", "ran")]
    assert [r["epoch"] for r in read_jsonl(d1 / "epochs.jsonl")] == [1, 2]


@pytest.mark.parametrize("gpu_works", [True, False])
def test_after_a_gpu_cell_fails_a_probe_tells_a_broken_gpu_from_a_broken_cell(tmp_path, fake, monkeypatch,
                                                                             gpu_works):
    cmd, launched = fake
    monkeypatch.setattr(processes, "resolve_device", lambda name: "cuda")  # the grid starts on a GPU machine
    broken = "RuntimeError: CUDA error: uncorrectable ECC error encountered"
    probe = [sys.executable, "-c", "print('gpu ok')" if gpu_works else f"import sys; sys.exit({broken!r})"]
    monkeypatch.setattr(processes, "GPU_PROBE", tuple(probe))
    monkeypatch.setenv("FAKE_FAIL", "c1-")  # c1 fails (its summary says so, exit 3)
    out = tmp_path / "out"
    auto = Overrides(device="auto")  # cells that would run on the GPU
    if gpu_works:  # a cell's own failure (NaN, OOM): recorded, and the grid goes on
        results = run_grid(make_grid(3), out, auto, command=cmd, console=quiet())
        assert [r.status for r in results] == ["ok", "failed", "ok"]
        return
    # cells that asked for the CPU do not depend on the GPU: no probe, the grid goes on
    on_cpu = run_grid(make_grid(3), tmp_path / "cpu", command=cmd, console=quiet())
    assert [r.status for r in on_cpu] == ["ok", "failed", "ok"]
    n = len(launched())
    with pytest.raises(DeviceGone, match=r"GPU stopped working after c1-\w+ failed \(RuntimeError: CUDA error: "
                                         r"uncorrectable ECC .*--retry-failed"):
        run_grid(make_grid(3), out, auto, command=cmd, console=quiet())
    assert [c["folder"][:3] for c in launched()[n:]] == ["c0-", "c1-"]  # c2 never started on the broken GPU


@pytest.mark.parametrize(("fault", "code", "says"), [
    ("FAKE_FULL", 4, "the disk (or your quota) is full"), ("FAKE_NO_GPU", 5, "GPU is no longer visible")])
def test_bench_run_answers_a_full_disk_or_a_gpu_gone_with_one_line_and_its_exit_status(
        tmp_path, fake, monkeypatch, capsys, fault, code, says):
    cmd, _ = fake
    real = processes.run_grid
    monkeypatch.setattr(cmd_run, "load_grid", lambda name: make_grid(3))
    monkeypatch.setattr(cmd_run, "run_grid", lambda *a, **k: real(*a, **{**k, "command": cmd}))
    monkeypatch.setattr(processes, "resolve_device", lambda name: "cuda")
    monkeypatch.setenv(fault, "c1-")
    with pytest.raises(SystemExit) as exc:
        cli_main(["run", "--grid", "fake", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert exc.value.code == code and len(lines) == 1 and says in lines[0] and "Traceback" not in err, err


def test_the_gpu_probe_reports_why_it_failed():
    assert processes.gpu_broken([sys.executable, "-c", "print('fine')"]) is None
    assert processes.gpu_broken([sys.executable, "-c", "raise RuntimeError('no CUDA GPUs are available')"]) == (
        "RuntimeError: no CUDA GPUs are available")
    assert processes.gpu_broken([sys.executable, "-c", "import sys; sys.exit(7)"]) == "exited with code 7"


def test_a_hung_cell_is_stopped_after_its_stall_limit_and_the_grid_goes_on(tmp_path, fake, monkeypatch):
    cmd, launched = fake
    monkeypatch.setenv("FAKE_HANG", "c0-")  # c0 hangs in epoch 2, after one row
    out = tmp_path / "out"
    t0 = time.monotonic()
    results = run_grid(make_grid(2), out, Overrides(epochs=3), command=cmd, console=quiet(), stall_timeout_s=1.0)
    assert time.monotonic() - t0 < 60  # not the hour it sleeps
    assert [r.status for r in results] == ["failed", "ok"]
    s = read_json(out / results[0].folder / "summary.json")
    assert s["error"].startswith("cell process wrote no new epoch for 1 s after epoch 1 and was stopped as hung")
    assert s["epochs_completed"] == 1
    assert read_jsonl(out / results[0].folder / "launches.jsonl")[-1]["stalled"] is True
    assert read_jsonl(out / results[1].folder / "launches.jsonl")[-1]["stalled"] is False
    monkeypatch.delenv("FAKE_HANG")
    retried = run_grid(make_grid(2), out, Overrides(epochs=3), command=cmd, console=quiet(), retry_failed=True)
    assert [r.status for r in retried] == ["ok", "ok"]
    assert launched()[-1] == {"folder": results[0].folder, "resume": True, "planned_device": "cpu"}
    assert [r["epoch"] for r in read_jsonl(out / results[0].folder / "epochs.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("limit", [float("inf"), float("nan"), -1.0])
def test_a_stall_limit_never_reached_is_refused_before_anything_is_written(tmp_path, fake, limit):
    # nan and inf would leave the watch silently off: 0 is how it is turned off, as on Slurm (SlurmOptions)
    cmd, launched = fake
    with pytest.raises(UserError, match=r"stall_timeout_s=.*: give a finite number of seconds .*0 turns the watch off"):
        run_grid(make_grid(1), tmp_path / "out", Overrides(epochs=1), command=cmd, console=quiet(),
                 stall_timeout_s=limit)
    assert not (tmp_path / "out").exists() and launched() == []


def test_the_stall_limit_is_armed_by_the_launchs_first_epoch_and_scales_with_the_slowest():
    rows = [{"time_s": 2.0, "val_time_s": 1.0}, {"time_s": 100.0, "capture_time_s": 50.0, "val_time_s": 30.0},
            {"time_s": 1.0}]
    # loading, building, compiling: nothing measured to compare with yet, only signs of life, for an hour
    assert stall_limit_s([], 0) == STARTUP_STALL_S == 3600.0
    assert stall_limit_s(rows, 3) == STARTUP_STALL_S  # a resume: the rows it started with are not its own
    assert stall_limit_s([], 0, setting=5.0) == STARTUP_STALL_S  # a limit sized for epochs never cuts a start short
    assert stall_limit_s([], 0, setting=7200.0) == 7200.0  # a longer one stands
    assert stall_limit_s([], 0, setting=0) is None
    assert stall_limit_s(rows[:1], 0) == STALL_FLOOR_S  # 10 x 3 s is below the floor
    assert stall_limit_s(rows, 2) == STALL_FACTOR * 180.0 == 1800.0
    assert stall_limit_s([*rows, {"time_s": 400.0}], 0) == 4000.0
    assert stall_limit_s(rows, 0, setting=5.0) == 5.0
    assert stall_limit_s(rows, 0, setting=0) is None  # --stall-timeout 0: never


def test_the_stall_watch_goes_by_signs_of_life_until_the_launchs_first_row_then_by_rows_alone(tmp_path):
    row = {"time_s": 10.0}

    def touched(mtime_ns: int) -> Path:  # the run folder, its .alive last touched at mtime_ns
        (tmp_path / ALIVE_NAME).touch()
        os.utime(tmp_path / ALIVE_NAME, ns=(mtime_ns, mtime_ns))
        return tmp_path

    watch = StallWatch(since=1, setting=None, now=0.0)  # a resume from one row
    assert watch.seen([row], 1.0) and watch.stalled(3600.0) is None
    assert watch.stalled(3601.5) == (
        "showed no sign of life for 3600 s before writing epoch 2 (loading data, building, compiling or "
        "capturing, or in its steps) and was stopped as hung (--stall-timeout; --retry-failed resumes it)")
    watch.alive(tmp_path, 2000.0)  # no file yet: no news
    assert watch.stalled(3601.5) is not None
    watch.alive(touched(111), 3000.0)  # touched: the clock starts again
    assert watch.stalled(6599.0) is None and watch.stalled(6601.0) is not None
    watch.alive(touched(111), 6000.0)  # the same mark: nothing new
    assert watch.stalled(6601.0) is not None
    assert watch.seen([row, row], 7000.0)  # its first own row: from now on rows alone, 10 x 10 s under the floor
    assert watch.stalled(7000.0 + STALL_FLOOR_S + 1) == (
        f"wrote no new epoch for {STALL_FLOOR_S:g} s after epoch 2 and was stopped as hung "
        "(--stall-timeout; --retry-failed resumes it)")
    watch.alive(touched(222), 8000.0)  # a step touched it: an epoch is what counts now
    assert watch.stalled(7000.0 + STALL_FLOOR_S + 1) is not None
    off = StallWatch(since=0, setting=0, now=0.0)  # --stall-timeout 0: never, before the first row too
    off.seen([], 0.0)
    assert off.stalled(1e9) is None


def test_a_cell_without_a_sign_of_life_before_its_first_epoch_is_stopped_and_a_slow_live_one_is_not(
        tmp_path, fake, monkeypatch):
    cmd, _ = fake
    monkeypatch.setattr(cell_log, "STARTUP_STALL_S", 2.0)
    monkeypatch.setenv("FAKE_STUCK_START", "c0-")  # hangs silent before its first epoch
    monkeypatch.setenv("FAKE_SLOW_START", "c1-")  # 5 s before its first epoch, touching .alive
    monkeypatch.setenv("FAKE_START_S", "5")
    out = tmp_path / "out"
    t0 = time.monotonic()
    results = run_grid(make_grid(3), out, Overrides(epochs=2), command=cmd, console=quiet(), stall_timeout_s=1.0)
    assert time.monotonic() - t0 < 60  # not the hour c0 sleeps
    assert [r.status for r in results] == ["failed", "ok", "ok"]
    s = read_json(out / results[0].folder / "summary.json")
    assert s["error"].startswith("cell process showed no sign of life for 2 s before writing epoch 1"), s["error"]
    assert s["epochs_completed"] == 0
    assert read_jsonl(out / results[0].folder / "launches.jsonl")[-1]["stalled"] is True
    launch = read_jsonl(out / results[1].folder / "launches.jsonl")[-1]
    assert launch["stalled"] is False and launch["wall_s"] > 5.0  # 5 s without a row, alive: not stopped


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
    assert "the cell was stopped after the --cell-timeout of 1.5 s" in (
        out / results[0].folder / "train.log").read_text()
    monkeypatch.setenv("FAKE_EPOCH_S", "0")
    retried = run_grid(make_grid(2), out, Overrides(epochs=50), command=cmd, console=quiet(), retry_failed=True)
    assert [r.status for r in retried] == ["ok", "ok"] and launched()[-1]["resume"] is True
    assert [r["epoch"] for r in read_jsonl(out / results[0].folder / "epochs.jsonl")] == list(range(1, 51))


def test_cells_this_machine_cannot_run_are_recorded_as_skipped(tmp_path, fake, monkeypatch):
    cmd, launched = fake
    # decide as a CPU-only machine would, whatever this one has
    monkeypatch.setattr(planning, "skip_reason_for",
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


def test_a_cell_this_machine_cannot_run_shows_skipped_while_the_grid_still_runs(tmp_path, fake, monkeypatch):
    """It used to get its 'skipped' record only when the runner reached it: `bench status` showed it 'pending ...
    not started' meanwhile, as if it would run."""
    cmd, _ = fake
    monkeypatch.setattr(planning, "skip_reason_for",
                        lambda cfg: "needs CUDA (--graphs cuda-graph needs a CUDA device)"
                        if cfg.graphs == "cuda-graph" else None)
    out = tmp_path / "out"
    seen: list[dict[str, str]] = []
    real_run_cell = processes.run_cell

    def run_cell(p, *args, **kwargs):  # what `bench status` says as the first cell starts
        seen.extend({"cell": r["cell"], "status": r["status"], "detail": r["detail"]} for r in cell_status_rows(out))
        return real_run_cell(p, *args, **kwargs)

    monkeypatch.setattr(processes, "run_cell", run_cell)
    results = run_grid(make_grid(1, cuda_cell=True), out, command=cmd, console=quiet())
    assert [(r.status, r.action) for r in results] == [("ok", "ran"), ("skipped", "skipped")]
    graph = next(r for r in seen if r["cell"] == results[1].folder)
    assert graph["status"] == "skipped" and graph["detail"].startswith("needs CUDA")
    assert next(r for r in seen if r["cell"] == results[0].folder)["status"] == "pending"
    again = run_grid(make_grid(1, cuda_cell=True), out, command=cmd, console=quiet())
    assert [(r.status, r.action) for r in again] == [("ok", "reused"), ("skipped", "reused")]



def _grid_driver(out: Path, cmd: list[str], epochs: int) -> str:
    """A `python -c` program running a 2-cell grid into `out`, exiting 130 when interrupted (as `bench run`)."""
    return (
        "import sys\n"
        "from pathlib import Path\n"
        "from tests.fake_trainer import make_grid, quiet\n"
        "from bench.planning import Overrides\n"
        "from bench.processes import run_grid\n"
        "try:\n"
        f"    run_grid(make_grid(2), Path({str(out)!r}), Overrides(epochs={epochs}), command={cmd!r}, console=quiet())\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
    )


def test_interrupt_stops_the_cell_without_marking_it_failed_and_a_rerun_resumes(tmp_path, fake, monkeypatch):
    cmd, launched = fake
    out = tmp_path / "out"
    driver = _grid_driver(out, cmd, epochs=40)
    env = {**os.environ, "FAKE_EPOCH_S": "0.25"}  # 10 s of epochs: a loaded machine must not let it finish first
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
    (stopped,) = read_jsonl(d0 / LAUNCHES)  # the interrupted launch is on record, with its time
    assert stopped["interrupted"] is True and stopped["exit_code"] != 0 and stopped["wall_s"] > 0
    assert stopped["epochs_before"] == 0 and stopped["epochs_after"] == n_rows
    results = run_grid(make_grid(2), out, Overrides(epochs=40), command=cmd, console=quiet())
    assert [r.status for r in results] == ["ok", "ok"] and results[0].action == "resumed"
    assert [r["epoch"] for r in read_jsonl(d0 / "epochs.jsonl")] == list(range(1, 41))
    assert [launch["exit_code"] for launch in read_jsonl(d0 / LAUNCHES)][1:] == [0]


def test_a_runner_started_with_sigint_ignored_still_stops_its_cell_at_once(tmp_path, fake):
    """A script's `nohup bench run ... &` starts the runner with SIGINT ignored. Its cells inherited that, so at a
    SIGTERM (`kill`, a Slurm time limit on a job running the grid) the runner's gentle SIGINT to the cell was sat
    out for its whole 20 s grace before the SIGTERM. Now the cell takes SIGINT's default back at its start, in a
    process group of its own: a Ctrl-C in the terminal, meant for the script the runner runs behind, still passes
    the cell by, as it passes the runner."""
    cmd, launched = fake
    out = tmp_path / "out"
    driver = _grid_driver(out, cmd, epochs=400)
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO, env={**os.environ, "FAKE_EPOCH_S": "0.25"},
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))

    def rows() -> int:
        return len([r for f in out.glob("c0-*/epochs.jsonl") for r in read_jsonl(f)])

    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not rows():
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # a Ctrl-C reaching the script's process group: the runner's
        before = rows()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and rows() < before + 4:
            time.sleep(0.05)
        assert rows() >= before + 4 and len(launched()) == 1, "the terminal's Ctrl-C stopped the cell"
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)  # the runner alone
        assert proc.wait(timeout=60) == 130
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (d0,) = out.glob("c0-*")
    assert read_json(d0 / "summary.json")["status"] == "running"  # stopped, resumable
    (stopped,) = read_jsonl(d0 / LAUNCHES)
    assert stopped["exit_code"] == -signal.SIGINT  # the SIGINT ended it, not the SIGTERM 20 s later
    assert took < 15.0, f"the cell sat out the SIGINT grace: {took:.1f} s"


def test_a_runner_killed_outright_leaves_its_launch_on_record(tmp_path, fake):
    """SIGKILL gives the runner no chance to append the launch: it is recorded by the next runner, end unknown."""
    cmd, _ = fake
    out = tmp_path / "out"
    driver = (
        "from pathlib import Path\n"
        "from tests.fake_trainer import make_grid, quiet\n"
        "from bench.planning import Overrides\n"
        "from bench.processes import run_grid\n"
        f"run_grid(make_grid(1), Path({str(out)!r}), Overrides(epochs=40), command={cmd!r}, console=quiet())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO, env={**os.environ, "FAKE_EPOCH_S": "0.25"})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len([r for f in out.glob("c0-*/epochs.jsonl") for r in read_jsonl(f)]) < 3:
            time.sleep(0.05)
        proc.kill()  # the runner alone; its cell dies with it (PR_SET_PDEATHSIG)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    (d0,) = out.glob("c0-*")
    assert (d0 / OPEN_LAUNCH).is_file() and not (d0 / LAUNCHES).exists()
    time.sleep(0.5)  # the cell's last rows, if any, are written by now
    n_rows = len(read_jsonl(d0 / "epochs.jsonl"))
    results = run_grid(make_grid(1), out, Overrides(epochs=40), command=cmd, console=quiet())
    assert [r.status for r in results] == ["ok"] and results[0].action == "resumed"
    killed, resumed = read_jsonl(d0 / LAUNCHES)
    assert killed["runner_killed"] is True and killed["exit_code"] is None and killed["wall_s"] is None
    assert killed["epochs_before"] == 0 and killed["epochs_after"] == n_rows >= 3 and killed["resume"] is False
    assert killed["started_utc"] <= killed["last_output_utc"] <= resumed["started_utc"]
    assert resumed["exit_code"] == 0 and "runner_killed" not in resumed
    assert not (d0 / OPEN_LAUNCH).exists()


def test_a_second_runner_on_the_same_folder_is_refused(tmp_path, fake):
    cmd, _ = fake
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".bench-run.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="another `bench run`"):
            run_grid(make_grid(1), out, command=cmd, console=quiet())


def test_the_live_display_shows_the_grids_elapsed_and_remaining_time(tmp_path, monkeypatch):
    script = tmp_path / "timed_fake.py"
    script.write_text(TIMED_FAKE)
    monkeypatch.setenv("FAKE_FINGERPRINT", machine_fingerprint())
    monkeypatch.setenv("FAKE_IMAGE_S", "0.02")
    cmd = [sys.executable, str(script)]
    run_grid(make_grid(1), tmp_path / "before", command=cmd, console=quiet())  # measures c0's configuration
    text = io.StringIO()
    console = Console(file=text, force_terminal=True, width=200)
    results = run_grid(make_grid(2), tmp_path / "out", Overrides(epochs=3), command=cmd, console=console,
                       estimate_from=[tmp_path / "before"])
    assert [r.status for r in results] == ["ok", "ok"]
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text.getvalue())  # without the terminal's control codes
    # the grid's bar: the running cell, the elapsed time and what is left (a number while cells remain)
    assert re.search(r"c0-[0-9a-f]{8}\s+elapsed [\d.]+ s, ~[\d.]+ s left", shown), shown[-2000:]
    assert re.search(r"c1-[0-9a-f]{8}\s+elapsed [\d.]+ s, ~[\d.]+ s left", shown), shown[-2000:]
    assert re.search(r"cells .*2/2.*elapsed [\d.]+ s, nothing left", shown), shown[-2000:]


@pytest.mark.parametrize(("tail", "line"), [
    # a cell killed mid-epoch: its log holds a warning, the warning's source line and a progress-bar fragment
    (["/x/ddnet/trainer.py:96: UserWarning: 64 px images are too small for the standard MS-SSIM",
      '  self.loss_fn = DDNetLoss(self.image_side, guard_tf32=cfg.precision == "tf32")', "train 0/8 0:00:04"], ""),
    (["train ━━━━━━━━ 1/4 0:00:15 loss 1.675", "=== bench run 2026-11-28: cell started"], ""),
    # our own warnings are one 'warning: ...' line: a cell SIGKILLed mid-epoch was recorded as
    # "cell process killed by signal SIGKILL: warning: 64 px images are too small ..."
    (["=== bench run 2026-11-28: cell started",
      "warning: 64 px images are too small for the standard MS-SSIM; using reduced MS-SSIM"], ""),
    (["Traceback (most recent call last):", '  File "x.py", line 1, in <module>', "RuntimeError: boom"],
     "RuntimeError: boom"),
    (["segfault-like crash", "/x/y.py:3: FutureWarning: soon"], "segfault-like crash"),
    (["error: training failed: NaN", "RuntimeError: later"], "error: training failed: NaN"),
])
def test_the_error_line_of_a_log_is_never_a_warning_or_a_progress_bar(tail: list[str], line: str) -> None:
    assert cell_log.error_line(tail) == line
