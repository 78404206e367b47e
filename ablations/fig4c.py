"""Fig. 4(c): final MS-SSIM against the hybrid split (dense epochs, then random-sparse epochs).

The paper's regime (`bench.grids.paper_base`): 5120 + 784 slices of 512 px, batch 32 (160 steps per
epoch), 50 epochs; the splits scale with `--epochs`.
"""

from __future__ import annotations

from bench.grids import Cell, dense_model, hybrid_model, model_label, slug, standard_factors
from ddnet.config import TrainConfig

NAME = "fig4c"
DESCRIPTION = "Fig. 4(c): random sparsity with dense_epochs 0, 5, ..., 50 of 50 (scaled to --epochs); all-dense is the baseline."


def splits(epochs: int) -> list[int]:
    """Dense-epoch counts to try: 0..epochs in steps of max(1, epochs // 10), always ending at `epochs`."""
    step = max(1, epochs // 10)
    out = list(range(0, epochs + 1, step))
    if out[-1] != epochs:
        out.append(epochs)
    return out


def cells(base: TrainConfig) -> list[Cell]:
    """One cell per split; the split equal to the epoch count trains dense only (the baseline line)."""
    out = []
    for de in splits(base.epochs):
        if de == base.epochs:
            cfg = dense_model(base)
            out.append(Cell(slug("dense", f"d{de}"), f"{model_label(cfg)} (baseline)", standard_factors(cfg), cfg))
        else:
            cfg = hybrid_model(base, "random", dense_epochs=de)
            name = slug("random", f"d{de}", f"s{base.epochs - de}")
            out.append(Cell(name, model_label(cfg), standard_factors(cfg), cfg))
    return out
