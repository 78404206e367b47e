"""`bench grids` and `bench run`: expand a grid and run each cell in its own fresh process.

One folder per cell under `--out` (default `results/runs/<grid>`), named
`<slug>-<hash>` (`<slug>-r<k>-<hash>` with repeats), where the hash covers the
cell's full config and the code version (package version + git commit; a
dirty tree does not change it, so editing code does not orphan a half-run
grid). Each cell is `python -m bench.cli train --config <cell>/config.request.json
--out <cell> [--resume]` with its output in `<cell>/train.log`.

Re-running into the same folder is the way to resume: finished cells
(summary.json status 'ok') are left alone, unfinished ones continue from their
checkpoint, failed ones stay failed unless `--retry-failed`. Nothing already
written is overwritten. A failing cell is recorded and the grid goes on; the
command exits non-zero at the end if any cell failed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.grids import Cell, Grid, load_grid, registry
from bench.store import read_json, read_jsonl, rewrite_jsonl, write_json
from ddnet.config import ConfigError, TrainConfig, check_runnable, check_static
from ddnet.errors import UserError

TRAIN_COMMAND: tuple[str, ...] = (sys.executable, "-m", "bench.cli", "train")
"""The command each cell runs (`--config ... --out ... [--resume]` are appended)."""

LOG_TAIL_LINES = 20
"""Lines of a failed cell's train.log shown to the user and stored in its summary."""

POLL_S = 0.5
"""How often the runner looks at the running cell's epochs.jsonl."""


# ------------------------------------------------------------------ planning


@dataclass
class Overrides:
    """Command-line settings that replace the grid's base values (None: keep the grid's)."""

    epochs: int | None = None
    batch_size: int | None = None
    image_size: int | None = None
    data: str | None = None
    n_train: int | None = None
    seed: int | None = None
    device: str | None = None

    def fields(self) -> dict[str, Any]:
        """Dotted TrainConfig field -> value, for the options that were given."""
        names = {
            "epochs": "epochs",
            "batch_size": "batch_size",
            "image_size": "data.image_size",
            "data": "data.source",
            "n_train": "data.n_train",
            "seed": "seed",
            "device": "device",
        }
        return {dotted: getattr(self, attr) for attr, dotted in names.items() if getattr(self, attr) is not None}

    def apply(self, cfg: TrainConfig, keep: set[str] | frozenset[str] = frozenset()) -> TrainConfig:
        """`cfg` with the given options set, except fields whose leaf name is in `keep` (a grid's factors)."""
        changes = {k: v for k, v in self.fields().items() if k.split(".")[-1] not in keep}
        return cfg.replace(**changes) if changes else cfg


@dataclass
class PlannedCell:
    """One cell of one repeat, with its folder name and the config it will run."""

    cell: Cell
    repeat: int
    folder: str
    """Folder name under the grid's out folder: '<slug>-<hash>' or '<slug>-r<k>-<hash>'."""
    config: TrainConfig
    skip_reason: str | None
    """Why it will not run on this machine (the grid's reason or `check_runnable`'s), else None."""

    def cell_record(self, grid: str, code_version: str) -> dict[str, Any]:
        """The `cell.json` contents (see the run-folder contract)."""
        return {
            "grid": grid,
            "cell": self.cell.name,
            "repeat": self.repeat,
            "label": self.cell.label,
            "factors": self.cell.factors,
            "folder": self.folder,
            "code_version": code_version,
        }


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit of the checkout (never the dirty flag: edits must not re-key cells)."""
    import ddnet

    version = str(getattr(ddnet, "__version__", "0"))
    root = Path(ddnet.__file__).resolve().parent.parent
    if (root / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
        if commit:
            return f"{version}+g{commit[:12]}"
    return version


def cell_hash(cfg: TrainConfig, version: str) -> str:
    """8 hex digits identifying a cell's config under a code version."""
    blob = json.dumps(cfg.to_dict(), sort_keys=True) + "\n" + version
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def skip_reason_for(cfg: TrainConfig) -> str | None:
    """None when this machine can run `cfg`, else the reason ('needs CUDA (...)' for CUDA-only features)."""
    try:
        check_runnable(cfg)
    except ConfigError as e:
        msg = str(e)
        return f"needs CUDA ({msg})" if ("CUDA" in msg or "GPU" in msg) else msg
    return None


