"""`bench grids` and `bench run`: list the grids; expand one and run each cell in its own fresh process.

`bench run` plans the grid (`bench.planning`: cells, folder names, run order,
`<out>/grid.json`), then runs the cells one process each (`bench.processes`),
and ends with a summary table; it exits non-zero if any cell failed. Re-running
the same command into the same folder resumes the grid; `--dry-run` prints the
plan and writes nothing.

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

import contextlib
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from bench.grids import Grid, load_grid, registry
from bench.planning import Overrides, PlannedCell, plan_grid, run_order
from bench.processes import CellResult, read_summary, run_grid
from bench.store import read_json
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


def print_plan(console: Console, grid: Grid, planned: list[PlannedCell], order: list[str], out: Path) -> None:
    """`--dry-run`: the cells in run order with their factors and skip reasons; nothing is run or written."""
    by_folder = {p.folder: p for p in planned}
    table = Table(title=f"grid '{grid.name}': {len(planned)} cells -> {out}")
    table.add_column("#", justify="right")
    table.add_column("cell", overflow="fold")
    table.add_column("factors", overflow="fold")
    table.add_column("state / skip reason", overflow="fold")
    for i, folder in enumerate(order, start=1):
        p = by_folder[folder]
        factors = ", ".join(f"{k}={v}" for k, v in p.cell.factors.items())
        s = read_summary(out / folder)
        if p.skip_reason:
            state = f"skip: {p.skip_reason}"
        elif s is not None:
            state = f"{s.get('status')} (existing)"
        else:
            state = "to run"
        table.add_row(str(i), folder, factors, state)
    console.print(table)


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
    try:
        table = Table(title="grids (ablations/)")
        table.add_column("grid")
        table.add_column("cells", justify="right")
        table.add_column("description", overflow="fold")
        for name, grid in registry().items():
            table.add_row(name, str(len(grid.cells())), grid.description)
        console.print(table)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def run_cmd(
    grid: str = typer.Option(..., "--grid", help="Grid name (see `bench grids`) or path to a grid .py file."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default results/runs/<grid>)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Override the grid's epoch count."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Override the batch size."),
    image_size: int | None = typer.Option(None, "--image-size", help="Override the synthetic image side."),
    data: str | None = typer.Option(None, "--data", help="'synthetic' or a data folder."),
    n_train: int | None = typer.Option(None, "--n-train", help="Override the synthetic training slices."),
    device: str | None = typer.Option(None, "--device", help="Override the device: auto, cpu or cuda."),
    seed: int | None = typer.Option(None, "--seed", help="Base seed (repeat k uses seed + k; also seeds the order)."),
    repeats: int = typer.Option(1, "--repeats", help="Run each cell this many times, interleaved in a seeded order."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the cells and run nothing."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue a grid already in --out (default)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run failed cells again (from their checkpoint)."),
    cell_timeout: float | None = typer.Option(None, "--cell-timeout", min=1,
                                              help="Stop a cell after this many seconds and record it as failed "
                                                   "(default: no limit)."),
) -> None:
    """Run every cell of a grid, each in its own process, into one folder per cell; re-run to resume."""
    console = _console()
    try:
        g = load_grid(grid)
        overrides = Overrides(epochs=epochs, batch_size=batch_size, image_size=image_size, data=data,
                              n_train=n_train, seed=seed, device=device)
        out_dir = out if out is not None else Path("results") / "runs" / g.name
        if dry_run:
            planned = plan_grid(g, overrides, repeats)
            order_seed = seed if seed is not None else g.base().seed
            order = run_order(planned, order_seed)
            existing = out_dir / "grid.json"
            if existing.exists():
                with contextlib.suppress(OSError, json.JSONDecodeError, KeyError):
                    recorded = list(read_json(existing)["order"])
                    if sorted(recorded) == sorted(order):
                        order = recorded
            print_plan(console, g, planned, order, out_dir)
            return
        try:
            results = run_grid(g, out_dir, overrides, repeats, resume, retry_failed, console=console,
                               cell_timeout_s=cell_timeout)
        except KeyboardInterrupt:
            console.print(f"interrupted; run the same command again to resume the grid in {out_dir}.",
                          markup=False, highlight=False)
            raise typer.Exit(130) from None
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    print_summary(console, results)
    failed = [r for r in results if r.status not in ("ok", "skipped")]
    if failed:
        console.print(f"{len(failed)} cell(s) did not finish ok; see their train.log under {out_dir}.",
                      markup=False, highlight=False)
        raise typer.Exit(1)
