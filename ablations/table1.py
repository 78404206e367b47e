"""Table 1: dense vs 50% random sparse DDNet, pruned before the first epoch, batch 1.

The paper's regime (`bench.grids.paper_base`: 5120 training and 784 validation slices of 512 px,
50 epochs) at the batch of 1 the paper used for this table: 5120 steps per epoch, 256,000 images
per cell. `--batch-size` replaces the batch 1; `--epochs`, `--n-train`, `--image-size` shorten a run.
"""

from __future__ import annotations

from bench.grids import Cell, dense_model, hybrid_model, model_label, standard_factors
from ddnet.config import TrainConfig

NAME = "table1"
DESCRIPTION = "Table 1: dense vs 50% random sparsity from the first epoch (dense_epochs 0), batch 1."


def cells(base: TrainConfig) -> list[Cell]:
    """The dense model and the random-sparse model pruned at epoch 0, both at the paper's batch size 1."""
    base = base.replace(batch_size=1)
    dense = dense_model(base)
    sparse = hybrid_model(base, "random", dense_epochs=0).replace(**{"sparsity.amount": 0.5})
    return [
        Cell("dense", model_label(dense), standard_factors(dense), dense),
        Cell("random-sparse", model_label(sparse), standard_factors(sparse), sparse),
    ]
