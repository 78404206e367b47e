"""Distance to the limit: achieved FLOP/s and bytes/s of a training cell against the device's peaks.

A cell's row gets the model FLOP/s it achieved (counted FLOPs per image x
images/s) as a % of the device's dense peak for the precision it ran in, and
an estimate of the bytes a training step moves per image as a % of the
device's memory bandwidth. Units are decimal: TFLOP/s = 1e12 FLOP/s,
TB/s = 1e12 B/s, GB = 1e9 B (vendor datasheets use decimal units too).

Peaks come from `PEAKS`, a table of NVIDIA datasheet figures keyed by the
normalised name torch reports (`torch.cuda.get_device_name()`); an unknown
device gets None and its columns stay empty rather than guessed. On a CPU
`measure_cpu_peak` measures a peak at start (matmul and copy microbenchmarks)
and labels it `measured=True`: a measured peak is what this process reached,
not what the silicon could.

Datasheets quote tensor-core figures "with sparsity" (2:4 structured, marked
with an asterisk, "one-half lower without sparsity"). Dense training never
uses the sparse rate, so every figure here is dense: where a datasheet gives
only the sparse number, the dense one is that number / 2 (said in `source`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ddnet.config import Precision, choices

PRECISIONS: tuple[str, ...] = choices(Precision)
"""Precision keys of `DevicePeak.flops_tflops`, the same as `TrainConfig.precision`."""

ACTIVATION_PASSES = 3
"""Times a training step moves the forward's activation traffic (leaf inputs + outputs).

The forward reads each leaf's inputs and writes its outputs (1x). The
backward reads the saved inputs (or outputs) and the incoming gradient (the
size of the output) and writes the gradient of the input, the weight
gradient reading the same two again: about twice the forward's traffic, the
same 2:1 ratio as its FLOPs. 1 + 2 = 3.
"""

PARAM_PASSES_ADAM = 10
"""Parameter-sized tensors a training step with Adam reads or writes, per step (not per image).

Forward reads W (1); backward reads W and writes dW (2); Adam reads dW, W,
m, v and writes W, m, v (7). Divided by the batch size for a per-image figure.
"""


@dataclass(frozen=True)
class DevicePeak:
    """A device's peaks: dense FLOP/s per precision and memory bandwidth, with where they come from."""

    name: str
    """The product, as the source names it ('NVIDIA H100 SXM5 80GB'), or 'cpu (measured)'."""
    flops_tflops: dict[str, float]
    """Dense peak TFLOP/s per precision key of `PRECISIONS`: 'fp32' the IEEE fp32 non-tensor-core peak,
    'tf32', 'amp-fp16', 'amp-bf16' the tensor-core peaks. A precision the device has no figure for is absent."""
    bandwidth_tbs: float
    """Peak memory bandwidth (TB/s, decimal)."""
    source: str
    """Where the figures come from: the vendor document, or how they were measured."""
    measured: bool
    """True when measured on this machine by a microbenchmark, False for a datasheet figure."""


def normalise_device_name(device_name: str) -> str:
    """The key `PEAKS` uses: lower case, vendor prefix dropped, punctuation runs as one space.

    'NVIDIA A100-SXM4-80GB' -> 'a100 sxm4 80gb', 'NVIDIA H100 80GB HBM3' -> 'h100 80gb hbm3'.
    """
    name = re.sub(r"[^a-z0-9]+", " ", device_name.lower()).strip()
    return re.sub(r"^nvidia ", "", name)


_HOPPER_WHITEPAPER = (
    "NVIDIA H100 Tensor Core GPU Architecture whitepaper (H100 SXM5: FP32 66.9, dense TF32 494.7, "
    "BF16/FP16 989.4 TFLOP/s); NVIDIA H100 datasheet gives 67 and, with sparsity, 989*/1,979* "
    "('one-half lower without sparsity')"
)
_A100_DATASHEET = (
    "NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): "
    "FP32 19.5, TF32 156 (312* sparse), BF16/FP16 312 (624* sparse) TFLOP/s"
)

_H100_SXM_FLOPS = {"fp32": 66.9, "tf32": 494.7, "amp-fp16": 989.4, "amp-bf16": 989.4}
_A100_FLOPS = {"fp32": 19.5, "tf32": 156.0, "amp-fp16": 312.0, "amp-bf16": 312.0}

