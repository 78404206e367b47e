"""Data loaders: DoLL (the whole set staged on the device once) and the host DataLoader baseline.

Both draw the same seeded permutation per epoch (`epoch_permutation`) and cut it
into the same global batches (`shard_batches`), so on a CPU they feed identical
batches and the host-vs-device comparison is a pure data-movement comparison.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ddnet.config import TrainConfig
from ddnet.data import SliceDataset, SliceSet, load_split
from ddnet.errors import UserError
from ddnet.loss import choose_msssim
from ddnet.replicas import Dist, agree


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
        self._out: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.lq.shape[0] // self.cfg.batch_size

    def bind(self, buffers: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
        """Gather every batch straight into `buffers` (a graphed step's static inputs); None unbinds.

        Each batch then *is* those buffers, overwritten by the next gather: fine for a
        consumer that uses a batch before asking for the next one on the same stream.
        """
        self._out = buffers
        return True

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = epoch_permutation(self.lq.shape[0], self.cfg.seed, epoch, self.lq.device)
        gather = self._gather_new if self._out is None else self._gather_into
        for idx in shard_batches(perm, self.cfg.batch_size, self.rank, self.world):
            yield gather(idx)

    def _gather_new(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lq.index_select(0, idx), self.hq.index_select(0, idx)

    def _gather_into(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_lq, out_hq = self._out
        torch.index_select(self.lq, 0, idx, out=out_lq)
        torch.index_select(self.hq, 0, idx, out=out_hq)
        return out_lq, out_hq

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

    def bind(self, buffers: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
        """Host batches arrive in fresh pinned tensors: the step copies them itself (returns False)."""
        return False

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
    """Stage the whole training set on `device` once; under DDP global rank 0 broadcasts it to every rank.

    Global rank 0 holds the tensors read from disk; every other rank, on any node, passes None
    and receives them over the process group (NCCL over the network between GPU nodes, gloo on
    CPUs), so only global rank 0 ever touches the files. One reader for the whole job rather than
    one per node: no per-node subgroup, and the other nodes need neither the files nor a cache;
    the price is 2 x N x H x W x 4 bytes sent to each rank, counted in `staging_time_s`.
    Returns the staged tensors and a record of the staging time and bytes (kept apart from epoch time).
    """
    t0 = time.perf_counter()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if world > 1:
        shape = torch.zeros(4, dtype=torch.int64, device=device)
        if rank == 0:
            shape.copy_(torch.tensor(lq.shape, dtype=torch.int64))
        dist.broadcast(shape, src=0)
        dims = [int(s) for s in shape.tolist()]
        if device.type == "cuda":
            # the tightest GPU decides, on every rank alike: all refuse together or none does
            free = torch.tensor(torch.cuda.mem_get_info(device)[0], dtype=torch.int64, device=device)
            dist.all_reduce(free, op=dist.ReduceOp.MIN)
            _check_fits(2 * math.prod(dims) * 4, int(free.item()), device, "on the fullest rank's GPU")
        if rank == 0:
            lq_d, hq_d = lq.to(device).contiguous(), hq.to(device).contiguous()
        else:
            lq_d = torch.empty(dims, dtype=torch.float32, device=device)
            hq_d = torch.empty(dims, dtype=torch.float32, device=device)
        dist.broadcast(lq_d, src=0)
        dist.broadcast(hq_d, src=0)
    else:
        if device.type == "cuda":
            _check_fits(lq.numel() * lq.element_size() * 2, torch.cuda.mem_get_info(device)[0], device, "")
        lq_d, hq_d = lq.to(device), hq.to(device)
    lq_d = lq_d.contiguous(memory_format=fmt)
    hq_d = hq_d.contiguous(memory_format=fmt)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    nbytes = lq_d.numel() * lq_d.element_size() + hq_d.numel() * hq_d.element_size()
    return lq_d, hq_d, {"staging_time_s": time.perf_counter() - t0, "staging_bytes": nbytes}


def _check_fits(need: int, free: int, device: torch.device, where: str) -> None:
    if need > 0.8 * free:
        total = torch.cuda.mem_get_info(device)[1]
        raise UserError(
            f"DoLL needs {need / 2**30:.2f} GiB to stage the training set but only {free / 2**30:.2f} GiB "
            f"of {total / 2**30:.2f} GiB is free{' ' + where if where else ''} on {device}; use --loader host "
            "or fewer/smaller slices."
        )


# ----------------------------------------------------------------- a run's data


@dataclass
class RunData:
    """What one run trains and validates on, as `load_run_data` built it on this rank."""

    loader: HostLoader | DeviceLoader
    image_side: int
    read_files: bool
    """Whether this rank read the files (global rank 0; every rank with the host loader)."""
    placement: list[dict[str, Any]]
    """Where every rank runs (rank, host, node, local rank): gathered while the ranks agree on the data."""
    data_load: dict[str, Any]
    """Seconds spent reading or generating the slices (`data_load_s`) and the data cache's verdict."""
    staging: dict[str, Any] = field(default_factory=lambda: {"staging_time_s": 0.0, "staging_bytes": 0})
    val: SliceSet | None = None
    """The validation set, on global rank 0 only (it alone validates)."""


def check_val_shape(train: SliceSet, val: SliceSet, source: str) -> None:
    """UserError when the val slices need another MS-SSIM setting than the train slices.

    The run's loss picks its setting from the training size and validation scores with it: on smaller
    val slices that setting does not fit (pytorch_msssim skips smoothing and warns), on larger ones it is
    not the setting `bench eval` picks for them, so neither val_ms_ssim would mean what it says.
    """
    (th, tw), (vh, vw) = (tuple(int(n) for n in s.lq.shape[-2:]) for s in (train, val))
    t_set, v_set = choose_msssim(min(th, tw)), choose_msssim(min(vh, vw))
    if t_set != v_set:
        raise UserError(
            f"the val slices in {source} are {vh}x{vw} px but the train slices {th}x{tw} px, which get another "
            f"MS-SSIM setting ({v_set.describe()} vs {t_set.describe()}), while validation scores with the "
            "training size's; give val/ the train slices' shape (crop or resample)."
        )


def load_run_data(cfg: TrainConfig, device: torch.device, me: Dist) -> RunData:
    """Read the splits, agree over the group that every rank could, then build the loader (`me`: this rank).

    Who reads files: DoLL under DDP reads the training set on global rank 0 only and
    broadcasts it to every rank, across nodes too (`stage_on_device`); the host loader
    reads its own full copy on every rank (each node needs the data at --data, or its own
    synthetic cache). Validation data is read on global rank 0 only (it alone validates).
    """
    read_here = me.main or cfg.loader == "host"
    train, val, refusal = None, None, None
    data_load: dict[str, Any] = {"data_load_s": 0.0}
    try:
        if read_here:
            train = load_split(cfg.data, "train")
            data_load = dict(train.load)
        if me.main:
            val = load_split(cfg.data, "val")
            data_load["data_load_s"] += val.load["data_load_s"]  # reading or generating, apart from training
        if train is not None and len(train) < cfg.batch_size:
            raise UserError(
                f"the training set has {len(train)} slices, fewer than --batch-size {cfg.batch_size}; "
                # --n-train shapes synthetic data only: a folder grows by its own files
                + ("lower --batch-size or add data (--n-train)." if cfg.data.source == "synthetic" else
                   f"lower --batch-size or add slice pairs to {Path(cfg.data.source) / 'train'}.")
            )
        if train is not None and val is not None:
            check_val_shape(train, val, cfg.data.source)
    except UserError as e:
        refusal = str(e)
    # Under DDP a data refusal on one rank must reach the others, which would otherwise wait in the
    # staging broadcast until the collective timeout; the same gather tells every rank where the others run.
    refusal, placement = agree(refusal, me)
    if refusal is not None:
        raise UserError(refusal)
    common = {"read_files": read_here, "placement": placement, "data_load": data_load, "val": val}
    if cfg.loader == "device":
        lq_d, hq_d, staging = stage_on_device(
            train.lq if train is not None else None, train.hq if train is not None else None,
            device, cfg.channels_last, me.rank, me.world,
        )
        return RunData(DeviceLoader(lq_d, hq_d, cfg, me.rank, me.world), int(min(lq_d.shape[-2:])),
                       staging=staging, **common)
    return RunData(HostLoader(SliceDataset(train), cfg, device, me.rank, me.world),
                   int(min(train.lq.shape[-2:])), **common)
