"""DDP across nodes: two torchrun "nodes" on one machine (CPU, gloo), each launch one node of the job.

Every test starts two `python -m torch.distributed.run --nnodes 2 --nproc-per-node 1` processes
against one rendezvous on 127.0.0.1, as two machines would, and checks what the job writes: global
rank 0 alone reads (DoLL) and writes, the epoch-0 shards split the set, the replicas end with equal
weights, and a refusal or failure on one node ends both at once rather than at the collective timeout.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from bench.store import read_json, read_jsonl

pytestmark = pytest.mark.slow  # each test starts two-node jobs: about 20 s apiece on two cores

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--base-width", "4", "--growth", "4", "--bottleneck", "8", "--image-size", "32", "--n-train", "8",
        "--n-val", "4", "--batch-size", "4", "--epochs", "2", "--device", "cpu", "--num-workers", "0", "--quiet"]
LAUNCH_TIMEOUT_S = 150
"""Longest a two-node job may take here before both launches are killed and the test fails."""
DIST_TIMEOUT_S = 300
"""The collective timeout given to the jobs: far above what a quick end may take, so a test that ends
in time proves the job did not just wait the timeout out."""
QUICK_S = 90
"""A refusal or failure on one node must end both launches within this (rendezvous and start included)."""
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE")


@dataclass
class Launch:
    """One node's torchrun: its exit status and everything it and its worker printed."""

    rc: int
    log: str


