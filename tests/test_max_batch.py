"""`bench max-batch`: the search (fake predicates, on a CPU), the build it probes, the CPU refusal, and a
real probe on a GPU."""

from __future__ import annotations

import gc
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import bench.cmd_max_batch as mb
from bench.cli import main
from bench.cmd_max_batch import ProbeResult, probes_sparse_phase, search_largest, train_shape
from ddnet.config import DataConfig, ModelConfig, SparsityConfig, TrainConfig
from ddnet.errors import UserError

TINY = ModelConfig(base_width=4, growth=4, bottleneck=8)


def _below(threshold: int) -> tuple[list[int], Callable[[int], bool]]:
    """A predicate 'batch <= threshold fits' and the list of batches it was asked about."""
    asked: list[int] = []

    def fits(b: int) -> bool:
        asked.append(b)
        return b <= threshold

    return asked, fits


# ----------------------------------------------------------------- the search


def test_threshold_37_from_8_is_found_exactly_in_nine_probes():
    asked, fits = _below(37)
    res = search_largest(fits, start=8, maximum=4096, step=1)
    assert res.largest == 37 and not res.capped
    assert asked == [8, 16, 32, 64, 48, 40, 36, 38, 37]  # doubling, then bisection between 32 and 64
    assert [p.fits for p in res.probes] == [b <= 37 for b in asked]


@pytest.mark.parametrize("threshold", [1, 2, 3, 5, 7])
def test_threshold_below_the_start_is_found_by_halving_then_bisecting(threshold: int):
    asked, fits = _below(threshold)
    res = search_largest(fits, start=8)
    assert res.largest == threshold
    assert asked[0] == 8 and asked[1] == 4  # the start failed, so the search went down
    assert len(asked) == len(set(asked))


def test_not_even_batch_one_fits_gives_zero_after_probing_one():
    asked, fits = _below(0)
    res = search_largest(fits, start=8)
    assert res.largest == 0 and asked == [8, 4, 2, 1]
    assert not any(p.fits for p in res.probes)


def test_threshold_above_the_maximum_stops_at_the_maximum_and_says_so():
    asked, fits = _below(10**6)
    res = search_largest(fits, start=8, maximum=100)
    assert res.largest == 100 and res.capped
    assert asked == [8, 16, 32, 64, 100]  # the last doubling is clipped to the maximum
    assert search_largest(_below(10**6)[1], start=500, maximum=100).largest == 100  # start clipped too


def test_the_maximum_itself_failing_bisects_below_it():
    res = search_largest(_below(70)[1], start=8, maximum=100)
    assert res.largest == 70 and not res.capped


@pytest.mark.parametrize("threshold", [1, 9, 37, 100, 255, 256, 257, 1000, 4095])
def test_probes_grow_like_log2_and_never_repeat(threshold: int):
    asked, fits = _below(threshold)
    res = search_largest(fits, start=8, maximum=4096)
    assert res.largest == threshold
    assert len(asked) == len(set(asked))
    # doubling: log2(threshold / start) + 2 probes at most; bisection: log2 of the gap, which is < threshold
    assert len(asked) <= math.ceil(math.log2(max(threshold, 8) / 8)) + 2 + math.ceil(math.log2(threshold + 1)) + 3


def test_probe_count_is_monotone_in_the_range_searched():
    counts = [len(search_largest(_below(t - 1)[1], start=8, maximum=4096).probes) for t in (16, 64, 256, 1024, 4096)]
    assert counts == sorted(counts) and counts[-1] <= 24


@pytest.mark.parametrize(("threshold", "step"), [(37, 4), (37, 8), (100, 16), (5, 2)])
def test_step_bounds_the_error_and_probes_multiples_above_the_last_fit(threshold: int, step: int):
    asked, fits = _below(threshold)
    res = search_largest(fits, start=8, step=step)
    assert threshold - step < res.largest <= threshold
    assert len(asked) <= len(_below(threshold)[0]) + 12
    exact = search_largest(_below(threshold)[1], start=8, step=1)
    assert len(res.probes) <= len(exact.probes)  # a coarser step never costs more probes


