"""`bench status RESULTS_DIR`: one table of every cell of a grid, with totals and the time used so far.

Reads the grid's folders (`bench.status`) and, when Slurm jobs are recorded in its grid.json
and Slurm's accounting answers here, the jobs' states (`bench.slurm.job_states`); elsewhere the
folders alone say where each cell stands.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from bench.slurm import job_states
from bench.status import cell_status_rows, recorded_jobs, status_table
from bench.store import TRAIN_LOCK, lock_held
from ddnet.errors import UserError


def status_cmd(
    results_dir: Path = typer.Argument(..., help="A grid's --out folder (the one holding grid.json), or one "
                                       "`bench train` run folder."),
) -> None:
    """Where every cell of a grid (or one run) stands: queued, running (epoch k/N), finished, failed, skipped."""
    if not results_dir.is_dir():
        raise UserError(f"{results_dir} is not a folder; pass the --out folder of a `bench run`.")
    jobs = recorded_jobs(results_dir)
    states = job_states(list(jobs.values())) if jobs else {}
    rows = cell_status_rows(results_dir, states or None)  # {}: Slurm not reachable here, folders only
    if not rows and (results_dir / TRAIN_LOCK).exists():
        if lock_held(results_dir / TRAIN_LOCK):
            raise UserError(f"{results_dir} is a `bench train` run that is starting and has written no record yet; "
                            "run bench status again in a moment.")
        raise UserError(f"{results_dir} is a `bench train` run stopped before it wrote its first record (only its "
                        "lock file is there): nothing was trained; run the command that started it again, without "
                        "--resume.")
    if not rows:
        raise UserError(f"{results_dir} holds no grid cells (no grid.json or cell folders) and no run (no "
                        "summary.json or epochs.jsonl); pass the --out folder of a `bench run` or `bench train`.")
    console = Console()
    console.print(status_table(rows))  # totals in its caption
    if jobs and not states:
        console.print("Slurm job states are not available here: statuses come from the folders alone.",
                      markup=False, highlight=False)
