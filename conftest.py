"""Shared pytest setup: GPU tests skip cleanly without CUDA; tests run with few threads."""

from __future__ import annotations

import os

import pytest

# the CI machine has 2 cores: keep torch from oversubscribing them in every test process
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smoke_grid(tmp_path_factory: pytest.TempPathFactory):
    """One real `bench run --grid smoke` (minutes on a CPU), shared by the runner and report tests.

    Returns (results folder, the finished process). It runs with the grid's own
    defaults (4 epochs: 2 dense + 2 sparse for the hybrid cells).
    """
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("smoke") / "runs"
    res = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--grid", "smoke", "--out", str(out)],
                         cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=2400)
    return out, res
