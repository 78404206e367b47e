"""Fig. 8(b): combinations of the architecture-aware optimizations, for the dense and each sparse model.

The paper's regime, as fig8a (`bench.grids.paper_base`: 5120 + 784 slices of 512 px, batch 32, 50 epochs).
"""

from __future__ import annotations

from ablations.fig8a import variant_cells
from bench.grids import Cell
from ddnet.config import TrainConfig

NAME = "fig8b"
DESCRIPTION = "Fig. 8(b): MP+DoLL, MP+GCO, DoLL+GCO, MP+DoLL+GCO; dense + 3 sparse models (baselines in fig8a)."

VARIANTS: dict[str, dict[str, str]] = {
    "MP+DoLL": {"precision": "amp-fp16", "loader": "device"},
    "MP+GCO": {"precision": "amp-fp16", "graphs": "cuda-graph"},
    "DoLL+GCO": {"loader": "device", "graphs": "cuda-graph"},
    "MP+DoLL+GCO": {"precision": "amp-fp16", "loader": "device", "graphs": "cuda-graph"},
}


def cells(base: TrainConfig) -> list[Cell]:
    """4 models x 4 combinations."""
    return variant_cells(base, VARIANTS)
