"""Planning a grid run: expand a grid into cells, name their folders, fix the run order.

One folder per cell under `--out` (default `results/runs/<grid>`), named
`<slug>-<hash>` (`<slug>-r<k>-<hash>` with repeats), where the hash covers the
cell's full config and the code version (package version + git commit; a
dirty tree does not change it, so editing code does not orphan a half-run
grid). With repeats, each round's cells run in a seeded shuffle. The plan is
recorded once in `<out>/grid.json`; a later run into the same folder must
plan the same cells (`prepare_out`). Nothing here starts a process: that is
`bench.processes`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ddnet
from bench.collectors import git_state
from bench.grids import Cell, Grid
from bench.store import read_json, write_json
from ddnet.config import ConfigError, TrainConfig, check_runnable
from ddnet.errors import UserError


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
    version = str(getattr(ddnet, "__version__", "0"))
    root = Path(ddnet.__file__).resolve().parent.parent
    # Only our own checkout's commit: git_state may also report DDNET_BENCH_GIT_COMMIT for a copy
    # without .git, which would re-key the cells of a grid half-run before the variable was set.
    if (root / ".git").exists():
        state = git_state(root)
        if state["git_commit_source"] == "git":
            return f"{version}+g{state['git_commit'][:12]}"
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
            # an explicit option beats a setting the grid fixed (table1's batch 1), never a factor it varies;
            # a TrainConfig is validated when it is made, so an impossible override fails here, named
            try:
                cfg = overrides.apply(c.config, keep=set(c.factors))
                if repeats > 1:
                    cfg = cfg.replace(seed=cfg.seed + k)
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

