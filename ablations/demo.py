"""Demo: the paper's accuracy story in small, with real learning, in a few minutes on a 2-core CPU.

Dense DDNet; the same net pruned 50 % at random before training (the paper's
Table 1 setting); pruned at random after all but the last epoch, so it has one
epoch to recover (pruning's immediate cost); and the hybrid schedule (half the
epochs dense, then pruned and retrained sparse) for random, top-K and
structured sparsity (Table 2's recovery).

Settings, chosen by measurement on a 2-core CPU (README quotes the run):
64 px slices (the smallest side where both MS-SSIM scales are defined), 64
training and 16 validation slices, batch 8 (8 steps per epoch), a half-width
net (base width and growth 8, bottleneck 32: a quarter of the paper's FLOPs),
80 epochs, lr 3e-3 without decay (the paper's 1e-4 with 0.95 decay learns far
too slowly for a few hundred steps), and dose 0.01: a noisy enough input
(MS-SSIM about 93 %, PSNR about 28 dB) that a denoiser can beat it. The dense
net passes its input's MS-SSIM after about 16 epochs; PSNR stays below the
input's (it learns structure fast and absolute intensity slowly).

Measured (README): pruning a trained net costs most of its accuracy at once (the
validation MS-SSIM falls from about 96 % to 22-43 % in the epoch after the
switch, Fig. 4(a)'s curves) and the last-epoch cell ends near 40 % (the paper's
Table 1 reads 42.39 % for its random-sparse net); 40 sparse epochs recover it
to within about 0.7 pp of dense (Table 2's shape). Pruned *before* training,
the sparse net learns as well as the dense one here: the paper's Table 1 drop
for that setting does not reproduce with masks that are kept (its code dropped
them, letting Adam regrow the pruned weights).

What it cannot show: the paper's absolute numbers (real chest CT at 512 px,
50 epochs at batch 32) or any speed figure (a CPU has no tensor cores, CUDA
graphs or DoLL); use `full` or the paper grids on a GPU for those.
"""

from __future__ import annotations

from bench.grids import SPARSE_KINDS, Cell, dense_model, hybrid_model, model_label, slug, standard_factors
from ddnet.config import DataConfig, ModelConfig, TrainConfig

NAME = "demo"
DESCRIPTION = "CPU demo (minutes): dense vs pruned-from-start vs hybrid random/topk/structured, learning shown."


def defaults() -> TrainConfig:
    """64 px, 64 + 16 slices at dose 0.01, half-width net, batch 8, 80 epochs, lr 3e-3 without decay, CPU."""
    return TrainConfig(
        model=ModelConfig(base_width=8, growth=8, bottleneck=32),
        data=DataConfig(source="synthetic", image_size=64, n_train=64, n_val=16, synth_mode="fast", dose=0.01),
        epochs=80,
        batch_size=8,
        lr=3e-3,
        gamma=1.0,
        num_workers=0,
        device="cpu",
    )


def cells(base: TrainConfig) -> list[Cell]:
    """Dense, random pruned before training, random pruned for the last epoch, and each sparsity type on
    the hybrid schedule: 6 cells."""
    dense = dense_model(base)
    pruned = hybrid_model(base, "random", dense_epochs=0)
    late = hybrid_model(base, "random", dense_epochs=base.epochs - 1)
    out = [Cell("dense", model_label(dense), standard_factors(dense), dense),
           Cell("random-from-start", model_label(pruned), standard_factors(pruned), pruned),
           Cell("random-last-epoch", model_label(late), standard_factors(late), late)]
    for kind in SPARSE_KINDS:
        cfg = hybrid_model(base, kind)
        out.append(Cell(slug(kind, f"hybrid{cfg.sparsity.dense_epochs}"), model_label(cfg), standard_factors(cfg), cfg))
    return out
