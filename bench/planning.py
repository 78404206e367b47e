"""Planning a grid run: expand a grid into cells, name their folders, fix the run order.

One folder per cell under `--out` (default `results/runs/<grid>`), named
`<slug>-<hash>` (`<slug>-r<k>-<hash>` with repeats), where the hash covers the
cell's full config and the code version (package version + git commit; a
dirty tree does not change it, so editing code does not orphan a half-run
grid). With repeats, each round's cells run in a seeded shuffle. The plan is
recorded once in `<out>/grid.json`; a later run into the same folder must
plan the same cells (`prepare_out`), and one `bench run` at a time holds the
folder (`exclusive`). Nothing here starts a process: that is `bench.processes`.

What a planned cell trains (`cell_sizes`: slices, side, steps x batch per epoch),
and where it stands in its folder (`cell_state`, as `bench.processes.run_cell`
will see it) are found here too, for the plan's estimates (`bench.estimate`;
the synthetic data still to make: `bench.data_plan`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ddnet
from bench.collectors import git_state
from bench.grids import Cell, Grid
from bench.store import lock_held, read_json, read_jsonl, read_summary, take_lock, write_json
from ddnet.config import ConfigError, TrainConfig, absolute_source, check_runnable, warn_synthetic_only
from ddnet.data.errors import DataError
from ddnet.data.readers import find_split, list_images, read_image
from ddnet.errors import UserError, make_folder

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: `exclusive` then takes no lock
    fcntl = None


@dataclass
class Overrides:
    """Command-line settings that replace the grid's base values (None: keep the grid's)."""

    epochs: int | None = None
    batch_size: int | None = None
    image_size: int | None = None
    data: str | None = None
    n_train: int | None = None
    n_val: int | None = None
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
            "n_val": "data.n_val",
            "seed": "seed",
            "device": "device",
        }
        out = {dotted: getattr(self, attr) for attr, dotted in names.items() if getattr(self, attr) is not None}
        if "data.source" in out:  # the cells run from their own folders
            out["data.source"] = absolute_source(out["data.source"])
        return out

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
            "epochs": self.config.epochs,  # `bench status` shows 0/N for a cell not reached yet
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
    if overrides.data is not None:
        warn_synthetic_only([flag for flag, v in (("--image-size", overrides.image_size), ("--n-train",
                             overrides.n_train), ("--n-val", overrides.n_val)) if v is not None], overrides.data)
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
    _warn_same_configs(grid.name, planned, bool(overrides.fields()))
    for p in planned:  # before anything is written, not once per cell in its own process
        sizes = cell_sizes(p.config)
        if not p.skip_reason and sizes.n_train < sizes.batch:
            source = p.config.data.source  # --n-train shapes synthetic data only: a folder grows by its files
            more = "add data (--n-train)" if source == "synthetic" else f"add slice pairs to {Path(source) / 'train'}"
            raise UserError(f"grid '{grid.name}', cell '{p.cell.name}': the training set has {sizes.n_train} "
                            f"slices, fewer than --batch-size {sizes.batch}; lower --batch-size or {more}.")
    return planned


def _warn_same_configs(grid: str, planned: list[PlannedCell], overridden: bool) -> None:
    """Warn when cells train the same config (options such as --epochs 2 can make a grid's cells meet):
    each runs, as its own measurement."""
    seen: dict[tuple[int, str], str] = {}
    twins = []
    for p in planned:
        key = (p.repeat, json.dumps(p.config.to_dict(), sort_keys=True))
        if key in seen and p.repeat == 0:
            twins.append(f"'{p.cell.name}' = '{seen[key]}'")
        seen.setdefault(key, p.cell.name)
    if twins:
        at = " with the options given" if overridden else ""
        warnings.warn(f"grid '{grid}': {len(twins)} cell(s) train the same config as an earlier one{at} "
                      f"({', '.join(twins[:3])}{' ...' if len(twins) > 3 else ''}); each still runs and is "
                      "reported as its own cell. For repeated measurements use --repeats; otherwise make them "
                      "differ or drop one.", stacklevel=2)


def _run_folder_mark(d: Path) -> str | None:
    """The file that makes `d` a run folder (a grid cell's, or bench train's: its config beside its records)."""
    if (d / "cell.json").is_file():
        return "cell.json"
    if (d / "config.json").is_file():
        return next((n for n in ("summary.json", "epochs.jsonl") if (d / n).is_file()), None)
    return None


def check_grid_out(out: Path) -> None:
    """Refuse an --out that is a run folder or lies inside one or inside another grid's folder (UserError):
    the grid's cells would nest among a run's files, and a report of the outer folder would count them twice."""
    out = Path(out).expanduser().absolute()
    for d in (out, *out.parents):
        with contextlib.suppress(OSError):
            held = _run_folder_mark(d)
            if held is not None:
                where = "is" if d == out else f"lies inside {d}, which is"
                raise UserError(f"--out {out} {where} a run folder (it holds {held}); pass a folder outside "
                                "any run for the grid.")
            if d != out and (d / "grid.json").is_file():
                raise UserError(f"--out {out} lies inside {d}, another grid's folder; pass a folder outside it "
                                "(`bench report` reads every grid under one parent folder).")


def check_recorded(out: Path, record: dict[str, Any], folders: list[str], version: str) -> list[str]:
    """The run order `out/grid.json` (read as `record`) holds for these cell folders; UserError when it records
    another cell set (another grid, other options, or other code)."""
    known = [c["folder"] if isinstance(c, dict) else c for c in record.get("cells", [])]
    if set(known) != set(folders) or sorted(record.get("order", [])) != sorted(folders):
        old = record.get("code_version")
        why = (f"it was planned by code {old} and this is {version}: cell folders are keyed by the code's "
               "commit, so check out that commit to finish it, or pick another --out" if old != version else
               f"the grid or its options changed ({_set_change(known, folders)}): run it with the grid file "
               "and options it was started with, or pick another --out")
        raise UserError(f"{out} holds a different cell set (grid '{record.get('grid')}', {len(known)} cells); {why}.")
    return list(record["order"])


def _set_change(recorded: list[str], planned: list[str]) -> str:
    """'planned now, not recorded: a-1234, b-5678; recorded, not planned now: c-9abc' (three of each at most)."""
    def few(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    new, gone = [f for f in planned if f not in recorded], [str(f) for f in recorded if f not in planned]
    parts = ([f"planned now, not recorded: {few(new)}"] if new else []) + \
        ([f"recorded, not planned now: {few(gone)}"] if gone else [])
    return "; ".join(parts) or "its run order lists other cells"


# ------------------------------------------------------------------ what a cell trains, where it stands


@dataclass(frozen=True)
class Sizes:
    """What one epoch of a cell processes."""

    steps: int
    """Optimizer steps per epoch: n_train // batch (the loaders drop a last partial batch)."""
    batch: int
    """Global batch (split across replicas under DDP)."""
    side: int
    """Image side in pixels."""
    n_train: int
    n_val: int
    val_batch: int

    @property
    def images_per_epoch(self) -> int:
        """Training images per epoch: steps x batch."""
        return self.steps * self.batch


@functools.lru_cache(maxsize=32)
def _folder_sizes(root: str) -> tuple[int, int, int]:
    """(train slices, val slices, side) of a data folder, from its file lists and its first slice."""
    train_hq, _ = find_split(root, "train")
    files = list_images(train_hq)
    if not files:
        raise DataError(f"no images in {train_hq}")
    return len(files), len(list_images(find_split(root, "val")[0])), int(read_image(files[0]).shape[-1])


def cell_sizes(cfg: TrainConfig) -> Sizes:
    """The sizes `cfg` trains at: synthetic ones from the config, a data folder's counted (its first slice's side)."""
    n_train, n_val, side = cfg.data.n_train, cfg.data.n_val, cfg.data.image_size
    if cfg.data.source != "synthetic":
        try:
            n_train, n_val, side = _folder_sizes(str(Path(cfg.data.source).expanduser()))
        except (DataError, OSError):
            pass  # an unreadable folder fails in `bench train` with its own message; use the config's
    return Sizes(steps=n_train // cfg.batch_size, batch=cfg.batch_size, side=side, n_train=n_train, n_val=n_val,
                 val_batch=cfg.val_batch_size or cfg.batch_size)


def cell_state(p: PlannedCell, out: Path, retry_failed: bool = False) -> tuple[str, int]:
    """('to run' | 'done' | 'failed' | 'skip', epochs it has behind a checkpoint), as `run_cell` will see it:
    a failed cell is kept unless `retry_failed`; rows without a checkpoint are dropped and redone."""
    d = out / p.folder
    status = (read_summary(d) or {}).get("status")
    if status == "ok":
        return "done", p.config.epochs
    if status == "failed" and not retry_failed:
        return "failed", 0
    if p.skip_reason:
        return "skip", 0
    done = len(read_jsonl(d / "epochs.jsonl")) if (d / "ckpt.pt").exists() else 0
    return "to run", min(done, p.config.epochs)




# ------------------------------------------------------------------ order and record


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


def recorded_grid(out: Path) -> dict[str, Any]:
    """`out/grid.json` as a dict, or {} when there is none or it cannot be read (a dry run writes nothing;
    `prepare_out` judges an unreadable file when the grid really runs)."""
    try:
        record = read_json(out / "grid.json")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _read_grid_record(path: Path) -> dict[str, Any]:
    """An existing grid.json, or UserError when it is damaged (the run would stop there)."""
    try:
        record = read_json(path)
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        record = f"{type(e).__name__}"
    if not isinstance(record, dict):
        raise UserError(f"{path} is damaged ({record if isinstance(record, str) else 'not a JSON object'}); it "
                        "records the grid's cells, order and code version: restore it, or run the grid into a "
                        "new --out (with --estimate-from this one).")
    return record


def dry_run_order(planned: list[PlannedCell], seed: int, out: Path) -> list[str]:
    """The order a run into `out` would take: the one grid.json recorded for this cell set, else the seeded one.
    Refuses (UserError) an --out the run would refuse as a place (`check_grid_out`)."""
    check_grid_out(out)
    order = run_order(planned, seed)
    recorded = recorded_grid(out).get("order")
    if isinstance(recorded, list) and sorted(map(str, recorded)) == sorted(order):
        return [str(f) for f in recorded]
    return order


def dry_run_refusal(out: Path, order: list[str], version: str | None = None, resume: bool = True) -> str | None:
    """What the run would refuse that a dry run does not: planning other options into a grid's folder is
    how a dry run estimates them from its epochs, but the run itself stops at the other cell set (and, with
    --no-resume, at any grid already there)."""
    if fcntl is not None and lock_held(out / RUN_LOCK):
        return f"note: `bench run` would stop here: {_BUSY.format(out=out)}"
    try:  # one read: {} when there is none
        record = _read_grid_record(out / "grid.json") if (out / "grid.json").exists() else {}
    except UserError as e:
        return f"note: `bench run` would stop here: {e}"
    if not record:
        return None
    if not resume:
        return f"note: `bench run` with these options would stop here: {_NOT_RESUMED.format(out=out)}"
    try:
        check_recorded(out, record, order, code_version() if version is None else version)
    except UserError as e:
        return f"note: `bench run` with these options would stop here: {e}"
    return None


RUN_LOCK = ".bench-run.lock"
"""The lock file in a grid's --out that its `bench run` holds (`exclusive`)."""
_BUSY = "another `bench run` is using {out}; wait for it or pick another --out."
_NOT_RESUMED = "{out} already holds a run of this grid; drop --no-resume to continue it, or pick another --out."


def prepare_out(
    out: Path, grid: Grid, planned: list[PlannedCell], seed: int, resume: bool, version: str
) -> list[str]:
    """Create `out/grid.json` once, or check the existing one matches; returns the run order."""
    path = out / "grid.json"
    folders = [p.folder for p in planned]
    if path.exists():
        if not resume:
            raise UserError(_NOT_RESUMED.format(out=out))
        record = _read_grid_record(path)
        order = check_recorded(out, record, folders, version)
        cells = [p.cell_record(grid.name, version) for p in planned]
        if _shown(record.get("cells")) != _shown(cells):  # a label or factor edited in the grid file: show it
            write_json(path, {**record, "cells": cells})
        for p, cell in zip(planned, cells, strict=True):  # edited labels, or a cell.json damaged or lost
            if (out / p.folder).is_dir():  # finished cells too, which no executor prepares again
                _write_cell_record(out / p.folder, cell)
        return order
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


def _write_cell_record(cell_dir: Path, record: dict[str, Any]) -> None:
    """Write `cell.json` when it is missing, unreadable, or shows another label or factors than `record`."""
    try:
        kept = read_json(cell_dir / "cell.json")
    except (OSError, ValueError):
        kept = None
    if _shown([kept]) != _shown([record]):
        write_json(cell_dir / "cell.json", record)


def _shown(cells: Any) -> list[Any]:
    """What the report and `bench status` show of cell records: each one's label and factors (the folder,
    hence the config, is the same for a grid rerun into its --out; the grid file may have renamed a label)."""
    if not isinstance(cells, list):
        return [cells]
    return [(c.get("folder"), c.get("label"), c.get("factors")) if isinstance(c, dict) else c for c in cells]


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """One `bench run` per out folder at a time (the lock dies with the process, even on SIGKILL)."""
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    make_folder(out, "pass a writable --out folder for the grid.")
    with take_lock(out / RUN_LOCK, "pass a writable --out folder.", _BUSY.format(out=out)):
        yield


def prepare_cell(p: PlannedCell, out: Path, grid_name: str, version: str) -> dict[str, Any] | None:
    """Make the cell's folder with `cell.json` and `config.request.json` (what `bench train --config` reads).

    A cell that will not run here (`p.skip_reason`) gets its 'skipped' summary instead, returned;
    None for a cell ready to run. Any executor (this runner, Slurm) starts from here.
    """
    cell_dir = out / p.folder
    cell_dir.mkdir(parents=True, exist_ok=True)
    _write_cell_record(cell_dir, p.cell_record(grid_name, version))
    if p.skip_reason:
        if not (cell_dir / "config.json").exists():
            write_json(cell_dir / "config.json", p.config.to_dict())
        record = {
            "status": "skipped", "reason": p.skip_reason, "error": None, "epochs_completed": 0,
            "total_time_s": None, "final_val_ms_ssim": None,
        }
        write_json(cell_dir / "summary.json", record)
        return record
    request = cell_dir / "config.request.json"
    if not request.exists():
        write_json(request, p.config.to_dict())
    return None
