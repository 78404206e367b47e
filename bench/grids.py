"""Experiment grids: a registry of the modules in `ablations/` and the `Cell` they return.

A grid is a Python module (or any `.py` file) with this interface:

    NAME: str                                   # registry key, e.g. 'table2'
    DESCRIPTION: str                            # one line for `bench grids`
    def cells(base: TrainConfig) -> list[Cell]  # the cells, derived from `base`
    def defaults() -> TrainConfig               # optional: the grid's own base
                                                # (else `paper_base()`)

`base` carries the paper-scale defaults (`paper_base()`: 5120 training and 784
validation slices of 512 px, batch 32, 50 epochs; or the grid's own
`defaults()`) with the user's command-line overrides already applied; a grid
changes only the factors it studies. Which cells this machine cannot run is decided later, at
run time, by `ddnet.config.check_runnable` (see `bench.planning`), never by a
hard-coded list in the grid.

The registry is a plain dict built by scanning the `ablations` package.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import pkgutil
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import ablations
from ddnet.config import DataConfig, TrainConfig, toggle_values
from ddnet.errors import UserError

_SLUG_OK = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass
class Cell:
    """One configuration of a grid: a readable slug, a label and the factors it sets."""

    name: str
    """Readable slug, unique within the grid (e.g. 'fp32-host-off-topk-hybrid25'); names the folder."""
    label: str
    """Human-readable description for tables and plots."""
    factors: dict[str, Any]
    """What the grid varies (precision, loader, graphs, sparsity, dense_epochs, ...): JSON-able values."""
    config: TrainConfig
    """The full training configuration of this cell."""
    skip_reason: str | None = None
    """Set by the grid when the cell is known not to be runnable; the runner adds machine-specific reasons."""


@dataclass
class Grid:
    """A loaded grid module."""

    name: str
    """Registry name (the module's NAME, or the file stem for a grid given by path)."""
    description: str
    """One line shown by `bench grids`."""
    source: str
    """Module name or file path it was loaded from."""
    cells_fn: Callable[[TrainConfig], list[Cell]] = field(repr=False)
    """The module's `cells(base)`."""
    defaults_fn: Callable[[], TrainConfig] | None = field(default=None, repr=False)
    """The module's optional `defaults()`; `paper_base()` when absent."""
    file: str | None = field(default=None, repr=False)
    """The module's file, to name the line of an error raised in it."""

    def base(self) -> TrainConfig:
        """The grid's base configuration before user overrides."""
        if self.defaults_fn is None:
            return paper_base()
        try:
            base = self.defaults_fn()
        except UserError as e:
            raise UserError(f"grid {self.source}: defaults() made an invalid config: {_one_line(e).rstrip('.')}"
                            f"{_at(e, self.file)}.") from None
        except (Exception, SystemExit) as e:  # a user's grid file: its error in one line, not a traceback
            raise UserError(f"grid {self.source}: defaults() raised {type(e).__name__}: {_one_line(e)}"
                            f"{_at(e, self.file)}; fix the grid file.") from None
        if not isinstance(base, TrainConfig):
            raise UserError(f"grid {self.source}: defaults() returned {type(base).__name__}, not a TrainConfig; "
                            "fix the grid file.")
        return base

    def cells(self, base: TrainConfig | None = None) -> list[Cell]:
        """Expand the grid on `base` (default: `self.base()`) and validate the result."""
        base = self.base() if base is None else base
        try:
            cells = self.cells_fn(base)
        except UserError as e:
            raise UserError(f"grid {self.source}: cells() made an invalid config: {_one_line(e).rstrip('.')}"
                            f"{_at(e, self.file)}.") from None
        except (Exception, SystemExit) as e:  # a user's grid file: its error in one line, not a traceback
            raise UserError(f"grid {self.source}: cells(base) raised {type(e).__name__}: {_one_line(e)}"
                            f"{_at(e, self.file)}; fix the grid file.") from None
        validate_cells(self.name, cells, self.source)
        return cells


def _one_line(e: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(e).split())


def _at(e: BaseException, file: str | None) -> str:
    """' (line 12)' for the last line of the grid `file` in `e`'s traceback (where the grid called what failed)."""
    if not file:
        return ""
    target = Path(file).resolve()
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == target]
    return f" (line {lines[-1]})" if lines else ""


