"""What a grid costs before it runs, and how much of it is left while it runs.

Images: a cell trains `steps x batch` images per epoch (`steps = n_train // batch`: the
loaders drop a last partial batch; under DDP the batch is the global one), so
`steps x batch x epochs` in all (`bench.planning.cell_sizes`).

Time: a cell takes `overhead_s + (its epochs left) x epoch_s`. `epoch_s`: a steady (not
warm-up) epoch's `time_s + val_time_s`, the median, per phase (a hybrid cell's epochs split
as its `dense_epochs` says, 'auto' as half). `overhead_s`: a launch's wall time (the runner's
`<cell>/launches.jsonl`) less its epochs at that time and any data it generated (counted
once per grid: `bench.data_plan.data_to_make`), the median over launches that exited 0; that
is process start, warm-up excess, capture, pruning, checkpoints. Without launches
(`bench train` alone, Slurm) it is what the records hold.

Where they come from, best first (`CellEstimate.source`):

1. measured: an earlier run (finished or not) under `--out` or `--estimate-from`, made on
   this machine (env.json's `fingerprint` and device), of the same timing configuration
   (`timing_key`: all but epochs, seeds, lr, schedule, data generation settings): the
   cell's own folder ("from 3 earlier epochs of this cell"), else one of the same cell (a
   shorter run, say), else the most epochs ("from 3 earlier epochs of <folder>"). When no
   such run measured every phase the cell has left, each phase may come from its own run
   (`phase_key`): a sparse phase from a run of the same configuration, a dense phase from
   any run of the same configuration but its sparsity (a hybrid cell's dense epochs are a
   dense model's), or from a calibration of that phase ("by phase: dense from <folder>,
   sparse calibrated"); failing both, a masked (random, topk) sparse phase is timed at the
   dense phase's epochs, since masked weights run the same dense kernels ("sparse at the
   dense epochs of <folder>"; the masks' own cost is not in it); only where every phase
   is measured is it 'measured';
2. calibrated (`bench run --calibrate`, `bench.calibrate.calibrate`): two epochs of
   `CAL_STEPS` steps of each distinct configuration and phase; a full epoch is the timed
   one plus a median step per further step, validation per slice ("calibrated: 3 steps").
   A data-bound host loader is underestimated;
3. scaled: an earlier run on this machine of the same toggles, model and loader but other
   sizes, the closest (same side, then batch, then work per epoch): training scaled by
   images x pixels per epoch, validation by slices x pixels, overhead kept ("scaled from
   <folder>: x40 images.px per epoch"); right for convolutions at scale, not where fixed
   costs dominate (tiny images on a GPU);
4. unknown.

Everything here reads folders and returns values. While a grid runs, `bench.grid_clock.GridClock`
keeps its elapsed and remaining time from these estimates.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cell_log import LAUNCHES
from bench.collectors import environment
from bench.data_plan import data_to_make
from bench.planning import PlannedCell, Sizes, cell_sizes, cell_state
from bench.store import epoch_phase, is_warmup, read_json, read_jsonl, seconds
from ddnet.config import ConfigError, SparsityConfig, TrainConfig, resolve_device

CAL_STEPS = 3
"""Training steps per calibration epoch (two epochs: a warm-up one and a timed one)."""

_NEUTRAL = ("epochs", "seed", "lr", "gamma", "warmup_epochs", "checkpoint_every", "init", "profile_steps",
            "device", "sparsity.dense_epochs", "sparsity.auto_patience", "data.source", "data.data_seed",
            "data.dose", "data.phantom", "data.normalisation", "data.hu_window", "data.synth_mode")
"""Fields that do not change how long a steady epoch takes (the device is keyed resolved, apart)."""
_SIZES = ("batch_size", "val_batch_size", "num_workers", "data.image_size", "data.n_train", "data.n_val")
"""Fields that change it by size only: an earlier run differing in these is scaled, not used as is."""


# ------------------------------------------------------------------ sizes and keys


def _drop(d: dict[str, Any], dotted: tuple[str, ...]) -> dict[str, Any]:
    d = json.loads(json.dumps(d))
    for path in dotted:
        *parents, leaf = path.split(".")
        functools.reduce(lambda t, k: t.get(k, {}), parents, d).pop(leaf, None)
    return d


def family_key(cfg: TrainConfig, device: str) -> str:
    """Toggles, model and parallelism on a device: what must match for an earlier run to be scaled to `cfg`."""
    return json.dumps({"device": device, **_drop(cfg.to_dict(), _NEUTRAL + _SIZES)}, sort_keys=True)


def timing_key(cfg: TrainConfig, device: str, sizes: Sizes) -> str:
    """`family_key` plus the sizes: what must match for an earlier run's epoch time to be used as is."""
    return json.dumps({"family": family_key(cfg, device), "num_workers": cfg.num_workers,
                       "sizes": [sizes.steps, sizes.batch, sizes.side, sizes.n_val, sizes.val_batch]})


