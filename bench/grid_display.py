"""How a running grid is shown: plain lines (not a terminal: logs, CI) or rich progress bars (a terminal).

Either way each line or bar carries the grid's elapsed and estimated remaining time
(`bench.grid_clock.GridClock`), every epoch a cell finishes (loss, MS-SSIM, seconds), and the
last lines of a cell's train.log when it fails or stops. `bench.processes.run_grid` drives it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.grid_clock import GridClock
from bench.planning import PlannedCell

if TYPE_CHECKING:
    from bench.processes import CellResult


class GridDisplay:
    """Progress for a grid: plain lines (not a TTY, CI) or a rich live display; each with the grid's elapsed and
    estimated remaining time (`clock`: run_grid tells it when cells start and finish)."""

    def __init__(self, console: Console, total: int, clock: GridClock) -> None:
        self.console = console
        self.total = total
        self.clock = clock
        self.done = 0
        self.current = ""
        self.shown = 0

    def __enter__(self) -> GridDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def grid_time(self) -> str:
        """'elapsed 3m02s, ~12m05s left'."""
        return self.clock.text(time.monotonic())

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def start(self, index: int, p: PlannedCell) -> None:
        self.current = p.folder
        self.shown = 0
        self._print(f"[{index}/{self.total}] {p.folder}: {p.cell.label}  (grid: {self.grid_time()})")

    def epoch(self, rows: list[dict[str, Any]], epochs: int) -> None:
        self.clock.cell_progress(rows, epochs)
        # one line per epoch row, each once (rows from before a resume included)
        for row in rows[self.shown:]:
            self._print(f"    {epoch_text(row, epochs)}  | grid {self.grid_time()}")
        self.shown = max(self.shown, len(rows))

    def tick(self) -> None:
        pass

    def finish(self, r: CellResult) -> None:
        self.done += 1
        detail = f" ({r.error})" if r.status == "skipped" and r.error else ""
        self._print(f"    -> {r.status} [{r.action}]{detail}; grid {self.done}/{self.total} cells, {self.grid_time()}")

    def failure(self, folder: str, tail: list[str], log: Path, what: str = "failed") -> None:
        self._print(f"    {folder} {what}; last lines of {log}:")
        for line in tail:
            self._print(f"    | {line}")


class LiveGridDisplay(GridDisplay):
    """Rich progress bars: cells done/total with the grid's elapsed and remaining time, and the current cell's
    epochs with loss and MS-SSIM."""

    def __init__(self, console: Console, total: int, clock: GridClock) -> None:
        super().__init__(console, total, clock)
        # auto_refresh=False: no refresh thread, so forking the cell process stays safe
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console, auto_refresh=False, transient=False,
        )
        self.grid_task = self.progress.add_task("cells", total=total, info=self.grid_time())
        self.cell_task = self.progress.add_task("epochs", total=1, info="", visible=False)

    def __enter__(self) -> GridDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.refresh()
        self.progress.stop()

    def tick(self) -> None:
        # the grid's bar: the running cell, elapsed and remaining (which moves between epochs too)
        self.progress.update(self.grid_task, info=f"{self.current}  {self.grid_time()}".strip())
        self.progress.refresh()

    def start(self, index: int, p: PlannedCell) -> None:
        self.current = p.folder
        self.progress.reset(self.cell_task, total=p.config.epochs, completed=0, visible=True,
                            description=f"  {p.cell.name}", info="starting")
        self.tick()

    def epoch(self, rows: list[dict[str, Any]], epochs: int) -> None:
        self.clock.cell_progress(rows, epochs)
        info = epoch_text(rows[-1], epochs) if rows else "waiting for epoch 1"
        self.progress.update(self.cell_task, completed=len(rows), total=epochs, info=info)
        self.tick()

    def finish(self, r: CellResult) -> None:
        self.done += 1
        self.current = ""
        self.progress.update(self.grid_task, completed=self.done)
        self.progress.update(self.cell_task, visible=False)
        if r.action not in ("reused",):
            detail = f" ({r.error})" if r.status == "skipped" and r.error else ""
            self.progress.console.print(f"{r.folder}: {r.status} [{r.action}]{detail}", markup=False, highlight=False)
        self.tick()

    def failure(self, folder: str, tail: list[str], log: Path, what: str = "failed") -> None:
        self.progress.console.print(f"[red]{folder} {what}[/red]; last lines of {log}:")
        for line in tail:
            self.progress.console.print(f"  | {line}", markup=False, highlight=False)


def epoch_text(row: dict[str, Any], epochs: int) -> str:
    def fmt(v: Any, spec: str) -> str:
        return format(v, spec) if isinstance(v, int | float) else "-"

    return (
        f"epoch {row.get('epoch', '?')}/{epochs} {row.get('phase', '')} "
        f"loss {fmt(row.get('train_loss'), '.4g')} MS-SSIM {fmt(row.get('val_ms_ssim'), '.2f')}% "
        f"{fmt(row.get('time_s'), '.1f')} s"
    )