def plan_grid(
    grid: Grid, overrides: Overrides | None = None, repeats: int = 1, version: str | None = None
) -> list[PlannedCell]:
    """Expand `grid` with the overrides into planned cells (declared order, repeat-major)."""
    if repeats < 1:
        raise UserError(f"--repeats {repeats} must be at least 1.")
    overrides = overrides or Overrides()
    version = code_version() if version is None else version
    if overrides.data not in (None, "synthetic") and not Path(overrides.data).is_dir():
        raise UserError(f"--data {overrides.data} is not a folder; give 'synthetic' or a folder with train/ and val/.")
    base = overrides.apply(grid.base())
    cells = grid.cells(base)
    planned: list[PlannedCell] = []
    for k in range(repeats):
        for c in cells:
            # an explicit option beats a setting the grid fixed (table1's batch 1), never a factor it varies
            cfg = overrides.apply(c.config, keep=set(c.factors))
            if repeats > 1:
                cfg = cfg.replace(seed=cfg.seed + k)
            try:
                check_static(cfg)
            except ConfigError as e:
                raise ConfigError(f"grid '{grid.name}', cell '{c.name}': {e}") from None
            h = cell_hash(cfg, version)
            folder = f"{c.name}-r{k}-{h}" if repeats > 1 else f"{c.name}-{h}"
            reason = c.skip_reason or skip_reason_for(cfg)
            planned.append(PlannedCell(cell=c, repeat=k, folder=folder, config=cfg, skip_reason=reason))
    return planned


def run_order(planned: list[PlannedCell], seed: int) -> list[str]:
    """Folders in run order: declared order for one repeat; with repeats, a seeded shuffle of each round."""
    rounds: dict[int, list[str]] = {}
    for p in planned:
        rounds.setdefault(p.repeat, []).append(p.folder)
    if len(rounds) == 1:
        return [p.folder for p in planned]
    rng = random.Random(seed)
    order: list[str] = []
    for k in sorted(rounds):
        batch = list(rounds[k])
        rng.shuffle(batch)  # interleave arms so slow drift (thermal, other jobs) does not favour one
        order += batch
    return order


def prepare_out(
    out: Path, grid: Grid, planned: list[PlannedCell], seed: int, resume: bool, version: str
) -> list[str]:
    """Create `out/grid.json` once, or check the existing one matches; returns the run order."""
    path = out / "grid.json"
    folders = [p.folder for p in planned]
    if path.exists():
        if not resume:
            raise UserError(
                f"{out} already holds a run of this grid; re-run with --resume to continue it, or pick another --out."
            )
        record = read_json(path)
        known = [c["folder"] if isinstance(c, dict) else c for c in record.get("cells", [])]
        if set(known) != set(folders) or sorted(record.get("order", [])) != sorted(folders):
            raise UserError(
                f"{out} holds a different cell set (grid '{record.get('grid')}', {len(known)} cells at code "
                f"{record.get('code_version')}); the grid, its options or the code changed: pick another --out."
            )
        return list(record["order"])
    order = run_order(planned, seed)
    write_json(path, {
        "grid": grid.name,
        "source": grid.source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": version,
        "repeats": max(p.repeat for p in planned) + 1,
        "seed": seed,
        "cells": [p.cell_record(grid.name, version) for p in planned],
        "order": order,
    })
    return order


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


def _summary(cell_dir: Path) -> dict[str, Any] | None:
    path = cell_dir / "summary.json"
    if not path.exists():
        return None
    try:
        s = read_json(path)
    except (OSError, json.JSONDecodeError):
        return None  # torn by a kill mid-write (write_json is atomic, so only a foreign writer could do this)
    return s if isinstance(s, dict) else None


