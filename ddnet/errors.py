"""User-facing errors: the CLI prints their message as one line and exits non-zero."""

from __future__ import annotations

import errno
from pathlib import Path

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
"""A full disk or a spent quota: a fault of the place, not of the run; nothing is recorded as failed."""


class UserError(ValueError):
    """Bad input or an impossible request. The message names the problem and the fix, in one line."""


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc` is a write that failed because the disk (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


def make_folder(path: Path, fix: str) -> None:
    """`mkdir -p path`, or one UserError that names the path, why it cannot be a folder and `fix`
    (e.g. "pass a writable --out folder."): a file in the way, no permission, a read-only place.
    A full disk is raised as the OSError it is (the commands answer it as a full disk, not as bad input)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a folder; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if out_of_space(e):
            raise
        raise UserError(f"cannot create {path} ({e.strerror or e}); {fix}") from None
