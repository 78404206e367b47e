"""`bench grids` and `bench run`: list the grids; expand one and run each cell in its own fresh process.

`bench run` plans the grid (`bench.planning`: cells, folder names, run order,
`<out>/grid.json`), prints the plan with each cell's size and cost, then runs
the cells one process each (`bench.processes`), and ends with a summary table;
it exits non-zero if any cell failed. Re-running the same command into the
same folder resumes the grid; `--dry-run` prints the plan and writes nothing.

The plan's cost (`bench.estimate`): per cell, the images it trains (steps x
batch x epochs, steps = n_train // batch; the global batch under DDP) and the
time it should take, with where that figure comes from: earlier runs under
`--out` (and `--estimate-from DIR`) on this machine ("from 3 earlier epochs
of this cell", "scaled from <folder>: ..."), a quick calibration (`--calibrate`: "calibrated: 3 steps"),
or "unknown"; then the totals and the one-time synthetic data generation, e.g.

    total: 2 cell(s) to run, 96 images to train, estimated 50.1 s (2 measured)
    data: 2 synthetic split(s) to generate once (5120 x 512 px + 784 x 512 px slices), ~5m54s (nominal ...)

While the grid runs, its elapsed and estimated remaining time are shown on every
line (plain output) or on the grid's bar (a terminal).

How to add a grid: one new file in ablations/, say `ablations/precision.py`:

    from bench.grids import Cell, dense_model, standard_factors
    from ddnet.config import TrainConfig

    NAME = "precision"                              # `bench run --grid precision`
    DESCRIPTION = "dense model, fp32 vs amp-bf16"   # one line for `bench grids`

    def cells(base: TrainConfig) -> list[Cell]:     # base: the paper's defaults + the user's options
        out = []
        for precision in ("fp32", "amp-bf16"):
            cfg = dense_model(base).replace(precision=precision)
            out.append(Cell(precision, f"dense, {precision}", standard_factors(cfg), cfg))
        return out

An optional `defaults() -> TrainConfig` replaces the paper's base (smoke.py
does, for tiny CPU runs). Nothing else changes: `bench grids` lists the new
grid, `bench run --grid precision` runs it, and tests/test_grids.py expands and
plans every grid in ablations/. The grid interface and its helpers are in
bench/grids.py; the paper's own grids in ablations/ are worked examples.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from bench.calibrate import calibrate
from bench.cell_log import check_stall_timeout, interrupted_why
from bench.estimate import Calibration, CellEstimate, PlanEstimate, estimate_plan
from bench.grids import Grid, load_grid, scan
from bench.planning import Overrides, PlannedCell, dry_run_order, dry_run_refusal, plan_grid
from bench.processes import CellResult, run_grid
from bench.run_slurm import run_on_slurm
from bench.slurm import SlurmOptions, refuse_live_jobs
from bench.status import format_duration
from bench.store import read_summary, writer_alive
from ddnet.config import resolve_device
from ddnet.errors import UserError


def print_summary(console: Console, results: list[CellResult]) -> None:
    """The end-of-grid table: cell, status, epochs, total time, final MS-SSIM, error."""
    table = Table(title="bench run: summary", show_lines=False)
    for col, kw in (
        ("cell", {"overflow": "fold"}), ("status", {}), ("epochs", {"justify": "right"}),
        ("total_time_s", {"justify": "right"}), ("final MS-SSIM %", {"justify": "right"}),
        ("error / reason", {"overflow": "fold"}),
    ):
        table.add_column(col, **kw)
    colours = {"ok": "green", "failed": "red", "skipped": "yellow"}
    for r in results:
        c = colours.get(r.status, "white")
        table.add_row(
            r.folder,
            f"[{c}]{r.status}[/{c}]" + (" (earlier)" if r.action == "reused" else ""),
            f"{r.epochs_completed}/{r.epochs}",
            f"{r.total_time_s:.1f}" if r.total_time_s is not None else "-",
            f"{r.final_val_ms_ssim:.2f}" if r.final_val_ms_ssim is not None else "-",
            (r.error or "")[:300],
        )
    console.print(table)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    console.print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())), markup=False, highlight=False)


def total_line(estimate: PlanEstimate) -> str:
    """'total: 4 cell(s) to run, 1,024,000 images to train, estimated 2h13m (3 measured, 1 scaled)'."""
    cells = estimate.to_run()
    kinds: dict[str, int] = {}
    for c in cells:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    how = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    text = f"total: {len(cells)} cell(s) to run, {sum(c.images_left for c in cells):,} images to train"
    if not cells:
        return text + ", nothing to do"
    if estimate.unknown == len(cells):
        text += f", time unknown ({how})"
    else:
        at_least = "at least " if estimate.unknown else ""
        data = " with the data generation" if estimate.data_s else ""
        text += f", estimated {at_least}{format_duration(estimate.total_s)}{data} ({how})"
    if estimate.unknown:
        text += "; for the unknown ones use --calibrate, or run a few epochs into this --out first"
    return text


def print_plan(console: Console, grid: Grid, planned: list[PlannedCell], order: list[str], out: Path,
               estimate: PlanEstimate | None = None) -> None:
    """The cells in run order with their factors, sizes, images to train, estimated time (and its source) and
    state or skip reason, then the totals; nothing is run or written."""
    by_folder = {p.folder: p for p in planned}
    # the factors every cell shares go under the table, once; the column shows what the grid varies
    keys = list(dict.fromkeys(k for p in planned for k in p.cell.factors))
    varied = [k for k in keys if len({repr(p.cell.factors.get(k)) for p in planned}) > 1] or keys
    shared = {k: planned[0].cell.factors[k] for k in keys if k not in varied and k in planned[0].cell.factors}
    table = Table(title=f"grid '{grid.name}': {len(planned)} cells -> {out}")
    table.add_column("#", justify="right")
    table.add_column("cell", overflow="fold")
    table.add_column("factors", overflow="fold")
    table.add_column("slices x px\nsteps x batch x epochs\nimages to train", overflow="fold", min_width=15)
    table.add_column("estimate\n(from)", overflow="fold")
    table.add_column("state / skip reason", overflow="fold")
    for i, folder in enumerate(order, start=1):
        p = by_folder[folder]
        factors = ", ".join(f"{k}={p.cell.factors[k]}" for k in varied if k in p.cell.factors)
        e = estimate.cells.get(folder) if estimate is not None else None
        state = f"skip: {p.skip_reason}" if p.skip_reason else _existing(read_summary(out / folder), e)
        if e is None:
            size = when = "-"
        else:
            z = e.sizes
            size = f"{z.n_train} x {z.side} px\n{z.steps} x {z.batch} x {e.epochs}\n{e.images:,} images"
            left = f", {e.epochs_left} of {e.epochs} epochs left" if 0 < e.epochs_left < e.epochs else ""
            if e.state != "to run":
                when = "-"
            elif e.seconds is None:
                when = e.source + left
            else:
                when = f"{format_duration(e.seconds)}\n({e.source}{left})"
        table.add_row(str(i), folder, factors, size, when, state)
    console.print(table)
    if shared:
        console.print("every cell: " + ", ".join(f"{k}={v}" for k, v in shared.items()), markup=False,
                      highlight=False)
    if estimate is not None:
        for line in (total_line(estimate), estimate.data_note):
            if line:
                console.print(line, markup=False, highlight=False)
        if estimate.other_machines:
            console.print(f"({estimate.other_machines} earlier run(s) under {out} were made on another machine "
                          "or device: not used for the estimates)", markup=False, highlight=False)


def _existing(s: dict | None, e: CellEstimate | None) -> str:
    """A cell's state in the plan: 'to run', or what its folder holds and what the run will do with it."""
    if s is None:
        return "to run"
    status = s.get("status")
    if status == "ok":
        return "ok (existing)"
    left = f", {e.epochs_left} of {e.epochs} epochs left" if e is not None and 0 < e.epochs_left < e.epochs else ""
    if status == "failed":
        return (f"failed (existing): retried{left}" if e is not None and e.state == "to run" else
                "failed (existing): kept; --retry-failed runs it again")
    if status == "running":  # its process is alive (another `bench train`), else it stopped and resumes
        if writer_alive(s.get("writer")) and not interrupted_why(s):
            return "running now (in another process)"
        if e is None:
            return "stopped: resumes from its last checkpoint"
        if e.epochs_left == 0:
            return "stopped after its last epoch: resumes to write its summary"
        return f"stopped: resumes{left}" if left else "stopped before its first checkpoint: starts again"
    return f"{status} (existing)"


