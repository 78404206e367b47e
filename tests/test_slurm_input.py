"""`bench run --executor slurm` given bad input or a Slurm that refuses: one line naming the fix, and no job
submitted before a refusal is forgotten. No cluster: fake `srun`/`sbatch`/`squeue` on PATH, or a fake executor."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from bench.cmd_run import run_cmd
from bench.grids import Cell, Grid, standard_factors
from bench.planning import Overrides
from bench.run_slurm import run_on_slurm, stop_waiting_line
from bench.slurm import CellJob, SlurmOptions, job_states, latest_jobs, submit_jobs
from bench.store import read_json
from ddnet.errors import UserError
from tests.fake_trainer import make_grid, quiet, tiny_base


def _bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scripts: dict[str, str], keep_path: bool = True) -> Path:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    # a host may have the real Slurm clients in /usr/bin: they must not answer for the fakes
    for tool in ("sbatch", "squeue", "sacct", "srun"):
        if tool not in scripts:
            (bin_dir / tool).write_text("#!/bin/sh\necho 'not here' >&2\nexit 127\n")
            (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}" if keep_path else str(bin_dir))
    return bin_dir


def _cli(*args: str) -> object:
    app = typer.Typer()
    app.command()(run_cmd)
    return CliRunner().invoke(app, list(args))


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("value, minutes", [
    (30, 30), ("240", 240), ("4:00:00", 240), ("04:00:00", 240), ("90:30", 91), ("1-00", 1440),
    ("1-12:30", 2190), ("2-00:00:01", 2881),
])
def test_slurm_time_takes_minutes_or_slurms_own_formats(value, minutes):
    assert SlurmOptions(time_min=value).time_min == minutes


@pytest.mark.parametrize("value", ["4h", "", "1:2:3:4", "-5", "UNLIMITED", "1-", "0:00:30x"])
def test_a_slurm_time_slurm_would_not_read_is_refused_naming_the_formats(value):
    with pytest.raises(UserError) as e:
        SlurmOptions(time_min=value)
    assert "give minutes (e.g. 240) or Slurm's" in str(e.value) and "\n" not in str(e.value)


def test_cli_slurm_time_in_hours_minutes_seconds_reaches_the_sbatch_script(tmp_path):
    res = _cli("--grid", "table1", "--out", str(tmp_path / "r"), "--executor", "slurm", "--data", "synthetic",
               "--image-size", "64", "--epochs", "2", "--slurm-time", "1-02:00:00", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "#SBATCH --time=1560\n" in res.output


def test_cli_slurm_time_too_short_for_the_requeue_signal_names_the_option_not_the_api_field(tmp_path):
    res = _cli("--grid", "table1", "--out", str(tmp_path / "r"), "--executor", "slurm", "--slurm-time", "1",
               "--dry-run")
    assert res.exit_code == 2
    assert "--slurm-time=1" in res.output and "at least 2 minutes" in res.output
    assert "SlurmOptions" not in res.output and "time_min" not in res.output


@pytest.mark.parametrize("mem", [float("inf"), 0.0001, 0.0009])
def test_memory_sbatch_cannot_take_or_would_read_as_the_whole_node_is_refused(mem):
    # submitit writes int(GB * 1024) MB: below 1 MB that is --mem=0, which Slurm reads as all of a node's memory
    with pytest.raises(UserError, match="mem_gb") as e:
        SlurmOptions(mem_gb=mem)
    assert "\n" not in str(e.value)
    assert SlurmOptions(mem_gb=0.001).mem_gb == 0.001


def test_cli_slurm_mem_gb_inf_is_one_line_not_a_traceback(tmp_path):
    res = _cli("--grid", "table1", "--out", str(tmp_path / "r"), "--executor", "slurm", "--slurm-mem-gb", "inf",
               "--dry-run")
    assert res.exit_code == 2 and "--slurm-mem-gb=inf" in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


@pytest.mark.parametrize("extra, fix", [
    ("--ntasks-per-node=2", "one task per node"),
    ("--ntasks=4", "one task per node"),
    ("-n", None),  # not a --key: the format message
    ("--signal=USR1@60", "bench sets it"),
    ("--job-name=mine", "bench sets it"),
])
def test_cli_extra_directives_bench_owns_are_refused_with_a_fix_the_command_line_can_apply(tmp_path, extra, fix):
    res = _cli("--grid", "table1", "--out", str(tmp_path / "r"), "--executor", "slurm",
               f"--slurm-extra={extra}", "--dry-run")
    assert res.exit_code == 2, res.output
    assert "SlurmOptions" not in res.output and (fix is None or fix in res.output), res.output


@pytest.mark.parametrize("extra, said", [
    ("--gres=gpu:2", "--gres=gpu:2"),
    ("--gres=nvme:1,gpu:a100:1", "--gres=nvme:1,gpu:a100:1"),
    ("--gpus=2", "--gpus=2"),
    ("--gpus-per-node=2", "--gpus-per-node=2"),
    ("--gpus-per-task=1", "--gpus-per-task=1"),
    ("--gpus_per_task=1", "--gpus-per-task=1"),
    ("-G 2", "-G 2"),
    ("-G2", "-G 2"),
])
def test_cli_a_gpu_request_in_slurm_extra_is_refused_beside_benchs_own(tmp_path, extra, said):
    # bench writes --gpus-per-node for every GPU cell: a second request would reach sbatch beside it
    res = _cli("--grid", "table1", "--out", str(tmp_path / "r"), "--executor", "slurm", "--data", "synthetic",
               "--image-size", "64", "--epochs", "2", f"--slurm-extra={extra}", "--dry-run")
    assert res.exit_code == 2, res.output
    line = " ".join(res.output.split())
    assert f"--slurm-extra sets {said}, a second GPU request" in line and "use --slurm-gpus-per-node" not in line
    assert "set --slurm-gpus-per-node instead" in line and "SlurmOptions" not in line, line
    assert not (tmp_path / "r").exists()


def test_a_gres_that_is_not_a_gpu_still_reaches_sbatch():
    assert SlurmOptions(extra_sbatch=["--gres=nvme:1"]).additional_parameters() == {"gres": "nvme:1"}
    with pytest.raises(UserError, match="sets -G 1, a second GPU request"):
        SlurmOptions(extra_sbatch={"G": 1})
    with pytest.raises(UserError, match="sets -n: bench sets it"):  # a short option bench owns: why, not how
        SlurmOptions(extra_sbatch=["-n 4"])


def test_cli_slurm_partition_that_swallowed_the_next_option_is_refused(tmp_path):
    res = _cli("--grid", "table1", "--out", str(tmp_path / "r"), "--executor", "slurm", "--slurm-partition",
               "--slurm-qos", "--dry-run")
    assert res.exit_code == 2, res.output
    assert "--slurm-partition='--slurm-qos' is an option, not a Slurm partition name" in res.output


def test_memory_per_cpu_beside_slurm_mem_gb_is_refused_before_sbatch_refuses_it():
    with pytest.raises(UserError, match="sbatch takes only one; drop one of them"):
        SlurmOptions(mem_gb=8, extra_sbatch=["--mem-per-cpu=2G"])
    assert SlurmOptions(extra_sbatch=["--mem-per-cpu=2G"]).additional_parameters() == {"mem-per-cpu": "2G"}


# ------------------------------------------------------------------ sbatch refuses, or is missing


SBATCH_OK_ONCE = """n=$(cat "$FAKE_SLURM_DIR/count" 2>/dev/null || echo 0); echo $((n + 1)) > "$FAKE_SLURM_DIR/count"
if [ "$n" -ge 1 ]; then
  echo "sbatch: error: invalid partition specified: gpux" >&2
  echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
  exit 1