def _result_from_summary(p: PlannedCell, s: dict[str, Any], action: str) -> CellResult:
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


def _log_tail(log: Path, n: int = LOG_TAIL_LINES) -> list[str]:
    if not log.exists():
        return []
    with open(log, errors="replace") as f:
        return [line.rstrip("\n") for line in f.readlines()[-n:]]


def _error_line(tail: list[str]) -> str:
    """The most telling line of a log tail: the CLI's 'error: ...' line, else the last non-empty line."""
    for line in reversed(tail):
        if line.startswith("error:"):
            return line
    for line in reversed(tail):
        if line.strip():
            return line.strip()
    return ""


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with code {rc}"


def _die_with_parent_hook() -> Callable[[], None] | None:
    """Linux: a pre-exec hook so the cell gets SIGTERM if the runner dies (no orphan keeps writing a folder).

    libc is looked up here, in the parent; the hook itself only makes the system call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:  # pragma: no cover - runs in the child between fork and exec
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the runner died before the call above took effect
            os._exit(1)

    return hook


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM reached the runner."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while the grid runs, so the child is stopped and nothing is recorded as failed."""
    def handler(signum: int, frame: Any) -> None:
        raise _Interrupted(signal.Signals(signum).name)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    display: _Display,
    command: Sequence[str] = TRAIN_COMMAND,
    retry_failed: bool = False,
    timeout_s: float | None = None,
) -> CellResult:
    """Run (or skip, or reuse) one planned cell; never overwrites a finished result.

    `timeout_s`: stop the cell's process after this many seconds and record it as failed
    (resumable later with --retry-failed, from its last checkpoint).
    """
    cell_dir = out / p.folder
    s = _summary(cell_dir)
    status = s.get("status") if s else None
    if s is not None and status == "ok":
        return _result_from_summary(p, s, "reused")
    if s is not None and status == "failed" and not retry_failed:
        return _result_from_summary(p, s, "reused")
    if s is not None and status == "skipped" and p.skip_reason:
        return _result_from_summary(p, s, "reused")

    cell_dir.mkdir(parents=True, exist_ok=True)
    if not (cell_dir / "cell.json").exists():
        write_json(cell_dir / "cell.json", p.cell_record(grid_name, version))
    if p.skip_reason:
        if not (cell_dir / "config.json").exists():
            write_json(cell_dir / "config.json", p.config.to_dict())
        record = {
            "status": "skipped", "reason": p.skip_reason, "error": None, "epochs_completed": 0,
            "total_time_s": None, "final_val_ms_ssim": None,
        }
        write_json(cell_dir / "summary.json", record)
        return _result_from_summary(p, record, "skipped")

    request = cell_dir / "config.request.json"
    if not request.exists():
        write_json(request, p.config.to_dict())
    # resume from the checkpoint when there is one: the trainer drops epoch rows past it
    resume = (cell_dir / "ckpt.pt").exists()
    epochs_path = cell_dir / "epochs.jsonl"
    if not resume and epochs_path.exists() and epochs_path.stat().st_size > 0:
        # killed after an epoch row was written but before the first checkpoint: those rows have no
        # model state behind them (checkpoint epoch 0), so drop them as a resume would, and start over
        rewrite_jsonl(epochs_path, [])
    argv = [*command, "--config", str(request), "--out", str(cell_dir)] + (["--resume"] if resume else [])
    log_path = cell_dir / "train.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "a") as log:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        log.write(f"=== bench run {stamp}: {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            preexec_fn=_die_with_parent_hook(),
        )
        started = time.monotonic()
        timed_out = False
        try:
            seen = -1
            while True:
                rows = read_jsonl(cell_dir / "epochs.jsonl")
                if len(rows) != seen:
                    seen = len(rows)
                    display.epoch(rows, p.config.epochs)
                display.tick()
                try:
                    proc.wait(timeout=POLL_S)  # returns as soon as the cell ends
                    break
                except subprocess.TimeoutExpired:
                    if timeout_s is not None and time.monotonic() - started > timeout_s:
                        timed_out = True
                        _stop_child(proc)
                        break
        except (KeyboardInterrupt, _Interrupted):
            _stop_child(proc)
            raise
    rows = read_jsonl(cell_dir / "epochs.jsonl")
    display.epoch(rows, p.config.epochs)
    rc = proc.returncode
    s = _summary(cell_dir) or {}
    action = "resumed" if resume else "ran"
    if rc == 0 and s.get("status") == "ok":
        return _result_from_summary(p, s, action)

    tail = _log_tail(log_path)
    if s.get("status") != "failed":
        # the process died without recording its failure (crash, kill, user error): record it here
        why = _exit_text(rc) if rc != 0 else f"exited 0 but summary.json status is {s.get('status')!r}"
        if timed_out:
            why = f"was stopped after the --cell-timeout of {timeout_s:g} s"
        line = _error_line(tail)
        s = {
            **s,
            "status": "failed",
            "error": f"cell process {why}" + (f": {line}" if line else ""),
            "exit_code": rc,
            "log_tail": tail,
            "epochs_completed": len(rows),
        }
        write_json(cell_dir / "summary.json", s)
    display.failure(p.folder, tail, log_path)
    return _result_from_summary(p, s, action)