PAPER_N_TRAIN = 5120
"""Training slices of the paper's regime: its public code's `CTDataset(..., length=5120)`."""
PAPER_N_VAL = 784
"""Validation slices of the paper's regime (its public code also held 784 test slices)."""


def paper_base() -> TrainConfig:
    """The paper's training regime: 5120 training and 784 validation slices of 512x512 (synthetic here),
    batch 32, 50 epochs.

    Why these sizes: the paper's public code trained on 5120 slices and validated on 784 (it held 784
    more for testing), so at batch 32 an epoch is 5120 // 32 = 160 steps and the whole run is
    160 x 32 x 50 = 256,000 training images. An epoch of well over a hundred steps is what the paper's
    per-epoch speedups were measured on: a few steps per epoch would time start-up (DataLoader workers,
    cuDNN autotuning, graph capture) rather than training. The synthetic slices are made once per data
    configuration and cached for every cell (`ddnet.data.cache`). For short runs, `bench run` takes
    `--epochs`, `--n-train`, `--n-val`, `--image-size` and `--batch-size` (table1 fixes batch 1, as the
    paper did, unless `--batch-size` is given).
    """
    return TrainConfig(epochs=50, batch_size=32,
                       data=DataConfig(source="synthetic", image_size=512, n_train=PAPER_N_TRAIN, n_val=PAPER_N_VAL))


def slug(*parts: object) -> str:
    """Join parts into a folder-safe lowercase slug: slug('amp-fp16', 'host', 'hybrid', 25) -> 'amp-fp16-host-hybrid-25'."""
    text = "-".join(str(p) for p in parts if p is not None and str(p) != "")
    text = re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")
    return re.sub(r"-{2,}", "-", text)


def standard_factors(cfg: TrainConfig) -> dict[str, Any]:
    """Every optimization toggle of a config (`ddnet.config.TOGGLES`) as flat factors, so every grid's
    cells can be matched up; a dense model's dense_epochs reads as all its epochs."""
    factors = toggle_values(cfg)
    factors["dense_epochs"] = cfg.sparsity.dense_epochs if cfg.sparsity.kind != "none" else cfg.epochs
    return factors


def toggles_slug(cfg: TrainConfig) -> str:
    """'fp32-host-off-dense' or 'amp-fp16-device-cuda-graph-topk-hybrid25' for a config."""
    if cfg.sparsity.kind == "none":
        model = "dense"
    else:
        model = f"{cfg.sparsity.kind}-hybrid{cfg.sparsity.dense_epochs}"
    return slug(cfg.precision, cfg.loader, cfg.graphs, model)


def model_label(cfg: TrainConfig) -> str:
    """'DDNet dense' or 'DDNet topk 50%, 25 dense + 25 sparse epochs'."""
    sp = cfg.sparsity
    if sp.kind == "none":
        return "DDNet dense"
    if sp.dense_epochs == "auto":
        schedule = "auto switch"
    else:
        schedule = f"{sp.dense_epochs} dense + {cfg.epochs - sp.dense_epochs} sparse epochs"
    return f"DDNet {sp.kind} {sp.amount:.0%}, {schedule}"


def dense_model(base: TrainConfig) -> TrainConfig:
    """`base` as a dense model (no pruning)."""
    return base.replace(**{"sparsity.kind": "none", "sparsity.dense_epochs": 0, "sparsity.pattern": "unstructured"})


def hybrid_model(base: TrainConfig, kind: str, dense_epochs: int | None = None) -> TrainConfig:
    """`base` pruned with `kind` on the hybrid schedule: `dense_epochs` (default epochs // 2) dense, then sparse."""
    de = base.epochs // 2 if dense_epochs is None else dense_epochs
    return base.replace(**{"sparsity.kind": kind, "sparsity.dense_epochs": de})


SPARSE_KINDS: tuple[str, ...] = ("random", "structured", "topk")
"""The three sparsity types of the paper (Table 2)."""


