"""The typed config: round trips, overrides, and refusals that name the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ddnet.config import ConfigError, Precision, TrainConfig, check_runnable, choices
from ddnet.config_fields import config_fields


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
    # any TrainConfig that exists is valid: the refusal comes when it is made
    with pytest.raises(ConfigError, match=message):
        TrainConfig().replace(**changes)


@pytest.mark.parametrize(("kwargs", "line"), [
    ({"precision": "fp8"}, "--precision 'fp8' is not one of fp32, tf32, amp-fp16, amp-bf16."),
    ({"epochs": "ten"}, "--epochs must be an integer, got 'ten'"),
    ({"epochs": 2.7}, "--epochs must be an integer, got 2.7"),
    ({"lr": float("nan")}, "--lr nan must be a positive finite number"),
    ({"lr": -0.1}, "--lr -0.1 must be a positive finite number"),
    ({"num_workers": -1}, "--num-workers -1 must be at least 0."),
    ({"profile_steps": -5}, "--profile-steps -5 must be at least 0."),
    ({"device": "tpu"}, "--device 'tpu' is not one of auto, cpu, cuda."),
    ({"model": None}, "'model' must be a ModelConfig"),
])
def test_a_config_cannot_exist_invalid_and_says_so_in_one_line(kwargs: dict, line: str) -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig(**kwargs)
    assert line in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [[1, 2], "fp32", {"model": None}, {"model": {"base_width": 0}}])
def test_config_files_of_the_wrong_shape_are_refused(bad) -> None:
    with pytest.raises(ConfigError):
        TrainConfig.from_dict(bad)


def test_lenient_reading_drops_fields_of_older_versions() -> None:
    old = {**TrainConfig().to_dict(), "fail_at_epoch": None}
    with pytest.raises(ConfigError, match="fail_at_epoch"):
        TrainConfig.from_dict(old)
    assert TrainConfig.from_dict(old, lenient=True) == TrainConfig()


def test_every_toggle_is_declared_once_and_reaches_the_command_line() -> None:
    fields = {f.path: f for f in config_fields()}
    # choices come from the Literal types themselves
    assert fields["precision"].choices == choices(Precision) == ("fp32", "tf32", "amp-fp16", "amp-bf16")
    assert fields["graphs"].choices == ("off", "cuda-graph", "compile", "compile-cuda-graph")
    assert fields["sparsity.dense_epochs"].choices == ("auto",)
    # every exposed field has a flag of its own, its docstring and its default
    assert len({f.flag for f in fields.values()}) == len(fields)
    assert all(f.doc for f in fields.values())
    assert fields["data.image_size"].flag == "--image-size" and fields["sparsity.kind"].flag == "--sparsity"
    assert "data.hu_window" not in fields  # declared not for the command line


def test_bench_train_help_shows_every_option_with_its_default() -> None:
    res = subprocess.run([sys.executable, "-m", "bench.cli", "train", "--help"], capture_output=True, text=True,
                         env={**__import__("os").environ, "COLUMNS": "250"}, timeout=120)
    assert res.returncode == 0, res.stderr
    for f in config_fields():
        assert f.flag in res.stdout, f.flag
    assert res.stdout.count("[default:") >= len(config_fields())
    assert "[default: 16 channels]" in res.stdout and "[default: 0.0001]" in res.stdout


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
