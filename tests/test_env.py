"""Tests of bench.collectors.env: fields, flags read not set, git state, fingerprint."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.collectors import env, environment

REPO = Path(__file__).resolve().parents[1]


def test_environment_fields_and_fingerprint() -> None:
    env = environment(extra_flags={"precision": "fp32", "fingerprint": "ignored"})
    assert env["torch_version"] == torch.__version__
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert env["git_commit"] == head
    assert isinstance(env["git_dirty"], bool)
    assert env["flag_float32_matmul_precision"] == torch.get_float32_matmul_precision()
    if hasattr(torch.backends, "fp32_precision"):  # new API only: legacy getters may raise once it is set
        assert env["flag_cudnn_conv_fp32_precision"] == torch.backends.cudnn.conv.fp32_precision
        assert env["flag_cuda_matmul_fp32_precision"] == torch.backends.cuda.matmul.fp32_precision
        assert "flag_cudnn_allow_tf32" not in env
    else:
        assert env["flag_cudnn_allow_tf32"] == torch.backends.cudnn.allow_tf32
        assert isinstance(env["flag_cuda_matmul_allow_tf32"], bool)
    assert env["flag_cudnn_benchmark"] == torch.backends.cudnn.benchmark
    assert env["flag_cudnn_deterministic"] == torch.backends.cudnn.deterministic
    assert env["flag_deterministic_algorithms"] == torch.are_deterministic_algorithms_enabled()
    assert env["precision"] == "fp32"
    assert env["cpu_count_logical"] >= 1 and env["cpu_model"]
    assert env["numpy_version"] == np.__version__
    if not torch.cuda.is_available():
        assert env["gpu_models"] == [] and env["gpu_count"] == 0
    json.dumps(env)  # storable as env.json
    again = environment()
    assert len(env["fingerprint"]) == 16 and env["fingerprint"] == again["fingerprint"]


def test_environment_reads_flags_without_setting_them() -> None:
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
    environment()
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == before
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert environment()["flag_float32_matmul_precision"] == "high"
    finally:
        torch.set_float32_matmul_precision(old)


def test_git_state_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DDNET_BENCH_GIT_COMMIT", raising=False)
    s = env.git_state(tmp_path)
    assert s == {"git_commit": None, "git_dirty": None, "git_dirty_files": None, "git_commit_source": None}
    # a copy of the tree without .git (a GPU box, a cluster's scratch) can be told its commit
    monkeypatch.setenv("DDNET_BENCH_GIT_COMMIT", "abc123")
    s = env.git_state(tmp_path)
    assert s["git_commit"] == "abc123" and s["git_commit_source"] == "DDNET_BENCH_GIT_COMMIT"
    assert s["git_dirty"] is None


def test_fingerprint_changes_with_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    fp = environment()["fingerprint"]
    monkeypatch.setattr(env, "_cpu_model", lambda: "Some Other CPU")
    assert environment()["fingerprint"] != fp

