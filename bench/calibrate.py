"""`bench run --calibrate`: time the configurations no earlier run measured, for the plan's estimates.

A cell's time comes from earlier runs when there are any (`bench.estimate`); for the
phases no run measured, one short `bench train` per distinct configuration and phase
(2 epochs of `CAL_STEPS` steps on synthetic slices of the cell's side: one warm-up,
one timed) gives a per-step time and the process's start-up, shared by every cell
that needs it. Calibration runs live in a temporary folder and are never results.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.cell_log import error_line, exit_text, log_tail
from bench.estimate import (
    CAL_STEPS,
    Calibration,
    machine_fingerprint,
    phase_match,
    phase_split,
    scan_runs,
    timing_key,
)
from bench.grids import toggles_slug
from bench.planning import PlannedCell, cell_sizes, cell_state
from bench.processes import TRAIN_COMMAND
from bench.status import format_duration
from bench.store import read_json, read_jsonl, read_summary, write_json
from ddnet.config import TrainConfig, resolve_device

CALIBRATION_TIMEOUT_S = 600.0
"""Longest a calibration training may take (torch.compile's first compile included)."""


def calibration_config(cfg: TrainConfig, phase: str) -> TrainConfig:
    """`cfg` cut to a calibration: 2 epochs of `CAL_STEPS` steps, one validation batch, synthetic slices of the
    same side, `phase` only (a sparse phase prunes before the first step; a dense one has no pruning)."""
    sizes = cell_sizes(cfg)
    changes: dict[str, Any] = {
        "epochs": 2, "warmup_epochs": 1, "profile_steps": 0, "checkpoint_every": 1, "init": None,
        "data.source": "synthetic", "data.image_size": sizes.side,
        "data.n_train": CAL_STEPS * cfg.batch_size, "data.n_val": max(1, min(sizes.n_val, sizes.val_batch)),
    }
    if phase == "sparse":
        changes["sparsity.dense_epochs"] = 0
    else:
        changes.update({"sparsity.kind": "none", "sparsity.dense_epochs": 0, "sparsity.pattern": "unstructured",
                        "sparsity.scope": "layer"})
    return cfg.replace(**changes)


def calibration_jobs(planned: list[PlannedCell], out: Path, retry_failed: bool = False,
                     also: tuple[Path, ...] = ()) -> dict[str, tuple[TrainConfig, list[tuple[str, str]]]]:
    """The calibrations a plan needs: {calibration key: (config to run, [(cell timing key, phase), ...])}.

    Only the phases left of cells that will run that no earlier run measured (under `out` or the
    `also` folders; `bench.estimate.phase_match`); one run per distinct configuration and phase,
    shared by every cell that needs it.
    """
    runs = scan_runs(out, *also)
    fp = machine_fingerprint()
    jobs: dict[str, tuple[TrainConfig, list[tuple[str, str]]]] = {}
    for p in planned:
        state, done = cell_state(p, out, retry_failed)
        if state != "to run":
            continue
        device, sizes = resolve_device(p.config.device), cell_sizes(p.config)
        key = timing_key(p.config, device, sizes)
        for phase, n in phase_split(p.config, done).items():
            if n == 0 or phase_match(runs, p, fp, phase) is not None:  # measured already (bench.estimate)
                continue
            cal = calibration_config(p.config, phase)
            cal_key = timing_key(cal, device, cell_sizes(cal))
            jobs.setdefault(cal_key, (cal, []))[1].append((key, phase))
    return jobs


def read_calibration(folder: Path, wall_s: float) -> Calibration:
    """The timed (second) epoch of a calibration run in `folder`, which took `wall_s` in all."""
    rows = read_jsonl(folder / "epochs.jsonl")
    timed = [r for r in rows if not r.get("warmup")] or rows[1:]
    if not timed:
        return Calibration(error=f"no timed epoch in {folder}")
    r = timed[-1]
    steps, train = int(r.get("steps") or CAL_STEPS), float(r.get("time_s") or 0.0)
    p50 = r.get("step_time_ms_p50")
    step = float(p50) / 1000.0 if isinstance(p50, int | float) else train / max(1, steps)
    n_val = int(read_json(folder / "config.json")["data"]["n_val"])
    load = (read_summary(folder) or {}).get("data_load_s")
    wall = train + float(r.get("val_time_s") or 0.0)
    # every epoch at the timed one's time is taken out, so the warm-up excess stays in; its own data does not
    overhead = wall_s - len(rows) * wall - (load if isinstance(load, int | float) else 0.0)
    return Calibration(steps=steps, train_s=train, step_s=step, val_s=wall - train, n_val=n_val,
                       overhead_s=max(0.0, overhead))


def calibrate(
    planned: list[PlannedCell],
    out: Path,
    retry_failed: bool = False,
    command: Sequence[str] = TRAIN_COMMAND,
    console: Console | None = None,
    timeout_s: float = CALIBRATION_TIMEOUT_S,
    estimate_from: Sequence[Path] = (),
) -> dict[tuple[str, str], Calibration]:
    """`--calibrate`: time the configurations no earlier run (under `out`, `estimate_from`) measured.

    One `bench train` per distinct configuration and phase (`calibration_jobs`), two epochs of
    `CAL_STEPS` steps on synthetic slices of the cell's side, in a temporary folder removed
    afterwards (the slices stay in the data cache). Returns {(cell timing key, phase): Calibration};
    a failed one carries its error.
    """
    console = console or Console()
    jobs = calibration_jobs(planned, out, retry_failed, tuple(estimate_from))
    results: dict[tuple[str, str], Calibration] = {}
    if jobs:
        console.print(f"calibrating {len(jobs)} configuration(s): 2 epochs of {CAL_STEPS} steps each "
                      "(one warm-up, one timed)", markup=False, highlight=False)
    with tempfile.TemporaryDirectory(prefix="bench-calibrate-") as tmp:
        for i, (cfg, users) in enumerate(jobs.values(), start=1):
            d = Path(tmp) / f"cal{i}"
            (d / "run").mkdir(parents=True)
            write_json(d / "config.json", cfg.to_dict())
            argv = [*command, "--config", str(d / "config.json"), "--out", str(d / "run")]
            t0 = time.monotonic()
            with open(d / "train.log", "w") as log:
                try:  # run() kills the child on any exception, Ctrl-C included
                    rc: int | None = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, timeout=timeout_s).returncode
                except subprocess.TimeoutExpired:
                    rc = None
            if rc == 0:
                c = read_calibration(d / "run", time.monotonic() - t0)
            else:
                line = error_line(log_tail(d / "train.log"))
                why = f"took over {timeout_s:g} s" if rc is None else exit_text(rc)
                c = Calibration(error=why + (f": {line}" if line else ""))
            results.update(dict.fromkeys(users, c))
            what = f"{toggles_slug(cfg)}, {cfg.data.image_size} px, batch {cfg.batch_size}"
            done = (f"{c.step_s * 1e3:.1f} ms per step, start-up {format_duration(c.overhead_s)}" if c.error is None
                    else f"calibration failed ({c.error})")
            console.print(f"  [{i}/{len(jobs)}] {what}: {done}", markup=False, highlight=False)
    return results
