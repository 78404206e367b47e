"""bench.slurm: options, sbatch preview, submission through submitit (local executor and a fake sbatch),
checkpoint / requeue with --resume, job states, and which cells a rerun submits.

No cluster: submitit's LocalExecutor runs the array tasks as real processes on this machine, and a fake
`srun` + `sbatch` on PATH lets the real SlurmExecutor write its batch script. Cells run a fake
`bench train` (no torch) that follows the run-folder contract.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pickle
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bench import cell_log
from bench.slurm import (
    CELL_LOCK,
    CellCommand,
    CellFailed,
    CellJob,
    SlurmOptions,
    job_states,
    latest_jobs,
    pending_cells,
    record_jobs,
    rendezvous_port,
    sbatch_preview,
    sbatch_text,
    slurm_state,
    state_label,
    state_text,
    submission_decisions,
    submit,
    submit_jobs,
    torchrun_command,
)
from ddnet.errors import UserError

# A stand-in for `bench train`: epochs.jsonl rows, a JSON "ckpt.pt" replaced after each epoch,
# summary.json; --resume drops rows past the checkpoint; it refuses to start fresh over rows (as the
# trainer does). Config keys: epochs, epoch_s, fail_at_epoch (records a failure, exit 3), crash_at_epoch
# (exit 9 without a summary), full_at_epoch (exit 4 as on a full disk, nothing recorded), hang_at_epoch
# (sleeps an hour: a stuck GPU), alive_start_s (that long before its first epoch, touching .alive every 0.2 s: a
# slow start that lives). Its pid goes to <out>/pid so a test can kill it.
FAKE_TRAIN = r'''
import json, os, sys, time
from pathlib import Path
args = sys.argv[1:]
cfg = json.loads(Path(args[args.index("--config") + 1]).read_text())
out = Path(args[args.index("--out") + 1])
resume = "--resume" in args
(out / "pid").write_text(str(os.getpid()))
summ, rows_path, ck = out / "summary.json", out / "epochs.jsonl", out / "ckpt.pt"
rows = [json.loads(l) for l in rows_path.read_text().splitlines() if l.strip()] if rows_path.exists() else []
if rows and not resume:
    print("error: holds epochs of an unfinished run; add --resume"); sys.exit(2)
start = json.loads(ck.read_text())["epoch"] if (resume and ck.exists()) else 0
rows = [r for r in rows if r["epoch"] <= start]
rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
(out / "config.json").write_text(json.dumps(cfg))
summ.write_text(json.dumps({"status": "running", "error": None}))
print(f"start at epoch {start}", flush=True)
until = time.monotonic() + cfg.get("alive_start_s", 0.0)
while time.monotonic() < until:
    (out / ".alive").touch()
    time.sleep(0.2)
for e in range(start + 1, cfg["epochs"] + 1):
    time.sleep(cfg.get("epoch_s", 0.0))
    if cfg.get("hang_at_epoch") == e:
        time.sleep(3600)
    if cfg.get("crash_at_epoch") == e:
        print("segfault-like crash", flush=True); os._exit(9)
    if cfg.get("full_at_epoch") == e:
        print(f"error: cannot write {ck} (the disk is full: No space left on device)", flush=True); sys.exit(4)
    if cfg.get("fail_at_epoch") == e:
        err = f"train loss became nan at epoch {e}\nmore"
        summ.write_text(json.dumps({"status": "failed", "error": err}))
        print(f"error: training failed at epoch {e}", flush=True); sys.exit(3)
    with open(rows_path, "a") as f:
        f.write(json.dumps({"epoch": e, "phase": "dense", "time_s": 0.25, "train_loss": 1.0 / e}) + "\n")
    tmp = out / "ckpt.tmp"
    tmp.write_text(json.dumps({"epoch": e}))
    os.replace(tmp, ck)
    print(f"epoch {e}", flush=True)
summ.write_text(json.dumps({"status": "ok", "error": None, "epochs_completed": cfg["epochs"],
                            "total_time_s": 0.25 * cfg["epochs"]}))
print("done", flush=True)
'''


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAIN)
    return path


def make_job(root: Path, fake: Path, name: str, nproc: int = 0, **cfg) -> CellJob:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.request.json").write_text(json.dumps({"epochs": 3, **cfg}))
    argv = [sys.executable, str(fake), "--config", str(folder / "config.request.json"), "--out", str(folder)]
    return CellJob(folder=folder, argv=argv, nproc=nproc)


def epochs_of(folder: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (folder / "epochs.jsonl").read_text().splitlines()]


def headers(folder: Path) -> list[str]:
    return [line for line in (folder / "train.log").read_text().splitlines() if line.startswith("=== ")]


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("kwargs, message", [
    ({"time_min": 0}, "time_min=0: give a whole number >= 1"),
    ({"time_min": 2.5}, "time_min=2.5"),
    ({"nodes": 0}, "nodes=0: give a whole number >= 1"),
    ({"nodes": 2, "cluster": "local"}, "nodes=2 needs cluster='slurm'"),
    ({"gpus_per_node": -1}, "gpus_per_node=-1"),
    ({"cpus_per_task": 0}, "cpus_per_task=0"),
    ({"mem_gb": 0}, "mem_gb=0: give the memory per node in GB"),
    ({"array_parallelism": 0}, "array_parallelism=0"),
    ({"partition": "gpu a100"}, "partition='gpu a100'"),
    ({"extra_sbatch": ["constraint=a100"]}, "write it as --key=value"),
    ({"extra_sbatch": ["--partition=gpu"]}, "sets --partition: set SlurmOptions.partition instead"),
    ({"extra_sbatch": {"output": "x.log"}}, "sets --output: submitit sets it"),
    ({"extra_sbatch": "--constraint=a100"}, "give a list of '--key=value' strings or a dict"),
    ({"signal_delay_s": 600, "time_min": 10}, "time_min=10 is too short: Slurm signals the job 600 s before"),
    ({"cluster": "pbs"}, "choose one of slurm, local, debug"),
    ({"job_name": "my job"}, "job_name='my job'"),
    ({"stall_timeout_s": -1}, "stall_timeout_s=-1: give a finite number of seconds (>= 0; 0 turns the watch off)"),
    ({"stall_timeout_s": float("inf")}, "stall_timeout_s=inf: give a finite number of seconds"),
    ({"stall_timeout_s": float("nan")}, "stall_timeout_s=nan: give a finite number of seconds"),
])
def test_options_refuse_bad_values_in_one_line_that_names_the_fix(kwargs, message):
    with pytest.raises(UserError, match=None) as e:
        SlurmOptions(**kwargs)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_extra_sbatch_list_and_dict_become_submitit_additional_parameters():
    listed = SlurmOptions(extra_sbatch=["--constraint=a100", "--exclusive", "--mail-type=END"])
    assert listed.additional_parameters() == {"constraint": "a100", "exclusive": True, "mail-type": "END"}
    keyed = SlurmOptions(extra_sbatch={"mail_user": "me@x.org"})
    assert keyed.additional_parameters() == {"mail-user": "me@x.org"}


def test_cell_job_validates_and_decides_resume_from_the_checkpoint(tmp_path, fake):
    with pytest.raises(UserError, match="3 replica.* do not split evenly over 2 nodes; give it a multiple of 2"):
        CellJob(tmp_path / "c", ["py", "-m", "bench.cli"], nproc=3, nodes=2)
    with pytest.raises(UserError, match="1 replica"):  # a CPU cell: its replicas, not its (zero) GPUs
        CellJob(tmp_path / "c", ["py", "-m", "bench.cli"], nproc=0, nodes=2)
    with pytest.raises(UserError, match="torchrun starts it on each node"):
        CellJob(tmp_path / "c", ["py", "-u", "train.py"], nproc=2, nodes=2)
    with pytest.raises(UserError, match="argv must be a non-empty list"):
        CellJob(tmp_path / "c", [])
    job = make_job(tmp_path, fake, "c")
    assert "--resume" not in job.command()
    (job.folder / "ckpt.pt").write_text("{}")
    assert job.command() == [*job.argv, "--resume"]
    # a planned --resume with no checkpoint behind it is dropped
    assert "--resume" not in CellJob(tmp_path / "d", [*job.argv, "--resume"]).command()


# ------------------------------------------------------------------ preview


def preview_options(**kw) -> SlurmOptions:
    return SlurmOptions(partition="gpu", account="proj42", qos="high", time_min=90, cpus_per_task=8,
                        mem_gb=32,
                        array_parallelism=4, extra_sbatch=["--constraint=a100", "--exclusive"],
                        setup=["module load cuda/12.4"], job_name="ddnet-full", **kw)


def test_sbatch_preview_holds_every_directive_and_the_exact_cell_commands(tmp_path, fake):
    pytest.importorskip("submitit")
    jobs = [make_job(tmp_path, fake, f"cell{i}", nproc=2) for i in range(5)]
    text = sbatch_preview(jobs, preview_options(), tmp_path / "slurm")
    for directive in ("--partition=gpu", "--account=proj42", "--qos=high", "--time=90", "--gpus-per-node=2",
                      "--cpus-per-task=8", "--mem=32GB", "--array=0-4%4", "--constraint=a100",
                      "--job-name=ddnet-full", "--ntasks-per-node=1", "--nodes=1"):
        assert f"#SBATCH {directive}\n" in text, directive
    assert "#SBATCH --exclusive\n" in text
    assert "module load cuda/12.4" in text and "-m submitit.core._submit" in text
    for i, job in enumerate(jobs):
        assert f"#  [{i}] {job.folder}: {shlex.join(job.argv)}" in text
    assert "approximate" not in text


def test_preview_splits_cells_by_gpu_count_and_gpus_override(tmp_path, fake):
    pytest.importorskip("submitit")
    jobs = [make_job(tmp_path, fake, "a", nproc=1), make_job(tmp_path, fake, "b", nproc=4),
            make_job(tmp_path, fake, "c", nproc=1), make_job(tmp_path, fake, "cpu", nproc=0)]
    text = sbatch_preview(jobs, preview_options(), tmp_path / "slurm")
    assert text.count("# ---- job array") == 3
    assert "--gpus-per-node=1\n" in text and "--gpus-per-node=4\n" in text and "--array=0-1%2" in text
    # a CPU cell asks for no GPU at all (no --gpus-per-node=0 line, which some clusters refuse)
    assert "--gpus-per-node=0" not in text
    one = sbatch_preview(jobs, preview_options(gpus_per_node=8), tmp_path / "slurm")
    assert one.count("# ---- job array") == 1 and "--gpus-per-node=8\n" in one


def test_a_multi_node_cell_asks_each_node_for_its_share_of_the_gpus(tmp_path, fake):
    pytest.importorskip("submitit")
    jobs = [replace(make_job(tmp_path, fake, "c8", nproc=8), nodes=2), make_job(tmp_path, fake, "c1", nproc=1)]
    text = sbatch_preview(jobs, preview_options(), tmp_path / "slurm")
    two, one = text.split("# ---- job array 2/2")
    assert "4 GPU(s) x 2 node(s)" in two and "#SBATCH --nodes=2\n" in two and "#SBATCH --gpus-per-node=4\n" in two
    assert "#SBATCH --ntasks-per-node=1\n" in two and "torchrun --nnodes 2" in two
    assert "#SBATCH --nodes=1\n" in one and "#SBATCH --gpus-per-node=1\n" in one and "torchrun" not in one


def test_torchrun_command_is_the_same_job_on_every_node_but_its_rank(tmp_path, fake):
    job = replace(make_job(tmp_path, fake, "c", nproc=8), nodes=2,
                  argv=[sys.executable, "-m", "bench.cli", "train", "--out", "o", "--nproc", "8", "--quiet"])
    (job.folder / "ckpt.pt").write_text("{}")  # a requeued job: every node resumes
    port = rendezvous_port("4242_3")
    assert port == rendezvous_port("4242_3") and 20000 <= port < 32000 and port != rendezvous_port("4242_4")
    hosts = ("gpu07", "gpu08")
    first, second = (torchrun_command(job, node, hosts, "4242_3", port) for node in (0, 1))
    assert first == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "4",
                     "--node-rank", "0", "--master-addr", "gpu07", "--master-port", str(port),
                     "--rdzv-id", "4242_3", "-m", "--", "bench.cli", "train", "--out", "o", "--quiet", "--resume",
                     "--nproc", "4"]  # the cell's --nproc 8 becomes this node's 4
    assert second == [*first[:8], "1", *first[9:]]  # only the node rank differs
    script = replace(job, argv=[sys.executable, "train.py", "--nproc=8"])
    assert torchrun_command(script, 1, hosts, "9", 1234)[-5:] == ["--", "train.py", "--resume", "--nproc", "4"]


def test_preview_without_submitits_private_renderer_is_marked_approximate(tmp_path, fake, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit.slurm.slurm", None)  # import now raises ImportError
    jobs = [make_job(tmp_path, fake, f"c{i}", nproc=1) for i in range(3)]
    text = sbatch_preview(jobs, preview_options(), tmp_path / "slurm")
    assert "approximate (submitit's renderer unavailable" in text
    for directive in ("--partition=gpu", "--account=proj42", "--qos=high", "--time=90", "--gpus-per-node=1",
                      "--mem=32GB", "--array=0-2%3", "--constraint=a100"):
        assert f"#SBATCH {directive}\n" in text, directive


# ------------------------------------------------------------------ submission to a fake Slurm

FAKE_SBATCH = """#!/bin/sh
n=$(cat "$FAKE_SLURM_DIR/count" 2>/dev/null || echo 4241); n=$((n + 1)); echo $n > "$FAKE_SLURM_DIR/count"
cp "$1" "$FAKE_SLURM_DIR/sbatch_$n.sh"
echo "Submitted batch job $n"
"""


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch) -> Path:
    """srun (so submitit picks Slurm) and an sbatch that keeps the script and answers with an id."""
    bin_dir, record = tmp_path / "fakebin", tmp_path / "fakeslurm"
    bin_dir.mkdir()
    record.mkdir()
    for name, body in (("srun", "#!/bin/sh\nexit 0\n"), ("sbatch", FAKE_SBATCH)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(record))
    return record


def test_submit_to_slurm_writes_the_previewed_script_one_array_per_shape(tmp_path, fake, fake_slurm):
    submitit = pytest.importorskip("submitit")
    jobs = [make_job(tmp_path, fake, "a", nproc=1), make_job(tmp_path, fake, "b", nproc=2),
            make_job(tmp_path, fake, "c", nproc=1)]
    log_dir = tmp_path / "slurm"
    options = preview_options()
    ids = submit(jobs, options, log_dir)
    # in the order of the cells; one array per GPU count (a lone cell is a plain job)
    assert ids == ["4242_0", "4243", "4242_1"]
    assert (fake_slurm / "sbatch_4242.sh").read_text() == sbatch_text(1, 1, 2, options, log_dir)
    assert (fake_slurm / "sbatch_4243.sh").read_text() == sbatch_text(2, 1, 1, options, log_dir)
    # what the node will run: the pickled CellCommand of each cell

    delayed = submitit.helpers.DelayedSubmission.load(log_dir / "4242_1" / "4242_1_submitted.pkl")
    assert isinstance(delayed.function, CellCommand) and delayed.function.job.argv == jobs[2].argv


def test_no_slurm_here_is_one_clear_line(tmp_path, fake, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    with pytest.raises(UserError, match="run on a Slurm login node, or use --executor local"):
        submit([make_job(tmp_path, fake, "a")], SlurmOptions(), tmp_path / "slurm")


# ------------------------------------------------------------------ real processes, submitit's local executor


def test_local_executor_fills_the_folder_exactly_as_running_the_command(tmp_path, fake):
    pytest.importorskip("submitit")

    direct = make_job(tmp_path / "direct", fake, "cell0", epochs=3)
    with open(direct.folder / "train.log", "a") as log:
        subprocess.run(direct.argv, stdout=log, stderr=subprocess.STDOUT, check=True)
    jobs = [make_job(tmp_path / "grid", fake, f"cell{i}", epochs=3) for i in range(2)]
    submitted = submit_jobs(jobs, SlurmOptions(cluster="local", time_min=5), tmp_path / "logs")
    results = [j.result() for j in submitted]
    assert [r["status"] for r in results] == ["ok", "ok"]

    def contents(folder: Path) -> dict[str, str]:
        out = {}
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or p.name == "pid":
                continue
            text = p.read_text().replace(str(folder), "<cell>")
            if p.name == "train.log":  # each launcher stamps its own header line
                text = "\n".join(line for line in text.splitlines() if not line.startswith("=== "))
            out[p.name] = text
        return out

    for job in jobs:
        assert contents(job.folder) == contents(direct.folder)
        assert (job.folder / CELL_LOCK).exists() and len(headers(job.folder)) == 1
    assert set(contents(direct.folder)) == {"ckpt.pt", "config.json", "config.request.json", "epochs.jsonl",
                                            "summary.json", "train.log"}


def test_a_killed_cell_is_picked_for_resubmission_and_resumes_from_its_checkpoint(tmp_path, fake):
    pytest.importorskip("submitit")
    job = make_job(tmp_path, fake, "cell", epochs=8, epoch_s=0.3)
    options = SlurmOptions(cluster="local", time_min=5)
    [first] = submit_jobs([job], options, tmp_path / "logs")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (job.folder / "ckpt.pt").exists() and len(epochs_of(job.folder)) >= 2:
            break
        time.sleep(0.05)
    os.kill(int((job.folder / "pid").read_text()), signal.SIGKILL)  # the OOM killer, say
    first.wait()
    assert "killed by signal SIGKILL" in str(first.exception())
    summary = json.loads((job.folder / "summary.json").read_text())
    assert summary["status"] == "running"  # resumable, not failed
    done_before = len(epochs_of(job.folder))
    assert 2 <= done_before < 8

    grid = record_jobs({"order": ["cell"]}, {"cell": first.job_id})
    statuses = {"cell": "running"}
    assert pending_cells(submission_decisions(statuses, grid, {first.job_id: "failed"})) == ["cell"]
    assert pending_cells(submission_decisions(statuses, grid, {first.job_id: "running"})) == []

    [second] = submit_jobs([job], options, tmp_path / "logs")
    assert second.result()["status"] == "ok"
    assert epochs_of(job.folder) == list(range(1, 9))  # no epoch lost, none twice
    first_cmd, second_cmd = headers(job.folder)
    assert not first_cmd.endswith("--resume") and second_cmd.endswith("--resume")
    assert f"start at epoch {done_before}" in (job.folder / "train.log").read_text()


def test_time_limit_signal_checkpoints_and_requeues_the_cell_with_resume(tmp_path, fake):
    """submitit's own requeue path (USR2 before the time limit), run by its local executor in seconds."""
    submitit = pytest.importorskip("submitit")

    class ShortLimitLocalExecutor(submitit.LocalExecutor):
        def _internal_update_parameters(self, **kwargs):
            kwargs.update(timeout_min=6 / 60, signal_delay_s=3)  # signal 3 s into each run
            super()._internal_update_parameters(**kwargs)

    job = make_job(tmp_path, fake, "cell", epochs=24, epoch_s=0.15)  # 3.6 s of epochs: needs a requeue
    [sub] = submit_jobs([job], SlurmOptions(time_min=5), tmp_path / "logs",
                        executor_factory=lambda folder: ShortLimitLocalExecutor(folder, max_num_timeout=3))
    assert sub.result()["status"] == "ok"
    assert epochs_of(job.folder) == list(range(1, 25))
    lines = headers(job.folder)
    runs = [h for h in lines if " for Slurm's time limit or a preemption" not in h]
    assert len(runs) >= 2 and not runs[0].endswith("--resume")
    assert all(r.endswith("--resume") for r in runs[1:])
    assert "checkpoint -> requeued with" in (sub.stdout() or "")
    # the cell's own log says why each run before the last stopped, and where
    stops = [int(re.search(r": stopped after epoch (\d+) for", h).group(1)) for h in lines if h not in runs]
    assert len(stops) == len(runs) - 1 and stops == sorted(stops) and 0 <= stops[0] < 24
    assert [h in runs for h in lines] == [True, False] * (len(runs) - 1) + [True]  # start, stop, start, ...