_H100_SXM = DevicePeak(
    "NVIDIA H100 SXM5 80GB", dict(_H100_SXM_FLOPS), 3.35, f"{_HOPPER_WHITEPAPER}; bandwidth 3.35 TB/s (datasheet)", False
)
_H200_SXM = DevicePeak(
    "NVIDIA H200 SXM 141GB",
    dict(_H100_SXM_FLOPS),
    4.8,
    "NVIDIA H200 Tensor Core GPU datasheet: FP32 67, TF32 989*, BF16/FP16 1,979* TFLOP/s (* with sparsity, "
    "dense = /2: the same GH100 compute as H100 SXM, so the whitepaper's 66.9/494.7/989.4), 4.8 TB/s HBM3e",
    False,
)
_H100_PCIE = DevicePeak(
    "NVIDIA H100 PCIe 80GB",
    {"fp32": 51.0, "tf32": 378.0, "amp-fp16": 756.5, "amp-bf16": 756.5},
    2.0,
    "NVIDIA H100 datasheet, H100 PCIe column: FP32 51, TF32 756*, BF16/FP16 1,513* TFLOP/s "
    "(* with sparsity, dense = /2), 2,000 GB/s HBM2e; NVIDIA H100 PCIe product brief PB-11133-001",
    False,
)
_A100_SXM_40 = DevicePeak("NVIDIA A100 SXM4 40GB", dict(_A100_FLOPS), 1.555, f"{_A100_DATASHEET}; 1,555 GB/s HBM2", False)
_A100_SXM_80 = DevicePeak("NVIDIA A100 SXM4 80GB", dict(_A100_FLOPS), 2.039, f"{_A100_DATASHEET}; 2,039 GB/s HBM2e", False)
_A100_PCIE_80 = DevicePeak("NVIDIA A100 PCIe 80GB", dict(_A100_FLOPS), 1.935, f"{_A100_DATASHEET}; 1,935 GB/s HBM2e", False)
_A100_PCIE_40 = DevicePeak("NVIDIA A100 PCIe 40GB", dict(_A100_FLOPS), 1.555, f"{_A100_DATASHEET}; 1,555 GB/s HBM2", False)
_L40S = DevicePeak(
    "NVIDIA L40S 48GB",
    {"fp32": 91.6, "tf32": 183.0, "amp-fp16": 362.05, "amp-bf16": 362.05},
    0.864,
    "NVIDIA L40S datasheet: FP32 91.6, TF32 183 (366*), BF16/FP16 362.05 (733*) TFLOP/s "
    "(* with sparsity), 864 GB/s GDDR6",
    False,
)

PEAKS: dict[str, DevicePeak] = {
    normalise_device_name(torch_name): peak
    for torch_name, peak in (
        # the names torch.cuda.get_device_name() returns; matched exactly after normalisation, so a
        # sibling part ('NVIDIA H200 NVL', 'NVIDIA H100 NVL', a MIG slice) is unknown rather than aliased
        ("NVIDIA H100 80GB HBM3", _H100_SXM),
        ("NVIDIA H200", _H200_SXM),
        ("NVIDIA H100 PCIe", _H100_PCIE),
        ("NVIDIA A100-SXM4-40GB", _A100_SXM_40),
        ("NVIDIA A100-SXM4-80GB", _A100_SXM_80),
        ("NVIDIA A100 80GB PCIe", _A100_PCIE_80),
        ("NVIDIA A100-PCIE-40GB", _A100_PCIE_40),
        ("NVIDIA L40S", _L40S),
    )
}
"""Known GPUs by normalised torch device name (`normalise_device_name`); dense datasheet peaks."""


def lookup_peak(device_name: str) -> DevicePeak | None:
    """The datasheet peaks of the device torch names `device_name`, or None when it is not in `PEAKS`."""
    return PEAKS.get(normalise_device_name(device_name))


# --- measured peak (CPU) ---------------------------------------------------------------------

MATMUL_SIDE = 1024
"""Side of the square matrices of the CPU matmul microbenchmark (2 * side**3 FLOPs per product)."""
COPY_BYTES = 128 * 2**20
"""Size of the tensor the CPU copy microbenchmark copies: past the last-level cache of most CPUs."""


def _best_seconds(fn: Callable[[], Any], budget_s: float, min_repeats: int = 2) -> float:
    """Fastest of repeated timed calls of `fn` after one untimed warm-up, for about `budget_s` seconds."""
    fn()
    best, start, repeats = math.inf, time.perf_counter(), 0
    while repeats < min_repeats or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        repeats += 1
    return best


