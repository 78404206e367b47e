"""`bench run --executor slurm` against a real Slurm cluster: sbatch job arrays, squeue and sacct, scancel, the
time-limit signal and submitit's requeue, with the real trainer.

Run only when DDNET_BENCH_TEST_SLURM=1 and `sinfo` answers: `.ci/slurm-cluster start` makes a cluster on
this machine (CI does: its own node, and two emulated ones in partition `multi` for two-node cells), and the opt-in keeps a developer's machine from submitting to a production cluster.
Each test compares what ran on Slurm with the same cell trained here without interruption: a cancel or a
requeue must cost time only, never a number.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.grids import load_grid_file
from bench.run_slurm import run_on_slurm
from bench.slurm import SlurmOptions, job_states, latest_jobs
from bench.store import read_json, read_jsonl
from tests.fake_trainer import quiet

REPO = Path(__file__).resolve().parent.parent


def _cluster_ready() -> bool:
    if os.environ.get("DDNET_BENCH_TEST_SLURM") != "1" or shutil.which("sinfo") is None:
        return False
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0 and any(s in res.stdout for s in ("idle", "mixed", "allocated"))


pytestmark = [pytest.mark.slurm_cluster, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("submitit") is None or not _cluster_ready(),
                                 reason="needs submitit, a Slurm cluster and DDNET_BENCH_TEST_SLURM=1 "
                                        "(.ci/slurm-cluster start makes one here)")]

GRID = '''
from bench.grids import Cell, standard_factors
from ddnet.config import DataConfig, ModelConfig, TrainConfig

NAME = "real_slurm"


def defaults():
    return TrainConfig(model=ModelConfig(base_width=4, growth=4, bottleneck=8),
                       data=DataConfig(image_size=32, n_train=8, n_val=2), epochs={epochs}, batch_size=4, lr=1e-3,
                       num_workers=0, device="cpu", nproc={nproc})


def cells(base):
    return [Cell(name, name, standard_factors(base.replace(**changes)), base.replace(**changes))
            for name, changes in {cells}]
'''

COMPARED = ("epoch", "train_loss", "val_loss", "val_ms_ssim", "lr")
"""Epoch-row fields that must not depend on how the run was scheduled (timings do)."""


def write_grid(folder: Path, epochs: int, cells: str, nproc: int = 1) -> Path:
    path = folder / "real_slurm.py"
    path.write_text(GRID.format(epochs=epochs, cells=cells, nproc=nproc))
    return path


def bench(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})})


def cell_dir(out: Path, name: str) -> Path:
    (d,) = [p for p in out.iterdir() if p.name.startswith(name + "-") and (p / "cell.json").exists()]
    return d


def rows(d: Path, upto: int | None = None) -> list[dict]:
    return [{k: r[k] for k in COMPARED} for r in read_jsonl(d / "epochs.jsonl")][:upto]


def trained_here(cell: Path, tmp: Path, epochs: int | None = None, env: dict[str, str] | None = None) -> list[dict]:
    """The same cell trained here in one go (`epochs` overrides its count), its comparable epoch rows."""
    ref = tmp / f"ref-{cell.name}-{epochs}"
    extra = ["--epochs", str(epochs)] if epochs else []
    res = bench("train", "--config", str(cell / "config.request.json"), "--out", str(ref), *extra, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return rows(ref)


def job_of(out: Path, cell: Path) -> str:
    return latest_jobs(read_json(out / "grid.json"))[cell.name]


def wait_until(what: str, check, timeout_s: float, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def starts(log: Path) -> list[str]:
    """The lines `bench slurm` wrote into a cell's log (train.log, train.log.node<k>) as it started the cell's
    command, one per start of its job on that node (not its notes on why a run stopped)."""
    if not log.exists():
        return []
    return [h for h in log.read_text().splitlines() if h.startswith("=== bench slurm") and " bench.cli train " in h]


def wait_ended(job: str) -> None:
    """Until Slurm no longer queues or runs `job` (after a SIGTERM the job waits for Slurm's KillWait, 30 s)."""
    wait_until(f"job {job} to end", lambda: job_states([job]).get(job) not in ("queued", "running"), 120, every_s=1)


def n_rows(d: Path) -> int:
    try:
        return len(read_jsonl(d / "epochs.jsonl"))
    except (OSError, ValueError):
        return 0


@pytest.fixture
def out(tmp_path):
    """The grid's --out; every job it records is cancelled when the test ends, whatever happened."""
    out = tmp_path / "out"
    yield out
    try:
        record = read_json(out / "grid.json")
    except (OSError, ValueError):
        return
    jobs = read_json_jobs(record)
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)