def phase_key(cfg: TrainConfig, device: str, sizes: Sizes, phase: str) -> str:
    """`timing_key` of `cfg`'s `phase` epochs: for the dense phase without the sparsity settings (nothing of
    them runs before the switch), so that a dense run's epochs and a hybrid run's dense ones stand for it."""
    if phase == "dense":
        cfg = dataclasses.replace(cfg, sparsity=SparsityConfig())
    return timing_key(cfg, device, sizes)


def _device_type(name: Any) -> str | None:
    return str(name).split(":")[0] if isinstance(name, str) and name and name != "auto" else None


@functools.lru_cache(maxsize=1)
def machine_fingerprint() -> str:
    """This machine's environment fingerprint (GPU models, driver, torch, CUDA, CPU), as env.json records it."""
    return str(environment()["fingerprint"])


# ------------------------------------------------------------------ earlier runs


def _wall(row: dict[str, Any]) -> float:
    """An epoch's wall time: training plus validation."""
    return seconds(row.get("time_s")) + seconds(row.get("val_time_s"))


@dataclass
class Measured:
    """What one earlier run folder says about time."""

    path: Path
    cell: str | None
    """cell.json's cell name (None for a folder `bench run` did not make)."""
    config: TrainConfig
    device: str
    fingerprint: str | None
    sizes: Sizes
    train_s: dict[str, float]
    """Phase -> median steady training time per epoch (`time_s`)."""
    val_s: dict[str, float]
    """Phase -> median validation time per epoch (`val_time_s`)."""
    n_epochs: int
    """Epochs behind the medians."""
    warmup_only: bool
    """No steady epoch yet: the medians are of warm-up epochs."""
    overhead_s: float
    """Per launch, beyond the steady epochs (module docstring)."""

    def epoch_s(self, phase: str) -> float:
        """Median steady epoch (training + validation) of `phase`, else of the phase measured."""
        p = phase if phase in self.train_s else next(iter(self.train_s))
        return self.train_s[p] + self.val_s[p]

    @functools.cached_property
    def timing_key(self) -> str:
        """Its `timing_key` (computed once: a plan compares it with every cell's)."""
        return timing_key(self.config, self.device, self.sizes)

    @functools.cached_property
    def phase_keys(self) -> dict[str, str]:
        """`phase_key` of each phase it measured (computed once, likewise)."""
        return {ph: phase_key(self.config, self.device, self.sizes, ph) for ph in self.train_s}


