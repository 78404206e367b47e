"""Sparsity for DDNet: random, top-K (magnitude) and structured pruning, 2:4 patterns,
masks that hold through training, counted sparsity and FLOPs, and the 'auto' switch.

Three ways of realising sparsity, named honestly in `SparsifyResult.kind`:

- 'masked' (random, topk): weights are zeroed and a boolean mask is re-applied after
  every optimizer step. The dense kernels are unchanged, so the executed FLOPs are
  the same; only the *theoretical* FLOPs (what an ideal sparse kernel would do) fall.
- 'structural' (structured): whole output channels are removed from layers whose
  outputs feed no concatenation, and those layers (and their consumers) are rebuilt
  as smaller dense modules. The executed FLOPs really fall.
- 'none'.

Defects of the paper's public code avoided here (each has a test):
masks are kept and re-applied (Adam would otherwise regrow pruned weights),
magnitude pruning keeps weights in place (no scrambling), a wrapped model
(DataParallel / DDP / torch.compile) is unwrapped instead of pruning nothing,
and no precision flag (TF32) is ever touched.
"""

from ddnet.sparsity.api import SparsifyResult, sparsify_
from ddnet.sparsity.layers import CONV_TYPES, prunable_layers
from ddnet.sparsity.masks import Masks, random_prune_, topk_prune_
from ddnet.sparsity.measure import count_flops, effective_flops, measure_sparsity
from ddnet.sparsity.schedule import AutoSwitch, phase_of
from ddnet.sparsity.structured import conform_to_state_dict_, structured_prune_

__all__ = [
    "CONV_TYPES", "AutoSwitch", "Masks", "SparsifyResult", "conform_to_state_dict_", "count_flops",
    "effective_flops", "measure_sparsity", "phase_of", "prunable_layers", "random_prune_", "sparsify_",
    "structured_prune_", "topk_prune_",
]
