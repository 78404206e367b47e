"""`bench run --executor slurm`: the same plan and run folders as the local runner, cells run as Slurm jobs.

What one invocation does, in order:

1. plan the grid exactly as `bench run` does (`bench.planning.plan_grid`): same cells, same
   folder names, same `grid.json`; a cell the *grid* skips is skipped, but this machine's own
   reasons (no CUDA on a login node) are not: the compute nodes decide;
2. prepare every cell folder (`cell.json`, `config.request.json`);
3. pick the cells to submit (`bench.slurm.submission_decisions`): never a finished cell, nor one whose
   latest job is queued or running; a cell whose job died is submitted again and continues from
   its checkpoint; a failed cell only with `--retry-failed`;
4. submit them, one job array per resource shape (`bench.slurm.submit_jobs`), each task running
   `bench train --config <cell>/config.request.json --out <cell> [--resume]` — the very command
   the local runner starts; under torchrun on each node with `nodes` > 1 — and record the job ids
   in `grid.json`;
5. with `--wait`, wait for the jobs it submitted and print the same summary table as a local run.

`--dry-run` prints the plan and the sbatch script of each array with its tasks' commands, and
writes nothing. Re-running the same command later is how a grid is continued; `bench status OUT`
shows each cell with its job's state meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.grids import Grid
from bench.planning import (
    Overrides,
    PlannedCell,
    check_grid_out,
    code_version,
    dry_run_order,
    dry_run_refusal,
    exclusive,
    plan_grid,
    prepare_cell,
    prepare_out,
    recorded_grid,
)
from bench.processes import TRAIN_COMMAND, CellResult, result_from_summary
from bench.slurm import (
    CellJob,
    SlurmOptions,
    SubmissionFailed,
    interrupts_held,
    job_states,
    latest_jobs,
    pending_cells,
    record_jobs,
    sbatch_preview,
    state_text,
    submission_decisions,
    submit_jobs,
)
from bench.store import read_json, read_jsonl, read_summary, write_json
from ddnet.config import resolve_device
from ddnet.errors import UserError

LOG_DIR = "slurm"
"""Under the grid's out folder: submitit's per-job folders (sbatch script, stdout, stderr, pickles)."""

WAIT_POLL_S = 2.0
"""How often `--wait` asks the submitted jobs whether they are done."""


def plan_for_cluster(grid: Grid, overrides: Overrides, repeats: int, options: SlurmOptions,
                     version: str) -> list[PlannedCell]:
    """The local plan; on a real cluster only the grid's own skip reasons stand (the nodes, not this login
    node, decide whether CUDA is there). `cluster='local'|'debug'` runs here, so this machine's reasons stand."""
    planned = plan_grid(grid, overrides, repeats, version)
    if options.cluster != "slurm":
        return planned
    # an explicit --device cpu with a CUDA-only toggle is impossible anywhere: that reason stays
    return [p if p.config.device == "cpu" else replace(p, skip_reason=p.cell.skip_reason) for p in planned]


def cell_job(p: PlannedCell, out: Path, command: Sequence[str], options: SlurmOptions) -> CellJob:
    """The array task of one cell: the local runner's command; one GPU per replica unless it runs on CPUs.

    On `options.nodes` > 1 the cell's replicas (its nproc, the DDP world) are split evenly over the nodes:
    its config, folder and global batch are those of the same cell on one node; only the placement differs.
    """
    cell_dir = out / p.folder
    argv = [*command, "--config", str(cell_dir / "config.request.json"), "--out", str(cell_dir)]
    gpus = 0 if p.config.device == "cpu" else p.config.nproc
    return CellJob(folder=cell_dir, argv=argv, nproc=gpus, nodes=options.nodes, replicas=p.config.nproc,
                   stall_timeout_s=options.stall_timeout_s)


def _statuses(planned: list[PlannedCell], order: list[str], out: Path) -> dict[str, str | None]:
    by_folder = {p.folder: p for p in planned}
    statuses: dict[str, str | None] = {}
    for folder in order:
        s = read_summary(out / folder)
        status = s.get("status") if s is not None else None
        if status is None and by_folder[folder].skip_reason:
            status = "skipped"
        statuses[folder] = status
    return statuses


