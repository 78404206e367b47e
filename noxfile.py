"""nox sessions: `nox -s tests`, `nox -s lint`, `nox -s oldest` (torch 2.6), `nox -s gpu` (on a CUDA machine)."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
TORCH_CPU = "torch==2.13.0"  # the CPU build; a bare `torch` would pull the multi-GB CUDA wheels
TORCH_OLDEST = "torch==2.6.0"  # pyproject's lower bound (tests/test_layout.py keeps the two equal)


@nox.session
def tests(session: nox.Session) -> None:
    """The CPU test suite (what CI runs)."""
    _suite(session, TORCH_CPU)


@nox.session
def oldest(session: nox.Session) -> None:
    """The CPU test suite against the oldest torch pyproject admits (PyPI's CUDA build: about 4 GB)."""
    _suite(session, TORCH_OLDEST)


def _suite(session: nox.Session, torch: str) -> None:
    session.install(torch)  # first: `.[dev]`'s torch range is then met and installs nothing more
    session.install("-e", ".[dev]")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """The GPU-marked tests and the compile ones, in the current environment (which must have a CUDA build of torch)."""
    session.run("pytest", "-q", "-m", "gpu or gpu_compile", *session.posargs)
