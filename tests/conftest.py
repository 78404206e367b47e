"""Fixtures shared by the tests in this folder (the repository's conftest.py has the session-wide ones)."""

from __future__ import annotations

import sys

import pytest
import torch.optim.adam as adam_mod
import torch.optim.optimizer as optimizer_mod

from bench.report.build import make_report
from bench.report.options import Options
from bench.store import read_jsonl
from tests.fake_trainer import FAKE_TRAIN
from tests.report_fakes import build_main


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.delenv("FAKE_CRASH", raising=False)
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    monkeypatch.delenv("FAKE_FULL", raising=False)
    monkeypatch.delenv("FAKE_NO_GPU", raising=False)
    monkeypatch.delenv("FAKE_LOST", raising=False)
    monkeypatch.delenv("FAKE_TERM", raising=False)
    monkeypatch.delenv("FAKE_TERM_SIGNAL", raising=False)
    monkeypatch.delenv("FAKE_STUCK_START", raising=False)
    monkeypatch.delenv("FAKE_SLOW_START", raising=False)

    def launched() -> list[dict]:
        return read_jsonl(calls)

    return [sys.executable, str(script)], launched


@pytest.fixture
def capturable_adam_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let `Adam(capturable=True)` run on a CPU (and on the meta device, which `tests/test_optim.py` has stand in
    for a GPU): its capturable code path is what a CUDA graph holds."""
    original = optimizer_mod._get_capturable_supported_devices

    def with_cpu(supports_xla: bool = True) -> list[str]:
        return [*original(supports_xla), "cpu", "meta"]

    monkeypatch.setattr(optimizer_mod, "_get_capturable_supported_devices", with_cpu)
    if hasattr(adam_mod, "_get_capturable_supported_devices"):
        monkeypatch.setattr(adam_mod, "_get_capturable_supported_devices", with_cpu)


@pytest.fixture(scope="session")
def main_report(tmp_path_factory):
    """The main fabricated grid (tests/report_fakes.py) and its report, built once for every test that
    reads it (they only read it): (runs folder, Report)."""
    root = tmp_path_factory.mktemp("runs")
    build_main(root)
    return root, make_report(root, root / "report", opts=Options())
