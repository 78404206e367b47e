"""bench.status: one row per cell from the run folders (and Slurm job states), robust to damaged files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from bench.cell_log import OPEN_LAUNCH
from bench.cli import app, main
from bench.slurm import record_jobs, slurm_state
from bench.status import (
    _running,
    cell_status_rows,
    format_duration,
    recorded_jobs,
    status_table,
    status_totals,
)
from bench.store import TRAIN_LOCK, take_lock, writer_record
from ddnet.errors import UserError

ORDER = ["fin-1", "fail-2", "part-3", "skip-4", "dmg-5", "wait-6", "later-7"]


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def epoch_rows(n: int, **extra) -> str:
    rows = [{"epoch": e, "phase": "dense", "time_s": 10.0, **(extra if e == 1 else {})}
            for e in range(1, n + 1)]
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def grid_dir(tmp_path: Path) -> Path:
    """A grid's out folder: finished, failed, partial, skipped, damaged, submitted and pending cells."""
    out = tmp_path / "runs" / "smoke"
    # grid.json's epochs per cell: what a cell not reached yet shows; a folder's own config says it otherwise
    planned = {"later-7": 4, "part-3": 9}
    grid = {"grid": "smoke", "order": ORDER,
            "cells": [{"folder": f, **({"epochs": planned[f]} if f in planned else {})} for f in ORDER]}
    write(out / "grid.json", record_jobs(grid, {"part-3": "77_2", "wait-6": "77_5"}))
    for name in ORDER[:6]:
        write(out / name / "cell.json", {"cell": name.split("-")[0], "label": f"label of {name}",
                                         "folder": name})
        write(out / name / "config.request.json", {"epochs": 5})
    write(out / "fin-1" / "config.json", {"epochs": 3})
    write(out / "fin-1" / "epochs.jsonl", epoch_rows(3))
    write(out / "fin-1" / "summary.json", {"status": "ok", "epochs_completed": 3, "total_time_s": 31.5,
                                           "final_val_ms_ssim": 93.456})
    write(out / "fail-2" / "epochs.jsonl", epoch_rows(1))
    write(out / "fail-2" / "summary.json", {"status": "failed", "epochs_completed": 1,
                                            "error": "train loss became nan at epoch 2\nTraceback"})
    # 2 of 5 epochs, a capture and a pruning time in the first row, and a torn last line (killed mid-append)
    torn = '{"epoch": 3, "ti'
    write(out / "part-3" / "epochs.jsonl", epoch_rows(2, capture_time_s=1.5, prune_time_s=0.5) + torn)
    write(out / "part-3" / "summary.json", {"status": "running", "error": None})
    write(out / "skip-4" / "summary.json", {"status": "skipped",
                                            "reason": "needs CUDA (--graphs cuda-graph)"})
    write(out / "dmg-5" / "summary.json", '{"status": "ok", "total_')
    return out


def by_cell(rows: list[dict]) -> dict[str, dict]:
    return {r["cell"]: r for r in rows}


def _age(detail: str) -> tuple[float, str]:
    """(seconds, unit) of a row's 'last sign of life 10 min ago'."""
    value, unit = re.search(r"last sign of life ([\d.]+) (s|min|h) ago", detail).groups()
    return float(value) * {"s": 1, "min": 60, "h": 3600}[unit], unit


