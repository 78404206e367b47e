"""Cells of repeats for `bench report`: all runs of one cell on one machine, the unit of a table row.

Runs are grouped by environment fingerprint, grid and cell name, so repeats of
one cell become one row and machines are never mixed. CellRuns measures are
medians over finished repeats of the per-run measures in `bench.report.runs`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bench.report.runs import RunRecord
from bench.report.setting import Setting
from bench.stats import median


@dataclass
class CellRuns:
    """All repeats of one cell on one machine: the unit of a table row."""

    fingerprint: str
    grid: str
    name: str
    label: str
    setting: Setting
    context: str
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def profile_steps(self) -> int:
        """Steps of the profiled copy window (--profile-steps) the cell ran with; 0 when it had none."""
        for r in self.runs:
            if r.config:
                return int(r.config.get("profile_steps", 0) or 0)
        return int((self.runs[0].cell.get("factors") or {}).get("profile_steps", 0) or 0) if self.runs else 0

    @property
    def ok_runs(self) -> list[RunRecord]:
        """Finished runs, sorted by repeat."""
        return sorted((r for r in self.runs if r.ok), key=lambda r: (r.repeat, r.rel))

    @property
    def has_numbers(self) -> bool:
        """At least one finished run."""
        return bool(self.ok_runs)

    def status_text(self) -> str:
        """'ok (3 repeats)' or what is missing: partial, failed, skipped runs with their messages."""
        ok = self.ok_runs
        others = [r for r in self.runs if not r.ok]
        damaged = sorted({r.damage for r in ok if r.damage})
        if not others:
            text = f"ok ({len(ok)} repeat{'s' if len(ok) != 1 else ''})"
            return text + (f" [{'; '.join(damaged)}]" if damaged else "")
        msgs = sorted({r.status_text() for r in others})
        head = f"{len(ok)}/{len(self.runs)} ok; " if ok else ""
        return head + "; ".join(msgs)

    # -------------------------------------------------------------- cell measures
    def values(self, fn: Any) -> list[float]:
        """fn(run) over finished runs, Nones dropped."""
        out = []
        for r in self.ok_runs:
            v = fn(r)
            if v is not None:
                out.append(float(v))
        return out

    def med(self, fn: Any) -> float | None:
        """Median over finished repeats of fn(run)."""
        v = self.values(fn)
        return float(median(v)) if v else None

    def epoch_time_p50(self) -> float | None:
        """Median over repeats of each run's median non-warm-up epoch time."""
        return self.med(lambda r: r.epoch_time_p50())

    def train_time_est_s(self) -> float | None:
        """Median over repeats of the phase-weighted training-time estimate."""
        return self.med(lambda r: r.train_time_est_s())

    def total_time_s(self) -> float | None:
        """Median over repeats of total_time_s."""
        return self.med(lambda r: r.total_time_s())

    def quality(self) -> tuple[float | None, float | None]:
        """Median over repeats of the final MS-SSIM and of its std over slices (percent)."""
        return self.med(lambda r: r.final_quality()[0]), self.med(lambda r: r.final_quality()[1])

    def metric(self, field: str) -> tuple[float | None, float | None]:
        """Median over repeats of a final epoch-row quality field and of its std (see RunRecord.final_metric)."""
        return self.med(lambda r: r.final_metric(field)[0]), self.med(lambda r: r.final_metric(field)[1])

    def phase_p50(self, phase: str) -> float | None:
        """Median over repeats of the median non-warm-up epoch time of one phase."""
        return self.med(lambda r: median(r.phase_times()[phase]) if r.phase_times().get(phase) else None)

    def pooled_phase_times(self) -> tuple[list[list[float]], list[float]]:
        """Non-warm-up epoch times pooled over repeats, per phase, with each phase's epoch count as weight."""
        phases: dict[str, list[float]] = {}
        counts: dict[str, list[int]] = {}
        for r in self.ok_runs:
            for p, t in r.phase_times().items():
                phases.setdefault(p, []).extend(t)
            for p, c in r.phase_counts().items():
                counts.setdefault(p, []).append(c)
        keys = sorted(phases)
        return [phases[k] for k in keys], [float(median(counts[k])) for k in keys]


def group_cells(runs: Iterable[RunRecord]) -> list[CellRuns]:
    """Group runs into cells by (fingerprint, grid, cell name); order: grid, then first appearance."""
    cells: dict[tuple[str, str, str], CellRuns] = {}
    for r in runs:
        key = (r.fingerprint, r.grid, r.cell_name)
        if key not in cells:
            cells[key] = CellRuns(r.fingerprint, r.grid, r.cell_name, r.label, r.setting, r.context)
        c = cells[key]
        c.runs.append(r)
        # A finished run's config is the best description of the cell (a skipped one may lack it).
        if r.ok and r.config and not any(x.ok for x in c.runs[:-1]):
            c.setting, c.context, c.label = r.setting, r.context, r.label
    return sorted(cells.values(), key=lambda c: (c.fingerprint, c.grid, c.name))
