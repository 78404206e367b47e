"""Speed benchmarks (pytest-benchmark). Disabled by default: they then run once as plain tests.

Run them for real with `python -m pytest tests/test_benchmarks.py --benchmark-enable`.
They measure, never assert a time: these machines are shared and noisy.
"""

from __future__ import annotations

import torch

from bench.training import build_run
from ddnet.config import DataConfig, ModelConfig, TrainConfig
from ddnet.data import SliceDataset, load_split
from ddnet.loaders import DeviceLoader, HostLoader

CFG = TrainConfig(model=ModelConfig(base_width=4, growth=4, bottleneck=8),
                  data=DataConfig(image_size=64, n_train=64, n_val=4), batch_size=8, num_workers=0,
                  device="cpu")


def _epoch(loader) -> int:
    n = 0
    for lq, _hq in loader.epoch(0):
        n += lq.shape[0]
    return n


def test_bench_doll_epoch(benchmark) -> None:
    s = load_split(CFG.data, "train")
    loader = DeviceLoader(s.lq, s.hq, CFG)
    assert benchmark(_epoch, loader) == 64


def test_bench_host_loader_epoch(benchmark) -> None:
    s = load_split(CFG.data, "train")
    loader = HostLoader(SliceDataset(s), CFG, torch.device("cpu"))
    assert benchmark(_epoch, loader) == 64


def test_bench_train_step(benchmark, tmp_path) -> None:
    run = build_run(CFG, tmp_path)
    run._build_step()
    lq, hq = next(iter(run.loader.epoch(0)))
    loss = benchmark(run.step, lq, hq)
    assert torch.isfinite(loss)
