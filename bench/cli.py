"""The `bench` command line: train, max-batch, eval, grids, run, report, data.

Each command lives in its own module, named in `COMMANDS`, and is imported
only when it runs (or shows its own --help): `bench --help` lists the commands
from `COMMANDS` alone, so it imports no command module and no torch. A new
command is one function (or one typer sub-app) in its module plus one line here.

Every command turns a `UserError` (bad input, impossible combination) into one
line on stderr and exit status 2, and a write that failed for a full disk into one
line and exit status 4; no traceback reaches the user for those.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import typer
from typer.core import TyperCommand, TyperGroup


class Entry(NamedTuple):
    """Where a command lives, and the one line `bench --help` shows for it."""

    module: str
    attribute: str
    """A typer command function, or a `typer.Typer` sub-app (a command group such as `bench data`)."""
    help: str


COMMANDS: dict[str, Entry] = {
    "train": Entry("bench.cmd_train", "train_cmd", "Train DDNet once and write the run folder."),
    "max-batch": Entry("bench.cmd_max_batch", "max_batch_cmd",
                       "Find the largest training batch that fits in this GPU's memory for one configuration."),
    "eval": Entry("bench.cmd_eval", "eval_cmd",
                  "Evaluate a checkpoint: input and output vs target per slice, mean +/- std, and a PNG strip."),
    "grids": Entry("bench.cmd_run", "grids_cmd",
                   "List the grids in ablations/ with their cell counts at default settings."),
    "run": Entry("bench.cmd_run", "run_cmd",
                 "Run every cell of a grid, each in its own process, into one folder per cell; re-run to resume."),
    "status": Entry("bench.cmd_status", "status_cmd",
                    "Where every cell of a grid (or one run) stands: queued, running (epoch k/N), finished, failed, skipped."),
    "report": Entry("bench.report", "report_cmd",
                    "Tables (Markdown, CSV) and plots of the paper's tables and figures, re-measured, "
                    "beside its numbers."),
    "data": Entry("bench.cmd_data", "data_app",
                  "Datasets: `synth` writes a synthetic dataset that --data DIR reads; `cache` lists or clears made data."),
}
"""Command name -> where it lives and its one-line help, in `bench --help` order."""


def load_command(name: str) -> Any:
    """Import the module of command `name` and build its click command, as `app.command(name)` would."""
    entry = COMMANDS[name]
    target = getattr(importlib.import_module(entry.module), entry.attribute)
    holder = typer.Typer(add_completion=False)
    if isinstance(target, typer.Typer):
        holder.add_typer(target, name=name)
    else:
        holder.command(name)(target)
    return typer.main.get_group(holder).commands[name]


class LazyGroup(TyperGroup):
    """The root group: commands are known by name and help line, and imported when one is used.

    `get_command` imports (click's contract for lazy groups), except while the
    group formats its own help: the listing then gets stand-ins that carry the
    name and the help line from `COMMANDS`. `self.commands` holds those
    stand-ins, so typer's "Did you mean ...?" sees every name.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commands = {name: TyperCommand(name, help=e.help) for name, e in COMMANDS.items()}
        self._loaded: dict[str, Any] = {}
        self._listing = False

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:
        if cmd_name not in COMMANDS:
            return None
        if self._listing:
            return self.commands[cmd_name]
        if cmd_name not in self._loaded:
            self._loaded[cmd_name] = load_command(cmd_name)
        return self._loaded[cmd_name]

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    cls=LazyGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="ddnet-bench: train, ablate and report DDNet the way the paper did, on your hardware.",
)


@app.callback()
def _root() -> None:
    # typer makes a group only of an app with a callback (or registered commands); LazyGroup has the commands
    pass


def _is_user_error(exc: BaseException) -> bool:
    # Not `except UserError`: importing ddnet.errors imports the ddnet package, hence torch, and
    # `bench --help` must not. A UserError comes from a command module, which imported it already.
    errors = sys.modules.get("ddnet.errors")
    return errors is not None and isinstance(exc, errors.UserError)


def _kind(exc: BaseException) -> str | None:
    """'no-args', 'usage' or 'abort' for click's exceptions (typer vendors click as a private module in
    recent versions and depends on it in older ones: matched by class name, so both work), else None."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "NoArgsIsHelpError" in names:
        return "no-args"
    if "UsageError" in names:
        return "usage"
    if "Abort" in names:
        return "abort"
    return None


_OURS = (str(Path(__file__).resolve().parent.parent / "ddnet"), str(Path(__file__).resolve().parent))
_python_format = warnings.formatwarning


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    """Our own warnings as one `warning: ...` line (not Python's file:line and source line); others as Python's."""
    if str(filename).startswith(_OURS):
        return f"warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


def one_line_warnings() -> None:
    """Print our own warnings as `_format_warning` does, in this process (the CLI's, or a replica it spawned)."""
    warnings.formatwarning = _format_warning


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: bad input of any kind is one `error:` line and exit status 2."""
    args = sys.argv[1:] if argv is None else list(argv)
    one_line_warnings()
    try:
        code = app(args=args, standalone_mode=False)
    except Exception as e:
        kind, ctx = _kind(e), getattr(e, "ctx", None)
        if kind == "no-args":  # `bench` or `bench data` alone: the help, as asked
            typer.echo(ctx.get_help() if ctx else str(e))
            sys.exit(0)
        if kind == "usage":  # an unknown option, a value of the wrong type, a missing one
            root = ctx.find_root().info_name or "" if ctx else ""
            sub = ctx.command_path[len(root):].strip() if ctx else ""
            typer.echo(f"error: {e.format_message()} (see `{' '.join(['bench', sub, '--help']).replace('  ', ' ')}`)",
                       err=True)
            sys.exit(2)
        if kind == "abort":
            typer.echo("aborted", err=True)
            sys.exit(130)
        from ddnet.errors import out_of_space  # noqa: PLC0415 - an error path; `bench --help` imports no ddnet

        if out_of_space(e):
            from bench.cell_log import EXIT_NO_SPACE  # noqa: PLC0415 - bench.cli imports no command module early

            where = f"cannot write {e.filename}" if e.filename else "a write failed"
            kept = (": finished cells are kept and the cell that stopped resumes from its last checkpoint"
                    if args[:1] == ["run"] else "")
            typer.echo(f"error: {where}: the disk (or your quota) is full ({e.strerror}); free some space, then run "
                       f"the same command again{kept}.", err=True)
            sys.exit(EXIT_NO_SPACE)
        if not _is_user_error(e):
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(getattr(e, "exit_code", 2))  # a UserError may name its own (bench.cell_log.DeviceGone)
    if isinstance(code, int) and code != 0:
        sys.exit(code)


if __name__ == "__main__":
    main()
