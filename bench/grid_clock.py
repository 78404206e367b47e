"""The elapsed and remaining time of a running grid, from the plan's estimates (`bench.estimate`) and the
running cell's own epochs; it takes the time as an argument (`bench.processes` passes a monotonic clock)."""

from __future__ import annotations

import statistics
from typing import Any

from bench.estimate import PlanEstimate
from bench.status import format_duration
from bench.store import epoch_phase, epoch_wall, is_warmup


class GridClock:
    """Elapsed and estimated remaining time of a running grid: finished cells count with their measured time
    (elapsed) and leave the remaining estimate; the running cell's follows its own steady epochs once it has
    one; the cells to come use the plan's estimates (`plan`: run_grid refreshes it as cells finish)."""

    def __init__(self, plan: PlanEstimate, now: float) -> None:
        self.plan = plan
        self.t0 = now
        self.finished: set[str] = set()
        self.current: str | None = None
        self.cell_t0 = now
        self.rows: list[dict[str, Any]] = []
        self.epochs = 0
        self.baseline: int | None = None
        self.data_pending = True  # the plan's data generation is ahead (no launched cell finished an epoch)

    def cell_started(self, folder: str, now: float) -> None:
        """A cell's turn has come (it may still be reused rather than run)."""
        self.current, self.cell_t0, self.rows, self.epochs, self.baseline = folder, now, [], 0, None

    def cell_progress(self, rows: list[dict[str, Any]], epochs: int) -> None:
        """The running cell's epoch rows so far (those from before a resume included)."""
        self.rows, self.epochs = list(rows), epochs
        if self.baseline is None:
            self.baseline = len(rows)
        elif len(rows) > self.baseline:
            self.data_pending = False  # data comes before the first epoch of a launched cell

    def cell_finished(self, folder: str) -> None:
        """The cell is over: its time is in the elapsed time, and no longer in the remaining one."""
        self.finished.add(folder)
        self.current = None

    def _current_left(self, now: float) -> float | None:
        est = self.plan.cells.get(self.current or "")
        rows = [r for r in self.rows if isinstance(r.get("time_s"), int | float)]
        # the trainer flags every row; an unflagged one follows is_warmup's default (1 warm-up epoch)
        steady = [r for r in rows if not is_warmup(r, {})]
        # a resumed cell's earlier epochs time its epochs, not this launch's start-up, which the plan's
        # estimate holds: it counts until this launch writes an epoch of its own
        this_launch = len(self.rows) > (self.baseline or 0)
        if steady and (this_launch or est is None or est.seconds is None):
            live = statistics.median(epoch_wall(r) for r in steady if epoch_phase(r) == epoch_phase(steady[-1]))
            return max(0, self.epochs - len(rows)) * live
        if est is not None and est.seconds is not None:
            left = est.seconds - (now - self.cell_t0)
            if est.epochs_s and est.epochs_left:  # past its estimate, its epochs to come are still ahead
                to_come = est.epochs_left - (len(self.rows) - (self.baseline or 0))
                left = max(left, max(0, to_come) * est.epochs_s / est.epochs_left)
            return max(0.0, left)
        if rows:
            return max(0, self.epochs - len(rows)) * statistics.median(epoch_wall(r) for r in rows)
        return None

    def remaining(self, now: float) -> tuple[float, int]:
        """(seconds of the known part, cells whose time is unknown), the data generation included."""
        left, unknown = 0.0, 0
        for folder, c in self.plan.cells.items():
            if folder not in self.finished and c.state == "to run":
                s = self._current_left(now) if folder == self.current else c.seconds
                left, unknown = (left, unknown + 1) if s is None else (left + s, unknown)
        if self.data_pending and left + unknown > 0:
            left += self.plan.data_s
        return left, unknown

    def text(self, now: float) -> str:
        """'elapsed 3m02s, ~12m05s left', '... + 2 cell(s) of unknown time' or 'remaining unknown (2 cells)'."""
        left, unknown = self.remaining(now)
        if unknown and left < 1.0:  # a known second or less beside unknown cells says nothing
            rest = f"remaining unknown ({unknown} cell(s))"
        elif unknown:
            rest = f"~{format_duration(left)} left + {unknown} cell(s) of unknown time"
        else:
            rest = f"~{format_duration(left)} left" if left else "nothing left"
        return f"elapsed {format_duration(now - self.t0)}, {rest}"
