"""Tests of bench.collectors.timing: epoch wall time, per-step times, data wait vs compute."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.collectors import TimeCollector, timing

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _scripted_epoch(tc: TimeCollector, epoch: int, steps: int, wait_s: float, compute_s: float) -> dict:
    tc.epoch_begin(epoch)
    for _ in range(steps):
        time.sleep(wait_s)  # the "loader"
        tc.batch_ready()
        time.sleep(compute_s)  # the "step"
        tc.step_end()
    return tc.epoch_end()


def test_time_collector_cpu_scripted_epoch() -> None:
    tc = TimeCollector(CPU, warmup_epochs=1)
    r1 = _scripted_epoch(tc, 1, steps=3, wait_s=0.02, compute_s=0.03)
    assert r1["steps"] == 3
    assert r1["timer"] == "perf_counter"
    assert r1["warmup"] is True
    # sleep never returns early; the upper bounds are loose because the machine is shared.
    assert 0.09 - 1e-3 <= r1["compute_s"] < 0.09 + 0.5
    assert 0.06 - 1e-3 <= r1["data_wait_s"] < 0.06 + 0.5
    assert r1["time_s"] >= r1["data_wait_s"] + r1["compute_s"] - 1e-3
    assert r1["time_s"] < r1["data_wait_s"] + r1["compute_s"] + 0.2
    assert len(tc.last_step_times_ms) == 3 and all(t >= 29.0 for t in tc.last_step_times_ms)
    assert len(tc.last_data_wait_ms) == 3 and all(w >= 19.0 for w in tc.last_data_wait_ms)
    assert r1["step_time_ms_p50"] == pytest.approx(float(np.median(tc.last_step_times_ms)))
    assert r1["step_time_ms_p50"] <= r1["step_time_ms_p90"] <= max(tc.last_step_times_ms)
    assert r1["step_time_ms_std"] >= 0.0
    assert r1["data_wait_first_ms"] == tc.last_data_wait_ms[0] >= 19.0
    assert r1["data_wait_rest_ms_max"] == max(tc.last_data_wait_ms[1:]) >= 19.0
    assert r1["device_gap_s"] is None and r1["device_gap_first_ms"] is None  # device events only

    r2 = _scripted_epoch(tc, 2, steps=2, wait_s=0.0, compute_s=0.01)
    assert r2["warmup"] is False and r2["steps"] == 2
    assert len(tc.last_step_times_ms) == 2  # raw values belong to the last epoch only


def test_time_collector_without_batch_ready_and_misuse() -> None:
    tc = TimeCollector(CPU, warmup_epochs=0)
    tc.epoch_begin(0)
    time.sleep(0.02)
    tc.step_end()  # no batch_ready: everything since the epoch began is the step
    r = tc.epoch_end()
    assert r["warmup"] is False and r["steps"] == 1
    assert r["data_wait_s"] == 0.0 and r["compute_s"] >= 0.019
    with pytest.raises(RuntimeError, match="outside epoch_begin"):
        tc.step_end()
    empty = TimeCollector(CPU)
    empty.epoch_begin(0)
    r0 = empty.epoch_end()
    assert r0["steps"] == 0 and r0["step_time_ms_p50"] is None and r0["compute_s"] == 0.0


class _Event:
    """A stand-in for a CUDA event: the host time it was recorded, `elapsed_time` in ms as CUDA's."""

    def __init__(self, t: float) -> None:
        self.t = t

    def elapsed_time(self, other: _Event) -> float:
        return (other.t - self.t) * 1e3


def test_device_gap_is_the_device_time_between_the_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    # the CUDA path's arithmetic on a CPU: events stamped with a scripted clock (one tick per event or call)
    clock = iter(float(k) for k in range(100))
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    tc = TimeCollector(CPU, warmup_epochs=0)
    tc._cuda, tc._event, tc._sync = True, lambda: _Event(next(clock)), lambda: None
    tc.epoch_begin(1)  # t0 = 0, epoch start event at 1
    tc.batch_ready()   # now 2, step start event 3: the device waited 2 s for the first batch
    tc.step_end()      # now 4, end event 5: a 2 s step
    tc.step_end()      # no batch_ready: the next step starts at that end; now 6, end event 7
    tc.batch_ready()   # now 8, start event 9: a 2 s gap
    tc.step_end()      # now 10, end event 11
    r = tc.epoch_end()  # now 12
    assert tc.last_step_times_ms == [2000.0, 2000.0, 2000.0]
    assert r["device_gap_s"] == 2.0 + 0.0 + 2.0 and r["device_gap_first_ms"] == 2000.0
    assert r["time_s"] == 12.0 and r["data_wait_s"] == 2.0 + 0.0 + 2.0  # host: 0 -> 2, none, 6 -> 8
    assert (r["data_wait_first_ms"], r["data_wait_rest_ms_max"]) == (2000.0, 2000.0)


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_cuda
def test_time_collector_cuda_events() -> None:
    dev = torch.device("cuda")
    a = torch.randn(2048, 2048, device=dev)
    tc = TimeCollector(dev)
    tc.epoch_begin(1)
    for _ in range(3):
        time.sleep(0.01)
        tc.batch_ready()
        for _ in range(5):
            a = a @ a
            a = a / a.norm()
        tc.step_end()
    r = tc.epoch_end()
    assert r["timer"] == "cuda-events" and r["steps"] == 3
    assert all(t > 0 for t in tc.last_step_times_ms)
    assert r["data_wait_s"] >= 0.025
    assert r["time_s"] >= r["compute_s"] - 1e-3
    # the device idles through each 10 ms sleep (5 matmuls take well under 1 ms), and steps and gaps tile
    # the epoch on the device's clock
    assert r["device_gap_s"] >= 0.02 and 0 < r["device_gap_first_ms"] <= 1e3 * r["device_gap_s"]
    assert r["compute_s"] + r["device_gap_s"] <= r["time_s"] + 1e-3

