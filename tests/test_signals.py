"""bench.signals: a child started with `parent_death_hook` ends with the process that started it, however that one
ends; `stopped_how` and `end_like` are the words and the end of a stopped command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import signals
from tests.test_train_resume import _live

REPO = Path(__file__).resolve().parent.parent

# the middle process starts a sleeper with the hook, says its pid, then waits to be killed
MIDDLE = (
    "import subprocess, sys, time\n"
    "from bench import signals\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
    " preexec_fn=signals.parent_death_hook())\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_started_with_the_hook_dies_with_its_parent_even_by_sigkill() -> None:
    psutil = pytest.importorskip("psutil")
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child = None
    try:
        child = psutil.Process(int(middle.stdout.readline()))
        assert _live(child)
        middle.kill()  # SIGKILL: no handler of its own can stop the child
        middle.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _live(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _live(child), "the child outlived its parent"
    finally:
        if middle.poll() is None:
            middle.kill()
        if child is not None and _live(child):
            child.kill()


def test_the_hook_is_none_without_prctl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert signals.parent_death_hook() is None
    signals.die_with_parent(os.getppid())  # nothing to do there, and no exit


def test_stopped_how_and_end_like() -> None:
    assert signals.stopped_how(signals.Terminated()) == "stopped by SIGTERM"
    assert signals.stopped_how(KeyboardInterrupt()) == "interrupted"
    signals.end_like(KeyboardInterrupt())  # a Ctrl-C: returns, the caller exits 130


class _Stop(Exception):
    pass


@pytest.mark.parametrize("again", [False, True])
def test_sigterm_raises_once_or_again_and_puts_the_handler_back(again: bool) -> None:
    """A command (`sigterm_unwinds`) ends at a second SIGTERM; a grid runner raises again, to record its cell."""
    before = signal.getsignal(signal.SIGTERM)
    raised = []
    with signals.sigterm_raises(lambda signum: _Stop(signal.Signals(signum).name), again=again):
        for _ in range(2 if again else 1):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler runs at once
            except _Stop as e:
                raised.append(str(e))
        after_first = signal.getsignal(signal.SIGTERM)
    assert raised == ["SIGTERM"] * (2 if again else 1)
    assert (after_first is signal.SIG_DFL) is not again  # once: the default action, which ends the process
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_unwinds_raises_terminated_a_keyboard_interrupt() -> None:
    with pytest.raises(signals.Terminated), signals.sigterm_unwinds():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert issubclass(signals.Terminated, KeyboardInterrupt)


# a cell started with `cell_start_hook`: its SIGINT disposition, and whether it leads a process group of its own
CELL = ("import os, signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN, "
        "os.getpgid(0) == os.getpid(), flush=True)")


@pytest.mark.parametrize("runner_ignores", [True, False])
def test_a_cell_takes_sigint_back_in_its_own_group_only_from_a_runner_that_ignores_sigint(runner_ignores: bool) -> None:
    """A script's `nohup bench run ... &` ignores SIGINT: the cell gets the default back, for the runner's gentle stop,
    and a group of its own, so the terminal's Ctrl-C the runner ignores passes it by too. A runner that takes SIGINT
    (a Ctrl-C reaches runner and cell alike) passes both on unchanged."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN if runner_ignores else signal.default_int_handler)
    try:
        hook = signals.cell_start_hook()
        # the child, as the cell, inherits SIGINT from this process at fork, as a cell does from its runner
        res = subprocess.run([sys.executable, "-c", CELL], preexec_fn=hook, capture_output=True, text=True,
                             timeout=60)
    finally:
        signal.signal(signal.SIGINT, before)
    ignored, own_group = res.stdout.split()
    assert ignored == "False"  # with the runner's default, Python's KeyboardInterrupt handler in both cases
    assert own_group == str(runner_ignores)