def read_json_jobs(record: dict) -> list[str]:
    """Every Slurm job id (array ids without the task) a grid.json records, resubmissions included."""
    return sorted({str(r["job_id"]).split("_")[0] for recs in record.get("jobs", {}).values() for r in recs})


def test_a_grid_runs_as_a_real_job_array_and_status_reads_the_scheduler(tmp_path, out):
    grid = write_grid(tmp_path, 3, '(("a", {}), ("b", {"lr": 2e-3}), ("broken", {"lr": 3e-3}))')
    nan = {"DDNET_BENCH_INJECT_NAN_EPOCH": "2", "DDNET_BENCH_INJECT_ONLY": f"{os.sep}broken-"}  # reaches the job

    res = bench("run", "--grid", str(grid), "--out", str(out), "--executor", "slurm", "--slurm-time", "10",
                "--wait", env=nan)

    assert res.returncode == 1, res.stdout + res.stderr  # the broken cell failed
    cells = {name: cell_dir(out, name) for name in ("a", "b", "broken")}
    jobs = {name: job_of(out, d) for name, d in cells.items()}
    array = {j.split("_")[0] for j in jobs.values()}
    assert len(array) == 1 and all("_" in j for j in jobs.values()), jobs  # one sbatch array, a task per cell
    assert job_states(list(jobs.values())) == {jobs["a"]: "finished", jobs["b"]: "finished",
                                               jobs["broken"]: "failed"}  # what sacct says, parsed by us
    for name in ("a", "b"):
        assert read_json(cells[name] / "summary.json")["status"] == "ok"
        assert rows(cells[name]) == trained_here(cells[name], tmp_path)  # Slurm changes no number
    broken = read_json(cells["broken"] / "summary.json")
    assert broken["status"] == "failed" and "nan" in broken["error"].lower()

    status = bench("status", str(out))
    assert status.returncode == 0, status.stderr
    for name in ("a", "b"):
        assert f"{jobs[name]} (finished)" in status.stdout
    assert f"{jobs['broken']} (failed)" in status.stdout

    again = bench("run", "--grid", str(grid), "--out", str(out), "--executor", "slurm", "--slurm-time", "10")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "submitted 0 cell(s);" in again.stdout, again.stdout  # finished and failed cells stay as they are
    assert latest_jobs(read_json(out / "grid.json")) == {d.name: jobs[n] for n, d in cells.items()}


def test_a_cancelled_job_is_resubmitted_by_the_next_run_and_resumes_exactly(tmp_path, out):
    epochs = 60  # 0.2-0.7 s each: the cancel lands long before the end, and the resume and its reference are short
    grid = write_grid(tmp_path, epochs, '(("long", {}),)')
    argv = ("run", "--grid", str(grid), "--out", str(out), "--executor", "slurm", "--slurm-time", "10")

    res = bench(*argv)
    assert res.returncode == 0, res.stdout + res.stderr
    cell = cell_dir(out, "long")
    job = job_of(out, cell)
    wait_until("two epochs and a checkpoint", lambda: n_rows(cell) >= 2 and (cell / "ckpt.pt").exists(), 180)
    subprocess.run(["scancel", job], check=True, timeout=30)
    # Slurm sends SIGTERM, the job stops its cell and waits to be ended; SIGKILL follows after KillWait (30 s)
    wait_until(f"job {job} cancelled", lambda: job_states([job]).get(job) == "cancelled", 120, every_s=1)
    done_before = n_rows(cell)
    assert 2 <= done_before < epochs, done_before
    assert read_json(cell / "summary.json")["status"] == "running"  # resumable, not failed

    status = bench("status", str(out))
    assert f"{job} (cancelled)" in status.stdout and "stopped" in status.stdout, status.stdout

    res = bench(*argv, "--wait")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"job {job} cancelled and the cell is unfinished" in " ".join(res.stdout.split()), res.stdout
    new_job = job_of(out, cell)
    assert new_job != job
    assert read_json(cell / "summary.json")["status"] == "ok"
    first, second = starts(cell / "train.log")
    assert "--resume" not in first and second.endswith("--resume")
    assert "SIGTERM from Slurm (a preemption, or scancel) stopped the cell" in (cell / "train.log").read_text()
    assert rows(cell) == trained_here(cell, tmp_path)  # every epoch once, as if never cancelled


