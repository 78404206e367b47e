"""What the trainer needs from whoever runs it: instruments and a sink for its records.

`ddnet` never imports the harness. The harness (`bench train`) builds the
collectors and a run-folder sink and hands them to `ddnet.trainer.train`, as
optimum-benchmark's training scenario hands its trackers to the backend. These
protocols are all the trainer knows of them; any object with these methods
will do (tests use the harness's own, `bench.training`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class StepTimer(Protocol):
    """Times epochs and steps (the harness's `TimeCollector`)."""

    def epoch_begin(self, epoch: int) -> None:
        """Sync the device and start the epoch clock."""

    def batch_ready(self) -> None:
        """A batch is in hand: the data wait is over, the step starts."""

    def step_end(self) -> None:
        """The optimizer step was issued (no host sync)."""

    def epoch_end(self) -> dict[str, Any]:
        """Sync once; the epoch's flat timing fields (time_s, steps, warmup, ...)."""

    def mark_warmup_next(self) -> None:
        """Mark the next epoch as warm-up (e.g. it recompiles)."""


class MemoryTracker(Protocol):
    """Peak memory per epoch and per run (the harness's `MemoryCollector`); a context manager."""

    def __enter__(self) -> MemoryTracker: ...

    def __exit__(self, *exc: object) -> None: ...

    def epoch_begin(self) -> None:
        """Start the epoch's peaks."""

    def epoch_end(self) -> dict[str, Any]:
        """The epoch's flat memory fields."""

    def summary(self) -> dict[str, Any]:
        """Whole-run peaks."""

    def fold_run_peak(self) -> None:
        """Keep the run peak so far (before something resets the allocator's statistics)."""

    def note_graph_peak(self, peak_allocated_bytes: int) -> None:
        """The allocator peak of a CUDA-graph capture (its activations live in the graph's pool)."""


CopyProfiler = Callable[[Callable[[int], None], int, torch.device], dict[str, Any]]
"""profile(run_steps, n_steps, device) -> flat copy totals: the dedicated data-movement window."""


@dataclass
class Instruments:
    """The measuring devices of one process's run, built by the harness for the chosen device."""

    timer: StepTimer
    memory: MemoryTracker
    profile_copies: CopyProfiler


InstrumentsFactory = Callable[[torch.device, Any, bool], Instruments]
"""make(device, cfg, main) -> Instruments: called once the run knows its device; `main` is rank 0."""


class RunSink(Protocol):
    """Where a run's records go (the harness's run folder). Only rank 0 calls it."""

    def open(self, config: dict[str, Any], resume: bool) -> None:
        """Refuse (UserError, naming the fix) a destination that cannot take this run; claim it."""

    def start(self, config: dict[str, Any], env: dict[str, Any]) -> None:
        """The run is built: record its config, its environment (`env`: the trainer's flags), 'running'."""

    def epochs(self) -> list[dict[str, Any]]:
        """Epoch rows recorded so far (for a resume)."""

    def keep_epochs(self, rows: list[dict[str, Any]]) -> None:
        """Replace the recorded epoch rows with `rows` (a resume drops rows past its checkpoint)."""

    def epoch(self, row: dict[str, Any]) -> None:
        """One finished epoch's row."""

    def checkpointed(self, epoch: int) -> None:
        """ckpt.pt holds epoch `epoch` (0: none yet), saved or restored: what a resume restarts from."""

    def alive(self) -> None:
        """The run makes progress (called at every training step: it must be cheap, e.g. act every few seconds)."""

    def copies(self, record: dict[str, Any]) -> None:
        """The profiled data-movement window's totals."""

    def finish(self, summary: dict[str, Any]) -> None:
        """The run ended well: its summary."""

    def fail(self, error: str, traceback: str) -> None:
        """The run failed while training: record why."""

    def interrupt(self, why: str) -> None:
        """The run stopped for a cause outside it (a replica lost): record why, leaving it resumable."""