fi
echo "Submitted batch job 4242"
"""


def _jobs(tmp_path: Path, gpus: list[int]) -> list[CellJob]:
    jobs = []
    for i, g in enumerate(gpus):
        folder = tmp_path / f"cell{i}"
        folder.mkdir()
        jobs.append(CellJob(folder, ["python", "-c", "pass"], nproc=g))
    return jobs


def test_sbatch_refusing_an_array_is_one_line_with_its_reason_and_keeps_what_was_submitted(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(tmp_path))
    _bin(tmp_path, monkeypatch, {"srun": "exit 0\n", "sbatch": SBATCH_OK_ONCE})
    jobs = _jobs(tmp_path, [1, 2, 1])  # two arrays: 1 GPU (cells 0, 2), then 2 GPUs (cell 1), which fails
    with pytest.raises(UserError) as e:
        submit_jobs(jobs, SlurmOptions(partition="gpux"), tmp_path / "slurm")
    msg = str(e.value)
    assert "\n" not in msg and "Invalid partition name specified" in msg and "--slurm-partition" in msg
    assert [str(j.job_id) if j else None for j in getattr(e.value, "submitted", [])] == ["4242_0", None, "4242_1"]


def test_no_sbatch_beside_srun_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    bin_dir = _bin(tmp_path, monkeypatch, {"srun": "exit 0\n"}, keep_path=False)
    (bin_dir / "sbatch").unlink()
    with pytest.raises(UserError, match="no sbatch on PATH") as e:
        submit_jobs(_jobs(tmp_path, [1]), SlurmOptions(), tmp_path / "slurm")
    assert "\n" not in str(e.value)


class _Executor:
    """submitit's executor interface, enough for submit_jobs: the n-th array is refused."""

    arrays = 0

    def __init__(self, refuse_at: int) -> None:
        self.refuse_at = refuse_at

    def update_parameters(self, **kwargs: object) -> None:
        pass

    @contextlib.contextmanager
    def batch(self):
        yield
        _Executor.arrays += 1
        if _Executor.arrays == self.refuse_at:
            raise RuntimeError("sbatch: error: Batch job submission failed: Invalid account or account/partition "
                               "combination specified")

    def submit(self, fn: object) -> object:
        job = type("Job", (), {})()
        job.job_id = f"{700 + _Executor.arrays}_{id(fn) % 1000}"
        return job


