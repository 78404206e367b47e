"""Where a DDP replica sits (global and node-local rank) and the collectives every rank takes together.

`Dist` comes from `bench train --nproc N` (one node) or from torchrun's environment (one
node or several); `agree` and `from_main` share one rank's refusal with every rank, so the
replicas refuse together instead of some waiting in a collective until its timeout.

When the group breaks during training, global rank 0 must tell a replica's own failure (a NaN,
an out-of-memory: the run failed) from a replica gone without a word (its node lost, the
network cut, a kill: the run did not fail, and stays resumable). A replica that fails says why
in the store the group met at before it leaves the group (`tell_failure`); rank 0, seeing the
break (`group_broke`), reads it there (`told_failure`) or, finding nothing, takes a peer on
another node for lost (`PeerLost`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as torch_dist


@dataclass
class Dist:
    """Where this process sits among the replicas, across nodes and on its own node.

    `rank` and `world` are the process group's (global): rank 0 alone writes the run folder,
    validates, and (DoLL) reads the training files. `local_rank` and `local_world` are this
    node's (torchrun's LOCAL_RANK and LOCAL_WORLD_SIZE): the GPU is `cuda:{local_rank}` and the
    node's cores are shared by `local_world` replicas. `Dist(rank, world)` is one node
    (`bench train --nproc N`): local = global.
    """

    rank: int = 0
    world: int = 1
    local_rank: int | None = None
    """This replica's index on its node (the GPU it drives); None: the global rank (one node)."""
    local_world: int | None = None
    """Replicas on this node; None: the world size (one node)."""
    node: int = 0
    """This node's rank among the nodes (torchrun's GROUP_RANK); 0 on one node."""
    host: str = field(default_factory=socket.gethostname)

    def __post_init__(self) -> None:
        self.local_rank = self.rank if self.local_rank is None else self.local_rank
        self.local_world = self.world if self.local_world is None else self.local_world

    @classmethod
    def from_torchrun(cls, env: Mapping[str, str] = os.environ) -> Dist:
        """This replica's place as torchrun describes it (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
        GROUP_RANK). Under a c10d rendezvous the global ranks are handed out by the rendezvous, so global
        rank 0 may sit on any node, not necessarily the one given --node-rank 0."""
        world = int(env["WORLD_SIZE"])
        return cls(rank=int(env["RANK"]), world=world, local_rank=int(env.get("LOCAL_RANK", 0)),
                   local_world=int(env.get("LOCAL_WORLD_SIZE", world)), node=int(env.get("GROUP_RANK", 0)))

    @property
    def main(self) -> bool:
        """Global rank 0: the one replica that writes the run folder."""
        return self.rank == 0

    def record(self) -> dict[str, Any]:
        """Where this replica ran, for the summary's `ddp_ranks`."""
        return {"rank": self.rank, "local_rank": self.local_rank, "local_world": self.local_world,
                "node": self.node, "host": self.host}


def gather(value: Any, dist: Dist) -> list[tuple[Any, dict[str, Any]]]:
    """Every rank's (value, place), in rank order, on every rank (a pickled all-gather; no collective alone)."""
    if dist.world == 1:
        return [(value, dist.record())]
    gathered: list[Any] = [None] * dist.world
    torch_dist.all_gather_object(gathered, (value, dist.record()))
    return gathered


def agree(refusal: str | None, dist: Dist) -> tuple[str | None, list[dict[str, Any]]]:
    """Every rank's refusal (None: none) and place, gathered on every rank: the first refusal, named by its
    rank and host, becomes every rank's, so all raise it together instead of some waiting in a collective."""
    gathered = gather(refusal, dist)
    first = next(((r, p) for r, p in gathered if r is not None), None)
    if first is not None:
        refusal = first[0] if first[1]["rank"] == 0 else f"rank {first[1]['rank']} on {first[1]['host']}: {first[0]}"
    return refusal, [p for _, p in gathered]


def from_main(value: Any) -> Any:
    """Rank 0's `value`, on every rank (a pickled broadcast over the process group)."""
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------ a broken group: failed, or a peer lost


class PeerLost(RuntimeError):
    """The process group broke during training and no replica said why: one vanished (its node lost, the
    network cut, a kill). Not the run's failure: nothing is recorded as failed, the run stays resumable."""


_GROUP_BROKE = re.compile(r"gloo/transport|(?:reset|closed) by peer|Timed out waiting|timeout caused pair closure|"
                          r"Socket Timeout")
"""How gloo (a plain RuntimeError) says that a peer went away or stopped answering (seen here: 'Read error ...
Connection reset by peer', 'Timed out waiting 20000ms for recv operation to complete', and, from DDP's buffer
broadcast, 'Application timeout caused pair closure')."""

TELL_TIMEOUT_S = 5.0
"""Longest telling or reading a failure may wait for the store."""
TOLD_WAIT_S = 2.0
"""How long rank 0, seeing the group break, waits for a failing replica's word (it is written before the
replica leaves the group, so it is normally there already)."""


def group_broke(e: BaseException) -> bool:
    """Whether `e` is the process group breaking under this replica (a peer gone or silent: gloo's transport
    errors, torch's DistError for NCCL and the store), not a failure of this replica's own."""
    dist_error = getattr(torch_dist, "DistError", None)
    return (dist_error is not None and isinstance(e, dist_error)) or (
        isinstance(e, RuntimeError) and _GROUP_BROKE.search(str(e)) is not None)


def _store() -> Any:
    """A client of the store the group met at (torchrun's or `--nproc`'s MASTER_ADDR:MASTER_PORT); None: none."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    return torch_dist.TCPStore(host, int(port), is_master=False,
                               timeout=datetime.timedelta(seconds=TELL_TIMEOUT_S))


def _told_key(rank: int) -> str:
    # torchrun may restart its workers against the same store: each restart has its own keys
    return f"ddnet-bench/failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"


def tell_failure(what: str, dist: Dist) -> None:
    """Leave this replica's own failure where global rank 0 finds it once the group breaks. Best effort: with
    the store out of reach, rank 0 takes the break for a lost peer."""
    with contextlib.suppress(Exception):
        store = _store()
        if store is not None:
            store.set(_told_key(dist.rank), f"rank {dist.rank} on {dist.host}: {what}")


def told_failure(dist: Dist, wait_s: float = TOLD_WAIT_S) -> str | None:
    """The failure another replica told (`tell_failure`), waiting up to `wait_s` for one; None: none told."""
    try:
        store = _store()
    except Exception:  # the store's host is gone too: nothing can have been told
        return None
    if store is None:
        return None
    keys = [_told_key(r) for r in range(dist.world) if r != dist.rank]
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(Exception):
            for key in keys:
                if store.check([key]):
                    return store.get(key).decode(errors="replace")
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)