def test_probe_results_are_kept_as_given():
    def fits(b: int) -> ProbeResult:
        return ProbeResult(b, b <= 20, peak_allocated_gib=b / 10 if b <= 20 else None, error=None if b <= 20 else "OOM")

    res = search_largest(fits, start=8)
    assert res.largest == 20
    assert [p.batch for p in res.probes if not p.fits][0] == 32 and res.probes[-1].error in (None, "OOM")
    assert next(p for p in res.probes if p.batch == 20).peak_allocated_gib == 2.0


def test_the_callers_list_keeps_the_probes_made_before_one_that_raised():
    probes: list[ProbeResult] = []

    def fits(b: int) -> bool:
        if b == 32:
            raise RuntimeError("not an out-of-memory error")
        return True

    with pytest.raises(RuntimeError):
        search_largest(fits, start=8, probes=probes)
    assert [(p.batch, p.fits) for p in probes] == [(8, True), (16, True)]
    kept: list[ProbeResult] = []
    assert search_largest(_below(20)[1], start=8, probes=kept).probes is kept  # one list, not a copy beside it


@pytest.mark.parametrize(("start", "maximum", "step"), [(0, 10, 1), (8, 0, 1), (8, 10, 0)])
def test_bad_search_bounds_are_refused(start: int, maximum: int, step: int):
    with pytest.raises(UserError, match="must all be at least 1"):
        search_largest(lambda b: True, start, maximum, step)


# ----------------------------------------------------------------- what a probe builds


def test_the_sparse_phase_is_probed_where_it_is_the_larger():
    assert not probes_sparse_phase(TrainConfig())
    assert probes_sparse_phase(TrainConfig(sparsity=SparsityConfig(kind="random", dense_epochs=5)))
    assert probes_sparse_phase(TrainConfig(sparsity=SparsityConfig(kind="topk")))
    assert not probes_sparse_phase(TrainConfig(sparsity=SparsityConfig(kind="structured", dense_epochs=5)))
    assert probes_sparse_phase(TrainConfig(sparsity=SparsityConfig(kind="structured", dense_epochs=0)))


def test_train_shape_of_synthetic_data_and_of_a_folder(tmp_path: Path):
    assert train_shape(TrainConfig(data=DataConfig(image_size=512, n_train=5120))) == (5120, 512, 512)
    for split in ("train", "val"):
        for kind in ("HQ", "LQ"):
            (tmp_path / split / kind).mkdir(parents=True)
            for i in range(3):
                np.save(tmp_path / split / kind / f"s{i}.npy", np.zeros((48, 64), np.float32))
    assert train_shape(TrainConfig(data=DataConfig(source=str(tmp_path)))) == (3, 48, 64)


@pytest.mark.filterwarnings("ignore:32 px images are too small")
@pytest.mark.parametrize("cfg", [
    TrainConfig(model=TINY),
    TrainConfig(model=TINY, loader="device", channels_last=True),
    TrainConfig(model=TINY, sparsity=SparsityConfig(kind="random")),
    TrainConfig(model=TINY, sparsity=SparsityConfig(kind="structured")),
], ids=["eager", "doll-channels-last", "random-masks", "structured"])
def test_a_probe_builds_the_configured_step_at_the_candidate_batch(cfg: TrainConfig, monkeypatch):
    seen: list[tuple] = []
    real = mb.build_step

    def spy(c, parts, sample):
        step, info = real(c, parts, sample)
        # (B, 1, H, W) inputs look alike in both formats (C = 1): the weights say which one the model runs in
        channels_last = any(w.dim() == 4 and min(w.shape[1:]) > 1 and not w.is_contiguous()
                            and w.is_contiguous(memory_format=torch.channels_last) for w in parts.model.parameters())
        seen.append((c.batch_size, tuple(sample[0].shape), channels_last))

        def counted(lq, hq):
            seen.append("step")
            return step(lq, hq)
        return counted, info

    monkeypatch.setattr(mb, "build_step", spy)
    dt = mb._two_steps(cfg.replace(batch_size=3), (6, 32, 48), torch.device("cpu"))
    assert dt > 0
    assert seen == [(3, (3, 1, 32, 48), cfg.channels_last), "step", "step"]


