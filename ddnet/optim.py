"""The architecture-aware optimizations, one function each, applied once at build time.

- `setup_precision`: TF32/fp32 flags, the autocast context and the GradScaler.
- `build_step`: the train step, eager, torch.compile'd, or captured as one CUDA graph.

The step returned by `build_step` never tests a toggle: every decision is made
here, once, and the hot loop just calls `step(lq, hq)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ddnet.config import TrainConfig
from ddnet.precision import set_fp32_precision

# ----------------------------------------------------------------- precision


@dataclass
class PrecisionSetup:
    """What a precision toggle decides: autocast dtype (or None), a GradScaler, and the flags set."""

    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    flags: dict[str, Any] = field(default_factory=dict)

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The forward pass's context: autocast for the AMP modes, a no-op otherwise."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # cache_enabled=False: the CUDA-graph docs require it for capture (the cast cache would
        # hold tensors from outside the graph's pool); DDNet uses each weight once per forward,
        # so eager runs lose nothing by it either
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype, cache_enabled=False)


def setup_precision(cfg: TrainConfig, device: torch.device) -> PrecisionSetup:
    """Apply the precision toggle process-wide and return what the step needs.

    fp32: TF32 off for matmuls and convs. tf32: TF32 on. amp-fp16: autocast to
    fp16 with a GradScaler. amp-bf16: autocast to bf16, no scaler (bf16 has
    fp32's exponent range). The loss and the quality metrics run in true fp32
    in every mode (`ddnet.precision.true_fp32`), tf32 included, so TF32 never
    confounds the quality comparison.
    """
    flags = set_fp32_precision("tf32" if cfg.precision == "tf32" else "ieee")
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark  # autotuning: a fast-path toggle, off in the baseline
    flags.update(set_deterministic(cfg.deterministic))
    dtype = {"amp-fp16": torch.float16, "amp-bf16": torch.bfloat16}.get(cfg.precision)
    # note: a disabled GradScaler is a no-op: scale() returns the loss, step() just steps
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "amp-fp16")
    flags.update(
        precision=cfg.precision,
        autocast_dtype=str(dtype) if dtype else None,
        grad_scaler=scaler.is_enabled(),
        cudnn_benchmark=torch.backends.cudnn.benchmark,
    )
    return PrecisionSetup(dtype, scaler, flags)


CUBLAS_DETERMINISTIC = ":4096:8"
"""The cuBLAS workspace setting CUDA's docs name for reproducible matmuls (torch refuses others in deterministic mode)."""


def set_deterministic(on: bool) -> dict[str, Any]:
    """Deterministic kernels only, process-wide, or torch's defaults; returns the flags in force.

    `torch.use_deterministic_algorithms` makes every op either deterministic or raise; cuDNN keeps to
    its deterministic algorithms (autotuning, when on, chooses among those); cuBLAS needs a fixed
    workspace, set here (before the run's first matmul) unless CUBLAS_WORKSPACE_CONFIG is already set.
    DDNet's own nondeterministic op, the bilinear upsampling's backward, is swapped by the trainer
    (`DDNet.set_deterministic`). A CPU run is deterministic either way."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    return {"deterministic": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


# ----------------------------------------------------------------- train step

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepParts:
    """Everything a train step touches; `post_step` re-applies sparsity masks (or does nothing)."""

    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    precision: PrecisionSetup
    device: torch.device
    post_step: Callable[[], None]


def eager_step(parts: StepParts, forward: nn.Module | None = None) -> StepFn:
    """One optimizer step, eagerly (or through a compiled `forward`). Returns the detached loss, no sync."""
    fwd = parts.model if forward is None else forward
    opt, scaler, loss_fn, post = parts.optimizer, parts.precision.scaler, parts.loss_fn, parts.post_step
    autocast = parts.precision.autocast
    dev = parts.device.type

    def step(lq: torch.Tensor, hq: torch.Tensor) -> torch.Tensor:
        with autocast(dev):
            out = fwd(lq)  # (B, 1, H, W)
        loss = loss_fn(out, hq)  # fp32, outside autocast
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        post()
        return loss.detach()

    return step


def graph_body(parts: StepParts, lq: torch.Tensor, hq: torch.Tensor, with_tail: bool) -> torch.Tensor:
    """What `GraphedStep` captures: forward, loss, scaled backward and, `with_tail`, the optimizer
    step and mask re-application. Grads are overwritten, not accumulated (they are None at capture).

    It must never read a device value on the host (`aten::item`): capture refuses any sync.
    `tests/test_optim.py` profiles it on a CPU with capturable Adam to keep it so.
    """
    with parts.precision.autocast(parts.device.type):
        out = parts.model(lq)  # (B, 1, H, W)
    loss = parts.loss_fn(out, hq)  # fp32, outside autocast
    parts.precision.scaler.scale(loss).backward()
    if with_tail:
        parts.optimizer.step()
        parts.post_step()
    return loss.detach()


class GraphedStep:
    """The whole train step captured once with torch.cuda.graph and replayed.

    Static input buffers are filled with `copy_` (or, when the DoLL loader is
    bound to `static_inputs`, gathered straight into by the loader: no extra
    device-to-device copy per step). Warm-up runs on a side stream (as
    the CUDA-graph docs require) and its effect on weights, BN statistics and
    optimizer state is undone before training, so the trajectory equals the
    eager one. Adam runs with `capturable=True` and a tensor learning rate that
    ExponentialLR updates in place. fp32/tf32/bf16: forward, loss, backward,
    optimizer step and mask re-application are all in the graph. amp-fp16:
    forward and the scaled backward are captured; the GradScaler's
    unscale/inf-check/step/update run eagerly after each replay
    (GradScaler.step reads `found_inf` on the host, which cannot be captured).

    `capture_peak_allocated_bytes` is the allocator's peak over warm-up and
    capture: the activations live in the graph's private pool from capture on,
    and replays allocate nothing, so the per-epoch allocator peaks of a graphed
    run would leave them out; the trainer folds this figure into them.
    """

    def __init__(self, parts: StepParts, sample_lq: torch.Tensor, sample_hq: torch.Tensor,
                 warmup_steps: int = 3) -> None:
        self.parts = p = parts
        self.static_lq = torch.empty_like(sample_lq)
        self.static_hq = torch.empty_like(sample_hq)
        self.static_lq.copy_(sample_lq)
        self.static_hq.copy_(sample_hq)
        fp16 = p.precision.scaler.is_enabled()
        # decided once: the eager GradScaler tail after each replay (amp-fp16), or nothing
        self._tail = self._scaler_tail if fp16 else _nothing
        self._fill = self._copy_inputs
        snapshot = _snapshot(p.model, p.optimizer)
        scaler_state = p.precision.scaler.state_dict() if fp16 else None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                p.optimizer.zero_grad(set_to_none=True)
                graph_body(p, self.static_lq, self.static_hq, with_tail=not fp16)
                self._tail()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        # the warm-up's activations sit cached on the side stream; give them back before the capture
        # takes as much again from its private pool (at 512 px, batch 32, fp32 both would not fit)
        torch.cuda.empty_cache()
        self.graph = torch.cuda.CUDAGraph()
        # grads to None before capture: backward then allocates .grad from the graph's private
        # pool and every replay overwrites (not accumulates) them, as the CUDA-graph docs prescribe
        p.optimizer.zero_grad(set_to_none=True)
        # thread_local: CUDA calls of other threads (the host loader's pin-memory thread, the
        # memory sampler) must not invalidate the capture; they never touch the captured stream
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_loss = graph_body(p, self.static_lq, self.static_hq, with_tail=not fp16)
        torch.cuda.synchronize()
        self.capture_peak_allocated_bytes = int(torch.cuda.max_memory_allocated())
        _restore(p.model, p.optimizer, snapshot)
        if fp16:
            p.precision.scaler.load_state_dict(scaler_state)  # warm-up moved the scale; undo it
        self.capture_time_s = time.perf_counter() - t0

    def _scaler_tail(self) -> None:
        p = self.parts
        p.precision.scaler.step(p.optimizer)
        p.precision.scaler.update()
        p.post_step()

    def _copy_inputs(self, lq: torch.Tensor, hq: torch.Tensor) -> None:
        self.static_lq.copy_(lq)
        self.static_hq.copy_(hq)

    @property
    def static_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers every replay reads its batch from: (low-dose, target)."""
        return self.static_lq, self.static_hq

    def skip_input_copy(self) -> None:
        """The loader now gathers each batch straight into `static_inputs`: stop copying them in."""
        self._fill = _skip_copy

    def __call__(self, lq: torch.Tensor, hq: torch.Tensor) -> torch.Tensor:
        self._fill(lq, hq)
        self.graph.replay()
        self._tail()
        return self.static_loss.clone()

    def release(self) -> None:
        """Free the graph and its private memory pool (before a recapture, e.g. after pruning)."""
        self.parts.optimizer.zero_grad(set_to_none=True)  # the grads live in the graph's pool
        self.graph.reset()
        del self.graph, self.static_loss, self.static_lq, self.static_hq
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _nothing() -> None:
    return None


def _skip_copy(lq: torch.Tensor, hq: torch.Tensor) -> None:
    return None


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Copies of weights, buffers and optimizer state, to undo capture warm-up."""
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "opt": {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                for p, s in optimizer.state.items()},
    }


@torch.no_grad()
def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, snap: dict) -> None:
    """Copy a snapshot back in place (the graph captured these very tensors' addresses)."""
    for k, v in model.state_dict().items():
        v.copy_(snap["model"][k])
    for p, state in optimizer.state.items():
        old = snap["opt"].get(id(p))
        for k, v in state.items():
            if torch.is_tensor(v):
                if old is not None and k in old:
                    v.copy_(old[k])
                else:
                    v.zero_()  # state created by warm-up: a fresh Adam state is all zeros (step 0)


def build_step(cfg: TrainConfig, parts: StepParts, sample: tuple[torch.Tensor, torch.Tensor]) -> tuple[StepFn, dict]:
    """The train step for `cfg.graphs`, and a record of what building it cost.

    The record holds `capture_time_s` (CUDA-graph warm-up and capture), `warmup_next_epoch`
    (torch.compile compiles lazily, so the next epoch pays it and must be marked warm-up)
    and, for a graph, `capture_peak_allocated_bytes`.
    The model is put in train mode first: a step captured or compiled from an eval-mode
    model (e.g. one just loaded by `--init`) would use BatchNorm's running statistics forever.
    """
    parts.model.train()
    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    if cfg.graphs in ("cuda-graph", "compile-cuda-graph"):
        if cfg.graphs == "compile-cuda-graph":
            # the compiled forward inside our captured step: its compilation happens in the capture's
            # warm-up steps, so it is counted in capture_time_s and no epoch pays it
            parts = dataclasses.replace(parts, model=torch.compile(parts.model, mode=mode))
        g = GraphedStep(parts, *sample)
        return g, {"capture_time_s": g.capture_time_s, "warmup_next_epoch": False,
                   "capture_peak_allocated_bytes": g.capture_peak_allocated_bytes}
    if cfg.graphs == "compile":
        # compilation happens lazily on the first call and is counted in the next epoch (marked warm-up)
        if cfg.compile_scope == "step":  # forward, loss, backward and Adam step (graph breaks at backward)
            compiled = torch.compile(eager_step(parts), mode=mode)
        else:
            compiled = eager_step(parts, torch.compile(parts.model, mode=mode))
        return checked_first_call(compiled, parts, COMPILE_CHECK_REL[cfg.precision]), \
            {"capture_time_s": 0.0, "warmup_next_epoch": True}
    return eager_step(parts), {"capture_time_s": 0.0, "warmup_next_epoch": False}


COMPILE_CHECK_REL = {"fp32": 1e-2, "tf32": 2e-2, "amp-bf16": 5e-2, "amp-fp16": 5e-2}
"""How far a compiled step's first loss may lie from eager PyTorch's on the same batch, relative: far above
rounding and kernel choice (1e-6 to 1e-3), far below what wrong generated code gives (torch 2.13's CPU
Inductor, this net at 64 px in train mode: a BatchNorm output off by up to 8, the loss by a factor)."""


class CompileMismatch(RuntimeError):
    """torch.compile's code computed another loss than eager PyTorch on the same batch: a compiler bug."""


def checked_first_call(step: StepFn, parts: StepParts, rel: float) -> StepFn:
    """`step` (a compiled one) whose first call is checked against an eager forward on the same batch.

    Before that call the eager model computes the loss of the batch without gradients; BatchNorm's running
    statistics, which that forward moves, are put back, so training goes on exactly as unchecked. A loss
    further than `rel` from eager's raises CompileMismatch (the run is recorded failed) instead of training
    a model the compiler got wrong. Non-finite losses are left to the trainer's own check.
    """
    checked = False

    def first_checked(lq: torch.Tensor, hq: torch.Tensor) -> torch.Tensor:
        nonlocal checked
        if checked:
            return step(lq, hq)
        with torch.no_grad():
            saved = [b.detach().clone() for b in parts.model.buffers()]
            with parts.precision.autocast(parts.device.type):
                out = parts.model(lq)
            eager = float(parts.loss_fn(out, hq))
            for b, v in zip(parts.model.buffers(), saved, strict=True):
                b.copy_(v)
        loss = step(lq, hq)
        checked = True
        got = float(loss)
        if math.isfinite(got) and math.isfinite(eager) and not math.isclose(got, eager, rel_tol=rel):
            hint = (" (on a CPU, torch 2.13's Inductor gets this net's train-mode BatchNorm wrong at 64 px and "
                    "up; torch._inductor.config.cpp.simdlen = 1 avoids that)") if parts.device.type == "cpu" else ""
            raise CompileMismatch(
                f"torch.compile's first step computed loss {got:.6g} where eager PyTorch computes {eager:.6g} "
                f"on the same batch ({abs(got - eager) / max(abs(eager), 1e-30):.1%} apart, allowed {rel:.0%}; torch "
                f"{torch.__version__} on {parts.device.type}): its generated code is wrong for this model here, "
                f"so the run stopped rather than train a wrong model{hint}. Use --graphs off (or cuda-graph on a "
                "GPU), or another torch release.")
        return loss

    return first_checked


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam(lr) in the chosen implementation (`optimizer_impl`: torch's default, foreach or fused).

    Under CUDA graphs: capturable, with a device tensor lr the scheduler can still change in place.
    """
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[cfg.optimizer_impl]
    if cfg.graphs in ("cuda-graph", "compile-cuda-graph"):
        return torch.optim.Adam(model.parameters(), lr=torch.tensor(cfg.lr, device=device), capturable=True, **impl)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, **impl)