def _asked(states: Callable[[list[str]], dict[str, str]], record: dict[str, Any],
           statuses: dict[str, str | None], options: SlurmOptions, retry_failed: bool) -> dict[str, str]:
    """The recorded jobs' states; refuses when Slurm gave none (`job_states` returns {} when squeue and sacct
    are missing or fail) while an unfinished cell has a job: reading them as gone would submit it twice."""
    jobs = latest_jobs(record)
    answer = states(list(jobs.values()))
    settled = ("ok", "skipped") if retry_failed else ("ok", "skipped", "failed")  # never resubmitted now
    waiting = [f for f, s in statuses.items() if f in jobs and s not in settled]
    if options.cluster == "slurm" and waiting and not answer:
        raise UserError(f"Slurm did not answer here (squeue and sacct failed or are missing), so whether the jobs "
                        f"of {len(waiting)} unfinished cell(s) still run is unknown and submitting them again could "
                        "run a cell twice; check `squeue --me`, then run the same command again.")
    return answer


def _decision_table(decisions: dict[str, tuple[bool, str]], ids: dict[str, str], title: str) -> Table:
    table = Table(title=title)
    table.add_column("cell", overflow="fold")
    table.add_column("action")
    table.add_column("why", overflow="fold")
    table.add_column("job", overflow="fold")
    for folder, (go, why) in decisions.items():
        table.add_row(folder, "submit" if go else "leave", why, ids.get(folder, "-"))
    return table