def test_a_job_at_its_time_limit_is_requeued_and_resumes_exactly(tmp_path, out):
    grid = load_grid_file(write_grid(tmp_path, 100_000, '(("endless", {}),)'))
    # a 2-minute limit signalled 60 s early: Slurm sends it up to its 30 s check period earlier still, so 30-60 s
    # in (90 s early came 3 s after the start, before the first epoch); submitit's handler stops the cell and
    # requeues the job, which Slurm starts again after cred_expire (.ci/slurm-cluster: 10 s)
    options = SlurmOptions(cluster="slurm", time_min=2, signal_delay_s=60, max_requeues=5)
    assert run_on_slurm(grid, out, options, console=quiet()) is None
    cell = cell_dir(out, "endless")
    job = job_of(out, cell)
    log = cell / "train.log"

    wait_until("the requeued job's start", lambda: len(starts(log)) >= 2, 240, every_s=1)
    at_requeue = n_rows(cell)
    wait_until("the requeued job's third epoch", lambda: n_rows(cell) >= at_requeue + 3, 150, every_s=0.5)
    subprocess.run(["scancel", job.split("_")[0]], check=True, timeout=30)
    wait_ended(job)

    first, second = starts(log)[:2]
    assert not first.endswith("--resume") and second.endswith("--resume")
    stop = re.search(r": stopped after epoch (\d+) for Slurm's time limit", log.read_text())
    assert stop is not None and 1 <= int(stop.group(1)) <= at_requeue
    assert job_of(out, cell) == job  # a requeue keeps the job id; no resubmission
    got = rows(cell)
    assert [r["epoch"] for r in got] == list(range(1, len(got) + 1))  # no epoch lost or written twice
    assert got == trained_here(cell, tmp_path, epochs=len(got))  # the interruption changed no number


# ------------------------------------------------------------------ one cell over two nodes

MULTI = "multi"
"""The partition of two nodes, vnode1 and vnode2, each its own slurmd on this host (.ci/slurm-cluster), by default
in a network and UTS namespace of its own: its own address and hostname."""
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
"""Each replica one thread, here and on the nodes (sbatch passes the environment on): the two-node cell and the
one-node reference then sum in the same order. (Each vnode's replica would otherwise take both of this host's
cores, where `bench train --nproc 2` here gives each replica one.)"""


def two_nodes_ready() -> bool:
    res = subprocess.run(["sinfo", "-h", "-p", MULTI, "-o", "%D"], capture_output=True, text=True, timeout=15)
    return res.returncode == 0 and res.stdout.strip().isdigit() and int(res.stdout) >= 2


needs_two_nodes = pytest.mark.skipif(not _cluster_ready() or not two_nodes_ready(),
                                     reason=f"the cluster has no partition '{MULTI}' of two nodes; "
                                            "run .ci/slurm-cluster start again")


def two_node_cell_three_epochs_in(tmp_path: Path, out: Path, name: str, epochs: int,
                                  env: dict[str, str]) -> tuple[tuple[str, ...], Path, str]:
    """Submit a grid of one two-node cell `name` on partition multi; when it has trained three epochs: the
    `bench run` argv, the cell's folder and its job."""
    grid = write_grid(tmp_path, epochs, f'(("{name}", {{}}),)', nproc=2)
    argv = ("run", "--grid", str(grid), "--out", str(out), "--executor", "slurm", "--slurm-nodes", "2",
            "--slurm-partition", MULTI, "--slurm-time", "10")
    res = bench(*argv, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    cell = cell_dir(out, name)
    job = job_of(out, cell)
    wait_until("three epochs", lambda: n_rows(cell) >= 3, 180, every_s=0.1)
    return argv, cell, job


def vnodes_are_hosts() -> bool:
    """Whether the two nodes are hosts of their own on a network (.ci/slurm-cluster's default), not names of this
    host's loopback (SLURM_CLUSTER_NETNS=0)."""
    return socket.gethostbyname("vnode1") != socket.gethostbyname("vnode2")


def job_field(job: str, field: str) -> str:
    """One field of the job's latest run, as sacct reports it (NodeList, AllocTRES, ...)."""
    res = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", field], capture_output=True, text=True,
                         timeout=30)
    return res.stdout.strip()


