"""`bench run --executor slurm` end to end without a cluster: submitit's local executor runs the array tasks
as real processes here, and the grid's folders must come out as the local runner leaves them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from bench.cmd_run import run_cmd
from bench.planning import Overrides, read_summary
from bench.processes import run_grid
from bench.run_slurm import LOG_DIR, plan_for_cluster, run_on_slurm
from bench.slurm import SlurmOptions, latest_jobs
from bench.store import read_json, read_jsonl
from tests.fake_trainer import make_grid, quiet

pytest.importorskip("submitit")

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
