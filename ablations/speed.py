"""Speed: each fast-path part alone and all together, dense and structured-sparse hybrid, 512 px.

Beyond the paper: cuDNN autotuning, channels_last, fused Adam, torch.compile
(the model's forward, the whole step, and compile's own CUDA graphs), our CUDA
graph around a compiled model, bf16, DoLL. The baseline is the paper-faithful
fp32 / host loader / eager cell; every ratio in the report's speed table is
against it, measured in the same grid (same machine, same call). Sizes: 256 +
32 slices of 512 px, batch 32, 5 epochs (4 timed), so that a GPU session can
afford it (about 10 minutes on an H200 by `gpu_quick`'s timings: four compile
cells of over a minute each); `--epochs` / `--n-train` scale it up. Under
`.ci/gpu-check`, the slices of its data step (192 + 32) are used.
"""

from __future__ import annotations

from bench.grids import Cell, dense_model, hybrid_model, model_label, slug, standard_factors
from ddnet.config import DataConfig, TrainConfig

NAME = "speed"
DESCRIPTION = "Fast-path parts alone and together (autotune, channels_last, fused Adam, compile, graphs, bf16, DoLL)."

ALL_EAGER = {"precision": "amp-bf16", "loader": "device", "channels_last": True, "cudnn_benchmark": True,
             "optimizer_impl": "fused"}
"""Every fast-path part that composes with any graph mode."""

# cell -> what it changes from the fp32 / host loader / eager dense baseline
DENSE_VARIANTS: dict[str, dict[str, object]] = {
    "baseline": {},
    "cudnn-benchmark": {"cudnn_benchmark": True},
    "channels-last": {"channels_last": True},
    "fused-adam": {"optimizer_impl": "fused"},
    "amp-bf16": {"precision": "amp-bf16"},
    "doll": {"loader": "device"},
    "compile": {"graphs": "compile"},
    "compile-step": {"graphs": "compile", "compile_scope": "step"},
    "cuda-graph-bf16": {"graphs": "cuda-graph", "precision": "amp-bf16"},
    "all-cuda-graph": {**ALL_EAGER, "graphs": "cuda-graph"},
    "all-compile-cuda-graph": {**ALL_EAGER, "graphs": "compile-cuda-graph"},
    "all-compile-reduce-overhead": {**ALL_EAGER, "graphs": "compile", "compile_mode": "reduce-overhead"},
}
SPARSE_VARIANTS: dict[str, dict[str, object]] = {
    "baseline": {},
    "all-cuda-graph": {**ALL_EAGER, "graphs": "cuda-graph"},
}


def defaults() -> TrainConfig:
    """512 px, batch 32, 5 epochs, 256 + 32 synthetic slices, lr 1e-4 (the paper's)."""
    return TrainConfig(
        data=DataConfig(source="synthetic", image_size=512, n_train=256, n_val=32, synth_mode="fast"),
        epochs=5, batch_size=32, lr=1e-4, num_workers=4, device="auto",
    )


def cells(base: TrainConfig) -> list[Cell]:
    """12 dense cells and 2 structured-sparse hybrid ones."""
    dense = dense_model(base).replace(precision="fp32", loader="host", graphs="off")
    out = []
    for model_slug, model_cfg, variants in (("dense", dense, DENSE_VARIANTS),
                                            ("structured", hybrid_model(dense, "structured"), SPARSE_VARIANTS)):
        for name, changes in variants.items():
            cfg = model_cfg.replace(**changes)
            factors = {**standard_factors(cfg), "variant": name}
            out.append(Cell(slug(model_slug, name), f"{model_label(cfg)}, {name}", factors, cfg))
    return out