def job_nodes(job: str) -> str:
    return job_field(job, "NodeList")


@needs_two_nodes
def test_two_node_cells_run_on_two_slurm_nodes_train_as_on_one_and_fail_together(tmp_path, out):
    grid = write_grid(tmp_path, 3, '(("wide", {}), ("broken", {"lr": 3e-3}))', nproc=2)
    nan = {"DDNET_BENCH_INJECT_NAN_EPOCH": "2", "DDNET_BENCH_INJECT_ONLY": f"{os.sep}broken-"}  # on both nodes

    # each node's emulated GPU asked for (.ci/slurm-cluster: a GRES without CUDA; the cells train on the CPU)
    res = bench("run", "--grid", str(grid), "--out", str(out), "--executor", "slurm", "--slurm-nodes", "2",
                "--slurm-partition", MULTI, "--slurm-gpus-per-node", "1", "--slurm-time", "10", "--wait",
                env={**ONE_THREAD, **nan})

    assert res.returncode == 1, res.stdout + res.stderr  # the broken cell failed
    cell, broken = cell_dir(out, "wide"), cell_dir(out, "broken")
    job, broken_job = job_of(out, cell), job_of(out, broken)
    assert job.split("_")[0] == broken_job.split("_")[0]  # one array of two-node tasks
    assert job_states([job, broken_job]) == {job: "finished", broken_job: "failed"}
    assert job_nodes(job) == job_nodes(broken_job) == "vnode[1-2]"  # each task on both nodes
    assert "gres/gpu=2" in job_field(job, "AllocTRES").split(","), job_field(job, "AllocTRES")  # one per node
    failed = read_json(broken / "summary.json")
    assert failed["status"] == "failed" and "nan at epoch 2" in failed["error"].lower(), failed
    assert (broken / "train.log.node1").exists()  # node 1 ran it too, and ended with node 0
    (node0,), (node1,) = starts(cell / "train.log"), starts(cell / "train.log.node1")
    for k, line in enumerate((node0, node1)):  # each node its torchrun, meeting on the job's first host
        assert f"--nnodes 2 --nproc-per-node 1 --node-rank {k} --master-addr vnode1" in line, line
    summary = read_json(cell / "summary.json")
    assert summary["status"] == "ok"
    assert [(r["rank"], r["node"], r["local_world"]) for r in summary["ddp_ranks"]] == [(0, 0, 1), (1, 1, 1)]
    # each replica on its own host: the rendezvous on vnode1 and gloo's all-reduce crossed the network
    hosts = [r["host"] for r in summary["ddp_ranks"]]
    assert hosts == (["vnode1", "vnode2"] if vnodes_are_hosts() else [socket.gethostname()] * 2), hosts
    assert read_json(cell / "config.json")["nproc"] == 2  # the cell's world, not the per-node count
    assert rows(cell) == trained_here(cell, tmp_path, env=ONE_THREAD)  # = `bench train --nproc 2` on one node
    status = bench("status", str(out))
    assert f"{job} (finished)" in status.stdout and f"{broken_job} (failed)" in status.stdout, status.stdout


