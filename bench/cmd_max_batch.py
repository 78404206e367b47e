"""`bench max-batch`: the largest training batch that fits in this GPU's memory, for one configuration.

The options are `bench train`'s (`--preset fastest`, `--config FILE.json`, one
per `TrainConfig` field), at the paper's 512 px unless `--image-size` or
`--config` says otherwise. Each candidate batch gets a fresh build of what
training builds (model, loss, Adam, precision, sparsity, the eager, compiled or
CUDA-graph step; DoLL's staged training set as a placeholder of its size), fed
random (B, 1, H, W) tensors on the device: no dataset is made. Two full steps
(the second one holds Adam's state), a sync, then the allocator's peaks; a CUDA
out-of-memory error is a "does not fit" row and the search goes on. Batches
double from `--start` until one does not fit (or `--max`), then bisect down to
`--step`. Not probed: validation (no_grad, smaller) and fragmentation over a
long run, so leave some headroom below the edge.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import typer

from bench.cmd_train import EXIT_FAILED, PRESETS, config_from_options, config_parameters
from bench.store import write_json
from ddnet.checkpoint import seed_everything
from ddnet.config import TrainConfig, check_runnable, resolve_device
from ddnet.data.readers import find_split, pair_files, read_image
from ddnet.errors import UserError, out_of_space
from ddnet.loss import DDNetLoss
from ddnet.model import DDNet
from ddnet.optim import GraphedStep, StepParts, build_step, make_optimizer, setup_precision
from ddnet.sparsity import sparsify_

PAPER_SIDE = 512
"""Slice side (px) probed when neither --image-size nor --config gives one: the paper's."""
CPU_REFUSAL = ("bench max-batch measures GPU memory; run it on a CUDA device (CPU memory is not a batch "
               "limit here).")
GIB = 2**30
_OOM_TEXT = ("out of memory", "ALLOC_FAILED")  # cuDNN and cuBLAS report a failed workspace allocation so


@dataclass
class ProbeResult:
    """One candidate batch: whether two train steps ran, and what they took (a flat row)."""

    batch: int
    fits: bool
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    step_ms: float | None = None
    """Wall time of the second step (synchronized): an indication, not a benchmark."""
    error: str | None = None
    """Why it did not fit (the out-of-memory message's first line)."""


@dataclass
class SearchResult:
    """The largest batch that fitted (0: not even batch 1), and every probe in the order made."""

    largest: int
    probes: list[ProbeResult] = field(default_factory=list)
    capped: bool = False
    """`largest` is the search's maximum: more may fit."""


