"""Cells of repeats for `bench report`: all runs of one cell on one machine, the unit of a table row.

Runs are grouped by environment fingerprint, grid, cell name and context (the
config fields that must agree for two runs to be compared: data, net, epochs,
batch, optimizer), so repeats of one cell become one row, machines are never
mixed, and two runs of one cell name with other epochs (a grid run twice with
another --epochs) are two cells, never pooled as repeats. Such cells have what
differs in their name ('dense-baseline [epochs 10]') and say so in their status.
CellRuns measures are medians over finished repeats of the per-run measures in
`bench.report.runs`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bench.report.format import is_num
from bench.report.runs import NO_ENV_NOTE, UNKNOWN_ENV, RunRecord, context_blob
from bench.report.setting import Setting
from bench.stats import median, summarize
from bench.store import epoch_phase

LAST_EPOCHS = 3
"""Epochs at the end of a run (of its final phase) over which the validation MS-SSIM's epoch-to-epoch spread is
measured."""
SETTLED_PP = 1.0
"""Moves of the final MS-SSIM (percentage points) at or below which the last epochs count as settled whatever
their pattern: a band from such epochs is at most a few pp, too small to call a real change noise."""


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
    clash: str | None = None
    """Set when other runs of this cell name on this machine have another context: what differs."""

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
        """'ok (3 repeats)' or what is missing: partial, failed, skipped runs with their messages; flags appended."""
        ok = self.ok_runs
        others = [r for r in self.runs if not r.ok]
        flags = self._flags()
        if not others:
            flags = sorted({r.damage for r in ok if r.damage}) + flags
            text = f"ok ({len(ok)} repeat{'s' if len(ok) != 1 else ''})"
            return text + (f" [{'; '.join(flags)}]" if flags else "")
        msgs = sorted({r.status_text() for r in others})
        head = f"{len(ok)}/{len(self.runs)} ok; " if ok else ""
        return head + "; ".join(msgs) + (f" [{'; '.join(flags)}]" if flags else "")

    def _flags(self) -> list[str]:
        """What a reader must know beside the numbers: a name shared with other settings, mixed code versions."""
        flags = [self.clash] if self.clash else []
        if self.fingerprint == UNKNOWN_ENV and any(r.epochs for r in self.runs):
            flags.append(NO_ENV_NOTE)
        versions = sorted({_code_version(r) for r in self.ok_runs} - {""})
        if len(versions) > 1:
            flags.append(f"repeats from {len(versions)} code versions: {', '.join(versions)}")
        return flags

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

    def quality_sd(self, over_repeats: bool) -> float | None:
        """How much the final MS-SSIM (percent) moves by chance: a sample std, None when it cannot be measured.

        Over repeats: the std of the repeats' final values. Otherwise: each run's std over the last
        `LAST_EPOCHS` validation values of its final phase (epoch-to-epoch swings; never across a pruning),
        median over repeats; None when a run's final phase has fewer than 2 epochs, or when a repeat's last
        epochs are still changing (`changing_runs`).
        """
        if over_repeats:
            v = self.values(lambda r: r.final_quality()[0])
            return summarize(v)["std"] if len(v) > 1 else None
        if self.changing_runs():  # a trend, not a chance swing: no band from it (one moving repeat is enough)
            return None
        return self.med(_last_epochs_sd)

    def changing_runs(self) -> list[str]:
        """Finished repeats whose final phase had not settled (`still_changing`), each as 'random-hybrid: 0.00,
        0.00, 77.32' (its last validation MS-SSIM values, oldest first; the repeat named when there are several)."""
        out = []
        for r in self.ok_runs:
            v = final_phase_values(r)
            if still_changing(v):
                rep = f" (repeat {r.repeat})" if len(self.ok_runs) > 1 else ""
                out.append(f"{self.name}{rep}: {', '.join(f'{x:.2f}' for x in v)}")
        return out

    def metric(self, field: str) -> tuple[float | None, float | None]:
        """Median over repeats of a final epoch-row quality field and of its std (see RunRecord.final_metric)."""
        return self.med(lambda r: r.final_metric(field)[0]), self.med(lambda r: r.final_metric(field)[1])

    def phase_p50(self, phase: str) -> float | None:
        """Median over repeats of the median non-warm-up epoch time of one phase."""
        return self.med(lambda r: median(r.phase_times()[phase]) if r.phase_times().get(phase) else None)

    def middle_run(self) -> RunRecord | None:
        """The finished run whose training-time estimate is the median (the lower middle for an even count)."""
        runs = sorted((r for r in self.ok_runs if r.train_time_est_s() is not None),
                      key=lambda r: (r.train_time_est_s(), r.repeat, r.rel))
        return runs[(len(runs) - 1) // 2] if runs else None


def final_phase_values(r: RunRecord) -> list[float]:
    """The last `LAST_EPOCHS` validation MS-SSIM values of the run's final phase (its epochs since pruning, or all
    of them for a run that never pruned), oldest first."""
    rows = [row for row in r.epochs if is_num(row.get("val_ms_ssim"))]
    phase = epoch_phase(rows[-1]) if rows else None
    final = list(itertools.takewhile(lambda row: epoch_phase(row) == phase, reversed(rows)))  # newest first
    return [float(row["val_ms_ssim"]) for row in reversed(final[:LAST_EPOCHS])]


def still_changing(v: list[float]) -> bool:
    """Whether the last epochs `v` (oldest first, `LAST_EPOCHS` of them) show a trend or a jump, not chance swings.

    Their spread is a noise band only if they scatter about a level. It is not when the run still moves at its
    end: a net recovering after pruning read 0, 0, 77.3 %, and the std of those three (a 89 pp band) called a
    12 pp drop 'within noise'. Still changing, when the moves exceed `SETTLED_PP`:
    - a trend: the values move one way (ties allowed) and the last step is at least as large as the first (the
      run is not slowing down: 60, 70, 80; 0, 0, 77.3), or
    - a jump: the last step is more than 3x the earlier values' own range (87.9, 88.2, 60).
    A recovery that slows down (30, 84, 88) or values scattered both ways (86, 92, 90) keep their band. Two
    values (a final phase of two epochs) that move by more than `SETTLED_PP` count as still changing: one step
    cannot tell a trend from a swing, and the smoke grid's 0, 48.4 after a pruning made a 68 pp band that
    called a 5 pp drop 'within noise'. One value is not judged (it has no band at all).
    """
    if len(v) < 2 or max(v) - min(v) <= SETTLED_PP:
        return False
    if len(v) < LAST_EPOCHS:
        return True
    steps = [b - a for a, b in itertools.pairwise(v)]
    last, earlier = abs(steps[-1]), max(v[:-1]) - min(v[:-1])
    one_way = all(d >= 0 for d in steps) or all(d <= 0 for d in steps)
    trend = one_way and last > SETTLED_PP and last >= abs(steps[0])
    jump = last > 3.0 * max(earlier, SETTLED_PP)
    return trend or jump


def _last_epochs_sd(r: RunRecord) -> float | None:
    """Sample std of the last `LAST_EPOCHS` validation MS-SSIM values of the run's final phase; None with fewer
    than 2, or when they are still changing (`still_changing`: a trend's spread is no chance swing).

    Pruning changes the model at once: the epochs before it are no sample of the final model's chance swings.
    Counted across it, a net pruned before its last of 80 epochs (97.6 % the epoch before, 39.8 % after) had a
    spread that called its 58 pp drop 'within noise'.
    """
    v = final_phase_values(r)
    if len(v) < 2 or still_changing(v):
        return None
    return summarize(v)["std"]


def _code_version(r: RunRecord) -> str:
    """The code a run measured: cell.json's code_version, else env.json's commit ('' when unrecorded)."""
    v = r.cell.get("code_version") or str(r.env.get("git_commit") or "")[:12]
    return str(v)


def context_fields(r: RunRecord) -> dict[str, Any]:
    """The run's context as flat fields ('epochs', 'data.n_train', ...): `context_blob`, which its
    `RunRecord.context` hashes, with `model` and `data` spread out."""
    out: dict[str, Any] = {}
    for key, value in context_blob(r.config, r.setting).items():
        if key in ("model", "data") and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _what_differs(cells: list[CellRuns]) -> tuple[list[str], dict[int, str]]:
    """The context fields in which cells of one name differ, and per cell (by id) its values: 'epochs 10'."""
    fields = {id(c): context_fields(next((r for r in c.runs if r.config), c.runs[0])) for c in cells}
    keys = sorted({k for f in fields.values() for k in f})
    differ = [k for k in keys if len({repr(f.get(k)) for f in fields.values()}) > 1]
    if not differ:  # hashes differ but the fields read alike (a hand-edited config): name the hashes
        return ["context"], {id(c): f"context {c.context}" for c in cells}
    return differ, {id(c): ", ".join(f"{k} {str(fields[id(c)].get(k))[:40]}" for k in differ) for c in cells}


def group_cells(runs: Iterable[RunRecord]) -> list[CellRuns]:
    """Group runs into cells by (fingerprint, grid, cell name, context); sorted by fingerprint, grid, name.

    A run with no config at all (a cell skipped before `bench run` wrote one) joins the one cell of its name
    that has a context, when there is exactly one. Cells of one name with different contexts keep apart:
    each gets what differs in its name and a status flag, so that a folder holding both reads plainly.
    """
    runs = list(runs)
    contexts: dict[tuple[str, str, str], set[str]] = {}
    for r in runs:
        if r.config:
            contexts.setdefault((r.fingerprint, r.grid, r.cell_name), set()).add(r.context)
    cells: dict[tuple[str, str, str, str], CellRuns] = {}
    for r in runs:
        known = contexts.get((r.fingerprint, r.grid, r.cell_name), set())
        context = next(iter(known)) if not r.config and len(known) == 1 else r.context
        key = (r.fingerprint, r.grid, r.cell_name, context)
        if key not in cells:
            cells[key] = CellRuns(r.fingerprint, r.grid, r.cell_name, r.label, r.setting, context)
        c = cells[key]
        c.runs.append(r)
        # A finished run's config is the best description of the cell (a skipped one may lack it).
        if r.ok and r.config and not any(x.ok for x in c.runs[:-1]):
            c.setting, c.label = r.setting, r.label
    by_name: dict[tuple[str, str, str], list[CellRuns]] = {}
    for c in cells.values():
        by_name.setdefault((c.fingerprint, c.grid, c.name), []).append(c)
    for same in by_name.values():
        if len(same) > 1:
            differ, what = _what_differs(same)
            for c in same:
                c.clash = (f"not pooled with {len(same) - 1} other cell(s) of this name: they differ in "
                           f"{', '.join(differ)}")
                c.name = f"{c.name} [{what[id(c)]}]"
    return sorted(cells.values(), key=lambda c: (c.fingerprint, c.grid, c.name))