@needs_two_nodes
def test_a_two_node_job_at_its_time_limit_is_requeued_on_both_nodes_and_resumes_exactly(tmp_path, out,
                                                                                      monkeypatch):
    for k, v in ONE_THREAD.items():
        monkeypatch.setenv(k, v)  # sbatch hands the submitting environment to the job
    grid = load_grid_file(write_grid(tmp_path, 100_000, '(("endless", {}),)', nproc=2))
    options = SlurmOptions(cluster="slurm", nodes=2, partition=MULTI, time_min=2, signal_delay_s=60,
                           max_requeues=5)
    assert run_on_slurm(grid, out, options, console=quiet()) is None
    cell = cell_dir(out, "endless")
    job = job_of(out, cell)

    wait_until("the requeued job's start on both nodes",
               lambda: len(starts(cell / "train.log")) >= 2 and len(starts(cell / "train.log.node1")) >= 2,
               240, every_s=1)
    at_requeue = n_rows(cell)
    wait_until("the requeued job's third epoch", lambda: n_rows(cell) >= at_requeue + 3, 150, every_s=0.5)
    subprocess.run(["scancel", job.split("_")[0]], check=True, timeout=30)
    wait_ended(job)

    for log in (cell / "train.log", cell / "train.log.node1"):  # both nodes stopped, both came back resuming
        first, second = starts(log)[:2]
        assert "--resume" not in first, first
        assert "--resume" in second, second
    stop = re.search(r": stopped after epoch (\d+) for Slurm's time limit", (cell / "train.log").read_text())
    assert stop is not None and 1 <= int(stop.group(1)) <= at_requeue
    assert job_of(out, cell) == job and job_nodes(job) == "vnode[1-2]"  # requeued, not resubmitted
    got = rows(cell)
    assert [r["epoch"] for r in got] == list(range(1, len(got) + 1))  # no epoch lost or written twice
    assert got == trained_here(cell, tmp_path, epochs=len(got), env=ONE_THREAD)


@needs_two_nodes
@pytest.mark.skipif(not (_cluster_ready() and two_nodes_ready() and vnodes_are_hosts()),
                    reason="the two nodes are names of this host's loopback (SLURM_CLUSTER_NETNS=0): none can be "
                           "cut off the network")
def test_a_node_cut_off_the_network_leaves_the_cell_resumable_and_the_next_run_finishes_it(tmp_path, out):
    epochs = 80  # about 0.4 s each on two nodes: the cut came at epoch 3 in CI, long before the end
    env = {**ONE_THREAD, "DDNET_BENCH_DIST_TIMEOUT_S": "20"}  # a silent peer is given up after 20 s
    argv, cell, job = two_node_cell_three_epochs_in(tmp_path, out, "cut", epochs, env)
    veth = "ddnb-vnode2"  # .ci/slurm-cluster: vnode2's link to the bridge; down, vnode2 is off the network
    subprocess.run(["ip", "link", "set", veth, "down"], check=True, timeout=30)
    try:
        # no replica can say why the group broke: rank 0 gives its peer up at the collective timeout
        wait_until("node 0's stop", lambda: "lost the other replicas" in (cell / "train.log").read_text(), 120,
                   every_s=0.5)
    finally:
        subprocess.run(["ip", "link", "set", veth, "up"], check=True, timeout=30)
    wait_ended(job)
    summary = read_json(cell / "summary.json")
    assert summary["status"] == "running", summary  # not failed: the network's fault, not the cell's
    assert summary["interrupted"].startswith("lost the other replicas (RuntimeError: "), summary
    cut_at = n_rows(cell)
    assert 3 <= cut_at < epochs
    status = bench("status", str(out))
    assert "stopped" in status.stdout and "lost the other replicas" in status.stdout, status.stdout

    # the next `bench run` resubmits it; it resumes on both nodes and finishes, as if never cut
    res = bench(*argv, "--wait", env=env)
    assert res.returncode == 0 and "submitted 1 cell(s)" in res.stdout, res.stdout + res.stderr
    assert read_json(cell / "summary.json")["status"] == "ok"
    for log in (cell / "train.log", cell / "train.log.node1"):
        assert " --resume" in starts(log)[-1], starts(log)
    got = rows(cell)
    assert [r["epoch"] for r in got] == list(range(1, epochs + 1))
    assert got == trained_here(cell, tmp_path, env=ONE_THREAD)


def memory_confined() -> bool:
    """Whether the cluster confines each job's memory to its --mem (task/cgroup: .ci/slurm-cluster on a host with cgroup v1)."""
    res = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=15)
    return "task/cgroup" in res.stdout