def _console() -> Console:
    console = Console()
    if not console.is_terminal and console.width < 160:
        # logs and CI: wide enough that tables do not fold every column
        console = Console(width=160)
    return console


# ------------------------------------------------------------------ commands


def grids_cmd() -> None:
    """List the grids in ablations/ with their cell counts at default settings."""
    console = _console()
    table = Table(title="grids (ablations/)")
    table.add_column("grid")
    table.add_column("cells", justify="right")
    table.add_column("description", overflow="fold")
    grids, broken = scan()
    errors = list(dict.fromkeys(broken.values()))  # a NAME two files share: one line
    for name, grid in grids.items():
        try:
            table.add_row(name, str(len(grid.cells())), grid.description)
        except UserError as e:  # one broken grid file: the others are still listed
            errors.append(str(e))
    console.print(table)
    for line in errors:
        typer.echo(f"error: {line}", err=True)
    if errors:
        raise typer.Exit(2)


MAX_CELLS = 500
"""Most cells (grid cells x --repeats) `bench run` starts without `--max-cells`: the shipped grids have at most 32,
so thousands are more likely a slip in a grid file's factor lists or in --repeats than a plan."""


def check_grid_size(g: Grid, repeats: int, max_cells: int, dry_run: bool) -> str | None:
    """Refuse (UserError) a grid of more than `max_cells` cells, naming the count and the fix; for a dry run,
    which starts nothing, the same words as a note to print (None: within the limit)."""
    if max_cells < 1:
        raise UserError(f"--max-cells {max_cells} must be at least 1.")
    n_cells = len(g.cells())
    total = n_cells * max(repeats, 1)
    if total <= max_cells:
        return None
    what = f"{n_cells} cells x {repeats} repeats" if repeats > 1 else f"{n_cells} cells"
    why = (f"grid {g.name} expands to {total} runs ({what}), more than --max-cells {max_cells}; check the grid "
           "file's factor lists and --repeats")
    if dry_run:
        return f"note: `bench run` would stop here: {why}, then pass --max-cells {total} to run them all."
    raise UserError(f"{why} with --dry-run (it shows every cell and the estimated time), then pass "
                    f"--max-cells {total} to run them all.")