# ------------------------------------------------------------------ CellCommand in this process


def test_cell_command_pickles_without_its_process_and_skips_a_finished_cell(tmp_path, fake):
    job = make_job(tmp_path, fake, "cell")
    cmd = pickle.loads(pickle.dumps(CellCommand(job)))
    assert cmd.job == job and cmd._proc is None
    (job.folder / "summary.json").write_text(json.dumps({"status": "ok"}))
    assert cmd()["status"] == "ok"
    assert not (job.folder / "train.log").exists()  # nothing was started


def test_cell_failures_are_recorded_like_the_local_runner(tmp_path, fake):
    failing = make_job(tmp_path, fake, "nan", epochs=3, fail_at_epoch=2)
    with pytest.raises(CellFailed, match="train loss became nan at epoch 2"):
        CellCommand(failing)()
    recorded = json.loads((failing.folder / "summary.json").read_text())
    assert recorded["error"].startswith("train loss became nan")

    crashing = make_job(tmp_path, fake, "crash", epochs=3, crash_at_epoch=2)
    with pytest.raises(CellFailed, match="exited with code 9"):
        CellCommand(crashing)()
    s = json.loads((crashing.folder / "summary.json").read_text())
    assert s["status"] == "failed" and s["exit_code"] == 9 and s["epochs_completed"] == 1
    assert s["error"] == "cell process exited with code 9: segfault-like crash"