def _two_shape_grid() -> Grid:
    def cells(base):
        one, two = base.replace(device="auto", nproc=1), base.replace(device="auto", nproc=2)
        return [Cell("one", "one gpu", standard_factors(one), one), Cell("two", "two gpus", standard_factors(two), two)]

    return Grid(name="shapes", description="two shapes", source="test", cells_fn=cells, defaults_fn=tiny_base)


def test_a_refused_second_array_leaves_the_first_arrays_jobs_recorded(tmp_path, fake):
    command, _ = fake
    _Executor.arrays = 0
    out = tmp_path / "g"
    with pytest.raises(UserError, match="Invalid account") as e:
        run_on_slurm(_two_shape_grid(), out, SlurmOptions(cluster="slurm"), console=quiet(), command=command,
                     executor_factory=lambda folder: _Executor(refuse_at=2), states=lambda ids: {})
    assert "1 cell(s) submitted before it are recorded" in str(e.value)
    recorded = latest_jobs(read_json(out / "grid.json"))
    assert [f.split("-")[0] for f in recorded] == ["one"]  # the job that runs is known: never submitted twice



class _InterruptedExecutor(_Executor):
    """The first array's sbatch reports the signals it has blocked, then `signum` reaches this process, as a Ctrl-C in
    the terminal (or a SIGTERM) would while sbatch ran."""

    def __init__(self, signum: int, blocked: list[set[int]]) -> None:
        super().__init__(refuse_at=0)
        self.signum, self.blocked = signum, blocked

    @contextlib.contextmanager
    def batch(self):
        yield
        res = subprocess.run([sys.executable, "-c", "import signal; print(*map(int, signal.pthread_sigmask("
                              "signal.SIG_BLOCK, [])))"], capture_output=True, text=True, check=True)
        self.blocked.append({int(x) for x in res.stdout.split()})
        _Executor.arrays += 1
        # to the main thread itself: a process-wide kill may land in another thread (torch's, pytest's) a moment
        # later, after the check before the next array (seen in CI); a real Ctrl-C then waits for that array
        signal.pthread_kill(threading.main_thread().ident, self.signum)


