"""SIGTERM as a clean stop for the commands that write (`bench train`, `data`, `eval`), and no orphans.

SIGTERM's default action ends a process where it stands: no cleanup, no word. Slurm sends it at a
job's time limit, `kill` and a shutdown send it. Inside `sigterm_unwinds()` it raises `Terminated`
(a KeyboardInterrupt) instead, so the command's Ctrl-C path runs: temporary files go, worker
processes stop, one line says what is kept. The command then calls `die_by_sigterm()`, and whoever
started it (a grid runner, Slurm, a shell) sees the same end as without the handler: killed by
SIGTERM (-15 for a parent process, status 143 in a shell). `die_with_parent` ends a spawned replica
with the process that started it, however that one ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the command (a Slurm time limit or scancel, `kill`, a shutdown)."""


def sigterm_unwinds() -> contextlib.AbstractContextManager[None]:
    """Raise `Terminated` on SIGTERM inside the block (a second SIGTERM ends the process at once)."""
    return sigterm_raises(lambda signum: Terminated())


@contextlib.contextmanager
def sigterm_raises(make: Callable[[int], BaseException], again: bool = False) -> Iterator[None]:
    """Raise `make(signum)` on SIGTERM inside the block. `again=False`: a second SIGTERM ends the process at
    once (a command unwinding its first must still be stoppable); `again=True`: it raises again (a grid runner
    stopping its cell, which must not die before the cell is recorded as stopped).

    Only the main thread may set handlers; elsewhere this changes nothing. The handler before it
    is put back on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if not again:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise make(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) in (handler, signal.SIG_DFL):
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def stopped_how(e: KeyboardInterrupt) -> str:
    """The first words of a command's line after a stop: 'stopped by SIGTERM' or 'interrupted' (Ctrl-C)."""
    return "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"


def end_like(e: KeyboardInterrupt) -> None:
    """After the command said what it kept: end by SIGTERM if that stopped it, as its sender expects (-15, 143
    in a shell); after a Ctrl-C return, and the caller exits 130."""
    if isinstance(e, Terminated):
        die_by_sigterm()


def die_by_sigterm() -> None:
    """End this process by SIGTERM, as if unhandled (after the command said what it kept)."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # delivered at once; never carry on past it
    os._exit(128 + signal.SIGTERM)


def _libc_prctl() -> Callable[..., int] | None:
    """libc's prctl on Linux, else None (another system, or no libc.so.6)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _end_with(prctl: Callable[..., int], parent: int) -> None:
    prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call above took effect
        os._exit(1)


def die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGTERM when `parent`, which started it, dies (SIGKILL included), so no
    replica of a killed `bench train --nproc N` trains on as an orphan, holding its GPU and the folder's lock.
    Elsewhere, or without libc, nothing changes."""
    prctl = _libc_prctl()
    if prctl is not None:
        _end_with(prctl, parent)


def parent_death_hook() -> Callable[[], None] | None:
    """`die_with_parent` for a child not yet started: a hook for `subprocess.Popen(preexec_fn=...)` that gives
    the child SIGTERM when this process dies (a grid runner's cell, a Slurm job's trainer). libc is looked
    up here, in the parent; the hook, run in the child between fork and exec, only makes the system call.
    None where there is no prctl."""
    prctl = _libc_prctl()
    if prctl is None:
        return None
    parent = os.getpid()
    return lambda: _end_with(prctl, parent)


def cell_start_hook() -> Callable[[], None] | None:
    """`preexec_fn` for a cell a grid runner starts: `parent_death_hook`'s, and SIGINT's default action back when
    the runner ignores SIGINT. A script's `nohup bench run ... &` (a background job without job control) starts
    the runner with SIGINT ignored; its cells inherited that, Python then gave them no KeyboardInterrupt, and the
    runner's gentle stop of a cell (a SIGINT) was sat out for its whole grace before the SIGTERM. Such a cell also
    gets a process group of its own: the runner still shares the script's, and a Ctrl-C in the terminal while the
    script runs must pass the cell by as it passes the runner (the runner signals the cell by its pid). A runner
    that takes SIGINT passes its cells SIGINT and its group as they are: a Ctrl-C in the terminal reaches both."""
    end_with_runner = parent_death_hook()
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        return end_with_runner

    def hook() -> None:  # pragma: no cover - runs in the child, between fork and exec
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # exec keeps an ignored signal ignored, a default one default
        os.setpgid(0, 0)  # out of the terminal's foreground group, whose Ctrl-C the runner ignores
        if end_with_runner is not None:
            end_with_runner()

    return hook


def stop_processes(procs: Sequence[Any], grace_s: float) -> None:
    """End `multiprocessing` processes (a `bench train --nproc N`'s replicas): `grace_s` to stop by themselves
    (a Ctrl-C in the terminal reaches them too), then SIGTERM, then SIGKILL; never leave one running alone."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for stop in ("terminate", "kill"):
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            getattr(p, stop)()
        for p in alive:
            p.join(5.0)