def _loopback_port() -> int:
    """A free TCP port on 127.0.0.1 for the rendezvous; skips where this machine cannot listen on loopback."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError as e:
        pytest.skip(f"torchrun cannot start here: no TCP listening on 127.0.0.1 for its rendezvous ({e})")


def _stop(proc: subprocess.Popen) -> None:
    """End one launch and its workers (torchrun starts them in sessions of their own), by their ids."""
    if proc.poll() is not None:
        return
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    proc.send_signal(signal.SIGTERM)  # torchrun's agent stops its workers on SIGTERM
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def two_nodes(tmp: Path, out: Path, *args: str, rdzv: str = "c10d", cwds: tuple[Path, Path] = (ROOT, ROOT),
              envs: tuple[dict, dict] = ({}, {}), during: Callable[[list[subprocess.Popen]], None] | None = None,
              ) -> list[Launch]:
    """Launch a two-node `bench train --out OUT ARGS` job; returns the launches in start order. `during`, if
    given, is called with both launches once they started.

    rdzv "c10d": torchrun's dynamic rendezvous (the form for Slurm); the rendezvous hands out the
    global ranks, so either launch may hold rank 0 (--node-rank is ignored, hence not given).
    rdzv "static": --master-addr/--master-port with --node-rank: the first launch holds rank 0.
    """
    port, job = _loopback_port(), uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DDNET_BENCH_DIST_TIMEOUT_S=str(DIST_TIMEOUT_S))
    procs, logs = [], []
    try:
        for node in (0, 1):
            where = (["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", job]
                     if rdzv == "c10d" else
                     ["--master-addr", "127.0.0.1", "--master-port", str(port), "--node-rank", str(node)])
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", *where,
                   "-m", "bench.cli", "train", "--out", str(out), *TINY, *args]
            logs.append(tmp / f"{out.name}.launch{node}.log")
            with open(logs[-1], "w") as log:
                procs.append(subprocess.Popen(cmd, cwd=cwds[node], env={**env, **envs[node]}, stdout=log,
                                              stderr=subprocess.STDOUT))
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        if during is not None:
            during(procs)
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                text = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
                pytest.fail(f"the two-node job did not end within {LAUNCH_TIMEOUT_S} s:\n{text}")
    finally:
        for p in procs:
            _stop(p)
    return [Launch(p.returncode, log.read_text()) for p, log in zip(procs, logs, strict=True)]


def _no_traceback_of_ours(launch: Launch) -> None:
    # torchrun prints its own traceback (ChildFailedError) for a failed worker; ours must print one line
    for package in ("bench", "ddnet"):
        assert f'File "{ROOT / package}' not in launch.log, launch.log[-3000:]


def _write_dataset(folder: Path, n: dict[str, int], side: int = 32) -> None:
    """A tiny dataset in the layout --data reads: {split}/{HQ,LQ}/*.npy, float32 HU."""
    rng = np.random.default_rng(0)
    for split, count in n.items():
        for kind in ("HQ", "LQ"):
            (folder / split / kind).mkdir(parents=True)
        for i in range(count):
            hq = rng.uniform(-1000, 1000, (side, side)).astype(np.float32)
            np.save(folder / split / "HQ" / f"s{i:03d}.npy", hq)
            np.save(folder / split / "LQ" / f"s{i:03d}.npy", hq + rng.normal(0, 50, (side, side)).astype(np.float32))


def test_two_nodes_c10d_doll_rank0_reads_and_writes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    launches = two_nodes(tmp_path, out, "--loader", "device")
    for launch in launches:
        assert launch.rc == 0, launch.log[-3000:]
    s = read_json(out / "summary.json")
    assert s["status"] == "ok" and s["world_size"] == 2
    ranks = sorted(s["ddp_ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    # one replica per node: each is local rank 0 (the GPU it would drive), on nodes 0 and 1
    assert [(r["local_rank"], r["local_world"]) for r in ranks] == [(0, 1), (0, 1)]
    assert sorted(r["node"] for r in ranks) == [0, 1] and all(r["host"] for r in ranks)
    # DoLL: global rank 0 read the files and broadcast them; the other node read nothing
    assert [r["read_files"] for r in ranks] == [True, False]
    a, b = set(ranks[0]["epoch0_indices"]), set(ranks[1]["epoch0_indices"])
    assert a.isdisjoint(b) and a | b == set(range(8))
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]
    assert ranks[0]["weights_abs_checksum"] == ranks[1]["weights_abs_checksum"]
    # only global rank 0 wrote: one set of epoch rows, one "done" line
    assert [r["epoch"] for r in read_jsonl(out / "epochs.jsonl")] == [1, 2]
    assert sum(launch.log.count("done: 2 epochs") for launch in launches) == 1
    assert sum(launch.log.count("warning: 32 px images are too small") for launch in launches) == 1  # rank 0's
    assert read_json(out / "config.json")["nproc"] == 2


def test_doll_needs_the_data_on_rank0s_node_only_and_host_refuses_everywhere(tmp_path: Path) -> None:
    # --data is relative: the node started in has_data/ sees it, the one in no_data/ does not,
    # as when the data sit on one machine's local disk
    (tmp_path / "has_data").mkdir()
    (tmp_path / "no_data").mkdir()
    _write_dataset(tmp_path / "has_data" / "ds", {"train": 8, "val": 4, "test": 2})
    cwds = (tmp_path / "has_data", tmp_path / "no_data")

    out = tmp_path / "doll"  # static rendezvous: the first launch (with the data) is global rank 0
    launches = two_nodes(tmp_path, out, "--data", "ds", "--loader", "device", rdzv="static", cwds=cwds)
    for launch in launches:
        assert launch.rc == 0, launch.log[-3000:]
    ranks = sorted(read_json(out / "summary.json")["ddp_ranks"], key=lambda r: r["rank"])
    assert [r["read_files"] for r in ranks] == [True, False]

    # the host loader reads on every rank: rank 1 cannot, and both nodes refuse together, at once
    out = tmp_path / "host"
    t0 = time.monotonic()
    launches = two_nodes(tmp_path, out, "--data", "ds", "--loader", "host", rdzv="static", cwds=cwds)
    assert time.monotonic() - t0 < QUICK_S
    for launch in launches:
        assert launch.rc != 0 and "exitcode  : 2" in launch.log, launch.log[-3000:]  # the worker's: a refusal
        # the relative --data is made absolute where it is given: the node in no_data/ names its own folder
        missing = f"data folder {tmp_path / 'no_data' / 'ds'} does not exist"
        assert "error: rank 1 on " in launch.log and missing in launch.log, launch.log[-3000:]
        _no_traceback_of_ours(launch)
    assert not out.exists()  # refused before anything was recorded


def test_a_failure_on_one_node_ends_both_at_once_and_resume_needs_the_checkpoint_everywhere(tmp_path: Path) -> None:
    # the train loss turns NaN at epoch 2 on one node only (an injected divergence): that replica fails
    # alone while the other heads into its next collective; the host loader reads on both nodes
    out = tmp_path / "nan"
    t0 = time.monotonic()
    launches = two_nodes(tmp_path, out, "--loader", "host", envs=({}, {"DDNET_BENCH_INJECT_NAN_EPOCH": "2"}))
    assert time.monotonic() - t0 < QUICK_S  # not the DIST_TIMEOUT_S a waiting peer would sit out
    for launch in launches:
        # training failed: the worker's exit code 3, as its agent reports it. Under c10d the store lives in
        # the agent that bound the endpoint; when that one leaves first, the other agent cannot report its
        # worker any more and fails on the store instead (torchrun's doing, not ours): ended too, at once
        assert launch.rc != 0, launch.log[-3000:]
        assert "exitcode  : 3" in launch.log or "RendezvousConnectionError" in launch.log, launch.log[-3000:]
        _no_traceback_of_ours(launch)
    assert any("exitcode  : 3" in launch.log for launch in launches)
    assert "train loss became nan at epoch 2" in launches[1].log
    s = read_json(out / "summary.json")  # global rank 0, on whichever node, recorded the failure
    assert s["status"] == "failed" and (out / "ckpt.pt").is_file()
    # the cause, not the broken connection rank 0 saw: the failing replica told it before leaving the group
    # (named by rank and host unless the NaN node held rank 0 itself)
    assert re.fullmatch(r"(rank 1 on \S+: )?TrainingFailed: train loss became nan at epoch 2", s["error"]), s["error"]

    # every rank reads ckpt.pt to resume: a node that cannot see the run folder (a relative --out from
    # another folder, like a node-local disk) refuses the resume on both nodes, before anything is recorded
    (tmp_path / "elsewhere").mkdir()
    t0 = time.monotonic()
    launches = two_nodes(tmp_path, Path("nan"), "--loader", "host", "--resume", rdzv="static",
                         cwds=(tmp_path, tmp_path / "elsewhere"))
    assert time.monotonic() - t0 < QUICK_S
    for launch in launches:
        assert launch.rc != 0 and "exitcode  : 2" in launch.log, launch.log[-3000:]
        assert "error: --resume: rank 1 on " in launch.log and "cannot see nan/ckpt.pt" in launch.log
        _no_traceback_of_ours(launch)
    assert read_json(out / "summary.json") == s


def test_a_replica_lost_without_a_word_leaves_the_run_resumable_not_failed(tmp_path: Path) -> None:
    # node 1's replica is killed mid-run (SIGKILL: as a node lost or a network cut, it says nothing): rank 0
    # sees its group break, finds no failure told, and stops with the run resumable (exit 6), not failed
    out = tmp_path / "lost"
    longer = ("--loader", "host", "--epochs", "40")

    def kill_node1_replica(procs: list[subprocess.Popen]) -> None:
        deadline = time.monotonic() + 60
        while len(read_jsonl(out / "epochs.jsonl")) < 3:
            assert time.monotonic() < deadline and procs[0].poll() is None, "the job made no 3 epochs"
            time.sleep(0.05)
        (replica,) = [c for c in psutil.Process(procs[1].pid).children(recursive=True)
                      if "bench.cli" in " ".join(c.cmdline())]
        replica.kill()

    t0 = time.monotonic()
    launches = two_nodes(tmp_path, out, *longer, rdzv="static", during=kill_node1_replica)
    assert time.monotonic() - t0 < QUICK_S  # rank 0 saw the broken connection at once
    assert "exitcode  : 6" in launches[0].log, launches[0].log[-3000:]
    assert "error: lost the other replicas (" in launches[0].log and "--resume" in launches[0].log
    _no_traceback_of_ours(launches[0])
    s = read_json(out / "summary.json")
    assert s["status"] == "running" and s["interrupted"].startswith("lost the other replicas (RuntimeError: ")
    done = len(read_jsonl(out / "epochs.jsonl"))
    assert 3 <= done < 40 and (out / "ckpt.pt").is_file()

    # the same job again with --resume continues from the checkpoint and finishes, every epoch once
    launches = two_nodes(tmp_path, Path(out), *longer, "--resume", rdzv="static")
    assert [launch.rc for launch in launches] == [0, 0], launches[0].log[-3000:]
    assert read_json(out / "summary.json")["status"] == "ok"
    assert [r["epoch"] for r in read_jsonl(out / "epochs.jsonl")] == list(range(1, 41))


def test_a_broken_group_is_told_from_a_replicas_own_failure(monkeypatch):
    import torch  # noqa: PLC0415
    import torch.distributed as torch_dist  # noqa: PLC0415

    from ddnet.replicas import Dist, group_broke, tell_failure, told_failure  # noqa: PLC0415

    # how gloo says a peer went away or went silent (seen on this machine), and torch's DistError: the group broke
    for text in ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.0.0.2]:36014: "
                 "Connection reset by peer.",
                 "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for "
                 "recv operation to complete",
                 "Application timeout caused pair closure"):  # DDP's buffer broadcast, a node cut off (seen in CI)
        assert group_broke(RuntimeError(text))
    assert group_broke(torch_dist.DistBackendError("NCCL communicator was aborted"))
    # a replica's own failures
    for own in (RuntimeError("train loss became nan at epoch 2"), torch.cuda.OutOfMemoryError("CUDA out of memory"),
                ValueError("bad shape")):
        assert not group_broke(own)

    # a failing replica tells rank 0 through the store the group met at
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    server = torch_dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # noqa: F841
    rank0, rank1 = Dist(0, 2, host="a"), Dist(1, 2, host="b")
    t0 = time.monotonic()
    assert told_failure(rank0, wait_s=0.3) is None  # nothing told: a lost peer
    assert time.monotonic() - t0 >= 0.3
    tell_failure("TrainingFailed: train loss became nan at epoch 2", rank1)
    assert told_failure(rank0) == "rank 1 on b: TrainingFailed: train loss became nan at epoch 2"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun restarted its workers: an earlier word is old
    assert told_failure(rank0, wait_s=0.1) is None
    monkeypatch.setenv("MASTER_PORT", "1")  # no store there (the store's host went too): nothing told, no raise
    tell_failure("x", rank1)
    assert told_failure(rank0, wait_s=0.1) is None

    # rank 0's verdict on a break nobody explained: across nodes a lost peer (resumable), on one node a failure
    from ddnet.replicas import PeerLost  # noqa: PLC0415
    from ddnet.trainer import _replicas_failure  # noqa: PLC0415

    class Sink:
        interrupted: list[str] = []

        def interrupt(self, why: str) -> None:
            self.interrupted.append(why)

    monkeypatch.delenv("MASTER_ADDR")  # no store: nothing told
    broke = RuntimeError("[gloo/gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    sink = Sink()
    with pytest.raises(PeerLost, match=r"^lost the other replicas \(RuntimeError: \[gloo"):
        _replicas_failure(broke, f"RuntimeError: {broke}", rank0, sink, several_nodes=True)
    assert sink.interrupted == [f"lost the other replicas (RuntimeError: {broke})"]
    sink.interrupted.clear()
    what = _replicas_failure(broke, f"RuntimeError: {broke}", rank0, sink, several_nodes=False)
    assert what == f"a replica ended without a word (killed, or crashed below Python): RuntimeError: {broke}"
    assert sink.interrupted == []
    own = ValueError("bad shape")
    assert _replicas_failure(own, "ValueError: bad shape", rank1, sink, several_nodes=True) == "ValueError: bad shape"


def test_cpu_replicas_share_their_affinity_mask_not_the_whole_machine_unless_omp_num_threads_says(monkeypatch):
    from bench.cmd_train import replica_threads  # noqa: PLC0415

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)  # a big shared node, of which Slurm gave this job 8 CPUs
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert [replica_threads(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert replica_threads(2) is None  # the user's (or torchrun's) setting stands