def test_rows_from_folders_alone(grid_dir):
    rows = cell_status_rows(grid_dir)
    assert [r["cell"] for r in rows] == ORDER  # grid.json's order, absent folders included
    r = by_cell(rows)
    assert (r["fin-1"]["status"], r["fin-1"]["epochs_done"], r["fin-1"]["epochs"]) == ("finished", 3, 3)
    assert r["fin-1"]["time_used_s"] == 31.5 and r["fin-1"]["detail"] == "final MS-SSIM 93.46%"
    assert r["fin-1"]["label"] == "label of fin-1"
    assert r["fail-2"]["status"] == "failed" and r["fail-2"]["detail"] == "train loss became nan at epoch 2"
    assert r["fail-2"]["time_used_s"] == 10.0
    part = r["part-3"]
    assert (part["status"], part["detail"], part["epochs_done"]) == ("running", "in epoch 3/5 (2 done, dense)", 2)
    assert part["time_used_s"] == pytest.approx(22.0)  # 2 x 10 s + 1.5 s capture + 0.5 s pruning
    assert part["job_id"] == "77_2" and part["job_state"] is None
    # its trainer touches .alive at its steps (every 10 s at most): the running row says how long ago
    (grid_dir / "part-3" / ".alive").touch()
    for age, unit in [(0, "s"), (95, "s"), (600, "min"), (3 * 3600, "h")]:
        t = time.time() - age
        os.utime(grid_dir / "part-3" / ".alive", (t, t))
        detail = by_cell(cell_status_rows(grid_dir))["part-3"]["detail"]
        assert re.fullmatch(r"in epoch 3/5 \(2 done, dense\), last sign of life (\d+ s|\d+ min|\d+\.\d h) ago", detail), detail
        value, said = _age(detail)
        assert said == unit and abs(value - age) <= 2, detail
    assert r["skip-4"]["status"] == "skipped" and r["skip-4"]["detail"] == "needs CUDA (--graphs cuda-graph)"
    assert r["dmg-5"]["status"] == "unreadable"
    assert r["dmg-5"]["detail"].startswith("unreadable: summary.json:")
    assert (r["wait-6"]["status"], r["wait-6"]["detail"]) == ("submitted", "job 77_5")
    assert (r["later-7"]["status"], r["later-7"]["epochs"], r["later-7"]["epochs_done"]) == ("pending", 4, 0)
    assert r["part-3"]["epochs"] == 5  # its config.request.json, not grid.json's 9
    assert r["wait-6"]["epochs"] == 5 and r["dmg-5"]["epochs"] == 5
    assert recorded_jobs(grid_dir) == {"part-3": "77_2", "wait-6": "77_5"}


@pytest.mark.parametrize("states, part, wait", [
    ({"77_2": "running", "77_5": "queued"}, ("running", "in epoch 3/5 (2 done, dense)"), ("queued", "job 77_5 queued")),
    ({"77_2": "queued", "77_5": "running"}, ("queued", "job 77_2 queued; resumes after epoch 2/5"),
     ("running", "in epoch 1/5")),
    ({"77_2": "cancelled", "77_5": "failed"},
     ("stopped", "job 77_2 cancelled with 2/5 epochs done; `bench run` resubmits it"),
     ("stopped", "job 77_5 failed with 0/5 epochs done; `bench run` resubmits it")),
    ({}, ("stopped", "job 77_2 unknown with 2/5 epochs done; `bench run` resubmits it"),
     ("submitted", "job 77_5, not listed by Slurm")),
])
def test_job_states_refine_unfinished_cells_only(grid_dir, states, part, wait):
    r = by_cell(cell_status_rows(grid_dir, job_states=states))
    assert (r["part-3"]["status"], r["part-3"]["detail"]) == part
    assert (r["wait-6"]["status"], r["wait-6"]["detail"]) == wait
    assert r["fin-1"]["status"] == "finished" and r["fail-2"]["status"] == "failed"  # the folder wins


def test_a_job_slurm_ended_says_slurms_reason_and_the_fix_a_preempted_one_is_not_a_cancel(grid_dir):
    states = {"77_2": slurm_state("TIMEOUT"), "77_5": slurm_state("PREEMPTED")}
    r = by_cell(cell_status_rows(grid_dir, job_states=states))
    assert (r["part-3"]["status"], r["part-3"]["detail"]) == (
        "stopped", "job 77_2 failed (Slurm TIMEOUT: the job hit --slurm-time; raise it, the cell resumes from its "
                   "last epoch) with 2/5 epochs done; `bench run` resubmits it")
    assert (r["wait-6"]["status"], r["wait-6"]["detail"]) == (
        "stopped", "job 77_5 preempted (resumable) with 0/5 epochs done; `bench run` resubmits it")
    assert r["part-3"]["job_state"] == "failed"  # the coarse state, for whatever reads the rows
    console = Console(width=300, record=True)
    console.print(status_table(list(r.values())))
    text = console.export_text()
    assert "77_2 (failed: TIMEOUT)" in text and "77_5 (preempted)" in text and "cancelled" not in text