@pytest.mark.skipif(not (_cluster_ready() and memory_confined()),
                    reason="the cluster does not confine memory (task/cgroup: .ci/slurm-cluster on a host with cgroup v1)")
def test_a_cell_killed_at_its_memory_limit_is_failed_with_the_fix_not_resubmitted(tmp_path, out):
    # 800 slices of 256 px do not fit in 0.6 GB beside torch: the cgroup's out-of-memory killer ends the trainer
    grid = write_grid(tmp_path, 3, '(("big", {"data": DataConfig(image_size=256, n_train=800, n_val=2)}),)')
    argv = ("run", "--grid", str(grid), "--out", str(out), "--executor", "slurm", "--slurm-mem-gb", "0.6",
            "--slurm-time", "10")
    res = bench(*argv, "--wait")
    assert res.returncode == 1, res.stdout + res.stderr
    cell = cell_dir(out, "big")
    s = read_json(cell / "summary.json")
    assert s["status"] == "failed", s  # it would run out again: not resumable by a plain `bench run`
    assert s["error"].startswith("cell process killed by signal SIGKILL after the out-of-memory killer struck at "
                                 "its memory limit (a Slurm job's --mem): ask for more memory (--slurm-mem-gb)"), s
    assert "=== bench slurm" not in s["error"]  # not the runner's own header for the log's telling line
    again = bench(*argv)
    assert "submitted 0 cell(s);" in again.stdout, again.stdout + again.stderr
    status = bench("status", str(out))
    assert "failed" in status.stdout and "out-of-memory killer" in status.stdout, status.stdout


HOG = """import os, sys, time
open(os.path.join(sys.argv[1], "cgroup.procs"), "w").write(str(os.getpid()))
open("/proc/self/oom_score_adj", "w").write("-1000")  # never the killer's choice: it picks the job's own
held = []
for _ in range(int(sys.argv[2]) // 16):
    held.append(bytearray(16 << 20))
    held[-1][::4096] = bytes(len(held[-1]) // 4096 * [1])  # touched, so charged
print("holding", flush=True)
time.sleep(600)
"""
"""Fills a job's memory cgroup on one node: moves itself into it, out of the killer's reach, and holds MB."""


def fill_job_memory(job_id: str, node: str, mb: int) -> tuple[subprocess.Popen, Path]:
    """Bring job `job_id` on `node` to its memory limit: the limit is lowered to what the job uses there (cgroup
    v1 takes no limit below that: no swap to reclaim into), then HOG holds `mb` more in its cgroup (returned)."""
    [job] = Path("/sys/fs/cgroup/memory").glob(f"slurm*{node}/uid_*/job_{job_field(job_id, 'JobIDRaw')}")
    for _ in range(50):  # its use moves between reads: retried until a limit just above it is taken
        try:
            (job / "memory.limit_in_bytes").write_text(str(int((job / "memory.usage_in_bytes").read_text()) + 2**20))
            break
        except OSError:
            time.sleep(0.1)
    else:
        pytest.fail(f"{job}: its memory limit could not be lowered to its use")
    return subprocess.Popen([sys.executable, "-c", HOG, str(job), str(mb)], stdout=subprocess.DEVNULL), job


@needs_two_nodes
@pytest.mark.skipif(not (_cluster_ready() and memory_confined()),
                    reason="the cluster does not confine memory (task/cgroup: .ci/slurm-cluster on a host with cgroup v1)")