def test_a_full_disk_leaves_the_cell_resumable_not_failed(tmp_path, fake):
    job = make_job(tmp_path, fake, "full", epochs=3, full_at_epoch=2)
    with pytest.raises(CellFailed, match="the disk is full .*cannot write .*ckpt.pt.*; free some space"):
        CellCommand(job)()
    assert json.loads((job.folder / "summary.json").read_text())["status"] == "running"  # not failed
    (job.folder / "config.request.json").write_text(json.dumps({"epochs": 3}))  # space freed: the next submission
    assert CellCommand(dataclasses.replace(job, argv=[*job.argv, "--resume"]))()["status"] == "ok"
    assert epochs_of(job.folder) == [1, 2, 3]


def test_a_hung_cell_is_stopped_at_its_stall_limit_and_resumes_when_retried(tmp_path, fake):
    job = dataclasses.replace(make_job(tmp_path, fake, "hung", epochs=3, hang_at_epoch=2), stall_timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(CellFailed, match="wrote no new epoch for 1 s after epoch 1 and was stopped as hung"):
        pickle.loads(pickle.dumps(CellCommand(job)))()  # as submitit ships it to the node
    assert time.monotonic() - t0 < 60  # not the hour it sleeps
    s = json.loads((job.folder / "summary.json").read_text())
    assert s["status"] == "failed" and s["error"].startswith("cell process wrote no new epoch for 1 s after epoch 1")
    assert epochs_of(job.folder) == [1] and any("stopped as hung" in h for h in headers(job.folder))
    (job.folder / "config.request.json").write_text(json.dumps({"epochs": 3}))  # unstuck: retried, it resumes
    assert CellCommand(job)()["status"] == "ok" and epochs_of(job.folder) == [1, 2, 3]


def test_a_cell_without_a_sign_of_life_before_its_first_epoch_is_stopped_a_slow_live_one_is_not(tmp_path, fake,
                                                                                                  monkeypatch):
    monkeypatch.setattr(cell_log, "STARTUP_STALL_S", 1.5)
    stuck = dataclasses.replace(make_job(tmp_path, fake, "stuck", epochs=2, hang_at_epoch=1), stall_timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(CellFailed, match=r"showed no sign of life for 1\.5 s before writing epoch 1 "):
        pickle.loads(pickle.dumps(CellCommand(stuck)))()
    assert time.monotonic() - t0 < 60  # not the hour it sleeps
    s = json.loads((stuck.folder / "summary.json").read_text())
    assert s["status"] == "failed" and s["error"].startswith("cell process showed no sign of life for 1.5 s")
    assert any("stopped as hung" in h for h in headers(stuck.folder))
    live = dataclasses.replace(make_job(tmp_path, fake, "live", epochs=2, alive_start_s=4.0), stall_timeout_s=1.0)
    t0 = time.monotonic()
    assert CellCommand(live)()["status"] == "ok" and epochs_of(live.folder) == [1, 2]
    assert time.monotonic() - t0 > 4.0  # 4 s without a row, alive: not stopped


@pytest.mark.parametrize(("executor", "proctrack"), [("slurm", "linuxproc"), ("slurm", "cgroup"), ("local", "linuxproc")])
def test_slurms_sigterm_leaves_the_cell_resumable_and_the_job_waiting_to_be_requeued(tmp_path, fake, monkeypatch,
                                                                                      executor, proctrack):
    """A preemption (PreemptMode=REQUEUE) or scancel: Slurm sends SIGTERM to the job's processes, then ends it.
    Slurm requeues a preempted job only if it still runs then: the job must not end on its own first. Outside a
    Slurm job (submitit's local executor) SIGTERM means what it says. Under proctrack/linuxproc every process of
    the job gets the signal; under proctrack/cgroup only the step's task (the job's own process) does, and the cell
    must stop all the same."""
    import threading  # noqa: PLC0415

    bypassed: list[int] = []

    def bypass(signum: int, frame: object) -> None:  # submitit's handler: logs it, nothing more
        bypassed.append(signum)

    previous = signal.signal(signal.SIGTERM, bypass)
    monkeypatch.setattr(CellCommand, "TERM_WAIT_S", 1.5 if executor == "slurm" else 30.0)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", executor)  # what submitit's job scripts set
    job = make_job(tmp_path, fake, "pre", epochs=200, epoch_s=0.05)
    cmd = CellCommand(job)
    sent: list[float] = []

    def preempt() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (cmd._proc is None or not (job.folder / "ckpt.pt").exists()):
            time.sleep(0.02)
        if proctrack == "linuxproc":
            os.killpg(cmd._proc.pid, signal.SIGTERM)  # the cell's processes
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)  # and the job's own

    expected = (r"stopped by Slurm's SIGTERM \(a preemption, or scancel\) with exit status -15; it stays resumable"
                if executor == "slurm" else r"the cell process was killed by signal SIGTERM; it stays resumable")
    try:
        threading.Thread(target=preempt, daemon=True).start()
        with pytest.raises(CellFailed, match=expected):
            cmd()
        waited = time.monotonic() - sent[0]
        assert signal.getsignal(signal.SIGTERM) is bypass  # the handler before ours is put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert bypassed == [signal.SIGTERM]  # submitit's handler still saw it
    assert json.loads((job.folder / "summary.json").read_text())["status"] == "running"  # not failed
    done = len(epochs_of(job.folder))
    assert 1 <= done < 200
    note = f"SIGTERM from Slurm (a preemption, or scancel) stopped the cell after epoch {done}; it stays resumable"
    if executor == "local":
        assert waited < 10 and note not in (job.folder / "train.log").read_text()
        return
    assert waited >= 1.5  # the job outlived its cell by TERM_WAIT_S, for Slurm to end and requeue it
    assert note in (job.folder / "train.log").read_text()
    requeued = CellCommand(dataclasses.replace(job, argv=job.argv))  # Slurm reruns the job as first submitted
    (job.folder / "config.request.json").write_text(json.dumps({"epochs": done + 2}))
    assert requeued()["status"] == "ok" and epochs_of(job.folder) == list(range(1, done + 3))  # it resumed


def test_the_cell_process_ignores_slurms_checkpoint_signal(tmp_path):
    """Slurm's --signal reaches every process of the job: the trainer must leave USR2 to submitit."""
    folder = tmp_path / "cell"
    probe = "import signal; print('usr2:', signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN)"
    with pytest.raises(CellFailed, match="exited 0 but summary.json status is None"):
        CellCommand(CellJob(folder, [sys.executable, "-c", probe]))()
    assert "usr2: True" in (folder / "train.log").read_text()


def test_a_second_process_for_the_same_cell_refuses_to_start(tmp_path, fake):
    job = make_job(tmp_path, fake, "cell")
    with open(job.folder / CELL_LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(CellFailed, match="being run by another process"):
            CellCommand(job)()
    assert not (job.folder / "summary.json").exists()


# ------------------------------------------------------------------ which cells to submit


def test_pending_cells_never_resubmits_live_or_finished_cells_and_resubmits_dead_ones():
    now = 1_000_000.0
    old, fresh = "1970-01-12T13:00:00+00:00", "1970-01-12T13:46:00+00:00"  # now - 2800 s, now - 40 s
    grid = {"jobs": {
        "queued": [{"job_id": "9_0", "submitted_at": old}],
        "running": [{"job_id": "9_1", "submitted_at": old}],
        "done": [{"job_id": "9_2", "submitted_at": old}],
        "failedjob": [{"job_id": "9_3", "submitted_at": old}],
        "cancelled": [{"job_id": "1_0", "submitted_at": old}, {"job_id": "9_4", "submitted_at": old}],
        "gone": [{"job_id": "9_5", "submitted_at": old}],
        "justnow": [{"job_id": "9_6", "submitted_at": fresh}],
        "completed_unfinished": [{"job_id": "9_7", "submitted_at": old}],
        "failedcell": [{"job_id": "9_8", "submitted_at": old}],
        "requeued_partial": [{"job_id": "9_9", "submitted_at": old}],
    }}
    statuses = {"queued": None, "running": "running", "done": "ok", "failedjob": "running", "cancelled": None,
                "gone": "running", "justnow": None, "completed_unfinished": "running", "failedcell": "failed",
                "requeued_partial": "running", "never": None, "skipped": "skipped"}
    states = {"9_0": "queued", "9_1": "running", "9_2": "finished", "9_3": "failed", "9_4": "cancelled",
              "9_7": "finished", "9_8": "failed", "9_9": "queued", "1_0": "running"}
    picked = pending_cells(submission_decisions(statuses, grid, states, now=now))
    assert picked == ["failedjob", "cancelled", "gone", "completed_unfinished", "never"]
    assert pending_cells(submission_decisions(statuses, grid, states, retry_failed=True, now=now)) == [
        "failedjob", "cancelled", "gone", "completed_unfinished", "failedcell", "never"]
    why = submission_decisions(statuses, grid, states, now=now)
    assert why["justnow"] == (False, "job 9_6 submitted 40 s ago, not listed by Slurm yet")
    assert why["cancelled"] == (True, "job 9_4 cancelled and the cell is unfinished")  # the latest job counts
    # without Slurm answering at all, a live job must not be taken for a dead one within the grace period
    assert "justnow" not in pending_cells(submission_decisions(statuses, grid, {}, now=now))


def test_a_preempted_job_reads_as_preempted_and_its_cell_is_resubmitted_unless_slurm_requeued_it():
    grid = {"jobs": {"gone": [{"job_id": "9_0"}], "requeued": [{"job_id": "9_1"}], "failed": [{"job_id": "9_2"}]}}
    statuses = {"gone": "running", "requeued": "running", "failed": "failed"}
    # PreemptMode=CANCEL: the job ended PREEMPTED; REQUEUE: squeue lists it again, pending under the same id
    states = {"9_0": slurm_state("PREEMPTED"), "9_1": slurm_state("REQUEUED"), "9_2": slurm_state("NODE_FAIL")}
    why = submission_decisions(statuses, grid, states)
    assert why["gone"] == (True, "job 9_0 preempted (resumable) and the cell is unfinished")
    assert why["requeued"] == (False, "job 9_1 queued (Slurm REQUEUED)")
    go, text = why["failed"]  # recorded failed: --retry-failed, as ever, and the text says so
    assert not go and text.startswith("failed (job 9_2 failed (Slurm NODE_FAIL: its node was lost") and (
        "--retry-failed" in text)


def test_record_jobs_keeps_history_and_latest_wins():
    grid = {"grid": "smoke", "order": ["a", "b"]}
    g1 = record_jobs(grid, {"a": "7_0", "b": "7_1"}, submitted_at="2026-01-01T00:00:00+00:00")
    g2 = record_jobs(g1, {"a": "8_0"})
    assert "jobs" not in grid  # the input is not changed
    assert g2["jobs"]["a"][0] == {"executor": "slurm", "job_id": "7_0",
                                  "submitted_at": "2026-01-01T00:00:00+00:00"}
    assert latest_jobs(g2) == {"a": "8_0", "b": "7_1"}
    assert json.loads(json.dumps(g2)) == g2  # stored as-is in grid.json
    assert latest_jobs({"jobs": {"x": "junk", "y": [None, {"no": "id"}]}}) == {}


# ------------------------------------------------------------------ job states


def test_job_states_is_empty_without_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert job_states(["123_4", "125"]) == {}


def test_job_states_maps_squeue_and_sacct_answers(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        # live jobs, arrays expanded by --array
        "squeue": "123_0|RUNNING\n123_1|PENDING\n130|CONFIGURING\n",
        # ended jobs; a pending range, a step line and an odd state among them
        "sacct": "123_2|COMPLETED\n123_2.batch|COMPLETED\n123_3|CANCELLED by 1000\n123_[5-6%2]|PENDING\n"
                 "124|OUT_OF_MEMORY\n126|PREEMPTED\n127|WEIRD\n",
    }
    for name, out in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\ncat <<'EOF'\n{out}EOF\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")  # cat for the fakes
    ids = ["123_0", "123_1", "123_2", "123_3", "123_5", "124", "126", "127", "999"]
    got = job_states(ids)
    assert got == {"123_0": "running", "123_1": "queued", "123_2": "finished",
                   "123_3": "cancelled", "123_5": "queued", "124": "failed", "126": "cancelled",
                   "127": "unknown", "999": "unknown"}
    # the coarse state is for the logic; what is printed keeps Slurm's word, with the fix
    assert {j: state_text(got[j]) for j in ("123_3", "124", "126", "127")} == {
        "123_3": "cancelled", "124": "failed (Slurm OUT_OF_MEMORY: the job hit its memory limit; raise --slurm-mem-gb "
                                     "(or lower --batch-size))",
        "126": "preempted (resumable)", "127": "unknown"}


def test_a_state_is_printed_with_slurms_reason_and_the_fix():
    text = {w: state_text(slurm_state(w)) for w in ("TIMEOUT", "NODE_FAIL", "PREEMPTED", "FAILED", "CANCELLED by 7",
                                                    "COMPLETED", "PENDING", "REQUEUE_HOLD", "SPECIAL_EXIT")}
    assert text == {
        "TIMEOUT": "failed (Slurm TIMEOUT: the job hit --slurm-time; raise it, the cell resumes from its last epoch)",
        "NODE_FAIL": "failed (Slurm NODE_FAIL: its node was lost, not the cell's doing; resubmitted (--retry-failed "
                     "if the cell recorded a failure), it resumes from its last epoch)",
        "PREEMPTED": "preempted (resumable)", "FAILED": "failed", "CANCELLED by 7": "cancelled",
        "COMPLETED": "finished", "PENDING": "queued", "REQUEUE_HOLD": "queued (Slurm REQUEUE_HOLD)",
        "SPECIAL_EXIT": "failed (Slurm SPECIAL_EXIT)"}
    assert [state_label(slurm_state(w)) for w in ("TIMEOUT", "PREEMPTED", "FAILED")] == [
        "failed: TIMEOUT", "preempted", "failed"]
    assert state_text("failed") == "failed" and state_label("queued") == "queued"  # a plain state, as given
    timeout = slurm_state("TIMEOUT")
    assert timeout == "failed" and {timeout: 1}["failed"] == 1 and json.dumps([timeout]) == '["failed"]'
    assert pickle.loads(pickle.dumps(timeout)).slurm == "TIMEOUT"


def test_slurm_state_names():
    assert [slurm_state(s) for s in ("PENDING", "REQUEUED", "RUNNING", "COMPLETING", "COMPLETED", "TIMEOUT",
                                     "NODE_FAIL", "CANCELLED+", "", "BOGUS")] == [
        "queued", "queued", "running", "running", "finished", "failed", "failed", "cancelled", "unknown",
        "unknown"]
