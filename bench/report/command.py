"""`bench report [RESULTS_DIR] [--out DIR] ...`: the command line of the report.

Every `bench` process imports this module through the CLI (one process per
grid cell in `bench run`), so it imports only typer and the options here; the
report machinery (pandas, matplotlib, seaborn) loads when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from bench.report.options import DEFAULT_RESULTS, Options, check_target
from ddnet.errors import UserError


def report_cmd(
    results_dir: Path = typer.Argument(DEFAULT_RESULTS, help="Folder searched recursively for run folders (summary.json)."),
    out: Path | None = typer.Option(None, "--out", help="Report folder (default: RESULTS_DIR/report)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing report folder."),
    tolerance: float = typer.Option(0.5, "--tolerance", help="Time to quality: target = dense baseline MS-SSIM minus this (pp)."),
    target: str | None = typer.Option(None, "--target", help="Time to quality: an absolute MS-SSIM target in "
                                      "percent, or 'input' (the first epoch that beats the low-dose input)."),
) -> None:
    """Tables (Markdown, CSV) and plots of the paper's tables and figures, re-measured, beside its numbers."""
    # Deferred: make_report pulls in pandas, matplotlib and seaborn (about a second); `bench --help` and
    # every `bench run` cell process import this module and must not pay for them.
    from bench.report.build import make_report  # noqa: PLC0415

    rep = make_report(results_dir, out, force, Options(tolerance_pp=tolerance, **_target(target)))
    n_tables = sum(len(e.tables) for e in rep.environments)
    n_plots = sum(len(t.plots) for e in rep.environments for t in e.tables)
    typer.echo(f"report: {rep.report_md} ({n_tables} tables, {n_plots} plots, {len(rep.environments)} environment(s))")
    if rep.not_run:
        typer.echo(f"not run: {', '.join(rep.not_run)}")


def _target(text: str | None) -> dict:
    """--target: a number (percent) or 'input'."""
    if text is None:
        return {}
    if text == "input":
        return {"target_input": True}
    try:
        pct = float(text)
    except ValueError:
        raise UserError(f"--target {text!r} is neither a number (percent) nor 'input'; pass e.g. --target 97.22 "
                        "or --target input.") from None
    check_target(pct)
    return {"target_pct": pct}
