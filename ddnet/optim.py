"""The architecture-aware optimizations, one function each, applied once at build time.

- `setup_precision`: TF32/fp32 flags, the autocast context and the GradScaler.
- `stage_on_device` / `DeviceLoader`: DoLL, the whole dataset staged on the device once.
- `HostLoader`: the torch DataLoader baseline.
- `build_step`: the train step, eager, torch.compile'd, or captured as one CUDA graph.

The step returned by `build_step` never tests a toggle: every decision is made
here, once, and the hot loop just calls `step(lq, hq)`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ddnet.config import TrainConfig

# ----------------------------------------------------------------- precision


@dataclass
class PrecisionSetup:
    """What a precision toggle decides: autocast dtype (or None), a GradScaler, and the flags set."""

    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    flags: dict[str, Any] = field(default_factory=dict)

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The forward pass's context: autocast for the AMP modes, a no-op otherwise."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # cache_enabled=False: the CUDA-graph docs require it for capture (the cast cache would
        # hold tensors from outside the graph's pool); DDNet uses each weight once per forward,
        # so eager runs lose nothing by it either
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype, cache_enabled=False)


def _set_fp32_precision(mode: str) -> dict[str, Any]:
    """Set how fp32 matmuls and convolutions run: 'ieee' (true fp32) or 'tf32'.

    cuDNN lets convolutions use TF32 by default, so fp32 must switch it off
    explicitly. Only one of PyTorch's two APIs is used: the `fp32_precision`
    settings where they exist (mixing them with the legacy `allow_tf32` flags
    raises in recent PyTorch), the legacy flags on older versions.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = mode
        conv.fp32_precision = mode
        return {
            "tf32_api": "fp32_precision",
            "cuda.matmul.fp32_precision": torch.backends.cuda.matmul.fp32_precision,
            "cudnn.conv.fp32_precision": conv.fp32_precision,
        }
    allow = mode == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    return {
        "tf32_api": "allow_tf32",
        "cuda.matmul.allow_tf32": allow,
        "cudnn.allow_tf32": allow,
    }


def setup_precision(cfg: TrainConfig, device: torch.device) -> PrecisionSetup:
    """Apply the precision toggle process-wide and return what the step needs.

    fp32: TF32 off for matmuls and convs. tf32: TF32 on. amp-fp16: autocast to
    fp16 with a GradScaler. amp-bf16: autocast to bf16, no scaler (bf16 has
    fp32's exponent range). In the AMP modes the ops left in fp32 (the loss,
    MS-SSIM) run in true fp32, so TF32 does not confound the comparison.
    """
    flags = _set_fp32_precision("tf32" if cfg.precision == "tf32" else "ieee")
    dtype = {"amp-fp16": torch.float16, "amp-bf16": torch.bfloat16}.get(cfg.precision)
    # note: a disabled GradScaler is a no-op: scale() returns the loss, step() just steps
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "amp-fp16")
    flags.update(
        precision=cfg.precision,
        autocast_dtype=str(dtype) if dtype else None,
        grad_scaler=scaler.is_enabled(),
        cudnn_benchmark=torch.backends.cudnn.benchmark,
    )
    return PrecisionSetup(dtype, scaler, flags)


# ----------------------------------------------------------------- loaders


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The shuffled sample order of one epoch, drawn from a generator seeded by (seed, epoch).

    Drawn on `device` (for DoLL, no host round trip). CPU and CUDA generators
    give different permutations for the same seed; on one device type the
    order is a pure function of (seed, epoch), which makes resume exact.
    """
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g, device=device)


def shard_batches(perm: torch.Tensor, batch_size: int, rank: int, world: int) -> list[torch.Tensor]:
    """Cut a permutation into global batches (last partial one dropped) and keep this rank's share.

    Global batch k is perm[k*B:(k+1)*B]; rank r takes its r-th contiguous slice
    of B/world samples, so ranks see disjoint shards of the same shuffled order.
    Slicing is a view: no host sync, no copy.
    """
    per_rank = batch_size // world
    steps = perm.numel() // batch_size
    return [perm[k * batch_size + rank * per_rank : k * batch_size + (rank + 1) * per_rank] for k in range(steps)]


class DeviceLoader:
    """DoLL: the whole dataset lives on the training device; batches are gathered there by index.

    Staging happens once (in `stage_on_device`); each epoch draws its
    permutation on the device and `index_select`s batches: no per-step
    host-to-device copy and no per-step host sync.
    """

    def __init__(self, lq: torch.Tensor, hq: torch.Tensor, cfg: TrainConfig, rank: int = 0, world: int = 1):
        self.lq, self.hq = lq, hq  # (N, 1, H, W) on the device
        self.cfg, self.rank, self.world = cfg, rank, world

    def __len__(self) -> int:
        return self.lq.shape[0] // self.cfg.batch_size

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = epoch_permutation(self.lq.shape[0], self.cfg.seed, epoch, self.lq.device)
        for idx in shard_batches(perm, self.cfg.batch_size, self.rank, self.world):
            yield self.lq.index_select(0, idx), self.hq.index_select(0, idx)

    def indices(self, epoch: int) -> list[int]:
        """The sample indices this rank sees in `epoch` (for tests and records; syncs)."""
        perm = epoch_permutation(self.lq.shape[0], self.cfg.seed, epoch, self.lq.device)
        return torch.cat(shard_batches(perm, self.cfg.batch_size, self.rank, self.world)).tolist()


class _EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's index batches of one epoch: the same order DoLL uses on a CPU.

    It plays the role of a DistributedSampler(shuffle=True, drop_last=True):
    every rank shares one seeded permutation and takes a disjoint shard. Using
    the very same rule as DoLL makes the host-vs-device comparison a pure
    data-movement comparison (identical batches on a CPU).
    """

    def __init__(self, n: int, cfg: TrainConfig, rank: int, world: int) -> None:
        self.n, self.cfg, self.rank, self.world = n, cfg, rank, world
        self.epoch = 0

    def __iter__(self) -> Iterator[list[int]]:
        perm = epoch_permutation(self.n, self.cfg.seed, self.epoch, torch.device("cpu"))
        for idx in shard_batches(perm, self.cfg.batch_size, self.rank, self.world):
            yield idx.tolist()

    def __len__(self) -> int:
        return self.n // self.cfg.batch_size


