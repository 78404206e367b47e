"""User-facing errors: the CLI prints their message as one line and exits non-zero."""

from __future__ import annotations

from pathlib import Path


class UserError(ValueError):
    """Bad input or an impossible request. The message names the problem and the fix, in one line."""


def make_folder(path: Path, fix: str) -> None:
    """`mkdir -p path`, or one UserError that names the path, why it cannot be a folder and `fix`
    (e.g. "pass a writable --out folder."): a file in the way, no permission, a read-only place."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a folder; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {path} ({e.strerror or e}); {fix}") from None
