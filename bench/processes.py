"""Running a planned grid: one fresh `bench train` process per cell, watched, stopped, recorded.

Each cell runs `python -m bench.cli train --config <cell>/config.request.json
--out <cell> [--resume]`, its output in `<cell>/train.log`. Re-running into the
same folder resumes: finished cells are left alone, unfinished ones continue from
their checkpoint, failed ones stay failed unless `--retry-failed`; nothing
written is overwritten. A failing cell is recorded and the grid goes on, as is one
that stops making progress (`bench.cell_log.stall_limit_s`: no new epoch for 10x its
slowest, at least 30 min; before its first, no sign of life for an hour). Ctrl-C or SIGTERM
stops the running cell and leaves it resumable, not failed; so does a full disk (the cell exits
EXIT_NO_SPACE) or a GPU gone (EXIT_NO_DEVICE: the grid started with one and a cell sees none),
which also stop the grid: every later cell would fail alike, or fall back to the CPU. After a
GPU cell fails, a one-tensor probe in a fresh process tells a broken GPU (stop the grid) from a broken cell (go on).

Each launch is appended to `<cell>/launches.jsonl` (for `bench.estimate`); the display
shows the grid's elapsed and remaining time (`GridClock`), re-estimated as cells finish.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import signals
from bench.cell_log import (
    EXIT_NO_DEVICE,
    EXIT_NO_SPACE,
    LAUNCHES,
    OPEN_LAUNCH,
    PLANNED_DEVICE_ENV,
    DeviceGone,
    StallWatch,
    check_stall_timeout,
    exit_text,
    interrupted_why,
    log_tail,
    oom_error,
    oom_kills,
    record_failure,
)
from bench.estimate import Calibration, PlanEstimate, estimate_plan
from bench.grid_clock import GridClock
from bench.grid_display import GridDisplay, LiveGridDisplay
from bench.grids import Grid
from bench.planning import (
    Overrides,
    PlannedCell,
    check_grid_out,
    code_version,
    exclusive,
    plan_grid,
    prepare_cell,
    prepare_out,
)
from bench.store import append_jsonl, read_json, read_jsonl, read_summary, rewrite_jsonl, write_json
from ddnet.config import resolve_device
from ddnet.errors import UserError

TRAIN_COMMAND: tuple[str, ...] = (sys.executable, "-m", "bench.cli", "train")
"""The command each cell runs (`--config ... --out ... [--resume]` are appended)."""

POLL_S = 0.5
"""How often the runner looks at the running cell's epochs.jsonl."""

GPU_PROBE: tuple[str, ...] = (sys.executable, "-c", "import torch; x = torch.ones(8, device='cuda'); "
                              "torch.cuda.synchronize(); assert float(x.sum()) == 8.0; print('gpu ok')")
"""Run after a GPU cell fails: does this machine's GPU still compute, in a fresh process? (`gpu_broken`)"""
GPU_PROBE_TIMEOUT_S = 120.0