# ------------------------------------------------------------------ display


class _Display:
    """Progress for a grid: plain lines (not a TTY, CI) or a rich live display."""

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.total = total
        self.done = 0
        self.current = ""
        self.shown = 0

    def __enter__(self) -> _Display:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def start(self, index: int, p: PlannedCell) -> None:
        self.current = p.folder
        self.shown = 0
        self.console.print(f"[{index}/{self.total}] {p.folder}: {p.cell.label}", markup=False, highlight=False)

    def epoch(self, rows: list[dict[str, Any]], epochs: int) -> None:
        # one line per epoch row, each once (rows from before a resume included)
        for row in rows[self.shown:]:
            self.console.print(f"    {_epoch_text(row, epochs)}", markup=False, highlight=False)
        self.shown = max(self.shown, len(rows))

    def tick(self) -> None:
        pass

    def finish(self, r: CellResult) -> None:
        self.done += 1
        detail = f" ({r.error})" if r.status == "skipped" and r.error else ""
        self.console.print(f"    -> {r.status} [{r.action}]{detail}", markup=False, highlight=False)

    def failure(self, folder: str, tail: list[str], log: Path) -> None:
        self.console.print(f"    {folder} failed; last lines of {log}:", markup=False, highlight=False)
        for line in tail:
            self.console.print(f"    | {line}", markup=False, highlight=False)


class _LiveDisplay(_Display):
    """Rich progress bars: cells done/total and the current cell's epochs with loss and MS-SSIM."""

    def __init__(self, console: Console, total: int) -> None:
        super().__init__(console, total)
        # auto_refresh=False: no refresh thread, so forking the cell process stays safe
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console, auto_refresh=False, transient=False,
        )
        self.grid_task = self.progress.add_task("cells", total=total, info="")
        self.cell_task = self.progress.add_task("epochs", total=1, info="", visible=False)

    def __enter__(self) -> _Display:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.refresh()
        self.progress.stop()

    def start(self, index: int, p: PlannedCell) -> None:
        self.current = p.folder
        self.progress.update(self.grid_task, info=p.folder)
        self.progress.reset(self.cell_task, total=p.config.epochs, completed=0, visible=True,
                            description=f"  {p.cell.name}", info="starting")
        self.progress.refresh()

    def epoch(self, rows: list[dict[str, Any]], epochs: int) -> None:
        info = _epoch_text(rows[-1], epochs) if rows else "waiting for epoch 1"
        self.progress.update(self.cell_task, completed=len(rows), total=epochs, info=info)
        self.progress.refresh()

    def tick(self) -> None:
        self.progress.refresh()

    def finish(self, r: CellResult) -> None:
        self.done += 1
        self.progress.update(self.grid_task, completed=self.done)
        self.progress.update(self.cell_task, visible=False)
        if r.action not in ("reused",):
            detail = f" ({r.error})" if r.status == "skipped" and r.error else ""
            self.progress.console.print(f"{r.folder}: {r.status} [{r.action}]{detail}", markup=False, highlight=False)
        self.progress.refresh()

    def failure(self, folder: str, tail: list[str], log: Path) -> None:
        self.progress.console.print(f"[red]{folder} failed[/red]; last lines of {log}:")
        for line in tail:
            self.progress.console.print(f"  | {line}", markup=False, highlight=False)