def _overhead(path: Path, rows: list[dict[str, Any]], cfg: TrainConfig, epoch_s: Any,
              summary: dict[str, Any]) -> float:
    """Per-launch time beyond the steady epochs (see the module docstring)."""
    by_epoch = {int(r.get("epoch") or 0): r for r in rows}
    config = {"warmup_epochs": cfg.warmup_epochs}
    found = []
    for launch in read_jsonl(path / LAUNCHES):
        before, after = int(launch.get("epochs_before") or 0), int(launch.get("epochs_after") or 0)
        if launch.get("exit_code") != 0 or not isinstance(launch.get("wall_s"), int | float) or after <= before:
            continue
        ran = [by_epoch[e] for e in range(before + 1, after + 1) if e in by_epoch]
        miss = seconds(launch.get("data_load_s")) if launch.get("data_cache") == "miss" else 0.0
        found.append(float(launch["wall_s"]) - sum(epoch_s(epoch_phase(r)) for r in ran) - miss)
    if found:
        return max(0.0, statistics.median(found))
    # no launch recorded: what the records hold, without process start
    warm = sum(max(0.0, _wall(r) - epoch_s(epoch_phase(r))) for r in rows if is_warmup(r, config))
    extra = sum(seconds(r.get("capture_time_s")) + seconds(r.get("prune_time_s")) for r in rows)
    data = seconds(summary.get("data_load_s")) if summary.get("data_cache") != "miss" else 0.0
    return warm + extra + data + seconds(summary.get("staging_time_s"))


def read_measured(path: Path) -> Measured | None:
    """The timing facts of one run folder, or None when it has no usable epoch or configuration."""
    rows = [r for r in read_jsonl(path / "epochs.jsonl") if isinstance(r.get("time_s"), int | float)]
    if not rows:
        return None
    raw = _read_dict(path / "config.json") or _read_dict(path / "config.request.json")
    try:
        cfg = TrainConfig.from_dict(raw, lenient=True)
    except (ConfigError, TypeError, ValueError):
        return None
    env = _read_dict(path / "env.json")
    summary = _read_dict(path / "summary.json")
    cell = _read_dict(path / "cell.json").get("cell")
    device = _device_type(env.get("device")) or _device_type(summary.get("device")) or _device_type(cfg.device)
    if device is None:
        return None
    steady = [r for r in rows if not is_warmup(r, {"warmup_epochs": cfg.warmup_epochs})]
    used = steady or rows
    by_phase = {ph: rs for ph in ("dense", "sparse") if (rs := [r for r in used if epoch_phase(r) == ph])}
    train_s = {ph: statistics.median(seconds(r.get("time_s")) for r in rs) for ph, rs in by_phase.items()}
    val_s = {ph: statistics.median(seconds(r.get("val_time_s")) for r in rs) for ph, rs in by_phase.items()}
    sizes = cell_sizes(cfg)  # the steps and side it recorded, where it did
    steps = next((r["steps"] for r in rows if isinstance(r.get("steps"), int) and r["steps"] > 0), sizes.steps)
    side = summary["image_side"] if isinstance(summary.get("image_side"), int) else sizes.side
    sizes = dataclasses.replace(sizes, steps=steps, n_train=steps * sizes.batch, side=side)
    m = Measured(path=path, cell=cell if isinstance(cell, str) else None, config=cfg, device=device,
                 fingerprint=env.get("fingerprint") if isinstance(env.get("fingerprint"), str) else None,
                 sizes=sizes, train_s=train_s, val_s=val_s, n_epochs=len(used), warmup_only=not steady, overhead_s=0)
    m.overhead_s = _overhead(path, rows, cfg, m.epoch_s, summary)
    return m


def _read_dict(path: Path) -> dict[str, Any]:
    try:
        d = read_json(path)
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def scan_runs(*roots: Path) -> list[Measured]:
    """Every run folder under the `roots` (any depth) with at least one epoch, each once, sorted by path."""
    folders: set[Path] = set()
    for root in roots:
        if Path(root).is_dir():
            folders.update(f.parent.resolve() for f in Path(root).rglob("epochs.jsonl"))
    return [m for d in sorted(folders) if (m := read_measured(d)) is not None]


# ------------------------------------------------------------------ calibration