def _ended_writer() -> dict:
    """What `bench train` records as its summary's writer, of a process now ended."""
    gone = subprocess.run([sys.executable, "-c", "import json, psutil, socket, os; print(json.dumps({'host': "
                           "socket.gethostname(), 'pid': os.getpid(), 'created': psutil.Process().create_time()}))"],
                          capture_output=True, text=True, check=True)
    return json.loads(gone.stdout)


def test_a_local_cell_whose_process_has_ended_is_stopped_not_running(grid_dir):
    ended = _ended_writer()
    for writer, expected in [(ended, "stopped"), (writer_record(), "running"),  # this process: alive
                             ({**writer_record(), "created": 1.0}, "stopped"),  # its pid, reused by another process
                             ({**ended, "host": "another-node"}, "running"),  # cannot be told from here
                             (None, "running")]:  # an older folder: no writer recorded
        write(grid_dir / "part-3" / "summary.json", {"status": "running", "error": None, "writer": writer})
        part = by_cell(cell_status_rows(grid_dir))["part-3"]
        assert part["status"] == expected, writer
    assert part["detail"] == "in epoch 3/5 (2 done, dense)"
    write(grid_dir / "part-3" / "summary.json", {"status": "running", "error": None, "writer": ended})
    part = by_cell(cell_status_rows(grid_dir))["part-3"]
    assert part["detail"] == "2/5 epochs done; its process has ended: `bench run` (the same command) resumes it"
    (grid_dir / "part-3" / "cell.json").unlink()  # a run `bench train` made on its own: that command resumes it
    assert by_cell(cell_status_rows(grid_dir))["part-3"]["detail"] == (
        f"2/5 epochs done; its process has ended: `bench train --out {grid_dir / 'part-3'} --resume` resumes it")
    # with Slurm job states the job's state decides, as before
    assert by_cell(cell_status_rows(grid_dir, job_states={"77_2": "running"}))["part-3"]["status"] == "running"


def test_a_stopped_cell_says_when_its_checkpoint_holds_fewer_epochs_than_its_rows(grid_dir):
    """A stop between an epoch's row and its checkpoint (a full disk while writing ckpt.pt), or with
    --checkpoint-every N, left status counting rows: '2/5 epochs done' where the resume retrains epoch 2."""
    ended, tail = _ended_writer(), "; its process has ended: `bench run` (the same command) resumes it"
    for k, said in [(1, " (1 of them in its checkpoint: the resume retrains from epoch 2)"),
                     (0, " (none of them in a checkpoint: the resume retrains from epoch 1)"),
                     (2, ""), (None, "")]:  # up to date; a run from before the field
        write(grid_dir / "part-3" / "summary.json", {"status": "running", "error": None, "writer": ended,
                                                     **({"checkpoint_epoch": k} if k is not None else {})})
        part = by_cell(cell_status_rows(grid_dir))["part-3"]
        assert (part["status"], part["detail"], part["epochs_done"]) == ("stopped", f"2/5 epochs done{said}{tail}", 2)
    write(grid_dir / "part-3" / "summary.json", {"status": "running", "error": None, "checkpoint_epoch": 1})
    rows = by_cell(cell_status_rows(grid_dir, job_states={"77_2": "cancelled"}))
    assert rows["part-3"]["detail"] == ("job 77_2 cancelled with 2/5 epochs done; `bench run` resubmits it (1 of them "
                                        "in its checkpoint: the resume retrains from epoch 2)")
    rows = by_cell(cell_status_rows(grid_dir, job_states={"77_2": "queued"}))
    assert rows["part-3"]["detail"] == ("job 77_2 queued; resumes after epoch 1/5 (1 epoch(s) done past its "
                                        "checkpoint are retrained)")


