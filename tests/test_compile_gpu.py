"""torch.compile's two GPU paths that `pytest -m gpu` leaves out: the whole step compiled (`--compile-scope step`,
the speed grid's compile-step cell) and compile's own CUDA graphs (`--compile-mode reduce-overhead` with every
fast-path part, its all-compile-reduce-overhead cell).

Marked `gpu_compile`, not `gpu`: each compiles DDNet's forward and backward (the step's Adam too) from a cold
Inductor cache, about a minute apiece on an H200 (the compile-cuda-graph test under `-m gpu` took 55 s there),
which `.ci/gpu-check`'s one 8-minute call cannot spend beside its grid. The check runs them when GPU_CHECK_STEPS
names `compiletests`; `pytest -m gpu_compile` runs them on any CUDA machine. Skipped without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from ablations.speed import ALL_EAGER, DENSE_VARIANTS
from bench.store import read_jsonl
from bench.training import train
from tests.test_optim import _gpu_cfg, _trajectory, needs_cuda


def _trains(tmp_path: Path, **changes) -> None:
    """Two whole epochs with validation through `train()`: finished, and the training loss fell."""
    summary = train(_gpu_cfg(**changes), tmp_path, progress=False)
    assert summary["status"] == "ok" and summary["epochs_completed"] == 2, summary.get("error")
    rows = read_jsonl(tmp_path / "epochs.jsonl")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"], [r["train_loss"] for r in rows]


@pytest.mark.gpu_compile
@needs_cuda
@pytest.mark.timeout(400)
def test_the_whole_compiled_step_trains_like_eager_on_a_gpu(tmp_path: Path) -> None:
    cell = DENSE_VARIANTS["compile-step"]  # the speed grid's cell: forward, loss, backward and Adam compiled
    torch._dynamo.reset()
    counters.clear()
    eager = _trajectory(_gpu_cfg(), tmp_path / "eager")
    compiled = _trajectory(_gpu_cfg(**cell), tmp_path / "step")
    # the step up to its backward, and Adam's update after that graph break, at least (3 on a CPU)
    assert counters["stats"]["unique_graphs"] >= 2
    # before any update: the same arithmetic up to Inductor's fused kernels' rounding; after it, compiled Adam's
    # updates (about lr * sign(grad)) turn that rounding into whole steps for near-zero gradients (on a CPU 3 %
    # after one step, tests/test_optim.py's CPU test of this scope)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-3)
    assert compiled == pytest.approx(eager, rel=0.15)
    assert compiled[-1] < compiled[0]
    _trains(tmp_path / "train", **cell)


@pytest.mark.gpu_compile
@needs_cuda
@pytest.mark.timeout(400)
def test_compiles_own_cuda_graphs_with_every_fast_path_part_train_like_eager(tmp_path: Path) -> None:
    cell = DENSE_VARIANTS["all-compile-reduce-overhead"]  # amp-bf16, DoLL, channels_last, autotuning, fused Adam
    assert {k: cell[k] for k in ALL_EAGER} == ALL_EAGER and cell["compile_mode"] == "reduce-overhead"
    torch._dynamo.reset()
    counters.clear()
    eager = _trajectory(_gpu_cfg(**ALL_EAGER), tmp_path / "eager")
    graphed = _trajectory(_gpu_cfg(**cell), tmp_path / "ro")
    # CUDA graph trees: the first call runs as warm-up, the second records (copying the batch, not a static
    # input, into the graph's own buffer), later calls replay. A skip (BatchNorm's buffer updates, a CPU tensor,
    # an op graphs refuse) would run the cell without graphs under a name that says it has them
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] > 0
    # bf16 before any update, up to the kernels autotuning picked (test_optim's fast-path bound)
    assert graphed[0] == pytest.approx(eager[0], rel=2e-2)
    assert graphed[-1] < graphed[0]
    _trains(tmp_path / "train", **cell)