def test_a_two_node_cell_killed_at_its_memory_limit_on_node_2_is_failed_with_the_fix(tmp_path, out):
    """Rank 0, on vnode1, sees only its peer lost (resumable, as for a node cut off); vnode2 alone can read its
    memory cgroup and says why: the cell is failed with the fix, not resubmitted into the same death."""
    argv, cell, job = two_node_cell_three_epochs_in(tmp_path, out, "filled", 3000, ONE_THREAD)
    hog, cgroup = fill_job_memory(job, "vnode2", 128)
    try:  # until vnode2's word (.node1-ended...)
        wait_until("vnode2's end", lambda: any(cell.glob(".node1-ended.*")), 120, every_s=0.2)
    finally:
        hog.kill()
        hog.wait()
    wait_ended(job)
    with contextlib.suppress(OSError):  # Slurm could not remove it with the hog inside
        cgroup.rmdir()
    s = read_json(cell / "summary.json")
    assert s["status"] == "failed" and "interrupted" not in s, s
    assert re.fullmatch(r"cell process stopped when node 1 \(vnode2\) ended, its torchrun (killed by signal "
                        r"SIGKILL|exited with code 1) after the out-of-memory killer struck at its memory limit "
                        r"\(a Slurm job's --mem\): ask for more memory \(--slurm-mem-gb\).*", s["error"]), s["error"]
    assert 3 <= s["epochs_completed"] < 3000
    again = bench(*argv, env=ONE_THREAD)
    assert "submitted 0 cell(s);" in again.stdout, again.stdout + again.stderr
    status = bench("status", str(out))
    assert "failed" in status.stdout and "out-of-memory killer" in status.stdout, status.stdout


# ------------------------------------------------------------------ preemption

@pytest.mark.parametrize("nodes", [1, pytest.param(2, marks=needs_two_nodes)])
def test_a_preempted_job_is_requeued_by_slurm_and_resumes_exactly(tmp_path, out, nodes):
    grid = write_grid(tmp_path, 100_000, '(("preempted", {}),)', nproc=nodes)
    on_two = ("--slurm-nodes", "2", "--slurm-partition", MULTI) if nodes == 2 else ()
    env = ONE_THREAD if nodes == 2 else None
    argv = ("run", "--grid", str(grid), "--out", str(out), "--executor", "slurm", "--slurm-time", "10", *on_two)
    res = bench(*argv, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    cell = cell_dir(out, "preempted")
    job = job_of(out, cell)
    log = cell / "train.log"
    logs = [log, cell / "train.log.node1"][:nodes]
    wait_until("two epochs and a checkpoint", lambda: n_rows(cell) >= 2 and (cell / "ckpt.pt").exists(), 180)

    # a job of a higher-tier partition wants the cell's nodes whole (.ci/slurm-cluster: `urgent` preempts the
    # others): Slurm sends the cell's job SIGTERM and, GraceTime (10 s) later, kills and requeues it
    urgent = subprocess.run(["sbatch", "--parsable", "--partition", "urgent", "--nodelist", job_nodes(job),
                             "--nodes", str(nodes), "--exclusive", "--output", "/dev/null", "--wrap", "sleep 5"],
                            capture_output=True, text=True, timeout=30)
    assert urgent.returncode == 0, urgent.stderr
    wait_until("the preemption's SIGTERM", lambda: "SIGTERM from Slurm" in log.read_text(), 60, every_s=0.5)
    # while Slurm ends and requeues the job, `bench run` must see it alive: a second job would race the requeue
    again = bench(*argv, env=env)
    assert again.returncode == 0 and "submitted 0 cell(s);" in again.stdout, again.stdout + again.stderr
    wait_until("the preempted job's new start on every node", lambda: all(len(starts(f)) >= 2 for f in logs), 240,
               every_s=1)
    at_requeue = n_rows(cell)
    wait_until("the requeued job's third epoch", lambda: n_rows(cell) >= at_requeue + 3, 150, every_s=0.5)
    subprocess.run(["scancel", job], check=True, timeout=30)
    wait_ended(job)

    for f in logs:  # every node stopped and started again, resuming
        first, second = starts(f)[:2]
        assert "--resume" not in first and " --resume" in second, (first, second)
    stop = re.search(r"SIGTERM from Slurm \(a preemption, or scancel\) stopped the cell after epoch (\d+)",
                     log.read_text())
    assert stop is not None and 2 <= int(stop.group(1)) <= at_requeue
    history = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", job, "-o", "State"], capture_output=True,
                             text=True, timeout=30).stdout.split()
    assert history[0] == "PREEMPTED", history  # Slurm's record of the first run
    assert job_of(out, cell) == job  # requeued by Slurm under the same id; `bench run` resubmitted nothing
    got = rows(cell)
    assert [r["epoch"] for r in got] == list(range(1, len(got) + 1))  # no epoch lost or written twice
    assert got == trained_here(cell, tmp_path, epochs=len(got), env=env)  # the preemption changed no number