def measure_cpu_peak(seconds: float = 1.0) -> DevicePeak:
    """Peaks this process reaches on the CPU, measured now; call it at start, before training.

    FLOP/s: the best of repeated `torch.mm` of two fixed `MATMUL_SIDE`-square
    matrices, in fp32 (reported for 'fp32' and 'tf32': TF32 is a CUDA mode, a
    CPU matmul stays fp32) and in bf16 ('amp-bf16': autocast on a CPU runs its
    matmuls and convs in bf16). 'amp-fp16' is absent: the trainer refuses it
    without CUDA. Bandwidth: the best of repeated `copy_` of a `COPY_BYTES`
    fp32 tensor, counting bytes read + written. Both use the process's torch
    thread count, the one training uses. About `seconds` in all (a CPU without
    fast bf16 can take longer: each benchmark runs at least twice).
    """
    gen = torch.Generator().manual_seed(0)
    n = MATMUL_SIDE
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    a16, b16 = a.bfloat16(), b.bfloat16()
    fp32_s = _best_seconds(lambda: torch.mm(a, b), 0.4 * seconds)
    bf16_s = _best_seconds(lambda: torch.mm(a16, b16), 0.2 * seconds)
    src = torch.ones(COPY_BYTES // 4)  # filled, so its pages are committed before timing
    dst = torch.empty_like(src)
    copy_s = _best_seconds(lambda: dst.copy_(src), 0.4 * seconds)
    fp32_tflops = 2 * n**3 / fp32_s / 1e12
    return DevicePeak(
        name="cpu (measured)",
        flops_tflops={"fp32": fp32_tflops, "tf32": fp32_tflops, "amp-bf16": 2 * n**3 / bf16_s / 1e12},
        bandwidth_tbs=2 * COPY_BYTES / copy_s / 1e12,
        source=(
            f"measured at start: best torch.mm {n}x{n} fp32 and bf16, best copy_ of {COPY_BYTES // 2**20} MiB "
            f"(read + write), {torch.get_num_threads()} threads"
        ),
        measured=True,
    )


# --- the row -----------------------------------------------------------------------------------


def roofline_row(
    flops_per_image: float,
    bytes_per_image: float | None,
    images_per_s: float,
    precision: str,
    peak: DevicePeak | None,
) -> dict[str, float | str | bool | None]:
    """Achieved FLOP/s and bandwidth of a cell and their % of the device's peaks, as flat keys with units.

    `flops_per_image` is used as given: it is whatever one image costs in the
    step being timed. For training, callers pass forward + backward (by
    convention 3x the counted forward FLOPs); nothing here multiplies it.
    `bytes_per_image` is an estimate such as `estimate_bytes_per_image`'s, or
    None. `peak` is `lookup_peak(...)`, `measure_cpu_peak()` or None; any
    figure that needs an unknown is None, never guessed.

    `bandwidth_floor_images_per_s` is the throughput the memory bandwidth
    alone would allow (bandwidth / bytes per image): the floor on step time,
    an upper bound on images/s.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if not (math.isfinite(images_per_s) and images_per_s >= 0):
        raise ValueError(f"images_per_s must be finite and >= 0, got {images_per_s}")
    if not (math.isfinite(flops_per_image) and flops_per_image >= 0):
        raise ValueError(f"flops_per_image must be finite and >= 0, got {flops_per_image}")
    if bytes_per_image is not None and not (math.isfinite(bytes_per_image) and bytes_per_image > 0):
        raise ValueError(f"bytes_per_image must be finite and > 0 (or None), got {bytes_per_image}")

    achieved_tflops = flops_per_image * images_per_s / 1e12
    peak_tflops = peak.flops_tflops.get(precision) if peak else None
    bandwidth = peak.bandwidth_tbs if peak else None
    achieved_tbs = bytes_per_image * images_per_s / 1e12 if bytes_per_image is not None else None
    return {
        "achieved_tflops": achieved_tflops,
        "peak_tflops": peak_tflops,
        "pct_of_peak_flops": 100 * achieved_tflops / peak_tflops if peak_tflops else None,
        "bytes_per_image_gb": bytes_per_image / 1e9 if bytes_per_image is not None else None,
        "achieved_bandwidth_tbs": achieved_tbs,
        "pct_of_peak_bandwidth": 100 * achieved_tbs / bandwidth if achieved_tbs is not None and bandwidth else None,
        "bandwidth_floor_images_per_s": (
            bandwidth * 1e12 / bytes_per_image if bytes_per_image is not None and bandwidth else None
        ),
        "peak_source": peak.source if peak else None,
        "peak_measured": peak.measured if peak else None,
    }


# --- bytes per image, counted ------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes one forward of one image reads and writes at its leaves, at the full image size."""

    input_bytes: int
    """Sum over leaf calls of the bytes of their tensor inputs."""
    output_bytes: int
    """Sum over leaf calls of the bytes of their tensor outputs."""
    output_bytes_by_op: dict[str, int]
    """`output_bytes` split by leaf: module class ('Conv2d') or function name ('leaky_relu', 'cat')."""


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in a (nested) tuple, list or dict of arguments or results."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class _LeafCounter(TorchFunctionMode):
    """Sums the bytes in and out of leaf modules and of torch functions called outside them.

    A leaf is a module without children, or a torch function (F.leaky_relu,
    torch.cat, x + y) called by a non-leaf module's forward: DDNet's
    activations, pooling, upsampling and concatenations are functional, and
    module hooks alone would miss about 40 % of its leaf output bytes. Calls
    inside a leaf module (its F.conv2d) are its own and not counted twice;
    views (reshape, slicing) move no bytes and are not counted.
    """

    def __init__(self, dtype_bytes: int) -> None:
        super().__init__()
        self.dtype_bytes = dtype_bytes
        self.depth = 0  # leaf modules being run now
        self.input_bytes = 0
        self.by_op: dict[str, int] = {}

    def nbytes(self, obj: Any, skip_views: bool = False) -> int:
        # activations are sized at the precision asked for, whatever the probe ran in
        return sum(
            t.numel() * (self.dtype_bytes if t.is_floating_point() else t.element_size())
            for t in _tensors(obj)
            if not (skip_views and t._base is not None)
        )

    def add(self, op: str, inputs: Any, outputs: Any) -> None:
        self.input_bytes += self.nbytes(inputs)
        self.by_op[op] = self.by_op.get(op, 0) + self.nbytes(outputs, skip_views=True)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # the mode is off while this runs, so the torch calls below are not counted
        out = func(*args, **(kwargs or {}))
        if self.depth == 0 and any(t._base is None for t in _tensors(out)):
            self.add(getattr(func, "__name__", str(func)), (args, kwargs), out)
        return out

    def enter_leaf(self, module: nn.Module, inputs: Any) -> None:
        self.depth += 1

    def exit_leaf(self, module: nn.Module, inputs: Any, output: Any) -> None:
        # counted before leaving the leaf: the tensor queries of `add` run under this mode and must not count
        if self.depth == 1:  # a leaf run by another leaf is part of that one
            self.add(type(module).__name__, inputs, output)
        self.depth -= 1


def count_activation_bytes(
    model: nn.Module,
    image_size: int,
    *,
    dtype_bytes: int = 4,
    probe_size: int = 64,
    in_channels: int = 1,
) -> ActivationBytes:
    """Counts the leaf input and output bytes of one forward of one `image_size`-square image.

    Runs one forward of a (1, in_channels, probe_size, probe_size) input (at
    most `image_size`; DDNet needs a multiple of 16) under `torch.no_grad()`
    in eval mode, then scales by area, (image_size / probe_size)**2: exact for
    a fully convolutional network whose every activation is a fixed fraction
    of the input's area, an overestimate for globally pooled features.
    Floating tensors are counted at `dtype_bytes` each element (2 for AMP
    activations). The model's mode, parameters and buffers are left as they
    were (eval mode keeps BatchNorm's running statistics untouched).
    """
    probe = min(probe_size, image_size)
    counter = _LeafCounter(dtype_bytes)
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    param = next(model.parameters(), None)
    x = torch.randn(
        1,
        in_channels,
        probe,
        probe,
        device=param.device if param is not None else "cpu",
        dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32,
    )  # (1, C, S, S)
    was_training = model.training
    handles = [m.register_forward_pre_hook(counter.enter_leaf) for m in leaves]
    handles += [m.register_forward_hook(counter.exit_leaf) for m in leaves]
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    scale = (image_size / probe) ** 2
    by_op = {op: round(n * scale) for op, n in counter.by_op.items()}
    return ActivationBytes(round(counter.input_bytes * scale), sum(by_op.values()), by_op)


def estimate_bytes_per_image(
    model: nn.Module,
    image_size: int,
    dtype_bytes: int = 4,
    *,
    batch_size: int = 1,
    probe_size: int = 64,
    in_channels: int = 1,
) -> int:
    """Estimated bytes one training step moves per image, from counted activation and parameter sizes.

        bytes = ACTIVATION_PASSES * (leaf input + output bytes of one forward)
              + PARAM_PASSES_ADAM * trainable parameter bytes / batch_size

    The activation part is counted (`count_activation_bytes`, `dtype_bytes`
    per element: 4 for fp32/tf32, 2 for AMP) and scaled by the step's 3
    passes over it (`ACTIVATION_PASSES`); the parameter part is the
    parameters' own size (fp32 master weights and Adam states under AMP too)
    times the 10 tensor passes of a step with Adam (`PARAM_PASSES_ADAM`),
    shared by the images of a batch (`batch_size` 1: the largest share).

    It is a model of traffic, not a measurement of DRAM bytes: caches, fused
    kernels, cuDNN workspaces and AMP's weight casts move it either way. For
    DDNet at 512 px activations dominate (~5 GB vs ~23 MB of parameter
    traffic), so the batch size hardly matters.
    """
    counted = count_activation_bytes(
        model, image_size, dtype_bytes=dtype_bytes, probe_size=probe_size, in_channels=in_channels
    )
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return round(
        ACTIVATION_PASSES * (counted.input_bytes + counted.output_bytes) + PARAM_PASSES_ADAM * param_bytes / batch_size
    )
