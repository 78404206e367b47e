"""The `bench` command line: train, eval, data, grids, run, report.

Every command turns a `UserError` (bad input, impossible combination) into one
line on stderr and exit status 2; no traceback reaches the user for those.
"""

from __future__ import annotations

import sys

import typer

from ddnet.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="ddnet-bench: train, ablate and report DDNet the way the paper did, on your hardware.",
)

# --- command registration: one block per module (keep each block's lines together) ---
# [train]
from bench.cmd_train import train_cmd  # noqa: E402

app.command("train")(train_cmd)
# [data]
from bench.cmd_data import data_app  # noqa: E402

app.add_typer(data_app, name="data")
# [eval]
from bench.cmd_eval import eval_cmd  # noqa: E402

app.command("eval")(eval_cmd)
# [grids/run]
from bench.cmd_run import grids_cmd, run_cmd  # noqa: E402

app.command("grids")(grids_cmd)
app.command("run")(run_cmd)
# [report]
from bench.report import report_cmd  # noqa: E402

app.command("report")(report_cmd)
# --- end of command registration ---


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, standalone_mode=True)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