SLURM_FLAGS = {"partition": "--slurm-partition", "account": "--slurm-account", "qos": "--slurm-qos",
               "time_min": "--slurm-time", "gpus_per_node": "--slurm-gpus-per-node",
               "cpus_per_task": "--slurm-cpus-per-task", "mem_gb": "--slurm-mem-gb",
               "array_parallelism": "--slurm-array-parallelism", "extra_sbatch": "--slurm-extra",
               "setup": "--slurm-setup", "cluster": "--slurm-cluster", "nodes": "--slurm-nodes",
               "stall_timeout_s": "--stall-timeout"}
"""`bench.slurm.SlurmOptions` fields as `bench run` spells them (its refusals name the option to fix)."""


def slurm_only_given(ctx: typer.Context) -> list[str]:
    """The options that only apply with `--executor slurm` (--wait, --slurm-*) given on the command line or
    from the environment, even at their default value, as their first spelling. (click's ParameterSource is
    compared by name: recent typer vendors its own click, older typer uses the click package.)"""
    return [p.opts[0] for p in ctx.command.params
            if p.name is not None and (p.name == "wait" or p.name.startswith("slurm_"))
            and getattr(ctx.get_parameter_source(p.name), "name", "DEFAULT") != "DEFAULT"]


def run_cmd(
    ctx: typer.Context,
    grid: str = typer.Option(..., "--grid", help="Grid name (see `bench grids`) or path to a grid .py file."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default results/runs/<grid>)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Override the grid's epoch count."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Override the batch size."),
    image_size: int | None = typer.Option(None, "--image-size", help="Override the synthetic image side."),
    data: str | None = typer.Option(None, "--data", help="'synthetic' or a data folder."),
    n_train: int | None = typer.Option(None, "--n-train", help="Override the synthetic training slices."),
    n_val: int | None = typer.Option(None, "--n-val", help="Override the synthetic validation slices."),
    device: str | None = typer.Option(None, "--device", help="Override the device: auto, cpu or cuda."),
    seed: int | None = typer.Option(None, "--seed", help="Base seed (repeat k uses seed + k; also seeds the order)."),
    repeats: int = typer.Option(1, "--repeats", help="Run each cell this many times, interleaved in a seeded order."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the cells, their sizes and estimates; run nothing."),
    estimate_from: list[Path] = typer.Option([], "--estimate-from",
                                             help="Also read earlier runs for the time estimates from this "
                                                  "folder (repeatable; --out is always read)."),
    calibrate_: bool = typer.Option(False, "--calibrate",
                                    help="Estimate the cells no earlier run measured from a quick training of "
                                         "each distinct configuration (2 epochs of 3 steps) before planning."),
    max_cells: int = typer.Option(MAX_CELLS, "--max-cells", help="Refuse a grid of more runs than this (cells x "
                                  "repeats): a guard against a slip in a grid file or --repeats."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue a grid already in --out (default)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run failed cells again (from their checkpoint)."),
    cell_timeout: float | None = typer.Option(None, "--cell-timeout", min=1,
                                              help="Stop a cell after this many seconds and record it as failed "
                                                   "(default: no limit)."),
    stall_timeout: float | None = typer.Option(None, "--stall-timeout",
                                               help="Stop a cell that writes no new epoch for this many seconds "
                                                    "(once it has written one) and record it as failed; 0: never "
                                                    "(default: 10x its slowest epoch, at least 30 min). Before "
                                                    "its first epoch: no sign of life for an hour, or this if "
                                                    "longer."),
    executor: str = typer.Option("local", "--executor",
                                 help="local: the cells run here, one after another; slurm: each cell is a "
                                      "Slurm array task (submitted now; re-run to resubmit dead ones)."),
    wait: bool = typer.Option(False, "--wait", help="slurm: wait for the submitted jobs, then print the summary."),
    slurm_partition: str | None = typer.Option(None, "--slurm-partition", help="slurm: partition (sbatch -p)."),
    slurm_account: str | None = typer.Option(None, "--slurm-account", help="slurm: account charged (sbatch -A)."),
    slurm_qos: str | None = typer.Option(None, "--slurm-qos", help="slurm: quality of service."),
    slurm_time: str = typer.Option("240", "--slurm-time", help="slurm: time limit per job, minutes or as sbatch "
                                                               "--time (4:00:00, 1-12:00); a job that reaches it "
                                                               "is requeued and resumes its cell."),
    slurm_gpus: int | None = typer.Option(None, "--slurm-gpus-per-node",
                                          help="slurm: GPUs per node (default: the cell's nproc / --slurm-nodes; "
                                               "0 on CPU cells)."),
    slurm_nodes: int = typer.Option(1, "--slurm-nodes", help="slurm: nodes per cell; its replicas (nproc, which "
                                                             "this must divide) are split evenly over them."),
    slurm_cpus: int | None = typer.Option(None, "--slurm-cpus-per-task", help="slurm: CPU cores per job."),
    slurm_mem: float | None = typer.Option(None, "--slurm-mem-gb", help="slurm: host memory per job, GB."),
    slurm_parallel: int | None = typer.Option(None, "--slurm-array-parallelism",
                                              help="slurm: most cells running at once."),
    slurm_extra: list[str] = typer.Option([], "--slurm-extra",
                                          help="slurm: another sbatch directive, e.g. --slurm-extra=--constraint=a100 "
                                               "(repeatable)."),
    slurm_setup: list[str] = typer.Option([], "--slurm-setup",
                                          help="slurm: a shell line run before each cell, e.g. 'module load cuda' "
                                               "(repeatable)."),
    slurm_cluster: str = typer.Option("slurm", "--slurm-cluster",
                                      help="slurm: 'slurm', or 'local' to try the Slurm path on this machine "
                                           "(submitit's local executor)."),
) -> None:
    """Run every cell of a grid, each in its own process, into one folder per cell; re-run to resume."""
    console = _console()
    try:
        check_stall_timeout(stall_timeout)  # nan, inf: one line, alike for both executors and a dry run
        g = load_grid(grid)
        size_note = check_grid_size(g, repeats, max_cells, dry_run)
        if size_note:  # a dry run still shows the plan (either executor)
            console.print(size_note, markup=False, highlight=False)
        overrides = Overrides(epochs=epochs, batch_size=batch_size, image_size=image_size, data=data,
                              n_train=n_train, n_val=n_val, seed=seed, device=device)
        out_dir = out if out is not None else Path("results") / "runs" / g.name
        if executor not in ("local", "slurm"):
            raise UserError(f"--executor {executor!r}: choose local (cells run here) or slurm (each cell a job).")
        if executor == "slurm":
            if calibrate_ or cell_timeout is not None:
                raise UserError("--calibrate and --cell-timeout run here, not on Slurm; drop them (a job's limit "
                                "is --slurm-time).")
            try:
                options = SlurmOptions(partition=slurm_partition, account=slurm_account, qos=slurm_qos,
                                       time_min=slurm_time, gpus_per_node=slurm_gpus, cpus_per_task=slurm_cpus,
                                       mem_gb=slurm_mem, array_parallelism=slurm_parallel,
                                       extra_sbatch=list(slurm_extra), setup=list(slurm_setup), cluster=slurm_cluster,
                                       nodes=slurm_nodes, stall_timeout_s=stall_timeout)
            except UserError as e:  # name the command-line option, not the API field
                msg = str(e)
                for field, flag in SLURM_FLAGS.items():
                    msg = msg.replace(f"SlurmOptions.{field}", flag)
                raise UserError(msg) from None
            try:
                results = run_on_slurm(g, out_dir, options, overrides, repeats, resume, retry_failed, dry_run, wait,
                                       console)
            except KeyboardInterrupt as e:  # submitting or waiting: the line says which jobs go on
                console.print(str(e) or f"interrupted; every job it submitted is recorded in grid.json: `bench status "
                              f"{out_dir}` shows them, and the same command submits only what is not queued or done.",
                              markup=False, highlight=False)
                raise typer.Exit(130) from None
            if results is not None:
                _finish(console, results, out_dir)
            return
        given = slurm_only_given(ctx)
        if given:
            raise UserError(f"{', '.join(given)} only apply with --executor slurm; add it, or drop them.")
        if device == "cuda" and resolve_device("auto") != "cuda":  # not a skip of every cell: a mistake
            raise UserError("--device cuda was asked for but no CUDA device is visible here; use --device cpu, or "
                            "leave --device out to run what this machine can (the CUDA-only cells are skipped).")
        calibrations: dict[tuple[str, str], Calibration] | None = None
        also = tuple(estimate_from)
        missing = [str(d) for d in also if not Path(d).is_dir()]
        if missing:
            raise UserError(f"--estimate-from {missing[0]} is not a folder; give a folder of earlier runs (a grid's "
                            "--out, or any folder above run folders).")
        if dry_run or calibrate_:
            planned = plan_grid(g, overrides, repeats)
        if calibrate_:
            calibrations = calibrate(planned, out_dir, retry_failed, console=console, estimate_from=also)
        if dry_run:
            order = dry_run_order(planned, seed if seed is not None else g.base().seed, out_dir)
            print_plan(console, g, planned, order, out_dir,
                       estimate_plan(planned, out_dir, retry_failed, calibrations, also))
            refusal = dry_run_refusal(out_dir, order, resume=resume)
            if refusal:
                console.print(refusal, markup=False, highlight=False)
            return

        refuse_live_jobs(out_dir)  # a grid continued here after `--executor slurm`: its jobs must have ended

        def show_plan(planned: list[PlannedCell], order: list[str], estimate: PlanEstimate) -> None:
            print_plan(console, g, planned, order, out_dir, estimate)

        try:
            results = run_grid(g, out_dir, overrides, repeats, resume, retry_failed, console=console,
                               cell_timeout_s=cell_timeout, stall_timeout_s=stall_timeout, on_plan=show_plan,
                               calibrations=calibrations, estimate_from=also)
        except KeyboardInterrupt:
            console.print(f"interrupted; run the same command again to resume the grid in {out_dir}.",
                          markup=False, highlight=False)
            raise typer.Exit(130) from None
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(getattr(e, "exit_code", 2)) from None  # DeviceGone: 5
    _finish(console, results, out_dir)


def _finish(console: Console, results: list[CellResult], out_dir: Path) -> None:
    """The summary table; exit 1 when a cell did not finish ok."""
    print_summary(console, results)
    failed = [r for r in results if r.status not in ("ok", "skipped")]
    if failed:
        retry = (" Failed cells stay failed on a plain rerun: add --retry-failed to resume them from their last "
                 "checkpoint." if any(r.status == "failed" for r in failed) else "")
        console.print(f"{len(failed)} cell(s) did not finish ok; see their train.log under {out_dir}.{retry}",
                      markup=False, highlight=False)
        raise typer.Exit(1)
