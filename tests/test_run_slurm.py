"""`bench run --executor slurm` end to end without a cluster: submitit's local executor runs the array tasks
as real processes here, and the grid's folders must come out as the local runner leaves them."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from bench import cell_log
from bench.cmd_run import run_cmd
from bench.grids import Cell, Grid, standard_factors
from bench.planning import Overrides
from bench.processes import run_grid
from bench.run_slurm import LOG_DIR, plan_for_cluster, run_on_slurm
from bench.slurm import SlurmOptions, latest_jobs, rendezvous_port, slurm_state
from bench.store import read_json, read_jsonl, read_summary
from ddnet.errors import UserError
from tests.fake_trainer import make_grid, quiet, tiny_base

# a mark, not a module-level importorskip: under `pytest -m gpu` (.ci/gpu-check, on an image without
# submitit) a deselected module must leave no 'skipped' entry in the junit file
pytestmark = pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                                reason="needs submitit (pip install -e '.[slurm]')")

ROOT = Path(__file__).resolve().parents[1]
LOCAL = SlurmOptions(cluster="local", time_min=5)


def _no_slurm(ids: list[str]) -> dict[str, str]:
    return {}  # no squeue here: every recorded job is unknown to "Slurm"


def _folder_record(cell: Path) -> dict[str, object]:
    """What a cell folder holds, with the launcher-specific parts (log headers, lock files) left out."""
    out: dict[str, object] = {}
    for p in sorted(cell.iterdir()):
        if p.name.startswith(".") or p.name in ("train.log", "launches.jsonl"):
            continue
        out[p.name] = read_jsonl(p) if p.suffix == ".jsonl" else json.loads(p.read_text())
    return out


def test_slurm_executor_fills_the_same_folders_as_the_local_runner(tmp_path, fake, monkeypatch):
    command, launched = fake
    monkeypatch.setenv("FAKE_FAIL", "c1-")  # c1 records a failed run, as a NaN loss would
    grid = make_grid(3, cuda_cell=True)

    local = run_grid(grid, tmp_path / "local", command=command, console=quiet())
    results = run_on_slurm(grid, tmp_path / "slurm", LOCAL, wait=True, console=quiet(), command=command,
                           states=_no_slurm)

    assert results is not None
    assert [(r.folder, r.status) for r in results] == [(r.folder, r.status) for r in local]
    assert [r.status for r in results] == ["ok", "failed", "ok", "skipped"]
    for r in local:
        assert _folder_record(tmp_path / "slurm" / r.folder) == _folder_record(tmp_path / "local" / r.folder)
    record = read_json(tmp_path / "slurm" / "grid.json")
    assert record["order"] == read_json(tmp_path / "local" / "grid.json")["order"]
    submitted = latest_jobs(record)
    assert sorted(submitted) == sorted(r.folder for r in local if r.status != "skipped")  # never the skipped cell
    assert (tmp_path / "slurm" / LOG_DIR).is_dir()


def test_a_hung_cell_is_stopped_and_recorded_alike_by_both_runners(tmp_path, fake, monkeypatch):
    command, _ = fake
    monkeypatch.setenv("FAKE_HANG", "c0-")  # c0 hangs in its second epoch
    grid = make_grid(2)
    local = run_grid(grid, tmp_path / "local", command=command, console=quiet(), stall_timeout_s=1.0)
    results = run_on_slurm(grid, tmp_path / "slurm", replace(LOCAL, stall_timeout_s=1.0), wait=True,
                           console=quiet(), command=command, states=_no_slurm)
    assert [r.status for r in local] == [r.status for r in results] == ["failed", "ok"]
    for r in local:  # the same folders; the log tails differ only by each launcher's header line
        slurm, here = _folder_record(tmp_path / "slurm" / r.folder), _folder_record(tmp_path / "local" / r.folder)
        for rec in (slurm, here):
            tail = rec["summary.json"].pop("log_tail", [])
            assert ("stopped as hung" in "\n".join(tail)) == (r.status == "failed")
        assert slurm == here
    error = read_json(tmp_path / "slurm" / local[0].folder / "summary.json")["error"]
    assert error.startswith("cell process wrote no new epoch for 1 s after epoch 1 and was stopped as hung")


def test_the_wait_summary_counts_the_epochs_of_a_cell_whose_job_ended_unfinished(tmp_path, fake, monkeypatch):
    command, _ = fake
    monkeypatch.setenv("FAKE_FULL", "c0-")  # c0 stops in its second epoch, resumable (as at a time limit)
    results = run_on_slurm(make_grid(2), tmp_path / "g", LOCAL, wait=True, console=quiet(), command=command,
                           states=_no_slurm)
    assert [(r.status, r.epochs_completed, r.epochs) for r in results] == [("running", 1, 2), ("ok", 2, 2)]


def test_the_wait_says_how_slurm_ended_a_job_whose_cell_did_not_finish_and_what_to_do(tmp_path, fake, monkeypatch,
                                                                                       capsys):
    import submitit  # noqa: PLC0415 - the module is skipped without it

    command, _ = fake
    monkeypatch.setenv("FAKE_FULL", "c0-")  # c0 stops in its second epoch, resumable, as at a time limit
    asked: list[list[str]] = []

    def sacct(ids: list[str]) -> dict[str, str]:  # Slurm's accounting: the job hit its time limit
        asked.append(ids)
        return {i: slurm_state("TIMEOUT") for i in ids}

    # cluster 'slurm' (its job states are asked for), the jobs run here by submitit's LocalExecutor
    results = run_on_slurm(make_grid(2), tmp_path / "g", SlurmOptions(time_min=5), wait=True, command=command,
                           console=Console(width=400), executor_factory=lambda f: submitit.LocalExecutor(f),
                           states=sacct)
    why = "failed (Slurm TIMEOUT: the job hit --slurm-time; raise it, the cell resumes from its last epoch)"
    assert [(r.status, r.error) for r in results] == [("running", f"job {asked[-1][0]} {why}"), ("ok", None)]
    assert [a for a in asked if a] == [[asked[-1][0]]]  # once the jobs ran: only the job of the unfinished cell
    out = capsys.readouterr().out
    assert f"job {asked[-1][0]} ended as {why}, cell running" in out, out


def test_a_lost_replica_leaves_the_cell_resumable_and_the_next_run_resubmits_it(tmp_path, fake, monkeypatch):
    command, launched = fake
    monkeypatch.setenv("FAKE_LOST", "c0-")  # c0's DDP group breaks in epoch 2 and no replica says why: exit 6
    grid, out = make_grid(2), tmp_path / "g"
    results = run_on_slurm(grid, out, LOCAL, wait=True, console=quiet(), command=command, states=_no_slurm)
    assert [(r.status, r.epochs_completed) for r in results] == [("running", 1), ("ok", 2)]
    (c0,) = out.glob("c0-*")
    summary = read_json(c0 / "summary.json")
    assert summary["status"] == "running" and summary["interrupted"].startswith("lost the other replicas")
    monkeypatch.delenv("FAKE_LOST")
    ended = {job: "failed" for job in latest_jobs(read_json(out / "grid.json")).values()}  # as Slurm lists it
    again = run_on_slurm(grid, out, LOCAL, wait=True, console=quiet(), command=command,
                         states=lambda ids: {i: ended.get(i, "unknown") for i in ids})
    assert [r.status for r in again] == ["ok", "ok"]
    assert [(c["folder"][:3], c["resume"]) for c in launched()][-1] == ("c0-", True)  # resubmitted, resuming
    assert [r["epoch"] for r in read_jsonl(c0 / "epochs.jsonl")] == [1, 2]


def test_a_rerun_submits_only_what_is_unfinished_and_retries_failed_cells_from_their_checkpoint(
        tmp_path, fake, monkeypatch):
    command, launched = fake
    monkeypatch.setenv("FAKE_FAIL", "c1-")
    grid, out = make_grid(3), tmp_path / "g"
    run_on_slurm(grid, out, LOCAL, wait=True, console=quiet(), command=command, states=_no_slurm)
    first = latest_jobs(read_json(out / "grid.json"))
    n_launches = len(launched())

    # the same command again: finished cells stay, the failed one waits for --retry-failed
    again = run_on_slurm(grid, out, LOCAL, wait=True, console=quiet(), command=command, states=_no_slurm)
    assert len(launched()) == n_launches and latest_jobs(read_json(out / "grid.json")) == first
    assert [r.action for r in again] == ["reused"] * 3

    monkeypatch.delenv("FAKE_FAIL")
    retried = run_on_slurm(grid, out, LOCAL, retry_failed=True, wait=True, console=quiet(), command=command,
                           states=_no_slurm)
    assert [r.status for r in retried] == ["ok", "ok", "ok"]
    calls = launched()[n_launches:]
    assert [(c["folder"].split("-")[0], c["resume"]) for c in calls] == [("c1", True)]
    jobs = read_json(out / "grid.json")["jobs"]
    c1 = next(f for f in jobs if f.startswith("c1-"))
    assert len(jobs[c1]) == 2 and all(len(v) == 1 for f, v in jobs.items() if f != c1)


def test_a_job_still_queued_or_running_is_never_submitted_twice(tmp_path, fake):
    command, launched = fake
    grid, out = make_grid(2), tmp_path / "g"
    run_on_slurm(grid, out, LOCAL, wait=True, console=quiet(), command=command, states=_no_slurm)
    folders = list(latest_jobs(read_json(out / "grid.json")))
    for f in folders:  # as if both cells were killed mid-run: unfinished, and their jobs said alive
        (out / f / "summary.json").write_text(json.dumps({"status": "running", "error": None}))
    before = len(launched())
    jobs = latest_jobs(read_json(out / "grid.json"))
    alive = {jobs[folders[0]]: "running", jobs[folders[1]]: "failed"}
    run_on_slurm(grid, out, LOCAL, wait=True, console=quiet(), command=command, states=lambda ids: alive)
    calls = launched()[before:]
    assert [c["folder"] for c in calls] == [folders[1]] and calls[0]["resume"] is True


def test_dry_run_previews_the_sbatch_script_and_writes_nothing(tmp_path, fake, capsys):
    command, _ = fake
    out = tmp_path / "g"
    options = SlurmOptions(partition="gpu", account="proj", time_min=30, cluster="slurm")
    assert run_on_slurm(make_grid(2), out, options, dry_run=True, command=command, states=_no_slurm) is None
    text = capsys.readouterr().out
    assert "#SBATCH --partition=gpu" in text and "#SBATCH --account=proj" in text
    assert "#SBATCH --array=0-1" in text and "--config" in text and "2 cell(s) would be submitted" in text
    assert not out.exists()


def test_slurm_nodes_splits_each_cells_replicas_and_refuses_an_uneven_split_before_writing(tmp_path, fake, capsys):
    command, _ = fake
    out, options = tmp_path / "g", SlurmOptions(nodes=2, cluster="slurm")
    with pytest.raises(UserError, match="1 replica.* do not split evenly over 2 nodes.*--slurm-nodes"):
        run_on_slurm(make_grid(2), out, options, command=command, states=_no_slurm)
    assert not out.exists()
    wide = Grid(name="wide", description="", source="test", defaults_fn=lambda: tiny_base().replace(nproc=4),
                cells_fn=lambda base: [Cell("w", "w", standard_factors(base), base)])
    run_on_slurm(wide, out, options, dry_run=True, command=command, states=_no_slurm)
    text = capsys.readouterr().out
    # a CPU cell: no GPUs asked, two replicas on each of the two nodes
    assert "#SBATCH --nodes=2" in text and "--gpus-per-node" not in text and "torchrun --nnodes 2" in text
    assert not out.exists()


def test_cli_slurm_nodes_is_checked_like_the_other_slurm_options(tmp_path):
    app = typer.Typer()
    app.command()(run_cmd)
    res = CliRunner().invoke(app, ["--grid", "smoke", "--out", str(tmp_path / "r"), "--slurm-nodes", "2"])
    assert res.exit_code == 2 and "--slurm-nodes only apply with --executor slurm" in res.output
    # given at its default value is still given (compared with the defaults, these once slipped through)
    res = CliRunner().invoke(app, ["--grid", "smoke", "--out", str(tmp_path / "r"), "--slurm-time", "240",
                                   "--wait", "--slurm-cluster", "slurm"])
    assert res.exit_code == 2, res.output
    assert "--wait, --slurm-time, --slurm-cluster only apply with --executor slurm" in res.output
    res = CliRunner().invoke(app, ["--grid", "smoke", "--out", str(tmp_path / "r"), "--executor", "slurm",
                                   "--slurm-nodes", "2", "--slurm-cluster", "local"])
    assert res.exit_code == 2 and "--slurm-nodes=2 needs cluster='slurm'" in res.output


def test_on_a_real_cluster_the_nodes_decide_about_cuda_but_not_an_explicit_cpu_cell():
    grid = make_grid(1, cuda_cell=True)

    def graph_reason(overrides: Overrides, options: SlurmOptions) -> str | None:
        return {p.cell.name: p.skip_reason for p in plan_for_cluster(grid, overrides, 1, options, "v")}["graph"]

    here = graph_reason(Overrides(device="auto"), LOCAL)
    if here is None:
        pytest.skip("this machine has CUDA: nothing to overrule")
    assert "needs CUDA" in here
    assert graph_reason(Overrides(device="auto"), SlurmOptions(cluster="slurm")) is None
    assert graph_reason(Overrides(), SlurmOptions(cluster="slurm")) is not None  # --device cpu + cuda-graph


def test_cli_executor_slurm_local_cluster_runs_the_grid(tmp_path, monkeypatch):
    """The command line end to end (`--slurm-cluster local --wait`): one real tiny training as an array task."""
    app = typer.Typer()
    app.command()(run_cmd)
    monkeypatch.chdir(tmp_path)
    grid_file = tmp_path / "one.py"
    grid_file.write_text(
        "from bench.grids import Cell, standard_factors\n"
        "from ddnet.config import DataConfig, ModelConfig, TrainConfig\n"
        "NAME = 'one'\nDESCRIPTION = 'one tiny cell'\n"
        "def defaults():\n"
        "    return TrainConfig(model=ModelConfig(base_width=4, growth=4, bottleneck=8), epochs=1, batch_size=4,\n"
        "                       data=DataConfig(image_size=32, n_train=8, n_val=2), num_workers=0, device='cpu')\n"
        "def cells(base):\n    return [Cell('only', 'only', standard_factors(base), base)]\n")
    res = CliRunner().invoke(app, ["--grid", str(grid_file), "--out", str(tmp_path / "r"), "--executor", "slurm",
                                   "--slurm-cluster", "local", "--wait"])
    assert res.exit_code == 0, res.output
    [cell] = [p for p in (tmp_path / "r").iterdir() if p.name.startswith("only-")]
    s = read_summary(cell)
    assert s["status"] == "ok" and s["epochs_completed"] == 1
    assert "submitted 1 cell(s)" in res.output and "1 ok" in res.output


# ------------------------------------------------------------------ a cell over two nodes, simulated here

TINY = ["--base-width", "4", "--growth", "4", "--bottleneck", "8", "--image-size", "32", "--n-train", "8",
        "--n-val", "4", "--batch-size", "4", "--epochs", "2", "--device", "cpu", "--num-workers", "0", "--quiet"]
NODE = ("import json, sys\nfrom pathlib import Path\nfrom bench.slurm import CellCommand, CellJob\n"
        "a = json.loads(sys.argv[1])\n"
        "job = CellJob(Path(a['folder']), a['argv'], nproc=0, nodes=2, replicas=2, cwd=a['cwd'])\n"
        "print('result:', json.dumps(CellCommand(job)()), flush=True)\n")
"""What submitit runs on each node of the job: the cell's CellCommand (CPU cell: 2 replicas, 0 GPUs)."""
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NODEID", "SLURM_JOB_NUM_NODES",
              "SLURM_JOB_NODELIST", "SLURM_PROCID", "SLURM_NTASKS", "RANK", "WORLD_SIZE", "LOCAL_RANK",
              "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
