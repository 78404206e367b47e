"""Reflection over `TrainConfig`: every field as the command line shows it (flag, type, doc, default, unit).

`bench train`'s options are generated from `config_fields()`, so a new field of
`TrainConfig` (or of its model, data and sparsity parts) is a new option, with
its docstring as help, its `Literal`'s values as choices and its default shown.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from ddnet.config import TrainConfig, choices, cli_flag


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a config dataclass (the source is the documentation)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@dataclass(frozen=True)
class ConfigField:
    """One field of `TrainConfig` as the command line sees it."""

    path: str
    """Dotted path in the config ('epochs', 'data.image_size')."""
    flag: str
    """Command-line flag ('--epochs', '--image-size')."""
    type: Any
    """Declared type."""
    default: Any
    doc: str
    unit: str

    @property
    def param(self) -> str:
        """The Python name of its command-line option ('--image-size' -> 'image_size'), as typer passes it."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def choices(self) -> tuple[str, ...]:
        """The allowed values of a Literal field (or of the Literal part of a union), else ()."""
        typ = self.type
        if typing.get_origin(typ) is Literal:
            return choices(typ)
        if typing.get_origin(typ) in (typing.Union, types.UnionType):
            return tuple(v for t in typing.get_args(typ) if typing.get_origin(t) is Literal for v in choices(t))
        return ()


def config_fields() -> list[ConfigField]:
    """Every command-line-exposed field of TrainConfig and its parts, in declaration order."""
    out: list[ConfigField] = []

    def walk(cls: type, prefix: str) -> None:
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            if dataclasses.is_dataclass(typ):
                walk(typ, f"{prefix}{f.name}.")
                continue
            if not f.metadata.get("cli", True):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append(ConfigField(prefix + f.name, cli_flag(f), typ, default, docs.get(f.name, ""),
                                   f.metadata.get("unit", "")))

    walk(TrainConfig, "")
    flags = [c.flag for c in out]
    dup = {f for f in flags if flags.count(f) > 1}
    if dup:  # a programming error, caught by the tests
        raise RuntimeError(f"config fields share command-line flags: {sorted(dup)}")
    return out
