"""Table 2: speedup and accuracy of each sparsity type on the hybrid schedule (25 dense + 25 sparse).

The paper's regime (`bench.grids.paper_base`): 5120 + 784 slices of 512 px, batch 32 (160 steps per
epoch), 50 epochs; `--epochs`, `--n-train`, `--image-size` shorten a run.
"""

from __future__ import annotations

from bench.grids import SPARSE_KINDS, Cell, dense_model, hybrid_model, model_label, slug, standard_factors
from ddnet.config import TrainConfig

NAME = "table2"
DESCRIPTION = "Table 2: dense baseline and random/structured/topk sparsity, hybrid epochs//2 dense + rest sparse."


def cells(base: TrainConfig) -> list[Cell]:
    """Dense baseline plus one hybrid-schedule cell per sparsity type."""
    dense = dense_model(base)
    out = [Cell("dense", model_label(dense), standard_factors(dense), dense)]
    for kind in SPARSE_KINDS:
        cfg = hybrid_model(base, kind)
        out.append(Cell(slug(kind, f"hybrid{cfg.sparsity.dense_epochs}"), model_label(cfg), standard_factors(cfg), cfg))
    return out