def test_damaged_files_are_reported_never_raised(grid_dir):
    second = epoch_rows(2)[len(epoch_rows(1)):]
    write(grid_dir / "part-3" / "epochs.jsonl", epoch_rows(1) + "garbage\n" + second)
    write(grid_dir / "fin-1" / "cell.json", "{")
    write(grid_dir / "skip-4" / "summary.json", "[1, 2]")
    write(grid_dir / "fail-2" / "summary.json", {"status": "exploded"})
    (grid_dir / "extra-9").mkdir()
    write(grid_dir / "extra-9" / "summary.json", "")  # empty file: killed before the first write
    r = by_cell(cell_status_rows(grid_dir))
    assert r["part-3"]["epochs_done"] == 2 and "unreadable: epochs.jsonl line(s) 2" in r["part-3"]["detail"]
    assert r["fin-1"]["status"] == "finished"
    assert "unreadable: cell.json: invalid JSON" in r["fin-1"]["detail"]
    assert r["skip-4"]["detail"] == "unreadable: summary.json: not a JSON object"
    assert r["fail-2"]["detail"] == "unreadable: summary.json status 'exploded'"
    assert r["extra-9"]["status"] == "unreadable"  # a folder outside grid.json's order is still listed, last
    assert list(r)[-1] == "extra-9"


def test_a_damaged_grid_json_is_one_unreadable_row_and_the_cells_still_show(grid_dir):
    write(grid_dir / "grid.json", "not json")
    rows = cell_status_rows(grid_dir)
    assert rows[0]["cell"] == "grid.json"
    assert rows[0]["detail"].startswith("unreadable: grid.json: invalid JSON")
    assert [r["cell"] for r in rows[1:]] == sorted(ORDER[:6])  # found by their cell.json, sorted
    assert status_totals(rows)["cells"] == 6
    assert recorded_jobs(grid_dir) == {}


def test_table_and_totals(grid_dir):
    rows = cell_status_rows(grid_dir, job_states={"77_2": "running", "77_5": "queued"})
    totals = status_totals(rows)
    assert totals["by_status"] == {"queued": 1, "running": 1, "finished": 1, "failed": 1, "skipped": 1,
                                   "unreadable": 1, "pending": 1}
    assert totals["time_used_s"] == pytest.approx(31.5 + 10.0 + 22.0)
    console = Console(record=True, width=220)
    console.print(status_table(rows))
    text = console.export_text()
    for needle in ("fin-1", "2/5", "77_2 (running)", "train loss became nan at epoch 2", "1m04s",
                   "7 cells: 1 pending, 1 queued, 1 running, 1 finished, 1 failed, 1 skipped, 1 unreadable"):
        assert needle in text, needle


def test_format_duration_and_missing_folder(tmp_path):
    assert [format_duration(s) for s in (None, 4.25, 245, 7625)] == ["-", "4.2 s", "4m05s", "2h07m"]
    with pytest.raises(UserError, match="is not a folder"):
        cell_status_rows(tmp_path / "nope")
    assert cell_status_rows(tmp_path) == []