def _epoch_text(row: dict[str, Any], epochs: int) -> str:
    def fmt(v: Any, spec: str) -> str:
        return format(v, spec) if isinstance(v, int | float) else "-"

    return (
        f"epoch {row.get('epoch', '?')}/{epochs} {row.get('phase', '')} "
        f"loss {fmt(row.get('train_loss'), '.4g')} MS-SSIM {fmt(row.get('val_ms_ssim'), '.2f')}% "
        f"{fmt(row.get('time_s'), '.1f')} s"
    )


# ------------------------------------------------------------------ the grid


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One `bench run` per out folder at a time (the lock dies with the process, even on SIGKILL)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".bench-run.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `bench run` is using {out}; wait for it or pick another --out.") from None
        yield


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
) -> list[CellResult]:
    """Run every cell of `grid` into `out`, sequentially, one fresh process per cell; returns one result per cell.

    Raises KeyboardInterrupt when interrupted (the running cell is stopped and stays resumable).
    """
    console = console or Console()
    overrides = overrides or Overrides()
    version = code_version()
    planned = plan_grid(grid, overrides, repeats, version)
    by_folder = {p.folder: p for p in planned}
    seed = overrides.seed if overrides.seed is not None else grid.base().seed
    results: list[CellResult] = []
    with _exclusive(out):
        order = prepare_out(out, grid, planned, seed, resume, version)
        display_cls = _LiveDisplay if console.is_terminal else _Display
        with _sigterm_as_interrupt(), display_cls(console, len(order)) as display:
            try:
                for i, folder in enumerate(order, start=1):
                    p = by_folder[folder]
                    display.start(i, p)
                    r = run_cell(p, out, grid.name, version, display, command, retry_failed, cell_timeout_s)
                    display.finish(r)
                    results.append(r)
            except _Interrupted as e:
                raise KeyboardInterrupt(str(e)) from None
    return results


def print_summary(console: Console, results: list[CellResult]) -> None:
    """The end-of-grid table: cell, status, epochs, total time, final MS-SSIM, error."""
    table = Table(title="bench run: summary", show_lines=False)
    for col, kw in (
        ("cell", {"overflow": "fold"}), ("status", {}), ("epochs", {"justify": "right"}),
        ("total_time_s", {"justify": "right"}), ("final MS-SSIM %", {"justify": "right"}),
        ("error / reason", {"overflow": "fold"}),
    ):
        table.add_column(col, **kw)
    colours = {"ok": "green", "failed": "red", "skipped": "yellow"}
    for r in results:
        c = colours.get(r.status, "white")
        table.add_row(
            r.folder,
            f"[{c}]{r.status}[/{c}]" + (" (earlier)" if r.action == "reused" else ""),
            f"{r.epochs_completed}/{r.epochs}",
            f"{r.total_time_s:.1f}" if r.total_time_s is not None else "-",
            f"{r.final_val_ms_ssim:.2f}" if r.final_val_ms_ssim is not None else "-",
            (r.error or "")[:300],
        )
    console.print(table)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    console.print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())), markup=False, highlight=False)