def gpu_broken(probe: Sequence[str] | None = None) -> str | None:
    """None when a fresh process can still compute on the GPU (`probe`, default GPU_PROBE), else why not."""
    try:
        res = subprocess.run(probe or GPU_PROBE, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             timeout=GPU_PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"a one-tensor CUDA probe hung for {GPU_PROBE_TIMEOUT_S:g} s"
    except OSError as e:
        return f"the CUDA probe could not start ({e})"
    if res.returncode == 0:
        return None
    lines = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
    return lines[-1][:200] if lines else exit_text(res.returncode)


# ------------------------------------------------------------------ one cell


@dataclass
class CellResult:
    """What happened to one cell in this invocation (a flat row for the summary table)."""

    folder: str
    label: str
    status: str
    """The cell's summary.json status: ok | failed | skipped."""
    action: str
    """What this invocation did: ran | resumed | reused (finished or failed earlier) | skipped."""
    epochs_completed: int = 0
    epochs: int = 0
    """Epochs the cell's config asks for."""
    total_time_s: float | None = None
    final_val_ms_ssim: float | None = None
    """Percent."""
    error: str | None = None
    """The failure, or for a skipped cell the reason."""

    def row(self) -> dict[str, Any]:
        """Flat dict (one row of the summary table)."""
        return dict(self.__dict__)


def result_from_summary(p: PlannedCell, s: dict[str, Any], action: str) -> CellResult:
    def num(v: Any) -> float | None:
        return float(v) if isinstance(v, int | float) else None

    return CellResult(
        folder=p.folder,
        label=p.cell.label,
        status=str(s.get("status")),
        action=action,
        epochs_completed=int(s.get("epochs_completed") or 0),
        epochs=p.config.epochs,
        total_time_s=num(s.get("total_time_s")),
        final_val_ms_ssim=num(s.get("final_val_ms_ssim")),
        error=s.get("error") or (s.get("reason") if s.get("status") == "skipped" else None),
    )


OUTSIDE_STOPS = (-signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP, 130)
"""How a cell's process ends when stopped on purpose (130: `bench train` after a Ctrl-C)."""


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM reached the runner."""


def _sigterm_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """Treat SIGTERM like Ctrl-C while the grid runs, so the child is stopped and nothing is recorded as failed."""
    return signals.sigterm_raises(lambda signum: _Interrupted(signal.Signals(signum).name), again=True)


def _stop_child(proc: subprocess.Popen) -> None:
    """Give the cell time to stop on the SIGINT it shares with us, then insist."""
    steps = ((2.0, None), (20.0, signal.SIGINT), (10.0, signal.SIGTERM), (5.0, signal.SIGKILL))
    for wait_s, sig in steps:
        if sig is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_cell(
    p: PlannedCell,
    out: Path,
    grid_name: str,
    version: str,
    display: GridDisplay,
    command: Sequence[str] = TRAIN_COMMAND,
    retry_failed: bool = False,
    timeout_s: float | None = None,
    stall_timeout_s: float | None = None,
    machine_device: str = "cpu",
) -> CellResult:
    """Run (or skip, or reuse) one planned cell; never overwrites a finished result.

    `timeout_s`: stop the cell's process after this many seconds and record it as failed
    (resumable later with --retry-failed, from its last checkpoint). Likewise when it writes no
    new epoch (before its first, no sign of life) for `stall_limit_s(rows, ..., stall_timeout_s)` seconds
    (None: the default limit).
    """
    cell_dir = out / p.folder
    _close_orphan_launch(cell_dir)
    s = read_summary(cell_dir)
    status = s.get("status") if s else None
    if s is not None and status == "ok":
        return result_from_summary(p, s, "reused")
    if s is not None and status == "failed" and not retry_failed:
        return result_from_summary(p, s, "reused")
    if s is not None and status == "skipped" and p.skip_reason:
        return result_from_summary(p, s, "reused")

    skipped = prepare_cell(p, out, grid_name, version)
    if skipped is not None:
        return result_from_summary(p, skipped, "skipped")
    request = cell_dir / "config.request.json"
    # resume from the checkpoint when there is one (the trainer drops epoch rows past it); a failed cell
    # retried, or one whose summary.json is damaged, is resumed too (bench train refuses to reuse such a
    # folder otherwise): a damaged summary of a finished cell is rebuilt from its last checkpoint
    resume = (cell_dir / "ckpt.pt").exists() or status in ("failed", "damaged")
    epochs_path = cell_dir / "epochs.jsonl"
    if not resume and epochs_path.exists() and epochs_path.stat().st_size > 0:
        # killed after an epoch row was written but before the first checkpoint: those rows have no
        # model state behind them (checkpoint epoch 0), so drop them as a resume would, and start over
        rewrite_jsonl(epochs_path, [])
    argv = [*command, "--config", str(request), "--out", str(cell_dir)] + (["--resume"] if resume else [])
    log_path = cell_dir / "train.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", PLANNED_DEVICE_ENV: machine_device}
    epochs_before = len(read_jsonl(epochs_path)) if resume else 0
    with open(log_path, "a") as log:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        log.write(f"=== bench run {stamp}: {' '.join(argv)}\n")
        log.flush()
        write_json(cell_dir / OPEN_LAUNCH, {"started_utc": stamp, "resume": resume, "epochs_before": epochs_before})
        oom_before = oom_kills()  # a memory cgroup's limit (a Slurm allocation, a systemd slice) may kill the cell
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            preexec_fn=signals.cell_start_hook(),
        )
        started = time.monotonic()
        watch = StallWatch(epochs_before, stall_timeout_s, started)
        timed_out, stalled, stop_why = False, None, None
        try:
            while True:
                rows = read_jsonl(cell_dir / "epochs.jsonl")
                now = time.monotonic()
                if watch.seen(rows, now):
                    display.epoch(rows, p.config.epochs)
                watch.alive(cell_dir, now)
                display.tick()
                try:
                    proc.wait(timeout=POLL_S)  # returns as soon as the cell ends
                    break
                except subprocess.TimeoutExpired:
                    now = time.monotonic()
                    timed_out = timeout_s is not None and now - started > timeout_s
                    stalled = watch.stalled(now)
                    if timed_out or stalled is not None:
                        stop_why = stalled if stalled is not None else f"was stopped after the --cell-timeout of {timeout_s:g} s"
                        log.write(f"=== bench run {datetime.now(timezone.utc).isoformat(timespec='seconds')}: "
                                  f"the cell {stop_why}\n")
                        log.flush()
                        _stop_child(proc)
                        break
        except (KeyboardInterrupt, _Interrupted):
            _stop_child(proc)
            _record_launch(cell_dir, stamp, started, proc.returncode, resume, epochs_before, interrupted=True)
            raise
    rc = proc.returncode
    s, rows = _record_launch(cell_dir, stamp, started, rc, resume, epochs_before, timed_out=timed_out,
                             stalled=stalled is not None)
    display.epoch(rows, p.config.epochs)
    if rc == EXIT_NO_SPACE:  # every later cell would fail alike: stop the grid, leave this cell resumable
        display.failure(p.folder, log_tail(log_path), log_path, "stopped: the disk is full")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(cell_dir))
    if rc == EXIT_NO_DEVICE:  # likewise: no cell may fall back to the CPU
        display.failure(p.folder, log_tail(log_path), log_path, "stopped: the GPU is gone")
        raise DeviceGone(f"the grid's GPU is no longer visible ({p.folder} could not start on it); check it "
                         "(nvidia-smi), then run the same command again: finished cells are kept and this one "
                         "resumes from its last checkpoint.")
    action = "resumed" if resume else "ran"
    if rc == 0 and s.get("status") == "ok":
        return result_from_summary(p, s, action)
    if (why := interrupted_why(s)) is not None:  # a replica lost (EXIT_PEER_LOST): not the cell's failure
        display.failure(p.folder, log_tail(log_path), log_path, f"stopped ({why}); it stays resumable")
        return result_from_summary(p, {**s, "status": "stopped", "error": why}, action)
    if stop_why is None and rc in OUTSIDE_STOPS and s.get("status") == "running":
        # stopped from outside the runner (`kill`, a Ctrl-C in another terminal): `bench train` said it stays
        # resumable, and it does; SIGKILL is not among them (the out-of-memory killer's signal)
        why = f"stopped from outside the runner ({exit_text(rc)})"
        display.failure(p.folder, log_tail(log_path), log_path, f"{why}; it stays resumable")
        return result_from_summary(p, {**s, "status": "stopped", "error": why}, action)

    tail = log_tail(log_path)
    if stop_why is None:
        stop_why = oom_error(oom_before, rc)
    # the process may have died without recording its failure (crash, kill, user error): recorded here, with
    # the runner's own reason when it stopped the cell
    s = record_failure(cell_dir, s, rc, tail, stop_why)
    display.failure(p.folder, tail, log_path)
    return result_from_summary(p, s, action)


def _record_launch(cell_dir: Path, stamp: str, started: float, rc: int | None, resume: bool, epochs_before: int,
                   **how: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Append this launch to the cell's launches.jsonl (what bench.estimate needs to tell the start-up from
    the epochs, and the report's wall time; `how`: timed_out, stalled, interrupted); returns (summary, rows)."""
    rows = read_jsonl(cell_dir / "epochs.jsonl")
    s = read_summary(cell_dir) or {}
    append_jsonl(cell_dir / LAUNCHES, {
        "started_utc": stamp, "wall_s": time.monotonic() - started, "exit_code": rc, "resume": resume,
        "timed_out": how.get("timed_out", False), "stalled": how.get("stalled", False),
        **({"interrupted": True} if how.get("interrupted") else {}),
        "epochs_before": epochs_before, "epochs_after": len(rows), "data_load_s": s.get("data_load_s"),
        "data_cache": s.get("data_cache")})
    (cell_dir / OPEN_LAUNCH).unlink(missing_ok=True)
    return s, rows


def _close_orphan_launch(cell_dir: Path) -> None:
    """Record the launch a killed runner left open: when it started, that its end is unknown (no exit code, no
    wall time), the epochs on disk now, and when its log was last written (the latest its process is known to
    have run)."""
    path = cell_dir / OPEN_LAUNCH
    if not path.exists():
        return
    try:
        opened = read_json(path)
    except (OSError, ValueError):  # unreadable (a foreign hand): the launch is on record all the same
        opened = {}
    opened = opened if isinstance(opened, dict) else {}
    try:
        last: datetime | None = datetime.fromtimestamp((cell_dir / "train.log").stat().st_mtime, timezone.utc)
    except OSError:
        last = None
    append_jsonl(cell_dir / LAUNCHES, {
        "started_utc": opened.get("started_utc"), "wall_s": None, "exit_code": None, "resume": opened.get("resume"),
        "timed_out": False, "stalled": False, "runner_killed": True,
        "last_output_utc": last.isoformat(timespec="seconds") if last else None,
        "epochs_before": opened.get("epochs_before"), "epochs_after": len(read_jsonl(cell_dir / "epochs.jsonl")),
        "data_load_s": None, "data_cache": None})
    path.unlink(missing_ok=True)


# ------------------------------------------------------------------ the grid


def run_grid(
    grid: Grid,
    out: Path,
    overrides: Overrides | None = None,
    repeats: int = 1,
    resume: bool = True,
    retry_failed: bool = False,
    command: Sequence[str] = TRAIN_COMMAND,
    console: Console | None = None,
    cell_timeout_s: float | None = None,
    stall_timeout_s: float | None = None,
    on_plan: Callable[[list[PlannedCell], list[str], PlanEstimate], None] | None = None,
    calibrations: dict[tuple[str, str], Calibration] | None = None,
    estimate_from: Sequence[Path] = (),
) -> list[CellResult]:
    """Run every cell of `grid` into `out`, sequentially, one fresh process per cell; returns one result per cell.

    `on_plan(planned, order, estimate)` is called once the run order is fixed, before the first cell
    (`bench run` prints the plan with it); the estimates read the run folders under `out` and
    `estimate_from`, and `calibrations` (`bench.calibrate.calibrate`).
    Raises KeyboardInterrupt when interrupted (the running cell is stopped and stays resumable), an
    OSError (ENOSPC) when a cell, or the runner, could not write for a full disk, and DeviceGone when the
    GPU this machine had at the start is no longer visible to a cell (either way the cell stays resumable)
    or no longer computes after a cell failed on it (`gpu_broken`; that cell stays failed).
    """
    check_stall_timeout(stall_timeout_s, "stall_timeout_s")  # before anything is written
    console = console or Console()
    overrides = overrides or Overrides()
    version = code_version()
    planned = plan_grid(grid, overrides, repeats, version)
    by_folder = {p.folder: p for p in planned}
    seed = overrides.seed if overrides.seed is not None else grid.base().seed
    results: list[CellResult] = []
    machine_device = resolve_device("auto")  # once: a GPU that vanishes mid-grid must not turn cells into CPU runs
    check_grid_out(out)  # before `exclusive` makes the folder
    with exclusive(out):
        order = prepare_out(out, grid, planned, seed, resume, version)
        # cells this machine cannot run are recorded 'skipped' now, not when the loop reaches them: `bench status`
        # meanwhile showed them 'pending', as if they would run
        skipped_now = {p.folder: s for p in planned if p.skip_reason and read_summary(out / p.folder) is None
                       and (s := prepare_cell(p, out, grid.name, version)) is not None}

        def estimate() -> PlanEstimate | None:
            try:  # reads the folders as they are now; an unreadable one must not stop the grid
                return estimate_plan(planned, out, retry_failed, calibrations, tuple(estimate_from))
            except (OSError, ValueError, UserError):
                return None

        plan = estimate() or PlanEstimate(cells={})
        if on_plan is not None:
            on_plan(planned, order, plan)
        clock = GridClock(plan, time.monotonic())
        display_cls = LiveGridDisplay if console.is_terminal else GridDisplay
        with _sigterm_as_interrupt(), display_cls(console, len(order), clock) as display:
            try:
                for i, folder in enumerate(order, start=1):
                    clock.cell_started(folder, time.monotonic())
                    display.start(i, by_folder[folder])
                    r = (result_from_summary(by_folder[folder], skipped_now[folder], "skipped")
                         if folder in skipped_now else
                         run_cell(by_folder[folder], out, grid.name, version, display, command, retry_failed,
                                  cell_timeout_s, stall_timeout_s, machine_device))
                    clock.cell_finished(folder)
                    if r.action != "reused":  # a new measurement: better estimates for the cells to come
                        clock.plan = estimate() or clock.plan
                    display.finish(r)
                    results.append(r)
                    p = by_folder[folder]
                    if (r.status == "failed" and r.action != "reused" and machine_device == "cuda"
                            and p.config.device != "cpu" and (why := gpu_broken()) is not None):
                        # a GPU in a bad state (Xid, ECC, fallen off the bus) would fail every cell after this one
                        raise DeviceGone(f"the GPU stopped working after {folder} failed ({why}); check it "
                                         "(nvidia-smi), then run the same command with --retry-failed: finished "
                                         f"cells are kept and {folder} resumes from its last checkpoint.")
            except _Interrupted as e:
                raise KeyboardInterrupt(str(e)) from None
    return results
