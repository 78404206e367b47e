"""Time: per-epoch wall time with a device sync, raw per-step times, data wait vs compute.

Rules (DESIGN.md, "Measurement rules"): time with a device sync or CUDA
events, keep the raw per-step values, mark warm-up epochs.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch


class TimeCollector:
    """Per-epoch wall time with a device sync; per-step times; data wait vs compute.

    Call order per epoch: `epoch_begin`, then per step `batch_ready` (the batch
    is in hand: the data wait ends) and `step_end` (the optimizer step was
    issued), then `epoch_end`. `batch_ready` may be skipped (e.g. DoLL has no
    wait): the step then starts where the previous one ended.

    On a CPU the per-step times are `time.perf_counter` differences. On a GPU
    each step is bracketed by a pair of CUDA events recorded on the current
    stream and resolved only at `epoch_end` (one synchronize per epoch, none in
    the loop). There the step time is device time between the events, while the
    data wait is host time from `step_end` to the next `batch_ready`; when the
    host runs ahead of the device the two overlap, so on a GPU
    `data_wait_s + compute_s` need not add up to `time_s`. What does add up
    there is `device_gap_s`: device time from the epoch's start to its last
    step's end spent outside the steps (the loader's copies, and the device
    idle while the host waits for a batch or launches), from the same events,
    and `device_gap_first_ms`, its part before the first step: with
    `data_wait_first_ms` and `data_wait_rest_ms_max` they tell the loader's
    epoch start (its workers' first batch) from a wait inside the epoch.

    Warm-up: the first `warmup_epochs` epochs that *this collector* sees are
    marked `warmup=True`, whatever their number: a resumed run starts a fresh
    process that pays autotuning and compilation again. `mark_warmup_next`
    marks one more (the epoch after a recompile).
    """

    def __init__(self, device: torch.device, warmup_epochs: int = 1) -> None:
        self.device = torch.device(device)
        self.warmup_epochs = int(warmup_epochs)
        self._cuda = self.device.type == "cuda"
        self._epochs_seen = 0
        self._extra_warmup = 0
        self._in_epoch = False
        self.last_step_times_ms: list[float] = []
        """Raw per-step times of the last finished epoch, in milliseconds."""
        self.last_data_wait_ms: list[float] = []
        """Raw per-step host data waits of the last finished epoch, in milliseconds."""

    # Events are recorded on the stream the training step runs on.
    def _event(self) -> torch.cuda.Event:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)

    def mark_warmup_next(self) -> None:
        """Mark the next epoch warm-up too (e.g. torch.compile recompiles after the hybrid switch)."""
        self._extra_warmup += 1

    def epoch_begin(self, epoch: int) -> None:
        """Sync the device (earlier work must not leak into this epoch) and start the epoch clock."""
        self._sync()
        self._epoch = epoch
        self._epochs_seen += 1
        self._this_warmup = self._epochs_seen <= self.warmup_epochs or self._extra_warmup > 0
        self._extra_warmup = max(0, self._extra_warmup - 1)
        self._in_epoch = True
        self._waits_s: list[float] = []
        self._host_steps_s: list[float] = []
        self._event_pairs: list[tuple[Any, Any]] = []
        self._t0 = time.perf_counter()
        self._last_mark = self._t0  # host time the previous step ended
        self._step_start_host = self._t0
        self._step_start_event = self._event() if self._cuda else None
        self._epoch_start_event = self._step_start_event
        self._waited = False

    def batch_ready(self) -> None:
        """A batch is in hand: the data wait since the last step ended is over; the step starts."""
        self._check_in_epoch("batch_ready")
        now = time.perf_counter()
        self._waits_s.append(now - self._last_mark)
        self._waited = True
        self._step_start_host = now
        if self._cuda:
            self._step_start_event = self._event()

    def step_end(self) -> None:
        """The optimizer step was issued. On a GPU this only records an event (no host sync)."""
        self._check_in_epoch("step_end")
        now = time.perf_counter()
        if not self._waited:
            self._waits_s.append(0.0)
        if self._cuda:
            end = self._event()
            self._event_pairs.append((self._step_start_event, end))
            self._step_start_event = end  # the next step starts here unless batch_ready says later
        else:
            self._host_steps_s.append(now - self._step_start_host)
        self._last_mark = now
        self._step_start_host = now
        self._waited = False

    def epoch_end(self) -> dict[str, Any]:
        """Sync once and return the epoch's flat timing fields."""
        self._check_in_epoch("epoch_end")
        self._sync()  # note: the one host-device sync of the epoch
        time_s = time.perf_counter() - self._t0
        self._in_epoch = False
        gaps_ms: list[float] | None = None
        if self._cuda:
            steps_ms = [float(a.elapsed_time(b)) for a, b in self._event_pairs]
            ends = [self._epoch_start_event] + [b for _, b in self._event_pairs[:-1]]
            gaps_ms = [float(e.elapsed_time(a)) for e, (a, _) in zip(ends, self._event_pairs, strict=True)]
        else:
            steps_ms = [s * 1e3 for s in self._host_steps_s]
        self.last_step_times_ms = steps_ms
        self.last_data_wait_ms = waits = [w * 1e3 for w in self._waits_s]
        row: dict[str, Any] = {
            "time_s": time_s,
            "steps": len(steps_ms),
            "data_wait_s": float(sum(self._waits_s)),
            "data_wait_first_ms": waits[0] if waits else None,
            "data_wait_rest_ms_max": max(waits[1:]) if len(waits) > 1 else None,
            "compute_s": float(sum(steps_ms)) / 1e3,
            "device_gap_s": sum(gaps_ms) / 1e3 if gaps_ms is not None else None,
            "device_gap_first_ms": gaps_ms[0] if gaps_ms else None,
            **_spread_ms("step_time_ms", steps_ms),
            "warmup": self._this_warmup,
            "timer": "cuda-events" if self._cuda else "perf_counter",
        }
        return row

    def _check_in_epoch(self, what: str) -> None:
        if not self._in_epoch:
            raise RuntimeError(f"TimeCollector.{what}() called outside epoch_begin()/epoch_end()")


def _spread_ms(prefix: str, values_ms: list[float]) -> dict[str, float | None]:
    """p50, p90, mean and sample std of raw values (None when there are none)."""
    if not values_ms:
        return {f"{prefix}_p50": None, f"{prefix}_p90": None, f"{prefix}_mean": None, f"{prefix}_std": None}
    arr = np.asarray(values_ms, dtype=np.float64)
    return {
        f"{prefix}_p50": float(np.percentile(arr, 50)),
        f"{prefix}_p90": float(np.percentile(arr, 90)),
        f"{prefix}_mean": float(arr.mean()),
        f"{prefix}_std": float(statistics.stdev(values_ms)) if len(values_ms) > 1 else 0.0,
    }