def print_plan(console: Console, grid: Grid, planned: list[PlannedCell], order: list[str], out: Path) -> None:
    """`--dry-run`: the cells in run order with their factors and skip reasons; nothing is run or written."""
    by_folder = {p.folder: p for p in planned}
    table = Table(title=f"grid '{grid.name}': {len(planned)} cells -> {out}")
    table.add_column("#", justify="right")
    table.add_column("cell", overflow="fold")
    table.add_column("factors", overflow="fold")
    table.add_column("state / skip reason", overflow="fold")
    for i, folder in enumerate(order, start=1):
        p = by_folder[folder]
        factors = ", ".join(f"{k}={v}" for k, v in p.cell.factors.items())
        s = _summary(out / folder)
        if p.skip_reason:
            state = f"skip: {p.skip_reason}"
        elif s is not None:
            state = f"{s.get('status')} (existing)"
        else:
            state = "to run"
        table.add_row(str(i), folder, factors, state)
    console.print(table)


def _console() -> Console:
    console = Console()
    if not console.is_terminal and console.width < 160:
        # logs and CI: wide enough that tables do not fold every column
        console = Console(width=160)
    return console


# ------------------------------------------------------------------ commands


def grids_cmd() -> None:
    """List the grids in ablations/ with their cell counts at default settings."""
    console = _console()
    try:
        table = Table(title="grids (ablations/)")
        table.add_column("grid")
        table.add_column("cells", justify="right")
        table.add_column("description", overflow="fold")
        for name, grid in registry().items():
            table.add_row(name, str(len(grid.cells())), grid.description)
        console.print(table)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def run_cmd(
    grid: str = typer.Option(..., "--grid", help="Grid name (see `bench grids`) or path to a grid .py file."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default results/runs/<grid>)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Override the grid's epoch count."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Override the batch size."),
    image_size: int | None = typer.Option(None, "--image-size", help="Override the synthetic image side."),
    data: str | None = typer.Option(None, "--data", help="'synthetic' or a data folder."),
    n_train: int | None = typer.Option(None, "--n-train", help="Override the synthetic training slices."),
    device: str | None = typer.Option(None, "--device", help="Override the device: auto, cpu or cuda."),
    seed: int | None = typer.Option(None, "--seed", help="Base seed (repeat k uses seed + k; also seeds the order)."),
    repeats: int = typer.Option(1, "--repeats", help="Run each cell this many times, interleaved in a seeded order."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the cells and run nothing."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue a grid already in --out (default)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run failed cells again (from their checkpoint)."),
    cell_timeout: float | None = typer.Option(None, "--cell-timeout", min=1,
                                              help="Stop a cell after this many seconds and record it as failed "
                                                   "(default: no limit)."),
) -> None:
    """Run every cell of a grid, each in its own process, into one folder per cell; re-run to resume."""
    console = _console()
    try:
        g = load_grid(grid)
        overrides = Overrides(epochs=epochs, batch_size=batch_size, image_size=image_size, data=data,
                              n_train=n_train, seed=seed, device=device)
        out_dir = out if out is not None else Path("results") / "runs" / g.name
        if dry_run:
            planned = plan_grid(g, overrides, repeats)
            order_seed = seed if seed is not None else g.base().seed
            order = run_order(planned, order_seed)
            existing = out_dir / "grid.json"
            if existing.exists():
                with contextlib.suppress(OSError, json.JSONDecodeError, KeyError):
                    recorded = list(read_json(existing)["order"])
                    if sorted(recorded) == sorted(order):
                        order = recorded
            print_plan(console, g, planned, order, out_dir)
            return
        try:
            results = run_grid(g, out_dir, overrides, repeats, resume, retry_failed, console=console,
                               cell_timeout_s=cell_timeout)
        except KeyboardInterrupt:
            console.print(f"interrupted; run the same command again to resume the grid in {out_dir}.",
                          markup=False, highlight=False)
            raise typer.Exit(130) from None
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    print_summary(console, results)
    failed = [r for r in results if r.status not in ("ok", "skipped")]
    if failed:
        console.print(f"{len(failed)} cell(s) did not finish ok; see their train.log under {out_dir}.",
                      markup=False, highlight=False)
        raise typer.Exit(1)