def test_oom_is_recognised_through_a_chain_and_other_errors_are_not():
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except torch.cuda.OutOfMemoryError:
            raise RuntimeError("operation failed during stream capture") from None
    except RuntimeError as chained:
        assert mb._is_oom(chained)  # `from None` hides it from the traceback, not from __context__
    assert mb._is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not mb._is_oom(RuntimeError("shape mismatch"))


# ----------------------------------------------------------------- the command


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal needs a machine without CUDA")
@pytest.mark.parametrize("args", [[], ["--preset", "fastest"], ["--device", "cpu", "--max", "64"]])
def test_on_a_cpu_the_command_refuses_in_one_line(args: list[str], capsys, tmp_path: Path):
    out = tmp_path / "mb.json"
    with pytest.raises(SystemExit) as exc:
        main(["max-batch", "--out", str(out), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: bench max-batch measures GPU memory; run it on a CUDA device (CPU memory is not a "
                   "batch limit here)."]
    assert not out.exists()


def test_a_bad_search_option_is_one_usage_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["max-batch", "--step", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--step" in err[0]


# ----------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_real_probes_fit_small_batches_and_an_impossible_one_is_oom_then_memory_comes_back():
    dev = torch.device("cuda", torch.cuda.current_device())
    cfg = TrainConfig(model=TINY, data=DataConfig(image_size=64), device="cuda")
    shape = (8, 64, 64)
    gc.collect()
    held = torch.cuda.memory_allocated(dev)  # what earlier tests in this process still hold (caches)
    small = mb.probe(cfg, 2, shape, dev)
    big = mb.probe(cfg, 4, shape, dev)
    assert small.fits and big.fits and small.error is None
    assert 0 < small.peak_allocated_gib < big.peak_allocated_gib <= big.peak_reserved_gib
    assert small.step_ms > 0
    total = torch.cuda.get_device_properties(dev).total_memory
    huge = int(2 * total / (64 * 64 * 4)) + 1  # the input tensor alone is twice the device
    oom = mb.probe(cfg, huge, shape, dev)
    assert not oom.fits and oom.peak_allocated_gib is None and "out of memory" in oom.error.lower()
    again = mb.probe(cfg, 2, shape, dev)  # nothing of the failed probe is left behind
    assert again.fits and again.peak_allocated_gib == pytest.approx(small.peak_allocated_gib, rel=0.05)
    assert torch.cuda.memory_allocated(dev) - held < 2**20


@pytest.mark.gpu
def test_the_command_finds_and_records_the_edge_under_a_cap(tmp_path: Path, capsys):
    out = tmp_path / "mb.json"
    main(["max-batch", "--image-size", "64", "--base-width", "4", "--growth", "4", "--bottleneck", "8",
          "--start", "2", "--max", "12", "--out", str(out)])
    text = capsys.readouterr().out
    assert "largest batch that fits: 12 (peak allocated" in text
    rec = json.loads(out.read_text())
    assert rec["largest_batch"] == 12 and rec["capped_at_max"]
    assert [p["batch"] for p in rec["probes"]] == [2, 4, 8, 12] and all(p["fits"] for p in rec["probes"])
    assert rec["device_name"] == torch.cuda.get_device_name() and rec["total_memory_gib"] > 0
    assert rec["config"]["data"]["image_size"] == 64
    with pytest.raises(SystemExit) as exc:  # an earlier record is never overwritten
        main(["max-batch", "--image-size", "64", "--max", "2", "--out", str(out)])
    assert exc.value.code == 2


# ----------------------------------------------------------------- options checked before the device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA says")
@pytest.mark.parametrize("args, says", [
    (["--precision", "fp8"], "--precision 'fp8' is not one of"),
    (["--image-size", "63"], "--image-size 63 must be divisible by 16"),
    (["--preset", "nope"], "--preset 'nope' is not one of"),
    (["--nproc", "2"], "drop --nproc 2"),
    (["--data", "/nonexistent/ct"], "data folder /nonexistent/ct does not exist"),
    (["--out", "{tmp}"], "exists; choose a new file"),
    (["--out", "{tmp}/file.txt/mb.json"], "file.txt is not a folder; choose a file in a folder you can write"),
])
def test_a_bad_option_is_named_on_a_cpu_not_hidden_behind_the_cuda_refusal(args, says, capsys, tmp_path: Path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["max-batch", *[a.replace("{tmp}", str(tmp_path)) for a in args]])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err


def _fake_gpu(monkeypatch, fits_up_to: int) -> None:
    """A 10 GiB 'GPU' whose probes are decided by a threshold (the search and the command's output, not CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"name": "FakeGPU",
                                                                                      "total_memory": 10 * 2**30}))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (9 * 2**30, 10 * 2**30))
    monkeypatch.setattr(mb, "resolve_device", lambda d: "cuda")
    monkeypatch.setattr(mb, "check_runnable", lambda cfg: None)
    monkeypatch.setattr(mb, "probe", lambda cfg, b, shape, dev: ProbeResult(b, True, 0.1 * b, 0.2 * b, 1.0)
                        if b <= fits_up_to else ProbeResult(b, False, error="CUDA out of memory (fake)"))


def test_an_out_that_cannot_be_written_at_the_end_keeps_the_answer_and_is_one_line(monkeypatch, capsys,
                                                                                    tmp_path: Path):
    _fake_gpu(monkeypatch, fits_up_to=20)

    for errno, code, says in [(30, 2, f"error: could not write --out {tmp_path / 'mb.json'} (Read-only"),
                              (28, 4, "error: a write failed: the disk (or your quota) is full")]:
        def refused(path, obj, errno=errno):
            raise OSError(errno, os.strerror(errno))

        monkeypatch.setattr(mb, "write_json", refused)
        with pytest.raises(SystemExit) as exc:
            main(["max-batch", "--image-size", "64", "--max", "40", "--out", str(tmp_path / "mb.json")])
        assert exc.value.code == code
        captured = capsys.readouterr()
        assert "largest batch that fits: 20 (peak allocated 2.00 GiB of 10.00 GiB on FakeGPU)" in captured.out
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(says), err


def test_the_record_holds_every_probe_and_the_answer(monkeypatch, capsys, tmp_path: Path):
    _fake_gpu(monkeypatch, fits_up_to=20)
    out = tmp_path / "new" / "mb.json"  # a folder that does not exist yet is made
    main(["max-batch", "--image-size", "64", "--max", "40", "--out", str(out)])
    rec = json.loads(out.read_text())
    assert rec["largest_batch"] == 20 and not rec["capped_at_max"]
    assert [p["batch"] for p in rec["probes"]] == [8, 16, 32, 24, 20, 22, 21]
    assert "largest batch that fits: 20" in capsys.readouterr().out


def test_a_probe_that_fails_otherwise_than_oom_is_on_record_with_the_probes_before_it(monkeypatch, capsys,
                                                                                       tmp_path: Path):
    """A probe failing for another reason than memory (a compile error, a kernel bug) ended the search with a line
    but wrote no --out: a sweep over configurations lost the probes that ran, and the file said nothing."""
    _fake_gpu(monkeypatch, fits_up_to=20)
    fits = mb.probe

    def broken_at_16(cfg, b, shape, dev):
        if b == 16:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
        return fits(cfg, b, shape, dev)

    monkeypatch.setattr(mb, "probe", broken_at_16)
    out = tmp_path / "mb.json"
    with pytest.raises(SystemExit) as exc:
        main(["max-batch", "--image-size", "64", "--max", "40", "--out", str(out)])
    assert exc.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: probe 2 failed: RuntimeError: CUDA error: an illegal memory access was encountered"]
    rec = json.loads(out.read_text())
    assert rec["status"] == "failed" and rec["largest_batch"] is None
    assert rec["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert [(p["batch"], p["fits"]) for p in rec["probes"]] == [(8, True)]
    assert rec["device_name"] == "FakeGPU" and rec["image_height"] == 64
    monkeypatch.setattr(mb, "probe", fits)
    main(["max-batch", "--image-size", "64", "--max", "40", "--out", str(tmp_path / "ok.json")])  # and when it ends
    assert json.loads((tmp_path / "ok.json").read_text())["status"] == "ok"