def validate_cells(grid: str, cells: list[Cell], source: str | None = None) -> None:
    """Refuse a grid with no cells, duplicate or unsafe names, or a cell whose config is not a valid
    TrainConfig; a refusal names `source`, the grid's file."""
    who = f"grid '{grid}'" + (f" ({source})" if source and source != grid else "")
    if not isinstance(cells, list):
        raise UserError(f"{who}: cells(base) returned a {type(cells).__name__}, not a list; it must return "
                        "a non-empty list of Cell (e.g. `return [Cell(...), ...]`).")
    if not cells:
        raise UserError(f"{who} returned no cells; its cells(base) must return a non-empty list of Cell.")
    seen: set[str] = set()
    for c in cells:
        if not isinstance(c, Cell):
            raise UserError(f"{who} returned {type(c).__name__}, not a Cell; build cells with bench.grids.Cell.")
        if not _SLUG_OK.match(c.name):
            raise UserError(
                f"{who}: cell name {c.name!r} is not a folder-safe slug; use bench.grids.slug(...)."
            )
        if c.name in seen:
            raise UserError(f"{who}: cell name {c.name!r} is used twice; cell names must be unique.")
        seen.add(c.name)
        if not isinstance(c.config, TrainConfig):
            raise UserError(f"{who}, cell '{c.name}': config is {type(c.config).__name__}, not a TrainConfig.")
        try:  # valid when made, but a grid may have set a field afterwards (cfg.lr = -1): check it again
            TrainConfig.from_dict(c.config.to_dict())
        except (TypeError, ValueError) as e:
            raise UserError(f"{who}, cell '{c.name}': invalid config: {_one_line(e).rstrip('.')} (set fields with "
                            "cfg.replace(...), which checks them).") from None
        if not isinstance(c.label, str):
            raise UserError(f"{who}, cell '{c.name}': label must be text, got {type(c.label).__name__}; "
                            "give Cell a str label.")
        if not isinstance(c.factors, dict) or not all(isinstance(k, str) for k in c.factors):
            raise UserError(f"{who}, cell '{c.name}': factors must be a dict with text keys, "
                            f"got {type(c.factors).__name__}.")
        for key, value in c.factors.items():  # they are written to cell.json and grid.json
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                raise UserError(f"{who}, cell '{c.name}': factor {key!r} is a {type(value).__name__}, which "
                                "JSON cannot hold; use plain str, int, float, bool or None (e.g. float(x)).") from None
        trained = standard_factors(c.config)
        wrong = [k for k, v in c.factors.items() if k in trained and v != trained[k]]
        if wrong:  # cell.json, grid.json and the plan would say it trains what it does not
            k = wrong[0]
            raise UserError(f"{who}, cell '{c.name}': factor {k}={c.factors[k]!r} but its config trains "
                            f"{k}={trained[k]!r}; set the config with cfg.replace(...) and the factors with "
                            "standard_factors(cfg), or name a factor of your own otherwise (e.g. 'variant').")


# ------------------------------------------------------------------ loading


def _grid_from_module(mod: ModuleType, fallback_name: str, source: str) -> Grid:
    cells_fn = getattr(mod, "cells", None)
    if not callable(cells_fn):
        raise UserError(f"grid {source} defines no cells(base) function; add `def cells(base): ...`.")
    defaults_fn = getattr(mod, "defaults", None)
    if defaults_fn is not None and not callable(defaults_fn):  # else the paper's 512 px base, silently
        raise UserError(f"grid {source}: defaults is not a function (it is {type(defaults_fn).__name__}); define "
                        "`def defaults(): return TrainConfig(...)`, or drop it for the paper's base.")
    name = getattr(mod, "NAME", fallback_name if _SLUG_OK.match(fallback_name) else slug(fallback_name))
    if not isinstance(name, str) or not _SLUG_OK.match(name):  # it names the default --out results/runs/<NAME>
        raise UserError(f"grid {source}: NAME {name!r} is not a folder-safe name; use lowercase letters, digits, "
                        "'.', '_' and '-' (e.g. NAME = 'my-grid').")
    return Grid(
        name=name,
        description=str(getattr(mod, "DESCRIPTION", "")).strip(),
        source=source,
        cells_fn=cells_fn,
        defaults_fn=defaults_fn,
        file=getattr(mod, "__file__", None),
    )