def run_on_slurm(
    grid: Grid,
    out: Path,
    options: SlurmOptions,
    overrides: Overrides | None = None,
    repeats: int = 1,
    resume: bool = True,
    retry_failed: bool = False,
    dry_run: bool = False,
    wait: bool = False,
    console: Console | None = None,
    command: Sequence[str] = TRAIN_COMMAND,
    executor_factory: Callable[[Path], Any] | None = None,
    states: Callable[[list[str]], dict[str, str]] = job_states,
) -> list[CellResult] | None:
    """Submit the grid's unfinished cells to Slurm (see the module docstring).

    Returns None after submitting (or a dry run), or with `wait` one CellResult per cell once the
    submitted jobs ended. `executor_factory` and `states` are for tests (submitit's LocalExecutor,
    a fake squeue). Raises UserError for what cannot be submitted (no submitit, no Slurm here).
    """
    console = console or Console()
    overrides = overrides or Overrides()
    if options.cluster != "slurm" and overrides.device == "cuda" and resolve_device("auto") != "cuda":
        # the cells run here: as the local runner, not a skip of every cell (on a cluster the nodes decide)
        raise UserError(f"--device cuda was asked for but no CUDA device is visible here (--slurm-cluster "
                        f"{options.cluster} runs the cells on this machine); use --device cpu, or leave --device out.")
    if options.cluster == "debug" and not (wait or dry_run):
        raise UserError("--slurm-cluster debug runs each cell in this process only while --wait waits for it (submitit's "
                        "debug executor): add --wait, or use --slurm-cluster local (cells run in the background).")
    version = code_version()
    planned = plan_for_cluster(grid, overrides, repeats, options, version)
    by_folder = {p.folder: p for p in planned}
    seed = overrides.seed if overrides.seed is not None else grid.base().seed
    log_dir = out / LOG_DIR
    for p in planned:  # refuse a cell that cannot be split over the nodes before anything is written
        if not p.skip_reason and p.config.nproc % options.nodes:
            raise UserError(f"--slurm-nodes {options.nodes}: cell {p.folder} trains {p.config.nproc} replica(s) (its "
                            f"nproc), which do not split evenly over {options.nodes} nodes; run a grid file whose cells set "
                            f"nproc to a multiple of {options.nodes} (TrainConfig(nproc=...); `bench run` has no "
                            "--nproc, the shipped grids train one replica), or --slurm-nodes 1.")
        if not p.skip_reason:
            cell_job(p, out, command, options)

    if dry_run:
        order = dry_run_order(planned, seed, out)
        recorded = recorded_grid(out)
        statuses = _statuses(planned, order, out)
        answer = _asked(states, recorded, statuses, options, retry_failed)
        decisions = submission_decisions(statuses, recorded, answer, retry_failed)
        console.print(_decision_table(decisions, {}, f"grid '{grid.name}' on Slurm: {len(order)} cells -> {out}"))
        jobs = [cell_job(by_folder[f], out, command, options) for f in pending_cells(decisions)]
        if jobs:
            console.print(sbatch_preview(jobs, options, log_dir), markup=False, highlight=False)
        console.print(f"dry run: {len(jobs)} cell(s) would be submitted; nothing was written.",
                      markup=False, highlight=False)
        refusal = dry_run_refusal(out, order, version, resume)
        if refusal:
            console.print(refusal, markup=False, highlight=False)
        return None

    check_grid_out(out)  # before `exclusive` makes the folder
    with exclusive(out):
        order = prepare_out(out, grid, planned, seed, resume, version)
        skipped_now = set()  # the summary shows them 'skipped', not 'skipped (earlier)'
        for folder in order:
            before = read_summary(out / folder)
            if prepare_cell(by_folder[folder], out, grid.name, version) is not None and (
                    before is None or before.get("status") != "skipped"):
                skipped_now.add(folder)
        record = read_json(out / "grid.json")
        statuses = _statuses(planned, order, out)
        answer = _asked(states, record, statuses, options, retry_failed)
        decisions = submission_decisions(statuses, record, answer, retry_failed)
        to_submit = pending_cells(decisions)
        jobs = [cell_job(by_folder[f], out, command, options) for f in to_submit]
        refused: SubmissionFailed | None = None

        def note(signame: str) -> None:
            console.print(f"{signame}: stopping once the jobs sbatch queued are recorded in {out / 'grid.json'} "
                          "(no further array is submitted) ...", markup=False, highlight=False)

        with interrupts_held(note, block_in_children=options.cluster == "slurm") as held:
            try:
                submitted = submit_jobs(jobs, options, log_dir, executor_factory, stop=lambda: bool(held))
            except SubmissionFailed as e:  # the arrays sbatch took before it run: record them, or they run twice
                refused, submitted = e, e.submitted
            ids = {f: str(j.job_id) for f, j in zip(to_submit, submitted, strict=True) if j is not None}
            if ids:
                write_json(out / "grid.json", record_jobs(record, ids))
    if held:
        raise KeyboardInterrupt(stopped_submitting_line(out, ids, len(to_submit), options.cluster))
    if refused is not None:
        raise UserError(f"{refused}" + (f" ({len(ids)} cell(s) submitted before it are recorded in grid.json; "
                                        "the same command submits only the rest.)" if ids else "")) from None
    console.print(_decision_table(decisions, ids, f"grid '{grid.name}' on Slurm ({options.cluster}) -> {out}"))
    arrays = sorted({i.split("_")[0] for i in ids.values()})
    console.print(f"submitted {len(ids)} cell(s)" + (f" as job(s) {', '.join(arrays)}" if arrays else "")
                  + f"; logs in {log_dir}; watch with `bench status {out}`; run the same command again to "
                  "resubmit cells whose jobs died.", markup=False, highlight=False)
    if not wait:
        return None
    try:
        return _wait(planned, order, out, dict(zip(to_submit, submitted, strict=True)), console, skipped_now,
                     states if options.cluster == "slurm" else None)  # submitit's local ids are no Slurm jobs
    except KeyboardInterrupt:  # Ctrl-C stops the waiting, not the jobs: say so, and how to watch or end them
        raise KeyboardInterrupt(stop_waiting_line(out, ids, options.cluster)) from None


