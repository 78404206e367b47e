"""What a report artifact is (one paper table or figure), and the registry the artifacts add themselves to.

An artifact module in `bench/report/artifacts/` builds a `Table` from one
environment's cells and (optionally) draws it, then calls `register` with an
`Artifact`. The registry is a plain dict in report order: the order in which
`bench/report/artifacts/__init__.py` imports the modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report.envview import CellPredicate, EnvView
from bench.report.setting import Setting


@dataclass
class Table:
    """One rendered table: numeric rows for CSV, display rows for Markdown, notes, extra CSVs and plots."""

    key: str
    title: str
    csv_rows: list[dict[str, Any]]
    md_rows: list[dict[str, Any]]
    md_columns: list[str]
    notes: list[str] = field(default_factory=list)
    extra_csv: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    plot_data: dict[str, Any] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)


def _always(_settings: list[Setting]) -> bool:
    return True


@dataclass(frozen=True)
class Needs:
    """Which cells fill an artifact, from their settings (never from grid names).

    Used to list the artifacts no run filled ('Not run') and the grids whose
    cells would fill them.
    """

    text: str
    """What it needs, in words (printed under 'Not run')."""
    cell: CellPredicate
    """Does a cell with this setting (and --profile-steps) belong in it?"""
    together: Callable[[list[Setting]], bool] = _always
    """An extra condition on all matching settings together (Table 1 also needs a sparse one)."""

    def filled_by(self, items: Sequence[tuple[Setting, int]]) -> bool:
        """Would cells with these (setting, profile_steps) fill the artifact?"""
        matched = [s for s, p in items if self.cell(s, p)]
        return bool(matched) and self.together(matched)


@dataclass(frozen=True)
class Artifact:
    """One paper table or figure of the report."""

    key: str
    """Names its files: tables/<key>.csv and .md, figures/<key>.png."""
    title: str
    """Short title for lists ('Not run', rendering problems); the table carries its full title."""
    build: Callable[[EnvView], Table | None]
    """The table from one environment's cells; None when no cell of that environment belongs in it."""
    plot: Callable[[Table, Path], Path | None] | None = None
    """Draws the table into a PNG (None when it had nothing to draw); None for text-only artifacts."""
    needs: Needs | None = None
    """Which cells fill it; None for artifacts any finished cell fills (never listed as not run)."""
    fills: tuple[str, ...] = ()
    """Grids that fill it, named when the grid registry cannot be expanded (kept in step with ablations/)."""


ARTIFACTS: dict[str, Artifact] = {}
"""Every artifact by key, in report order (filled by `register` as bench.report.artifacts is imported)."""


def register(artifact: Artifact) -> Artifact:
    """Add `artifact` to the registry (after those registered before it); a key may be registered once."""
    if artifact.key in ARTIFACTS:
        raise ValueError(f"report artifact {artifact.key!r} is registered twice; give the new one its own key.")
    ARTIFACTS[artifact.key] = artifact
    return artifact
