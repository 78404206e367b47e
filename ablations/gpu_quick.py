"""GPU quick check: the paper's regime (512 px, batch 32) cut to minutes, one cell per GPU path.

What `.ci/gpu-check` runs on a fresh GPU box to prove every GPU path and to
give first numbers: the dense fp32 baseline (the reference of every ratio; it
also profiles the host loader's copies), tf32, both AMP modes, DoLL (with a
copy profile: Fig. 9a), CUDA-graph capture in fp32 and with each AMP mode,
torch.compile, everything combined, and one structured-sparse hybrid cell.

Sizes: 192 training slices (6 batch-32 steps per epoch) and 5 epochs: the
first is warm-up (cuDNN autotuning, compilation), the other 4 give the
per-epoch spread the report's intervals need, and the whole check fits in 8
minutes on one H100 (an H200 took about 27 s a cell, of which about 15 s was
the process's start, data and exit: see `timeline_s` in each summary).
Order: torch.compile last, since compiling on a fresh machine (no Inductor
cache) takes over a minute: when a check runs out of time, that cell alone is
lost, never a CUDA-graph one. Data: `--data FOLDER` (the check makes it once with
`bench data synth`), else synthetic slices made per cell. lr is the paper's
1e-4: a few epochs do not reach the paper's quality, and this grid does not
claim to; it measures speed and proves that every path trains.
"""

from __future__ import annotations

from bench.grids import Cell, dense_model, hybrid_model, model_label, slug, standard_factors
from ddnet.config import DataConfig, TrainConfig

NAME = "gpu_quick"
DESCRIPTION = "GPU check at 512 px, batch 32, 5 epochs: baseline, tf32, AMP, DoLL, graphs, compile, combined, structured."

PROFILE_STEPS = 3

# cell slug -> (what it changes from the fp32 / host loader / eager dense baseline, profile steps), in run
# order: what the check's verdict needs first (the baseline, DoLL's copy profile for Fig. 9(a), every
# CUDA-graph cell), so that a check cut short by its time budget loses the plain eager variants instead
VARIANTS: dict[str, tuple[dict[str, object], int]] = {
    "baseline": ({}, PROFILE_STEPS),
    "doll": ({"loader": "device"}, PROFILE_STEPS),
    "graph-fp32": ({"graphs": "cuda-graph"}, 0),
    "graph-amp-bf16": ({"graphs": "cuda-graph", "precision": "amp-bf16"}, 0),
    "graph-amp-fp16": ({"graphs": "cuda-graph", "precision": "amp-fp16"}, 0),
    "combined-amp-bf16-doll-graph": ({"precision": "amp-bf16", "loader": "device", "graphs": "cuda-graph"}, 0),
    "amp-bf16": ({"precision": "amp-bf16"}, 0),
    "amp-fp16": ({"precision": "amp-fp16"}, 0),
    "tf32": ({"precision": "tf32"}, 0),
}
LAST = {"compile": ({"graphs": "compile"}, 0)}  # after the structured hybrid cell (see the module's docstring)


def defaults() -> TrainConfig:
    """512 px, batch 32, 5 epochs, 192 + 32 synthetic slices (or the slices of `--data`), lr 1e-4."""
    return TrainConfig(
        data=DataConfig(source="synthetic", image_size=512, n_train=192, n_val=32, synth_mode="fast"),
        epochs=5,
        batch_size=32,
        lr=1e-4,
        num_workers=4,
        device="auto",
    )


def cells(base: TrainConfig) -> list[Cell]:
    """10 dense variants and one structured-sparse hybrid (fp32, host, eager) = 11 cells, compile last."""
    dense = dense_model(base).replace(precision="fp32", loader="host", graphs="off", profile_steps=0)

    def variant(name: str, changes: dict[str, object], profile: int) -> Cell:
        cfg = dense.replace(**changes, profile_steps=profile)
        factors = {**standard_factors(cfg), "variant": name, "profile_steps": profile}
        return Cell(slug("dense", name), f"{model_label(cfg)}, {name}", factors, cfg)

    out = [variant(name, changes, profile) for name, (changes, profile) in VARIANTS.items()]
    sparse = hybrid_model(dense, "structured")
    factors = {**standard_factors(sparse), "variant": "baseline", "profile_steps": 0}
    out.append(Cell(slug("structured", f"hybrid{sparse.sparsity.dense_epochs}"), model_label(sparse), factors,
                    sparse))
    return out + [variant(name, changes, profile) for name, (changes, profile) in LAST.items()]
