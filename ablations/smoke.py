"""Smoke: the full factorial on tiny synthetic data, minutes on a 2-core CPU (what CI runs).

On a machine without CUDA the cuda-graph cells are kept and recorded as skipped
with the reason (decided at run time by `check_runnable`). The device is 'auto',
so on a GPU machine the same grid exercises the CUDA paths too. 'amp' is
amp-bf16 here because amp-fp16 needs CUDA.
"""

from __future__ import annotations

from ablations.full import GRAPHS, LOADERS, SPARSITIES, factorial
from bench.grids import Cell
from ddnet.config import DataConfig, ModelConfig, TrainConfig

NAME = "smoke"
DESCRIPTION = "Tiny-data factorial {fp32, amp-bf16} x loader x graphs x sparsity (64 px, 4 epochs: 2 dense + 2 sparse, tiny net) for CI."


def defaults() -> TrainConfig:
    """Tiny synthetic data, a tiny net, 4 epochs (2 dense + 2 sparse for the sparse cells: each phase then has an epoch past warm-up to time)."""
    return TrainConfig(
        model=ModelConfig(base_width=4, growth=4, bottleneck=8),
        data=DataConfig(source="synthetic", image_size=64, n_train=16, n_val=4, synth_mode="fast"),
        epochs=4,
        batch_size=4,
        # not the paper's 1e-4: this is CI plumbing, and a 4-wide net needs large steps to reach a
        # non-zero validation MS-SSIM within 8 steps (measured: 0 % at 1e-4..3e-3, ~57 % at 1e-2),
        # so that the smoke report has quality and time-to-quality figures to show
        lr=1e-2,
        num_workers=0,
        device="auto",
    )


def cells(base: TrainConfig) -> list[Cell]:
    """2 x 2 x 2 x 4 = 32 cells."""
    return factorial(base, precisions=("fp32", "amp-bf16"), loaders=LOADERS, graphs=GRAPHS, sparsities=SPARSITIES)
