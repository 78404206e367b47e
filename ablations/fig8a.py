"""Fig. 8(a): each architecture-aware optimization alone, for the dense and each sparse model.

The paper's regime (`bench.grids.paper_base`): 5120 + 784 slices of 512 px, batch 32 (160 steps per
epoch, so an epoch times training rather than start-up), 50 epochs.
"""

from __future__ import annotations

from bench.grids import SPARSE_KINDS, Cell, dense_model, hybrid_model, model_label, slug, standard_factors
from ddnet.config import TrainConfig

NAME = "fig8a"
DESCRIPTION = "Fig. 8(a): baseline, MP (amp-fp16), DoLL (device loader), GCO (cuda-graph) alone; dense + 3 sparse models."

# variant -> the toggles it changes from the fp32 / host loader / eager baseline
VARIANTS: dict[str, dict[str, str]] = {
    "baseline": {},
    "MP": {"precision": "amp-fp16"},
    "DoLL": {"loader": "device"},
    "GCO": {"graphs": "cuda-graph"},
}


def models(base: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """The dense model and each sparse model on the hybrid schedule, with a short slug each."""
    out = [("dense", dense_model(base))]
    for kind in SPARSE_KINDS:
        cfg = hybrid_model(base, kind)
        out.append((slug(kind, f"hybrid{cfg.sparsity.dense_epochs}"), cfg))
    return out


def variant_cells(base: TrainConfig, variants: dict[str, dict[str, str]]) -> list[Cell]:
    """Cross models x variants; shared with fig8b."""
    base = base.replace(precision="fp32", loader="host", graphs="off")
    out = []
    for model_slug, model_cfg in models(base):
        for variant, changes in variants.items():
            cfg = model_cfg.replace(**changes)
            factors = {**standard_factors(cfg), "variant": variant}
            out.append(Cell(slug(model_slug, variant), f"{model_label(cfg)}, {variant}", factors, cfg))
    return out


def cells(base: TrainConfig) -> list[Cell]:
    """4 models x {baseline, MP, DoLL, GCO}."""
    return variant_cells(base, VARIANTS)
