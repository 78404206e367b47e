"""The full factorial: precision x loader x graphs x sparsity (sparse models on the hybrid schedule).

The paper's regime (`bench.grids.paper_base`): 5120 training and 784 validation slices of 512 px
(made once and cached for every cell), batch 32 (160 steps per epoch), 50 epochs: 256,000 images
per cell. `bench run --grid full --dry-run` prints each cell's images and the grid's estimated
time; `--epochs`, `--n-train`, `--image-size` shorten a run.
"""

from __future__ import annotations

import itertools

from bench.grids import Cell, dense_model, hybrid_model, model_label, standard_factors, toggles_slug
from ddnet.config import TrainConfig

NAME = "full"
DESCRIPTION = "Factorial {fp32, amp-fp16} x {host, device} x {off, cuda-graph} x {none, random, structured, topk}."

PRECISIONS = ("fp32", "amp-fp16")
LOADERS = ("host", "device")
GRAPHS = ("off", "cuda-graph")
SPARSITIES = ("none", "random", "structured", "topk")


def factorial(
    base: TrainConfig,
    precisions: tuple[str, ...] = PRECISIONS,
    loaders: tuple[str, ...] = LOADERS,
    graphs: tuple[str, ...] = GRAPHS,
    sparsities: tuple[str, ...] = SPARSITIES,
) -> list[Cell]:
    """Every combination; sparse cells prune after epochs // 2 dense epochs. Shared with `smoke`."""
    out = []
    for kind, precision, loader, graph in itertools.product(sparsities, precisions, loaders, graphs):
        model = dense_model(base) if kind == "none" else hybrid_model(base, kind)
        cfg = model.replace(precision=precision, loader=loader, graphs=graph)
        label = f"{model_label(cfg)}; {precision}, {loader} loader, graphs {graph}"
        out.append(Cell(toggles_slug(cfg), label, standard_factors(cfg), cfg))
    return out


def cells(base: TrainConfig) -> list[Cell]:
    """2 x 2 x 2 x 4 = 32 cells."""
    return factorial(base)