class HostLoader:
    """The baseline: a torch DataLoader with workers and pinned memory; batches copied to the device per step."""

    def __init__(self, dataset: torch.utils.data.Dataset, cfg: TrainConfig, device: torch.device,
                 rank: int = 0, world: int = 1) -> None:
        self.device = device
        self.channels_last = cfg.channels_last
        self.sampler = _EpochBatchSampler(len(dataset), cfg, rank, world)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.epoch = epoch
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for lq, hq, _ in self.loader:
            # non_blocking only overlaps when the source is pinned (CUDA); harmless on CPU
            yield (lq.to(self.device, non_blocking=True, memory_format=fmt),
                   hq.to(self.device, non_blocking=True, memory_format=fmt))

    def indices(self, epoch: int) -> list[int]:
        self.sampler.epoch = epoch
        return [i for batch in self.sampler for i in batch]


def stage_on_device(lq: torch.Tensor | None, hq: torch.Tensor | None, device: torch.device,
                    channels_last: bool, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Stage the whole training set on `device` once; under DDP rank 0 broadcasts it to the others.

    Rank 0 holds the tensors read from disk; other ranks pass None and receive
    them over the process group (NCCL on GPUs, gloo on CPUs), so only rank 0
    ever touches the files. Returns the staged tensors and a record of the
    staging time and bytes (kept apart from epoch time).
    """
    from ddnet.errors import UserError

    t0 = time.perf_counter()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if world > 1:
        import torch.distributed as dist

        shape = torch.zeros(4, dtype=torch.int64, device=device)
        if rank == 0:
            shape.copy_(torch.tensor(lq.shape, dtype=torch.int64))
        dist.broadcast(shape, src=0)
        dims = [int(s) for s in shape.tolist()]
        if rank == 0:
            lq_d, hq_d = lq.to(device).contiguous(), hq.to(device).contiguous()
        else:
            lq_d = torch.empty(dims, dtype=torch.float32, device=device)
            hq_d = torch.empty(dims, dtype=torch.float32, device=device)
        dist.broadcast(lq_d, src=0)
        dist.broadcast(hq_d, src=0)
    else:
        need = lq.numel() * lq.element_size() * 2
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            if need > 0.8 * free:
                raise UserError(
                    f"DoLL needs {need / 2**30:.2f} GiB to stage the training set but only {free / 2**30:.2f} GiB "
                    f"of {total / 2**30:.2f} GiB is free on {device}; use --loader host or fewer/smaller slices."
                )
        lq_d, hq_d = lq.to(device), hq.to(device)
    lq_d = lq_d.contiguous(memory_format=fmt)
    hq_d = hq_d.contiguous(memory_format=fmt)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    nbytes = lq_d.numel() * lq_d.element_size() + hq_d.numel() * hq_d.element_size()
    return lq_d, hq_d, {"staging_time_s": time.perf_counter() - t0, "staging_bytes": nbytes}


# ----------------------------------------------------------------- train step

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepParts:
    """Everything a train step touches; `post_step` re-applies sparsity masks (or does nothing)."""

    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    precision: PrecisionSetup
    device: torch.device
    post_step: Callable[[], None]


def eager_step(parts: StepParts, forward: nn.Module | None = None) -> StepFn:
    """One optimizer step, eagerly (or through a compiled `forward`). Returns the detached loss, no sync."""
    fwd = parts.model if forward is None else forward
    opt, scaler, loss_fn, post = parts.optimizer, parts.precision.scaler, parts.loss_fn, parts.post_step
    autocast = parts.precision.autocast
    dev = parts.device.type

    def step(lq: torch.Tensor, hq: torch.Tensor) -> torch.Tensor:
        with autocast(dev):
            out = fwd(lq)  # (B, 1, H, W)
        loss = loss_fn(out, hq)  # fp32, outside autocast
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        post()
        return loss.detach()

    return step


class GraphedStep:
    """The whole train step captured once with torch.cuda.graph and replayed.

    Static input buffers are filled with `copy_`; warm-up runs on a side
    stream (as the CUDA-graph docs require) and its effect on weights, BN
    statistics and optimizer state is undone before training, so the
    trajectory equals the eager one. Adam runs with `capturable=True` and a
    tensor learning rate that ExponentialLR updates in place. fp32/tf32/bf16:
    forward, loss, backward, optimizer step and mask re-application are all in
    the graph. amp-fp16: forward and the scaled backward are captured; the
    GradScaler's unscale/inf-check/step/update run eagerly after each replay
    (GradScaler.step reads `found_inf` on the host, which cannot be captured).
    """

    def __init__(self, parts: StepParts, sample_lq: torch.Tensor, sample_hq: torch.Tensor,
                 warmup_steps: int = 3) -> None:
        self.parts = parts
        p = parts
        self.static_lq = torch.empty_like(sample_lq)
        self.static_hq = torch.empty_like(sample_hq)
        self.static_lq.copy_(sample_lq)
        self.static_hq.copy_(sample_hq)
        fp16 = p.precision.scaler.is_enabled()
        self.eager_tail = fp16
        snapshot = _snapshot(p.model, p.optimizer)
        scaler_state = p.precision.scaler.state_dict() if fp16 else None
        t0 = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                p.optimizer.zero_grad(set_to_none=True)
                self._body(capture_tail=not fp16)
                if fp16:
                    self._tail()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # grads to None before capture: backward then allocates .grad from the graph's private
        # pool and every replay overwrites (not accumulates) them, as the CUDA-graph docs prescribe
        p.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.static_loss = self._body(capture_tail=not fp16)
        torch.cuda.synchronize()
        _restore(p.model, p.optimizer, snapshot)
        if fp16:
            p.precision.scaler.load_state_dict(scaler_state)  # warm-up moved the scale; undo it
        self.capture_time_s = time.perf_counter() - t0

    def _body(self, capture_tail: bool) -> torch.Tensor:
        p = self.parts
        with p.precision.autocast("cuda"):
            out = p.model(self.static_lq)
        loss = p.loss_fn(out, self.static_hq)
        p.precision.scaler.scale(loss).backward()
        if capture_tail:
            p.optimizer.step()
            p.post_step()
        return loss.detach()

    def _tail(self) -> None:
        p = self.parts
        p.precision.scaler.step(p.optimizer)
        p.precision.scaler.update()
        p.post_step()

    def __call__(self, lq: torch.Tensor, hq: torch.Tensor) -> torch.Tensor:
        self.static_lq.copy_(lq)
        self.static_hq.copy_(hq)
        self.graph.replay()
        if self.eager_tail:
            self._tail()
        return self.static_loss.clone()


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Copies of weights, buffers and optimizer state, to undo capture warm-up."""
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "opt": {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                for p, s in optimizer.state.items()},
    }