TWO_NODES_TIMEOUT_S = 240


def _free_rendezvous_task() -> str:
    """An array task id whose rendezvous port (derived from the id, as on a cluster) is free on 127.0.0.1."""
    for task in range(200):
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", rendezvous_port(f"4242_{task}")))
            return str(task)
        except OSError:
            continue
    pytest.skip("no TCP listening on 127.0.0.1 for the rendezvous here")


@pytest.mark.slow
@pytest.mark.timeout(TWO_NODES_TIMEOUT_S + 60)
def test_a_two_node_cell_runs_one_torchrun_per_node_and_node_0_keeps_the_folder(tmp_path):
    """Two 'nodes' of one Slurm job on this machine: the real `bench train` under torchrun (gloo, CPU), each
    node's CellCommand started as submitit would (Slurm's environment: node id, node list, array job id)."""
    task = _free_rendezvous_task()
    cell = tmp_path / "cell"
    cell.mkdir()
    # a grid cell, as `bench run` prepares it: with cell.json the trainer leaves train.log.node1 alone
    (cell / "cell.json").write_text(json.dumps({"grid": "two-nodes", "cell": "cell"}))
    argv = [sys.executable, "-m", "bench.cli", "train", "--out", str(cell), *TINY, "--nproc", "2"]
    arg = json.dumps({"folder": str(cell), "argv": argv, "cwd": str(ROOT)})
    env = {k: v for k, v in os.environ.items() if k not in SLURM_VARS}
    env.update(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4250", SLURM_ARRAY_JOB_ID="4242", SLURM_ARRAY_TASK_ID=task,
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1", OMP_NUM_THREADS="1",
               DDNET_BENCH_DIST_TIMEOUT_S="300")
    procs = [subprocess.Popen([sys.executable, "-c", NODE, arg], cwd=ROOT, env={**env, "SLURM_NODEID": str(node)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=TWO_NODES_TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:  # a hung node: its CellCommand stops its torchrun on SIGTERM's way out
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(cell.glob("train.log*")))
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs) + logs
    assert '"status": "ok"' in outs[0] and '"node": 1, "exit_code": 0' in outs[1]

    s = read_json(cell / "summary.json")
    assert s["status"] == "ok" and s["world_size"] == 2 and s["epochs_completed"] == 2
    assert read_json(cell / "config.json")["nproc"] == 2  # the cell's replicas, not the per-node count
    # static rendezvous on the first host: global rank 0 (the folder's writer) runs on node 0
    assert sorted((r["rank"], r["node"]) for r in s["ddp_ranks"]) == [(0, 0), (1, 1)]
    log = (cell / "train.log").read_text()
    [header] = [line for line in log.splitlines() if line.startswith("=== bench slurm")]
    assert f"job 4242_{task} " in header and "torch.distributed.run" in header and "--node-rank 0" in header
    assert "done: 2 epochs" in log  # rank 0's own output, on node 0
    other = (cell / "train.log.node1").read_text()
    assert f"node 1 of job 4242_{task}" in other and "--node-rank 1" in other and "done:" not in other


def test_dry_run_over_a_damaged_grid_json_previews_and_changes_nothing(tmp_path, fake, capsys):
    command, _ = fake
    out = tmp_path / "g"
    out.mkdir()
    (out / "grid.json").write_text('{"order": [')  # torn
    assert run_on_slurm(make_grid(2), out, SlurmOptions(cluster="slurm"), dry_run=True, command=command,
                        states=_no_slurm) is None
    assert "2 cell(s) would be submitted" in capsys.readouterr().out
    assert (out / "grid.json").read_text() == '{"order": [' and sorted(p.name for p in out.iterdir()) == ["grid.json"]


@pytest.mark.timeout(180)
def test_a_node_whose_node_0_is_gone_stops_instead_of_waiting_out_the_rendezvous(tmp_path, monkeypatch):
    """Node 1 of a two-node job alone in its rendezvous (node 0 failed before its torchrun started): once
    node 0's end marker is there, node 1 stops its torchrun after the grace (here 1 s) instead of 600 s."""
    import bench.slurm.node as node_mod  # noqa: PLC0415 - the module whose grace is shortened

    task = _free_rendezvous_task()
    cell = tmp_path / "cell"
    cell.mkdir()
    for var in SLURM_VARS:
        monkeypatch.delenv(var, raising=False)
    for k, v in dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4250", SLURM_ARRAY_JOB_ID="4242",
                     SLURM_ARRAY_TASK_ID=task, SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1",
                     SLURM_NODEID="1", OMP_NUM_THREADS="1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(node_mod, "NODE0_GRACE_S", 1.0)
    argv = [sys.executable, "-m", "bench.cli", "train", "--out", str(cell), *TINY, "--nproc", "2"]
    job = node_mod.CellJob(cell, argv, nproc=0, nodes=2, replicas=2, cwd=str(ROOT))
    marker = node_mod.node0_marker(cell, f"4242_{task}")
    assert marker.name == f".node0-ended.4242_{task}.0"
    marker.write_text("node 0 failed before its torchrun\n")  # as node 0's CellCommand leaves it
    t0 = time.monotonic()
    result = node_mod.CellCommand(job)()
    took = time.monotonic() - t0
    assert result["node"] == 1 and result["exit_code"] != 0
    assert took < 60  # torchrun's static rendezvous alone would wait 600 s
    log = (cell / "train.log.node1").read_text()
    assert "node 0 ended over 1 s ago" in log and "this node's torchrun still runs: stopped" in log
    # a requeued attempt of the same job reads another marker (Slurm's restart count)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert node_mod.node0_marker(cell, f"4242_{task}") != marker


def test_node_0_leaves_its_marker_however_it_ends(tmp_path, monkeypatch):
    import bench.slurm.node as node_mod  # noqa: PLC0415 - the module whose placement is faked

    cell = tmp_path / "cell"
    place = node_mod.NodePlace(0, ("a", "b"), "77_1")
    monkeypatch.setattr(node_mod, "node_place", lambda job: place)
    for code in (0, 3):
        marker = node_mod.node0_marker(cell, "77_1")
        marker.unlink(missing_ok=True)
        script = tmp_path / f"exit{code}.py"
        script.write_text(f"raise SystemExit({code})\n")
        job = node_mod.CellJob(cell, [sys.executable, str(script)], nproc=0, nodes=2, replicas=2, cwd=str(ROOT))
        monkeypatch.setattr(node_mod, "torchrun_command", lambda job, *a: job.command())
        with pytest.raises(node_mod.CellFailed):  # no summary either way: recorded as a failed cell
            node_mod.CellCommand(job)()
        assert marker.is_file()


def _fake_node(monkeypatch: pytest.MonkeyPatch, node: int, kills: list[int]) -> object:
    """bench.slurm.node as node `node` of the two-node job 77_1 on hosts a and b, its command run without torchrun,
    and its memory cgroup's out-of-memory kill counter reading `kills` in turn."""
    import bench.slurm.node as node_mod  # noqa: PLC0415 - the module whose placement is faked

    monkeypatch.setattr(node_mod, "node_place", lambda job: node_mod.NodePlace(node, ("a", "b"), "77_1"))
    monkeypatch.setattr(node_mod, "torchrun_command", lambda job, *a: job.command())
    def counter() -> int:
        return kills.pop(0) if len(kills) > 1 else kills[0]

    monkeypatch.setattr(node_mod, "oom_kills", counter)  # before the cell
    monkeypatch.setattr(cell_log, "oom_kills", counter)  # after it (oom_error)
    return node_mod


@pytest.mark.parametrize("struck", [True, False])
def test_node_k_says_how_its_torchrun_ended_and_whether_the_out_of_memory_killer_struck(tmp_path, monkeypatch,
                                                                                          struck):
    """Only a node can read its own memory cgroup: node 1 leaves its end marker, empty or with the reason."""
    node_mod = _fake_node(monkeypatch, 1, [4, 5] if struck else [4])
    script = tmp_path / "killed.py"
    script.write_text("raise SystemExit(1)\n")  # torchrun, its replica killed
    job = node_mod.CellJob(tmp_path / "cell", [sys.executable, str(script)], nproc=0, nodes=2, replicas=2,
                           cwd=str(ROOT))
    assert node_mod.CellCommand(job)() == {"folder": str(job.folder), "node": 1, "exit_code": 1}
    said = node_mod.node_end_marker(job.folder, "77_1", 1).read_text()
    if struck:
        assert said.startswith("exited with code 1 after the out-of-memory killer struck at its memory limit (a "
                               "Slurm job's --mem): ask for more memory (--slurm-mem-gb)"), said
    else:
        assert said == ""


@pytest.mark.parametrize("node_1_says", ["oom", "nothing", "no marker"])
def test_node_0_fails_a_cell_whose_replicas_the_out_of_memory_killer_ended_on_another_node(tmp_path, monkeypatch,
                                                                                            node_1_says):
    """Rank 0 sees only its replicas lost (PeerLost: resumable). When node 1 says its replica was killed at its
    memory limit, the cell is failed with the fix (it would die again); else it stays resumable, and node 0
    waits at most NODES_END_WAIT_S for a node that says nothing (a node lost)."""
    node_mod = _fake_node(monkeypatch, 0, [2])  # nothing killed on node 0
    monkeypatch.setattr(node_mod, "NODES_END_WAIT_S", 1.0)
    cell = tmp_path / "cell"
    cell.mkdir()
    lost = {"status": "running", "interrupted": "lost the other replicas (Connection reset by peer)"}
    script = tmp_path / "lost.py"  # what rank 0 does when its group breaks unexplained (PeerLost: exit 6)
    script.write_text(f"import json, pathlib\npathlib.Path({str(cell / 'summary.json')!r}).write_text("
                      f"json.dumps({lost!r}))\nprint('PeerLost: lost the other replicas')\nraise SystemExit(6)\n")
    job = node_mod.CellJob(cell, [sys.executable, str(script)], nproc=0, nodes=2, replicas=2, cwd=str(ROOT))
    if node_1_says != "no marker":
        node_mod.node_end_marker(cell, "77_1", 1).write_text(  # as node 1 leaves it
            f"exited with code 1 after {cell_log.OOM_STRUCK}" if node_1_says == "oom" else "")
    t0 = time.monotonic()
    with pytest.raises(node_mod.CellFailed) as failed:
        node_mod.CellCommand(job)()
    took = time.monotonic() - t0
    s = read_json(cell / "summary.json")
    if node_1_says == "oom":
        assert s["status"] == "failed" and "interrupted" not in s, s
        assert s["error"] == ("cell process stopped when node 1 (b) ended, its torchrun exited with code 1 after "
                              f"{cell_log.OOM_STRUCK}"), s["error"]  # not rank 0's 'PeerLost' line
        assert "train.log.node1" in str(failed.value) and took < 1.0
        return
    assert s == lost  # resumable: the next `bench run` resubmits it
    assert "it stays resumable" in str(failed.value)
    assert (took >= 1.0) == (node_1_says == "no marker")  # node 1's word ends the wait