@dataclass
class Calibration:
    """A calibration run's timed epoch (`steps` steps: training `train_s`, median step `step_s`; validation of
    `n_val` slices `val_s`) and its wall time beyond two such epochs and its own data (`overhead_s`); or the
    `error` that stopped it."""

    steps: int = CAL_STEPS
    train_s: float = 0.0
    step_s: float = 0.0
    val_s: float = 0.0
    n_val: int = 1
    overhead_s: float = 0.0
    error: str | None = None

    def epoch_s(self, sizes: Sizes) -> float:
        """A full epoch at `sizes`: the timed epoch plus a median step per further step, validation per slice."""
        train = self.train_s + (sizes.steps - self.steps) * self.step_s
        return max(0.0, train) + self.val_s * sizes.n_val / max(1, self.n_val)


# ------------------------------------------------------------------ the plan


@dataclass
class CellEstimate:
    """One planned cell's size and time to finish."""

    folder: str
    sizes: Sizes
    epochs: int
    epochs_left: int
    state: str
    """'to run', 'done', 'failed' (kept, not retried), or 'skip'."""
    seconds: float | None = None
    """Time to finish the cell from where it stands (0 when nothing is left), None when unknown."""
    epochs_s: float | None = None
    """The epochs' part of `seconds`: the epochs left, each at its phase's steady epoch time."""
    overhead_s: float | None = None
    """The launch's part of `seconds` (start-up, data, warm-up, capture, checkpoints)."""
    epoch_s: float | None = None
    """Steady epoch time (training + validation) of the phase the cell spends most epochs in."""
    source: str = "unknown"
    kind: str = "unknown"
    """'measured', 'masked as dense', 'calibrated', 'scaled', 'unknown', or 'none' (nothing left to run)."""

    @property
    def images(self) -> int:
        """Images the whole cell trains: steps x batch x epochs."""
        return self.sizes.images_per_epoch * self.epochs

    @property
    def images_left(self) -> int:
        """Images still to train: steps x batch x the epochs left (0 for a cell that will not run)."""
        return self.sizes.images_per_epoch * self.epochs_left if self.state == "to run" else 0


@dataclass
class PlanEstimate:
    """Per-cell estimates of a plan, the one-time data generation, and the totals."""

    cells: dict[str, CellEstimate]
    data_s: float = 0.0
    """Generating the synthetic splits not cached yet, once (`bench.data_plan.data_to_make`); its note."""
    data_note: str = ""
    other_machines: int = 0
    """Earlier runs under the folder that were made on another machine or device (not used)."""

    def to_run(self) -> list[CellEstimate]:
        """The cells this run will train (not finished, failed and kept, or skipped)."""
        return [c for c in self.cells.values() if c.state == "to run"]

    @property
    def unknown(self) -> int:
        """Cells to run whose time is unknown."""
        return sum(1 for c in self.to_run() if c.seconds is None)

    @property
    def total_s(self) -> float:
        """The known part: cells with an estimate, plus the data generation."""
        return sum(c.seconds or 0.0 for c in self.to_run()) + self.data_s