def test_bench_status_command_shows_every_cell_and_the_totals(grid_dir, tmp_path, monkeypatch):
    # the scheduler as the recorded jobs would have it: the same answer with or without a Slurm here (CI has a
    # real one, which has never heard of job 77)
    monkeypatch.setattr("bench.cmd_status.job_states", lambda ids: {"77_2": "running", "77_5": "queued"})
    res = CliRunner().invoke(app, ["status", str(grid_dir)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for word in ("finished", "failed", "running", "skipped"):
        assert word in res.output, word
    assert "time used" in res.output
    with pytest.raises(SystemExit) as stop:  # through the real entry point: one error line, exit 2
        main(["status", str(tmp_path / "nowhere")])
    assert stop.value.code == 2


def test_a_run_folder_with_only_its_lock_says_it_never_wrote_a_record(tmp_path, capsys):
    # what a `bench train` killed before its first record leaves (its temporaries are cleared on the next open)
    run = tmp_path / "t1"
    run.mkdir()
    (run / TRAIN_LOCK).write_text("")
    with pytest.raises(SystemExit) as stop:
        main(["status", str(run)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {run} is a `bench train` run stopped before it wrote its first record (only its lock file is "
        "there): nothing was trained; run the command that started it again, without --resume.")
    with take_lock(run / TRAIN_LOCK, "fix", "busy"), pytest.raises(SystemExit) as stop:  # as a starting run holds it
        main(["status", str(run)])
    assert stop.value.code == 2 and "is a `bench train` run that is starting and has written no record yet" in (
        capsys.readouterr().err)


def test_one_bench_train_run_folder_is_one_row_not_an_error(tmp_path):
    run = tmp_path / "t1"  # what `bench train --out t1` leaves: no grid.json, no cell folders
    write(run / "config.json", {"epochs": 2})
    write(run / "epochs.jsonl", epoch_rows(2))
    write(run / "summary.json", {"status": "ok", "epochs_completed": 2, "total_time_s": 20.5,
                                 "final_val_ms_ssim": 91.0})
    rows = cell_status_rows(run)
    assert [(r["cell"], r["status"], r["epochs_done"], r["epochs"]) for r in rows] == [("t1", "finished", 2, 2)]
    res = CliRunner().invoke(app, ["status", str(run)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "1 cell: 1 finished; time used 20.5 s" in res.output
    assert cell_status_rows(tmp_path / "t1" / ".." / "t1")[0]["cell"] == "t1"  # not '..'
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as stop:
        main(["status", str(empty)])
    assert stop.value.code == 2


def test_a_finished_cell_whose_epoch_rows_were_lost_says_so(grid_dir):
    # the run ended, so a torn last line is damage, not a line being appended; and rows are missing
    write(grid_dir / "fin-1" / "epochs.jsonl", epoch_rows(1) + '{"epoch": 2, "ti')
    row = by_cell(cell_status_rows(grid_dir))["fin-1"]
    assert row["status"] == "finished" and row["epochs_done"] == 3
    assert "epochs.jsonl line(s) 2" in row["detail"] and "epochs.jsonl holds 1 of its 3 epoch rows" in row["detail"]
    part = by_cell(cell_status_rows(grid_dir))["part-3"]  # unfinished: its torn last line is still normal
    assert "unreadable" not in part["detail"]


def test_a_launched_cell_without_records_is_not_called_not_started(grid_dir):
    write(grid_dir / "wait-6" / OPEN_LAUNCH, {"started_utc": "2026-11-28T05:28:08+00:00", "resume": False})
    write(grid_dir / "grid.json", {"grid": "smoke", "order": ORDER})  # no job recorded: a local run
    row = by_cell(cell_status_rows(grid_dir))["wait-6"]
    assert row["status"] == "pending"
    assert row["detail"].startswith("launched 2026-11-28T05:28:08+00:00, no record yet")
    assert by_cell(cell_status_rows(grid_dir))["later-7"]["detail"] == "not started"


def test_a_failed_cell_launched_again_says_so_until_its_trainer_writes(grid_dir):
    """`bench run --retry-failed`: from the launch until the trainer rewrote summary.json (seconds, more on a
    loaded machine) `bench status` showed the old failure alone, as if nothing were retrying it."""
    write(grid_dir / "grid.json", {"grid": "smoke", "order": ORDER})  # no job recorded: a local run
    summary = grid_dir / "fail-2" / "summary.json"
    os.utime(summary, (time.time() - 60, time.time() - 60))  # written by the launch that failed, earlier
    write(grid_dir / "fail-2" / OPEN_LAUNCH, {"started_utc": "2026-11-28T12:23:17+00:00", "resume": True})
    row = by_cell(cell_status_rows(grid_dir))["fail-2"]
    assert row["status"] == "failed"
    assert row["detail"] == ("train loss became nan at epoch 2; launched again 2026-11-28T12:23:17+00:00, no record "
                             "yet: starting, or its `bench run` was stopped before the trainer began (`bench run` "
                             "starts it again)")
    os.utime(summary, None)  # a summary written after the mark (a runner killed before it recorded the launch)
    os.utime(grid_dir / "fail-2" / OPEN_LAUNCH, (time.time() - 30, time.time() - 30))
    assert by_cell(cell_status_rows(grid_dir))["fail-2"]["detail"] == "train loss became nan at epoch 2"


def test_a_running_cell_names_the_epoch_under_way_not_the_count_done():
    """A cell training its first epoch read 'epoch 0/4', as if it were at epoch 0."""
    assert _running(0, 4, "") == "in epoch 1/4"
    assert _running(2, 4, "dense") == "in epoch 3/4 (2 done, dense)"
    assert _running(4, 4, "sparse") == "all 4/4 epochs done, finishing"  # the final evaluation and records
    assert _running(1, None, "dense") == "in epoch 2/? (1 done, dense)"