def scan() -> tuple[dict[str, Grid], dict[str, str]]:
    """The grids in `ablations/` by name, and the files there that are no grid: {module or NAME: one line
    naming the file and the fix}. A file that does not import, lacks `cells` or shares another file's
    `NAME` is set aside, so it stops neither `bench grids` nor a run of another grid (modules whose name
    starts with '_' are helpers)."""
    found: dict[str, list[tuple[str, Grid]]] = {}
    broken: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(ablations.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        where = f"ablations/{info.name}.py"
        file = str(Path(getattr(info.module_finder, "path", "")) / f"{info.name}.py")
        try:
            mod = importlib.import_module(f"ablations.{info.name}")
            grid = _grid_from_module(mod, info.name, where)
        except UserError as e:
            broken[info.name] = str(e)
            continue
        except (Exception, SystemExit) as e:  # a user's grid file: its error in one line, not a traceback
            sys.modules.pop(f"ablations.{info.name}", None)
            broken[info.name] = (f"grid file {where} failed to import: {type(e).__name__}: {_one_line(e)}"
                                 f"{_at(e, file)}; fix the grid file.")
            continue
        found.setdefault(grid.name, []).append((info.name, grid))
    grids: dict[str, Grid] = {}
    for name, group in found.items():
        owner = next((g for stem, g in group if stem == name), None) if len(group) > 1 else group[0][1]
        if owner is not None:
            grids[name] = owner
        files = [f"ablations/{stem}.py" for stem, _ in group]
        shared = f"grid '{name}' is defined by {' and '.join(files)}; give each a NAME of its own."
        for stem, g in group:  # a copied grid file that kept its NAME would replace the grid it was copied from
            if owner is None:
                broken[stem] = broken[name] = shared
            elif g is not owner:
                own = stem if _SLUG_OK.match(stem) else slug(stem)
                broken[stem] = (f"grid file ablations/{stem}.py is named '{name}', like ablations/{name}.py; give "
                                f"it a NAME of its own (e.g. NAME = '{own}').")
    return grids, broken


def registry() -> dict[str, Grid]:
    """Every grid shipped in `ablations/` that loads, by name (`scan` has the files that do not)."""
    return scan()[0]


def load_grid_file(path: Path) -> Grid:
    """Load a grid from a `.py` file with the grid interface."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted(f.name for f in path.glob("*.py") if not f.name.startswith("_"))[:5]
        raise UserError(f"grid file {path} is a folder; give the path to a .py grid file"
                        + (f" (it holds {', '.join(found)})." if found else "."))
    if not path.is_file():
        hint = f" (did you mean {path}.py?)" if path.suffix != ".py" and Path(f"{path}.py").is_file() else ""
        raise UserError(f"grid file {path} does not exist{hint}; give a grid name or a path to a .py grid file.")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    mod_name = f"_bench_grid_{slug(path.stem).replace('-', '_').replace('.', '_')}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot load grid file {path}; it must be a Python .py file.")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod  # dataclasses in the file need their module registered
    try:
        spec.loader.exec_module(mod)
    except (Exception, SystemExit) as e:  # a user's grid file: report its error in one line, not a traceback
        sys.modules.pop(mod_name, None)
        raise UserError(f"grid file {path} failed to import: {type(e).__name__}: {_one_line(e)}"
                        f"{_at(e, str(path))}; fix the grid file.") from None
    grid = _grid_from_module(mod, path.stem, str(path))
    shipped = registry().get(grid.name)
    if shipped is not None and shipped.file and Path(shipped.file).resolve() != path.resolve():
        # its default --out, its grid.json and the report would mix it up with the shipped grid's runs
        raise UserError(f"grid file {path} is named '{grid.name}', like the shipped grid "
                        f"ablations/{Path(shipped.file).name}; "
                        "give it a NAME of its own.")
    return grid


def load_grid(name_or_path: str) -> Grid:
    """A grid by registry name, or from a path to a `.py` file. Unknown names list the known ones."""
    looks_like_path = name_or_path.endswith(".py") or "/" in name_or_path or "\\" in name_or_path
    if looks_like_path:
        return load_grid_file(Path(name_or_path))
    grids, broken = scan()
    if name_or_path in grids:
        return grids[name_or_path]
    if name_or_path in broken:
        raise UserError(broken[name_or_path])
    if Path(name_or_path).is_file() or Path(name_or_path).is_dir():
        return load_grid_file(Path(name_or_path))
    raise UserError(
        f"unknown grid '{name_or_path}'; known grids: {', '.join(grids)} (or give a path to a .py grid file)."
    )