@torch.no_grad()
def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, snap: dict) -> None:
    """Copy a snapshot back in place (the graph captured these very tensors' addresses)."""
    for k, v in model.state_dict().items():
        v.copy_(snap["model"][k])
    for p, state in optimizer.state.items():
        old = snap["opt"].get(id(p))
        for k, v in state.items():
            if torch.is_tensor(v):
                if old is not None and k in old:
                    v.copy_(old[k])
                else:
                    v.zero_()  # state created by warm-up: a fresh Adam state is all zeros (step 0)


def build_step(cfg: TrainConfig, parts: StepParts, sample: tuple[torch.Tensor, torch.Tensor]) -> tuple[StepFn, dict]:
    """The train step for `cfg.graphs`, and a record of what building it cost (capture/compile time)."""
    if cfg.graphs == "cuda-graph":
        g = GraphedStep(parts, *sample)
        return g, {"capture_time_s": g.capture_time_s}
    if cfg.graphs == "compile":
        # compilation happens lazily on the first call and is counted in the first epoch
        return eager_step(parts, torch.compile(parts.model)), {"capture_time_s": 0.0}
    return eager_step(parts), {"capture_time_s": 0.0}


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam(lr). Under CUDA graphs: capturable, with a device tensor lr the scheduler can still change."""
    if cfg.graphs == "cuda-graph":
        return torch.optim.Adam(model.parameters(), lr=torch.tensor(cfg.lr, device=device), capturable=True)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)