def stopped_submitting_line(out: Path, ids: dict[str, str], asked: int, cluster: str) -> str:
    """What `bench run --executor slurm` says when Ctrl-C or SIGTERM came while it submitted (`interrupts_held`)."""
    left = asked - len(ids)
    if not ids:
        return (f"stopped submitting: no cell was submitted; the same command submits the {left} cell(s); "
                f"`bench status {out}` shows where each cell stands.")
    arrays = sorted({i.split("_")[0] for i in ids.values()})
    cancel = f" and keep running (cancel them with `scancel {' '.join(arrays)}`)" if cluster == "slurm" else ""
    rest = f"; {left} cell(s) were not submitted: the same command submits them" if left else ""
    return (f"stopped submitting: {len(ids)} cell(s) submitted as job(s) {', '.join(arrays)} are recorded in "
            f"grid.json{cancel}{rest}; `bench status {out}` shows where each cell stands.")


def stop_waiting_line(out: Path, ids: dict[str, str], cluster: str) -> str:
    """What `bench run --executor slurm --wait` says when interrupted: the jobs it submitted go on (on a cluster)."""
    arrays = sorted({i.split("_")[0] for i in ids.values()})
    if cluster != "slurm":  # submitit's local or debug executor: the cells ran here, under this terminal
        return (f"interrupted; the cells started here (--slurm-cluster {cluster}) may have stopped with it: "
                f"`bench status {out}` shows where each stands, and the same command resubmits those that did.")
    return (f"stopped waiting; the {len(ids)} cell(s) submitted as job(s) {', '.join(arrays)} keep running on the "
            f"cluster: watch them with `bench status {out}`, cancel them with `scancel {' '.join(arrays)}`.")


def _done(job: Any) -> bool:
    """Whether a submitted job has ended. submitit's debug executor runs the job when asked: its `done()` would raise
    what the cell raised (CellFailed) after opening pdb on it; `exception()` runs it and returns that instead (the
    cell's summary.json says how it ended)."""
    if type(job).__name__ != "DebugJob":  # a Slurm or local job only asks how the job stands
        return bool(job.done())
    job.exception()
    return True


def _wait(planned: list[PlannedCell], order: list[str], out: Path, jobs: dict[str, Any], console: Console,
          skipped_now: set[str], states: Callable[[list[str]], dict[str, str]] | None = None) -> list[CellResult]:
    """Wait for the submitted jobs; one result per cell (from its summary.json) in run order. `states` (Slurm's
    answer, `job_states`) says how the job of a cell that did not finish ok ended: 'failed (Slurm TIMEOUT: ...)'."""
    left = dict(jobs)
    ended: dict[str, str] = {}  # cell folder -> how its job ended, where that is news (the cell did not finish)
    while left:
        done = {f: read_summary(out / f) or {} for f, j in left.items() if _done(j)}
        asked = [str(left[f].job_id) for f, s in done.items() if s.get("status") not in ("ok", "skipped")]
        told = states(asked) if states and asked else {}
        for folder, s in done.items():
            job = left.pop(folder)
            state = told.get(str(job.job_id))
            if state in ("failed", "cancelled", "finished"):  # not 'running': accounting a moment behind
                ended[folder] = f"job {job.job_id} {state_text(state)}"
            console.print(f"[{len(jobs) - len(left)}/{len(jobs)}] {folder}: job {job.job_id} ended"
                          + (f" as {state_text(state)}" if folder in ended else "")
                          + f", cell {s.get('status', 'without a summary')}", markup=False, highlight=False)
        if left:
            time.sleep(WAIT_POLL_S)
    by_folder = {p.folder: p for p in planned}
    results = []
    for folder in order:
        p = by_folder[folder]
        s = read_summary(out / folder)
        if s is None:
            results.append(CellResult(folder, p.cell.label, "pending", "submitted", 0, p.config.epochs,
                                      error=ended.get(folder)))
        else:
            action = "submitted" if folder in jobs else "skipped" if folder in skipped_now else "reused"
            result = result_from_summary(p, s, action)
            if s.get("status") == "running":  # its job ended unfinished: the epochs its rows hold so far
                result.epochs_completed = len(read_jsonl(out / folder / "epochs.jsonl"))
            if folder in ended and not result.error:  # why its job ended, and the fix
                result.error = ended[folder]
            results.append(result)
    return results
