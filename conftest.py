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
