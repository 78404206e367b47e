"""Run a grid's cells as Slurm job arrays through submitit: the parts of `bench run --executor slurm`.

Each cell is the same command the local runner starts (`python -m bench.cli train --config
<cell>/config.request.json --out <cell> [--resume]`), run on a compute node by `CellCommand`, with its
output appended to `<cell>/train.log`. A cell on N nodes (`SlurmOptions.nodes`) runs that command under
torchrun on each node (`torchrun_command`), its replicas (the cell's nproc) split evenly over them. The
run-folder contract does not change: `bench status` and `bench report` read the same folders whichever
executor filled them.

    jobs = [CellJob(folder, argv, nproc=1), ...]
    ids = submit(jobs, SlurmOptions(partition="gpu", time_min=240), log_dir=out / "slurm")
    grid = record_jobs(grid, dict(zip((j.folder.name for j in jobs), ids)))   # stored in grid.json

Re-running `bench run --executor slurm` resubmits only what `submission_decisions` picks: never a cell that
is finished or whose job is queued or running; a cell whose job died (failed, cancelled, preempted and not
requeued, gone) is submitted again and continues from its checkpoint. A preempted or timed-out job is requeued by
submitit itself (`CellCommand.checkpoint`), with `--resume`.

submitit is imported lazily: this module (and `bench status`) works without it. On a cluster, the
virtualenv (with submitit and this package), the grid's out folder and the log folder must be on a
filesystem the compute nodes share: the node unpickles `CellCommand` and runs the cell from there.
"""

from bench.slurm.jobs import (
    JOBS_KEY,
    STATES,
    JobState,
    job_states,
    latest_job_records,
    latest_jobs,
    pending_cells,
    record_jobs,
    refuse_live_jobs,
    slurm_state,
    state_label,
    state_text,
    submission_decisions,
)
from bench.slurm.node import CellCommand, CellFailed, NodePlace, rendezvous_port, torchrun_command
from bench.slurm.options import CELL_LOCK, CLUSTERS, CellJob, SlurmOptions
from bench.slurm.submit import (
    SubmissionFailed,
    executor_parameters,
    interrupts_held,
    sbatch_preview,
    sbatch_text,
    submit,
    submit_jobs,
)

__all__ = [
    "CELL_LOCK", "CLUSTERS", "JOBS_KEY", "STATES", "CellCommand", "CellFailed", "CellJob", "JobState", "NodePlace",
    "SlurmOptions", "SubmissionFailed",
    "executor_parameters", "interrupts_held", "job_states", "latest_job_records", "latest_jobs", "pending_cells", "record_jobs",
    "refuse_live_jobs",
    "rendezvous_port", "sbatch_preview", "sbatch_text", "slurm_state", "state_label", "state_text",
    "submission_decisions", "submit", "submit_jobs", "torchrun_command",
]
