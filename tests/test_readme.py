"""README.md against the code: every `bench` option it gives exists, and its grid table is `bench grids`'.

A renamed option or a grid whose cells changed would otherwise leave the README telling users a command
that fails, or a count that is wrong, with nothing in the suite to notice.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

from bench.cli import COMMANDS
from bench.cli import load_command as _load
from bench.grids import scan

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
COMMAND = re.compile(r"\bbench ([a-z][a-z-]*)((?:(?!&&|;|#)[^`\n|])*)")
"""`bench CMD ...` up to the end of its code span, table cell, line, shell command (`&&`, `;`, a pipe) or comment."""
load_command = functools.cache(_load)
"""Each command's click object built once, not once per mention (the README has about 140)."""


def _options(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}


def readme_commands(text: str) -> list[tuple[str, str, list[str]]]:
    """(command, as written, its options) of every `bench CMD ...` in `text` whose CMD is a bench command;
    a command group's subcommand (`bench data synth`) is part of the command."""
    found = []
    for m in COMMAND.finditer(text):
        name, rest = m.group(1), m.group(2)
        if name not in COMMANDS:
            continue  # prose: "bench run's ...", "the bench harness"
        words = rest.split()
        if words and not words[0].startswith("-") and hasattr(load_command(name), "commands"):
            name = f"{name} {words[0]}"  # a group's subcommand
        found.append((name, m.group(0).strip(), OPTION.findall(rest)))
    return found


def _wrong(found: list[tuple[str, str, list[str]]]) -> list[str]:
    """What in `found` names no command or no option of its command."""
    out = []
    for name, written, opts in found:
        top, _, sub = name.partition(" ")
        command = load_command(top)
        if sub:
            if sub not in command.commands:
                out.append(f"{written!r}: bench {top} has no subcommand {sub}")
                continue
            command = command.commands[sub]
        out += [f"{written!r}: bench {name} has no {opt}" for opt in opts if opt not in _options(command)]
    return out


def test_every_option_the_readme_gives_a_bench_command_exists() -> None:
    found = readme_commands(README)
    assert _wrong(found) == []
    # the scan sees the README's commands (about 60 options when this was written), not an empty match
    assert sum(len(opts) for _, _, opts in found) >= 40
    assert {name for name, _, _ in found} >= {"train", "run", "report", "eval", "status", "data synth"}


def test_the_option_check_catches_a_renamed_option() -> None:
    text = ("run `bench run --grid demo --repeat 3 && bench report r --outt x` and\n"
            "    bench data synth --out d --sise 64   # not --this\n")
    found = readme_commands(text)
    assert [(n, o) for n, _, o in found] == [("run", ["--grid", "--repeat"]), ("report", ["--outt"]),
                                             ("data synth", ["--out", "--sise"])]
    assert [w.split(": ", 1)[1] for w in _wrong(found)] == [
        "bench run has no --repeat", "bench report has no --outt", "bench data synth has no --sise"]
    assert _wrong(readme_commands("`bench data synthh --n 4`")) == ["'bench data synthh --n 4': bench data has no "
                                                                    "subcommand synthh"]


def test_every_grid_the_readme_runs_exists() -> None:
    grids, broken = scan()
    named = set(re.findall(r"--grid ([a-z][a-z0-9_]*)(?![\w./])", README))  # a name, not a grid file's path
    assert named and named - set(grids) == set(), broken


def test_the_readme_grid_table_is_what_bench_grids_lists() -> None:
    grids, broken = scan()
    assert broken == {}
    table = dict(re.findall(r"^\| `([a-z0-9_]+)` \| (\d+) \|", README, flags=re.M))
    assert {name: int(n) for name, n in table.items()} == {name: len(g.cells()) for name, g in grids.items()}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_readme_shows_every_command(name: str) -> None:
    assert re.search(rf"`bench {re.escape(name)}\b", README), f"README never shows `bench {name}`"
