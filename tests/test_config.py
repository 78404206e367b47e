"""The typed config: round trips, overrides, and refusals that name the fix."""

from __future__ import annotations

import pytest
import torch

from ddnet.config import ConfigError, TrainConfig, check_runnable, check_static


def test_round_trip_and_key() -> None:
    cfg = TrainConfig().replace(**{"sparsity.kind": "topk", "data.image_size": 64, "precision": "amp-bf16"})
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.key() == cfg.key()
    assert cfg.key() != TrainConfig().key()


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        TrainConfig().replace(precison="fp32")
    with pytest.raises(ConfigError, match="unknown"):
        TrainConfig.from_dict({"model": {"width": 3}})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"precision": "fp8"}, "--precision"),
        ({"sparsity.amount": 1.5}, "--amount"),
        ({"sparsity.kind": "random", "sparsity.dense_epochs": 50, "epochs": 50}, "no sparse epoch"),
        ({"data.image_size": 100}, "divisible by 16"),
        ({"sparsity.kind": "structured", "sparsity.pattern": "2:4"}, "2:4"),
        ({"batch_size": 3, "nproc": 2}, "divisible by --nproc"),
    ],
)
def test_static_refusals(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_static(TrainConfig().replace(**changes))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
@pytest.mark.parametrize(
    ("changes", "fix"),
    [
        ({"graphs": "cuda-graph"}, "use --graphs off"),
        ({"precision": "amp-fp16"}, "use amp-bf16"),
        ({"precision": "tf32"}, "use fp32"),
        ({"device": "cuda"}, "use --device cpu"),
    ],
)
def test_cpu_refusals_name_the_fix(changes: dict, fix: str) -> None:
    with pytest.raises(ConfigError, match=fix):
        check_runnable(TrainConfig().replace(**changes))