def search_largest(fits: Callable[[int], bool | ProbeResult], start: int = 8, maximum: int = 4096,
                   step: int = 1, probes: list[ProbeResult] | None = None) -> SearchResult:
    """Largest batch b in [1, maximum] with fits(b), assuming fitting is monotone in b.

    Doubles from `start` until a batch does not fit or `maximum` is reached; if even
    `start` does not fit, halves down to 1; then bisects between the last fit and the
    first failure until they are at most `step` apart (every probe is then the last fit
    plus a multiple of `step`). No batch is probed twice: about log2(maximum / start)
    + log2(largest) probes.

    `probes`: the list each probe is appended to (the result's `probes`); the caller's own keeps the probes
    made before one that raised.
    """
    if min(start, maximum, step) < 1:
        raise UserError(f"--start {start}, --max {maximum} and --step {step} must all be at least 1.")
    probes = [] if probes is None else probes

    def ok(b: int) -> bool:
        r = fits(b)
        probes.append(r if isinstance(r, ProbeResult) else ProbeResult(b, bool(r)))
        return probes[-1].fits

    lo, b = 0, min(start, maximum)  # lo: the largest batch known to fit
    while ok(b):
        lo = b
        if b == maximum:
            return SearchResult(lo, probes, capped=True)
        b = min(2 * b, maximum)
    hi = b  # the smallest batch known not to fit
    while lo == 0 and hi > 1:  # even the start did not fit: halve down
        if ok(hi // 2):
            lo = hi // 2
        else:
            hi //= 2
    while hi - lo > step:
        mid = lo + max(step, (hi - lo) // 2 // step * step)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return SearchResult(lo, probes)


# ----------------------------------------------------------------- one probe on the GPU


def train_shape(cfg: TrainConfig) -> tuple[int, int, int]:
    """(training slices, H, W) of the configured data: synthetic from the config, a folder from its first slice."""
    if cfg.data.source == "synthetic":
        return cfg.data.n_train, cfg.data.image_size, cfg.data.image_size
    pairs = pair_files(*find_split(cfg.data.source, "train"))
    h, w = read_image(pairs[0][0], tuple(cfg.data.hu_window)).shape
    return len(pairs), int(h), int(w)


def probes_sparse_phase(cfg: TrainConfig) -> bool:
    """Whether the probe prunes first: masks add memory (random, topk), so their sparse phase is the larger;
    structured pruning shrinks the net, so its dense phase is, unless there is none (--dense-epochs 0)."""
    sp = cfg.sparsity
    return sp.kind != "none" and (sp.kind != "structured" or sp.dense_epochs == 0)


def _two_steps(cfg: TrainConfig, shape: tuple[int, int, int], device: torch.device) -> float:
    """Build what training builds at cfg.batch_size and take two steps; returns the second one's time (s)."""
    n, h, w = shape
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    seed_everything(cfg.seed)
    precision = setup_precision(cfg, device)
    # DoLL keeps the whole training set on the device: a placeholder of its size holds that memory
    staged = ([torch.empty((n, 1, h, w), device=device).contiguous(memory_format=fmt) for _ in range(2)]
              if cfg.loader == "device" else [])
    model = DDNet(cfg.model).set_deterministic(cfg.deterministic).to(device, memory_format=fmt)
    loss_fn = DDNetLoss(min(h, w), guard_tf32=cfg.precision == "tf32")
    optimizer = make_optimizer(model, cfg, device)
    post_step: Callable[[], None] = _nothing
    if probes_sparse_phase(cfg):
        res = sparsify_(model, cfg.sparsity, seed=cfg.seed, optimizer=optimizer, image_size=min(h, w))
        model.to(device, memory_format=fmt)  # structured pruning made new parameters
        if res.masks is not None:
            post_step = res.masks.to(device).bind(model)
    lq, hq = (torch.rand((cfg.batch_size, 1, h, w), device=device).contiguous(memory_format=fmt) for _ in range(2))
    step, _ = build_step(cfg, StepParts(model, loss_fn, optimizer, precision, device, post_step), (lq, hq))
    try:
        step(lq, hq)  # creates Adam's state (and compiles, for --graphs compile)
        _sync(device)
        t0 = time.perf_counter()
        step(lq, hq)
        _sync(device)  # note: the step is asynchronous until here
        return time.perf_counter() - t0
    finally:
        if isinstance(step, GraphedStep):
            step.release()  # its private pool is not freed by the collector alone
        del staged  # held through both steps, as DoLL holds the set through training


def _nothing() -> None:
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # the build also runs on a CPU, for the tests
        torch.cuda.synchronize(device)


def _is_oom(e: BaseException | None) -> bool:
    """An out-of-memory error, or one raised while handling one (a CUDA-graph capture that ends badly)."""
    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError) or any(t in str(e) for t in _OOM_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _release(cfg: TrainConfig, device: torch.device) -> None:
    """Give back everything a probe held, so the next one starts from the same empty device."""
    if cfg.graphs in ("compile", "compile-cuda-graph"):
        torch.compiler.reset()  # compiled code holds the old model; a new shape must not hit the recompile limit
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


def probe(cfg: TrainConfig, batch: int, shape: tuple[int, int, int], device: torch.device) -> ProbeResult:
    """Two train steps of `cfg` at `batch` on random data: the peaks if they ran, the error if out of memory."""
    _release(cfg, device)
    try:
        dt = _two_steps(cfg.replace(batch_size=batch), shape, device)
        result = ProbeResult(batch, True, torch.cuda.max_memory_allocated(device) / GIB,
                             torch.cuda.max_memory_reserved(device) / GIB, dt * 1e3)
    except Exception as e:
        if not _is_oom(e):
            raise
        result = ProbeResult(batch, False, error=(str(e).strip().splitlines() or [type(e).__name__])[0][:200])
    _release(cfg, device)  # the failed build's tensors sit in the traceback's frames until here
    return result


# ----------------------------------------------------------------- the command


def _line(r: ProbeResult) -> str:
    if r.fits:
        return (f"batch {r.batch:>5}: fits  peak {r.peak_allocated_gib:6.2f} GiB allocated, "
                f"{r.peak_reserved_gib:6.2f} GiB reserved, step {r.step_ms:8.1f} ms")
    return f"batch {r.batch:>5}: OOM   ({r.error})"


def max_batch_cmd(**options: Any) -> None:
    """Find the largest training batch that fits in this GPU's memory for one configuration.

    Takes `bench train`'s options (--preset, --config, every config field); the
    batch size is what is searched, so --batch-size is ignored.
    """
    if options["image_size"] is None and options["config"] is None:
        options = {**options, "image_size": PAPER_SIDE}
    # every option, --out and the data are checked before the device: a bad one is named on a laptop too, not
    # after the GPU job has waited its turn (a preset needs CUDA: without one, the refusal below says so)
    cuda = torch.cuda.is_available()
    known = options["preset"] in (None, *PRESETS)  # an unknown name is named on a CPU too
    cfg = config_from_options(options if cuda or not known else {**options, "preset": None})
    if cfg.nproc > 1:
        raise UserError(f"bench max-batch measures one GPU; drop --nproc {cfg.nproc} (under DDP each replica "
                        f"holds batch / {cfg.nproc}, so the global batch can be {cfg.nproc}x the result).")
    out: Path | None = options["out"]
    if out is not None:
        check_out(out)
    shape = train_shape(cfg)
    if not cuda or resolve_device(cfg.device) != "cuda":
        raise UserError(CPU_REFUSAL)
    check_runnable(cfg)
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    free, total = torch.cuda.mem_get_info(device)
    typer.echo(f"{props.name}: {total / GIB:.1f} GiB, {free / GIB:.1f} GiB free; {shape[1]}x{shape[2]} px, "
               f"precision {cfg.precision}, graphs {cfg.graphs}, loader {cfg.loader}, "
               f"{'sparse' if probes_sparse_phase(cfg) else 'dense'} phase")

    done: list[ProbeResult] = []  # the search appends every probe here, also those before one that raises

    def fits(batch: int) -> ProbeResult:
        r = probe(cfg, batch, shape, device)
        typer.echo(_line(r))
        return r

    def record(**what: Any) -> dict[str, Any]:
        return {"device_name": props.name, "total_memory_gib": total / GIB, "free_memory_at_start_gib": free / GIB,
                "image_height": shape[1], "image_width": shape[2], "config": cfg.to_dict(),
                "phase": "sparse" if probes_sparse_phase(cfg) else "dense",
                "start": options["start"], "max": options["maximum"], "step": options["step"],
                "probes": [dataclasses.asdict(r) for r in done], **what, "torch": torch.__version__}

    try:
        found = search_largest(fits, options["start"], options["maximum"], options["step"], probes=done)
    except UserError:
        raise
    except Exception as e:  # not an OOM: the configuration itself fails here
        said = (str(e).strip().splitlines() or [""])[0][:200]
        failed = len(done) + 1
        typer.echo(f"error: probe {failed} failed: {type(e).__name__}: {said}", err=True)
        if out is not None:  # on record too: a sweep's missing file would not say why
            _write_record(out, record(status="failed", error=f"{type(e).__name__}: {said}", largest_batch=None))
        sys.exit(EXIT_FAILED)
    best = next((r for r in found.probes if r.fits and r.batch == found.largest), None)
    if best is not None:  # printed before --out is written: a write that fails must not lose the answer
        typer.echo(f"largest batch that fits: {found.largest} (peak allocated {best.peak_allocated_gib:.2f} GiB "
                   f"of {total / GIB:.2f} GiB on {props.name})")
        if found.capped:
            typer.echo(f"note: --max {options['maximum']} was reached; raise --max to look further.")
        if found.largest > shape[0]:
            typer.echo(f"note: a run at that batch needs at least {found.largest} training slices (--n-train).")
    if out is not None:
        _write_record(out, record(
            status="ok" if best is not None else "nothing fits", largest_batch=found.largest,
            capped_at_max=found.capped, peak_allocated_gib=best.peak_allocated_gib if best else None,
            peak_reserved_gib=best.peak_reserved_gib if best else None))
    if best is None:
        raise UserError(f"not even batch 1 fits in {total / GIB:.1f} GiB on {props.name} for this configuration; "
                        "try --precision amp-bf16, --loader host or a smaller --image-size.")


def check_out(out: Path) -> None:
    """Refuse an --out that exists or that cannot be written, before the search rather than after it."""
    if out.exists() or out.is_symlink():
        raise UserError(f"--out {out} exists; choose a new file (an earlier measurement is never overwritten).")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:  # write_json makes the missing folders
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "is not a folder" if not parent.is_dir() else "is not writable here"
        raise UserError(f"--out {out}: {parent} {why}; choose a file in a folder you can write.")


def _write_record(out: Path, record: dict[str, Any]) -> None:
    try:
        write_json(out, record)
    except OSError as e:
        if out_of_space(e):  # the full-disk line and exit status every command gives
            raise
        raise UserError(f"could not write --out {out} ({e.strerror or e}); every probe is printed above, and "
                        "rerunning with a writable --out measures it again.") from None


def _signature() -> tuple[inspect.Signature, dict[str, Any]]:
    """max_batch_cmd's parameters: the search's options, then `bench train`'s configuration options."""
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("start", kw, annotation=int, default=typer.Option(
            8, "--start", min=1, help="First batch probed; doubled until one does not fit.")),
        inspect.Parameter("maximum", kw, annotation=int, default=typer.Option(
            4096, "--max", min=1, help="Largest batch probed.")),
        inspect.Parameter("step", kw, annotation=int, default=typer.Option(
            1, "--step", min=1, help="Granularity of the bisection: the answer is within this of the edge.")),
        inspect.Parameter("out", kw, annotation=Path | None, default=typer.Option(
            None, "--out", help="JSON file to write (device, config, every probe, the result); never overwritten.")),
        *config_parameters(),
    ]
    side = next(p.default for p in params if p.name == "image_size")  # typer's OptionInfo: say our default
    side.help = side.help.split("  \\[default:")[0] + f"  \\[default: {PAPER_SIDE} px here, the paper's]"
    return inspect.Signature(params), {p.name: p.annotation for p in params} | {"return": None}


max_batch_cmd.__signature__, max_batch_cmd.__annotations__ = _signature()  # type: ignore[attr-defined]