@pytest.mark.parametrize("cluster", ["slurm", "local"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_submitting_waits_until_the_queued_jobs_are_recorded(tmp_path, fake, signum, cluster):
    """Ctrl-C (or SIGTERM) during the submission could leave an array queued but not in grid.json: it ran unseen,
    and the next `bench run` queued its cells again. Now the signal is held until the ids are recorded, no later
    array is submitted, and the line says which jobs run and what the same command does."""
    command, _ = fake
    _Executor.arrays = 0
    blocked: list[set[int]] = []
    out, said = tmp_path / "g", io.StringIO()
    with pytest.raises(KeyboardInterrupt) as e:
        run_on_slurm(_two_shape_grid(), out, SlurmOptions(cluster=cluster), console=Console(file=said, width=400),
                     command=command, executor_factory=lambda folder: _InterruptedExecutor(signum, blocked),
                     states=lambda ids: {})
    assert _Executor.arrays == 1  # the second array was never submitted
    recorded = latest_jobs(read_json(out / "grid.json"))
    assert [f.split("-")[0] for f in recorded] == ["one"] and recorded[next(iter(recorded))].startswith("700_")
    scancel = " and keep running (cancel them with `scancel 700`)" if cluster == "slurm" else ""
    assert str(e.value) == (f"stopped submitting: 1 cell(s) submitted as job(s) 700 are recorded in grid.json{scancel}; "
                            f"1 cell(s) were not submitted: the same command submits them; `bench status {out}` "
                            "shows where each cell stands.")
    assert f"{signal.Signals(signum).name}: stopping once the jobs sbatch queued are recorded" in said.getvalue()
    # sbatch itself cannot be killed by the terminal's Ctrl-C on a real cluster; submitit's local cells, started
    # from this process, must not keep the signals blocked for good
    held = {int(signal.SIGINT), int(signal.SIGTERM)}
    assert (held <= blocked[0]) if cluster == "slurm" else not (held & blocked[0])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert not (held & signal.pthread_sigmask(signal.SIG_BLOCK, []))

# ------------------------------------------------------------------ Slurm that does not answer


def test_squeue_failing_is_not_every_job_gone(tmp_path, monkeypatch):
    _bin(tmp_path, monkeypatch, {"squeue": "echo 'slurm_load_jobs error: Socket timed out' >&2\nexit 1\n",
                                 "sacct": "echo 'sacct: error: slurmdbd: connection refused' >&2\nexit 1\n"})
    assert job_states(["4242_0", "4243"]) == {}  # as without Slurm: not asked, rather than 'unknown'


def test_a_rerun_while_slurm_does_not_answer_submits_no_duplicate(tmp_path, fake):
    command, _ = fake
    _Executor.arrays = 0
    out = tmp_path / "g"
    run_on_slurm(_two_shape_grid(), out, SlurmOptions(cluster="slurm"), console=quiet(), command=command,
                 executor_factory=lambda folder: _Executor(refuse_at=0), states=lambda ids: {"x": "running"})
    before = read_json(out / "grid.json")["jobs"]
    grid = read_json(out / "grid.json")
    grid["jobs"] = {f: [{**r[0], "submitted_at": "2020-01-01T00:00:00+00:00"}] for f, r in before.items()}
    (out / "grid.json").write_text(__import__("json").dumps(grid))
    with pytest.raises(UserError, match="squeue"):
        run_on_slurm(_two_shape_grid(), out, SlurmOptions(cluster="slurm"), console=quiet(), command=command,
                     executor_factory=lambda folder: _Executor(refuse_at=0), states=lambda ids: {})
    assert {f: len(r) for f, r in read_json(out / "grid.json")["jobs"].items()} == {f: 1 for f in before}
    # failed cells (not retried) and finished ones need no answer: nothing of theirs would be submitted
    for f in before:
        (out / f / "summary.json").write_text('{"status": "failed", "error": "nan loss"}')
    run_on_slurm(_two_shape_grid(), out, SlurmOptions(cluster="slurm"), console=quiet(), command=command,
                 executor_factory=lambda folder: _Executor(refuse_at=0), states=lambda ids: {})
    assert {f: len(r) for f, r in read_json(out / "grid.json")["jobs"].items()} == {f: 1 for f in before}


# ------------------------------------------------------------------ --slurm-cluster local runs here


def test_local_cluster_with_device_cuda_and_no_cuda_is_refused_as_the_local_runner_refuses_it(tmp_path, fake):
    import torch  # noqa: PLC0415 - only to know whether this machine has CUDA

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    command, launched = fake
    with pytest.raises(UserError, match="--device cuda was asked for but no CUDA device is visible here"):
        run_on_slurm(_two_shape_grid(), tmp_path / "g", SlurmOptions(cluster="local"), Overrides(device="cuda"),
                     console=quiet(), command=command, states=lambda ids: {})
    assert not (tmp_path / "g").exists() and launched() == []
    # on a real cluster the nodes decide (a login node has no GPU)
    run_on_slurm(_two_shape_grid(), tmp_path / "s", SlurmOptions(cluster="slurm"), Overrides(device="cuda"),
                 dry_run=True, console=quiet(), command=command, states=lambda ids: {})


def test_wait_summary_says_skipped_not_skipped_earlier_for_a_cell_skipped_by_this_run(tmp_path, fake):
    command, _ = fake
    grid = make_grid(1, cuda_cell=True)  # its 'graph' cell needs CUDA and the grid says --device cpu: skipped
    options = SlurmOptions(cluster="local", time_min=5)
    first = run_on_slurm(grid, tmp_path / "g", options, wait=True, console=quiet(), command=command,
                         states=lambda ids: {})
    assert {r.folder.split("-")[0]: (r.status, r.action) for r in first} == {
        "c0": ("ok", "submitted"), "graph": ("skipped", "skipped")}
    again = run_on_slurm(grid, tmp_path / "g", options, wait=True, console=quiet(), command=command,
                         states=lambda ids: {})
    assert {r.folder.split("-")[0]: r.action for r in again} == {"c0": "reused", "graph": "reused"}


def test_debug_cluster_runs_its_cells_only_under_wait_and_a_failed_cell_is_a_row_not_a_traceback(tmp_path, fake,
                                                                                                 monkeypatch):
    command, launched = fake
    grid, debug = make_grid(2), SlurmOptions(cluster="debug", time_min=5)
    # submitit's DebugExecutor runs a job in this process when its result is asked for: without --wait, never
    with pytest.raises(UserError, match="add --wait, or use --slurm-cluster local"):
        run_on_slurm(grid, tmp_path / "g", debug, console=quiet(), command=command, states=lambda ids: {})
    assert launched() == []
    monkeypatch.setenv("FAKE_FAIL", "c1-")  # c1 records a failed run, as a NaN loss would
    import pdb  # noqa: PLC0415 - submitit's debug job opens pdb on a failed job: a prompt at the user's terminal

    monkeypatch.setattr(pdb, "post_mortem", lambda *a: pytest.fail("pdb opened on a failed cell"))
    results = run_on_slurm(grid, tmp_path / "g", debug, wait=True, console=quiet(), command=command,
                           states=lambda ids: {})
    assert sorted((r.folder.split("-")[0], r.status) for r in results) == [("c0", "ok"), ("c1", "failed")]


def test_slurm_nodes_over_a_one_replica_grid_names_a_fix_bench_run_can_take(tmp_path, fake):
    # no shipped grid sets nproc and `bench run` has no --nproc: "give it a multiple of 2" could not be followed
    command, _ = fake
    with pytest.raises(UserError) as e:
        run_on_slurm(make_grid(2), tmp_path / "g", SlurmOptions(nodes=2, cluster="slurm"), command=command,
                     states=lambda ids: {})
    msg = str(e.value)
    assert "trains 1 replica(s) (its nproc), which do not split evenly over 2 nodes" in msg and "\n" not in msg
    assert "a grid file whose cells set nproc" in msg and "--slurm-nodes 1" in msg


# ------------------------------------------------------------------ the local runner over a grid Slurm still runs

FAKE_SBATCH = """n=$(cat "$FAKE_SLURM_DIR/count" 2>/dev/null || echo 4241); n=$((n + 1)); echo $n > "$FAKE_SLURM_DIR/count"
echo "Submitted batch job $n"
"""


def test_the_local_runner_refuses_cells_whose_slurm_jobs_are_queued_or_running(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(tmp_path))
    squeue = 'cat "$FAKE_SLURM_DIR/squeue" 2>/dev/null\n'
    _bin(tmp_path, monkeypatch, {"srun": "exit 0\n", "sbatch": FAKE_SBATCH, "squeue": squeue, "sacct": "exit 0\n"})
    out = tmp_path / "r"
    args = ["--grid", "table1", "--out", str(out), "--data", "synthetic", "--image-size", "64", "--epochs", "1",
            "--n-train", "8", "--n-val", "4", "--device", "cpu"]
    res = _cli(*args, "--executor", "slurm")
    assert res.exit_code == 0, res.output
    (tmp_path / "squeue").write_text("4242_0|RUNNING\n4242_1|PENDING\n")
    res = _cli(*args)  # the same grid with the local runner: the same cells would run twice at once
    assert res.exit_code == 2, res.output
    assert "Slurm job(s) 4242_0 (running), 4242_1 (queued)" in res.output and "scancel" in res.output
    assert not any((out / f / "epochs.jsonl").exists() for f in latest_jobs(read_json(out / "grid.json")))
    (tmp_path / "squeue").write_text("")  # the jobs ended (sacct lists nothing: unknown): the local runner may go
    res = _cli(*args, "--dry-run")
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------ Ctrl-C while --wait waits


def test_ctrl_c_while_waiting_says_the_jobs_go_on_and_how_to_watch_or_cancel_them(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(tmp_path))
    _bin(tmp_path, monkeypatch, {"srun": "exit 0\n", "sbatch": FAKE_SBATCH, "squeue": "exit 0\n", "sacct": "exit 0\n"})

    def interrupted(job: object) -> bool:
        raise KeyboardInterrupt  # the user's Ctrl-C, in the wait loop

    monkeypatch.setattr("bench.run_slurm._done", interrupted)
    out = tmp_path / "r"
    res = _cli("--grid", "table1", "--out", str(out), "--data", "synthetic", "--image-size", "64", "--epochs", "1",
               "--n-train", "8", "--n-val", "4", "--device", "cpu", "--executor", "slurm", "--wait")
    assert res.exit_code == 130, res.output
    ids = sorted(latest_jobs(read_json(out / "grid.json")).values())
    assert ids and {i.split("_")[0] for i in ids} == {"4242"}  # recorded before the wait: a rerun leaves them be
    line = " ".join(res.output.split())
    assert (f"stopped waiting; the {len(ids)} cell(s) submitted as job(s) 4242 keep running on the cluster: watch "
            f"them with `bench status {out}`, cancel them with `scancel 4242`." in line), line
    assert "Aborted" not in res.output
    # submitit's local executor ran the cells here, under the same terminal: no claim that they go on
    assert "may have stopped with it" in stop_waiting_line(out, {"c0": "77"}, "local")
