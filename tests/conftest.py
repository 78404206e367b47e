"""Fixtures shared by the tests in this folder (the repository's conftest.py has the session-wide ones)."""

from __future__ import annotations

import sys

import pytest

from bench.store import read_jsonl
from tests.fake_trainer import FAKE_TRAIN


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.delenv("FAKE_CRASH", raising=False)
    monkeypatch.delenv("FAKE_FAIL", raising=False)

    def launched() -> list[dict]:
        return read_jsonl(calls)

    return [sys.executable, str(script)], launched