def phase_split(cfg: TrainConfig, done: int) -> dict[str, int]:
    """{'dense': n, 'sparse': m}: the phases of the epochs after the first `done`."""
    de: Any = cfg.sparsity.dense_epochs
    dense_total = cfg.epochs if cfg.sparsity.kind == "none" else (cfg.epochs // 2 if de == "auto" else int(de))
    dense_left = max(0, min(dense_total, cfg.epochs) - done)
    return {"dense": dense_left, "sparse": cfg.epochs - done - dense_left}


def exact_match(runs: list[Measured], key: str | None, fp: str, p: PlannedCell) -> Measured | None:
    """The best earlier run of exactly this timing configuration on this machine: the cell's own folder first,
    then a folder of the same cell (other epochs, say), then steady before warm-up-only, then the most epochs.
    `key` None: every run of `runs` on this machine is a candidate."""
    same = [m for m in runs if m.fingerprint == fp and (key is None or m.timing_key == key)]
    if not same:
        return None
    return max(same, key=lambda m: (m.path.name == p.folder, m.cell == p.cell.name, not m.warmup_only,
                                    m.n_epochs, str(m.path)))


def phase_match(runs: list[Measured], p: PlannedCell, fp: str, phase: str) -> Measured | None:
    """The best earlier run on this machine that measured steady (or warm-up) `phase` epochs of `p`'s
    configuration for that phase (`phase_key`), chosen as `exact_match` chooses."""
    device, sizes = resolve_device(p.config.device), cell_sizes(p.config)
    key = phase_key(p.config, device, sizes, phase)
    same = [m for m in runs if m.phase_keys.get(phase) == key]
    return exact_match(same, None, fp, p)


@dataclass
class PhaseSource:
    """Where one phase's steady epoch time comes from: an earlier run that measured it, or its calibration."""

    run: Measured | None = None
    calibration: Calibration | None = None
    as_dense: bool = False
    """A masked sparse phase timed at `run`'s dense epochs (the module docstring, 1)."""

    def epoch_s(self, phase: str, sizes: Sizes) -> float:
        if self.run is None:
            return self.calibration.epoch_s(sizes)
        return self.run.epoch_s("dense" if self.as_dense else phase)

    def text(self, p: PlannedCell) -> str:
        if self.run is None:
            return f"calibrated ({self.calibration.steps} steps)"
        name = "this cell" if self.run.path.name == p.folder else self.run.path.name
        return f"at the dense epochs of {name} (masked weights run dense kernels)" if self.as_dense else f"from {name}"


def _phase_sources(runs: list[Measured], p: PlannedCell, fp: str, phases: list[str], key: str,
                   calibrations: dict[tuple[str, str], Calibration] | None) -> dict[str, PhaseSource]:
    """{phase: its source} for the `phases` that have one (`phase_match`, else a calibration without error)."""
    out: dict[str, PhaseSource] = {}
    for ph in phases:
        if (m := phase_match(runs, p, fp, ph)) is not None:
            out[ph] = PhaseSource(run=m)
        elif calibrations and (c := calibrations.get((key, ph))) is not None and c.error is None:
            out[ph] = PhaseSource(calibration=c)
    if p.config.sparsity.masked and "sparse" in phases and "sparse" not in out and (m := phase_match(runs, p, fp, "dense")):
        out["sparse"] = PhaseSource(run=m, as_dense=True)
    return out


def _closest(runs: list[Measured], cfg: TrainConfig, device: str, sizes: Sizes, fp: str) -> Measured | None:
    fam = family_key(cfg, device)
    same = [m for m in runs if m.fingerprint == fp and family_key(m.config, m.device) == fam
            and m.sizes.images_per_epoch > 0 and m.sizes.side > 0]

    def distance(m: Measured) -> tuple[bool, bool, bool, float]:
        ratio = _work(sizes) / _work(m.sizes)
        return (m.sizes.side != sizes.side, m.sizes.batch != sizes.batch, m.warmup_only, abs(math.log(ratio)))

    return min(same, key=distance) if same else None


def _work(s: Sizes) -> float:
    return float(s.images_per_epoch) * s.side * s.side


def _split_s(split: dict[str, int], per_phase: Any) -> tuple[float, float | None]:
    """(sum of epochs x steady time over the phases left, the steady time of the phase with most epochs)."""
    total = 0.0
    for phase, n in split.items():
        if n:
            total += n * per_phase(phase)
    main = max(split, key=lambda k: split[k])
    return total, per_phase(main) if split[main] else None


def estimate_cell(p: PlannedCell, out: Path, runs: list[Measured], fp: str, retry_failed: bool = False,
                  calibrations: dict[tuple[str, str], Calibration] | None = None) -> CellEstimate:
    """The estimate of one planned cell (module docstring: measured, calibrated, scaled, unknown)."""
    sizes = cell_sizes(p.config)
    state, done = cell_state(p, out, retry_failed)
    est = CellEstimate(folder=p.folder, sizes=sizes, epochs=p.config.epochs, epochs_left=p.config.epochs - done,
                       state=state)
    if state != "to run":
        est.seconds, est.kind, est.epochs_left = 0.0, "none", 0
        est.source = {"done": "finished earlier", "failed": "failed earlier (--retry-failed reruns it)",
                      "skip": "not run here"}[state]
        return est
    device = resolve_device(p.config.device)
    key = timing_key(p.config, device, sizes)
    split = phase_split(p.config, done)
    m = exact_match(runs, key, fp, p)
    left = [ph for ph, n in split.items() if n]
    sources = _phase_sources(runs, p, fp, left, key, calibrations)
    # the exact run when it measured every phase left, or when nothing better covers them (its measured phase
    # then stands in for the other; another run's dense epochs standing in are no better); else each phase from
    # its own run or calibration
    as_dense = any(src.as_dense for src in sources.values())
    if m is not None and (all(ph in m.train_s for ph in left) or len(sources) < len(left) or as_dense):
        est.epochs_s, est.epoch_s = _split_s(split, m.epoch_s)
        est.overhead_s, est.kind = m.overhead_s, "measured"
        what = "warm-up epoch(s)" if m.warmup_only else "earlier epochs"
        est.source = f"from {m.n_epochs} {what} of {'this cell' if m.path.name == p.folder else m.path.name}"
        if missing := [ph for ph in left if ph not in m.train_s]:  # said, not passed off as measured
            est.source += f"; its {next(iter(m.train_s))} epochs stand in for the {' and '.join(missing)} ones"
    elif left and len(sources) == len(left):
        est.epochs_s, est.epoch_s = _split_s(split, lambda ph: sources[ph].epoch_s(ph, sizes))
        cals = [src.calibration for src in sources.values() if src.calibration is not None]
        first = sources[left[0]]  # the launch starts in this phase: its start-up and warm-up
        est.overhead_s = (first.run.overhead_s if first.run is not None
                          else statistics.median(c.overhead_s for c in cals))
        est.kind = "calibrated" if cals else "masked as dense" if as_dense else "measured"
        est.source = (f"calibrated: {cals[0].steps} steps" if len(cals) == len(sources)
                      else "by phase: " + ", ".join(f"{ph} {src.text(p)}" for ph, src in sources.items()))
    elif (m := _closest(runs, p.config, device, sizes, fp)) is not None:
        f_train = _work(sizes) / _work(m.sizes)
        f_val = (sizes.n_val * sizes.side ** 2) / max(1, m.sizes.n_val * m.sizes.side ** 2)

        def scaled(phase: str) -> float:
            ph = phase if phase in m.train_s else next(iter(m.train_s))
            return m.train_s[ph] * f_train + m.val_s[ph] * f_val

        est.epochs_s, est.epoch_s = _split_s(split, scaled)
        est.overhead_s, est.kind = m.overhead_s, "scaled"
        est.source = (f"scaled from {m.path.name} ({m.n_epochs} epochs at {m.sizes.images_per_epoch} x "
                      f"{m.sizes.side} px, b{m.sizes.batch}): x{f_train:.3g} images.px per epoch")
    else:
        errors = [c.error for ph in split if calibrations and (c := calibrations.get((key, ph))) and c.error]
        est.source = f"unknown (calibration failed: {errors[0]})" if errors else "unknown"
        return est
    est.seconds = est.overhead_s + est.epochs_s
    return est


def estimate_plan(planned: list[PlannedCell], out: Path, retry_failed: bool = False,
                  calibrations: dict[tuple[str, str], Calibration] | None = None,
                  also: tuple[Path, ...] = ()) -> PlanEstimate:
    """Every planned cell's estimate from the run folders under `out` and the `also` folders (and from
    calibrations), plus the data line."""
    runs = scan_runs(out, *also)
    fp = machine_fingerprint()
    cells = {p.folder: estimate_cell(p, out, runs, fp, retry_failed, calibrations) for p in planned}
    data_s, note = data_to_make(planned, {f: c.state for f, c in cells.items()})
    here = {resolve_device(p.config.device) for p in planned}
    others = sum(1 for m in runs if m.fingerprint != fp or m.device not in here)
    return PlanEstimate(cells=cells, data_s=data_s, data_note=note, other_machines=others)
