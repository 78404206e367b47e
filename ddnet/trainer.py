"""Train DDNet for one configuration.

`train(cfg, out_dir, sink=..., make_instruments=...)` is the whole job: build
(model, optimizer, loaders, step: every toggle decided here, once), then
epochs. Each epoch hands one row to the sink and replaces `ckpt.pt`
atomically, so a killed run resumes (`resume=True`) on the same trajectory.
The trainer never knows about grids or run folders: the harness (`bench`)
passes in the instruments that measure (`ddnet.hooks.Instruments`) and the
sink that records (`ddnet.hooks.RunSink`); the trainer writes only its
checkpoint and the exported weights.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddnet.checkpoint import (
    CKPT_FORMAT,
    atomic_save,
    rng_state,
    seed_everything,
    set_rng_state,
    weights_record,
)
from ddnet.config import TrainConfig, check_runnable, resolve_device
from ddnet.convert import load_model_weights
from ddnet.errors import UserError, out_of_space
from ddnet.hooks import InstrumentsFactory, RunSink
from ddnet.loaders import load_run_data
from ddnet.loss import DDNetLoss
from ddnet.model import DDNet
from ddnet.optim import GraphedStep, StepParts, build_step, make_optimizer, setup_precision
from ddnet.replicas import Dist, PeerLost, agree, from_main, gather, group_broke, tell_failure, told_failure
from ddnet.run_summary import ddp_records, kept_rows, run_summary
from ddnet.sparsity import AutoSwitch, Masks, conform_to_state_dict_, count_flops, measure_sparsity, sparsify_
from ddnet.validation import input_quality, validate

INJECT_NAN_ENV = "DDNET_BENCH_INJECT_NAN_EPOCH"
"""Testing aid, never part of a config: make the train loss NaN at this epoch (exercises failure handling)."""
INJECT_ONLY_ENV = "DDNET_BENCH_INJECT_ONLY"
"""With INJECT_NAN_ENV: only in runs whose output folder path contains this text."""


class TrainingFailed(RuntimeError):
    """Training itself went wrong (NaN/inf loss, OOM): recorded by the sink, exit status 3."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _injected_nan_epoch(out: Path) -> int | None:
    epoch = os.environ.get(INJECT_NAN_ENV)
    only = os.environ.get(INJECT_ONLY_ENV)
    if not epoch or (only and only not in str(out)):
        return None
    return int(epoch)


# ----------------------------------------------------------------- the run


def _no_news() -> None:
    return None


class Run:
    """One training run: everything built once from the config, then `fit()`."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, make_instruments: InstrumentsFactory,
                 resume: bool = False, dist: Dist | None = None) -> None:
        self.cfg, self.out, self.resume, self.dist = cfg, Path(out_dir), resume, dist or Dist()
        self.device = self._pick_device()
        seed_everything(cfg.seed)
        self.precision = setup_precision(cfg, self.device)
        self.fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        tools = make_instruments(self.device, cfg, self.dist.main)
        self.timer, self.memory, self.profile = tools.timer, tools.memory, tools.profile_copies
        data = load_run_data(cfg, self.device, self.dist)
        self.loader, self.val, self.image_side, self.read_files = data.loader, data.val, data.image_side, data.read_files
        self.data_load, self.staging, self.placement = data.data_load, data.staging, data.placement
        self.model = self._build_model()
        # TF32 guard around the loss only where the process runs in TF32 (decided once, not per step)
        self.loss_fn = DDNetLoss(self.image_side, guard_tf32=cfg.precision == "tf32")
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=cfg.gamma)
        self.masks: Masks | None = None
        self.sparsity_kind = "none"
        self.sparsity_report: dict[str, Any] = {}
        self.switch_epoch: int | None = None
        self.start_epoch = 0
        self.per_slice: tuple[list, list, list] | None = None
        self.input: dict[str, float] = {}
        self.copies: dict[str, Any] | None = None
        self.auto = (AutoSwitch(patience=cfg.sparsity.auto_patience, max_epoch=cfg.epochs - 1)
                     if cfg.sparsity.kind != "none" and cfg.sparsity.dense_epochs == "auto" else None)
        self.flops_dense = self._flops()
        self.params_dense = sum(p.numel() for p in self.model.parameters())
        self.ddp_model: nn.Module = self.model
        self.step = None
        self.nan_at_epoch = _injected_nan_epoch(self.out)
        self.alive: Callable[[], None] = _no_news  # the sink's sign of life, set by fit() on rank 0

    # -------------------------------------------------------------- build
    def _pick_device(self) -> torch.device:
        if resolve_device(self.cfg.device) == "cuda":
            # one GPU per replica on its node: the local rank (the global rank would run past the node's
            # GPUs on every node but the first)
            index = self.dist.local_rank
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        return torch.device("cpu")

    def _build_model(self) -> nn.Module:
        model = DDNet(self.cfg.model)
        if self.cfg.init:
            loaded, info = load_model_weights(self.cfg.init, device="cpu")
            want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            got = {k: tuple(v.shape) for k, v in loaded.state_dict().items()}
            if want != got:
                first = next(k for k in want if want[k] != got.get(k))
                # widths the file's net was built with (before any pruning) that differ from this run's
                ours = vars(self.cfg.model)
                opts = {f"--{k.replace('_', '-')}": (v, ours.get(k)) for k, v in info["model_config"].items()
                        if ours.get(k) != v}
                fix = ("it was pruned structurally (narrower layers, the same widths); --init starts from a "
                       "dense DDNet: use the checkpoint from before the pruning, or `bench eval` to evaluate it"
                       if not opts else "its net was built with " + " ".join(f"{o} {a}" for o, (a, _) in opts.items())
                       + " (this run: " + " ".join(f"{o} {b}" for o, (_, b) in opts.items()) + "); set "
                       + ", ".join(opts) + (" to the checkpoint's width" if len(opts) == 1 else " to its values"))
                raise UserError(f"--init {self.cfg.init} does not match the configured model: {first} is "
                                f"{got.get(first)} there but {want[first]} here; {fix}.")
            model = loaded
        return model.set_deterministic(self.cfg.deterministic).to(self.device, memory_format=self.fmt)

    def _flops(self) -> int | None:
        try:
            return int(count_flops(self.model, self.image_side)["flops_fwd"])
        except Exception:  # FLOP counting is a record, never a reason to stop a run
            return None

    def _build_step(self) -> float:
        """(Re)build the train step; returns capture time. Called at start and after pruning."""
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)
        # masks resolved once per build: the step's tail is one foreach multiply over bound weights
        post_step = self.masks.bind(self.model) if self.masks is not None else (lambda: None)
        parts = StepParts(self.ddp_model, self.loss_fn, self.optimizer, self.precision, self.device, post_step)
        old, self.step = self.step, None
        self.loader.bind(None)
        if isinstance(old, GraphedStep):
            old.release()  # free the old graph's pool before capturing the new one
        sample = next(iter(self.loader.epoch(0)))
        self.memory.fold_run_peak()  # a capture resets the allocator's peak statistics
        self.step, info = build_step(self.cfg, parts, sample)
        # DoLL gathers each batch straight into the graph's static inputs: no DtoD copy per step
        if isinstance(self.step, GraphedStep) and self.loader.bind(self.step.static_inputs):
            self.step.skip_input_copy()
        if "capture_peak_allocated_bytes" in info:
            self.memory.note_graph_peak(info["capture_peak_allocated_bytes"])
        if info["warmup_next_epoch"]:
            self.timer.mark_warmup_next()
        return float(info["capture_time_s"])

    def _prune(self) -> float:
        """Prune now (hybrid switch point); returns the time it took."""
        _sync(self.device)
        t0 = time.perf_counter()
        res = sparsify_(self.model, self.cfg.sparsity, seed=self.cfg.seed, optimizer=self.optimizer,
                        image_size=self.image_side)
        self.masks = res.masks.to(self.device) if res.masks is not None else None
        self.sparsity_kind = res.kind
        self.sparsity_report = res.report
        # structured pruning made new parameters: move the rebuilt layers to the device / format
        self.model.to(self.device, memory_format=self.fmt)
        _sync(self.device)
        return time.perf_counter() - t0

    # -------------------------------------------------------------- checkpoints
    def _checkpoint(self, epoch: int, phase: str) -> None:
        cfg = self.cfg.to_dict()
        atomic_save({
            "format": CKPT_FORMAT, "epoch": epoch, "model": self.model.state_dict(), "model_config": cfg["model"],
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
            "masks": self.masks.state_dict() if self.masks is not None else None,
            "sparsity_kind": self.sparsity_kind, "sparsity_report": self.sparsity_report, "phase": phase,
            "switch_epoch": self.switch_epoch, "auto": self.auto.state_dict() if self.auto is not None else None,
            "rng": rng_state(), "config": cfg,
            "normalisation": {"normalisation": cfg["data"]["normalisation"], "hu_window": cfg["data"]["hu_window"]},
            # the last validation's per-slice scores: a run resumed after its last epoch still has them
            "val_per_slice": self.per_slice,
        }, self.out / "ckpt.pt")

    _ck: dict[str, Any] | None = None  # read_checkpoint's result, until _restore applies it

    def read_checkpoint(self) -> dict[str, Any]:
        """Read and check ckpt.pt (once): a damaged or foreign checkpoint is refused before anything is recorded."""
        if self._ck is not None:
            return self._ck
        path = self.out / "ckpt.pt"
        try:
            ck = torch.load(path, map_location=self.device, weights_only=False)
            ck["config"], ck["epoch"]  # noqa: B018 - a checkpoint of another format fails here, not later
        except Exception as e:
            raise UserError(f"{path} cannot be read as a checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:80]}); "
                            "delete it to restart the run from scratch, or use a new --out.") from None
        if ck.get("config") != self.cfg.to_dict():
            raise UserError(f"{self.out} holds a run of a different configuration; use a new --out folder.")
        self._ck = ck
        return ck

    def _restore(self, sink: RunSink | None) -> list[dict]:
        """Apply ckpt.pt; drop epoch rows past it (rank 0, through the sink). Returns the kept rows."""
        ck, self._ck = self.read_checkpoint(), None
        if ck["sparsity_kind"] == "structural":
            conform_to_state_dict_(self.model, ck["model"])
            self.model.to(self.device, memory_format=self.fmt)
            self.optimizer = make_optimizer(self.model, self.cfg, self.device)
            self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=self.cfg.gamma)
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.precision.scaler.load_state_dict(ck["scaler"])
        if ck["masks"] is not None:
            self.masks = Masks.from_state_dict(ck["masks"]).to(self.device)
        self.sparsity_kind = ck["sparsity_kind"]
        self.sparsity_report = ck["sparsity_report"]
        self.switch_epoch = ck["switch_epoch"]
        self.per_slice = ck.get("val_per_slice")
        if self.auto is not None and ck["auto"] is not None:
            self.auto.load_state_dict(ck["auto"])
        set_rng_state(ck["rng"])
        self.start_epoch = ck["epoch"]
        if sink is None:
            return []
        rows = kept_rows(sink.epochs(), self.start_epoch, self.out / "epochs.jsonl")
        sink.keep_epochs(rows)
        sink.checkpointed(self.start_epoch)
        return rows

    # -------------------------------------------------------------- epochs
    def _phase(self, epoch: int) -> str:
        return "sparse" if self.switch_epoch is not None and epoch >= self.switch_epoch else "dense"

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        step, timer, alive = self.step, self.timer, self.alive
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        n = 0
        self.memory.epoch_begin()
        timer.epoch_begin(epoch)
        for lq, hq in self.loader.epoch(epoch):
            timer.batch_ready()
            loss_sum += step(lq, hq)  # stays on the device: no per-step host sync
            timer.step_end()
            alive()  # a sign of life for the runner's stall watch (rank 0's sink: a file touch every 10 s at most)
            n += 1
        rec = timer.epoch_end()  # the one sync of the epoch
        if self.dist.world > 1:
            torch_dist.all_reduce(loss_sum)
            n *= self.dist.world
        rec["train_loss"] = float(loss_sum.item() / max(n, 1))
        rec.update(self.memory.epoch_end())
        rec["images_per_s"] = n * (self.cfg.batch_size // self.dist.world) / rec["time_s"] if rec["time_s"] else None
        return rec

    def fit(self, sink: RunSink | None) -> dict[str, Any]:
        """Train every remaining epoch; rank 0 hands rows to `sink` (None on the other ranks)."""
        cfg, main = self.cfg, self.dist.main
        self.alive = sink.alive if sink is not None else _no_news
        rows: list[dict] = []
        if self.resume and self.resumes_from_checkpoint():
            rows = self._restore(sink)
        elif sink is not None:  # new, or killed before its first checkpoint: a row written has no state behind it
            if self.resume:
                sink.keep_epochs([])
            sink.checkpointed(0)
        if self.start_epoch == 0 and cfg.sparsity.kind != "none" and cfg.sparsity.dense_epochs == 0:
            self.switch_epoch = 0
        # --dense-epochs 0 prunes before the first step (the paper's Table 1 setting)
        pending_prune = self._prune() if self.switch_epoch == 0 and self.start_epoch == 0 else 0.0
        pending_capture = self._build_step()
        self.alive()
        prev_loss = rows[-1]["train_loss"] if rows else None
        if main:  # the floor: the low-dose input scored against the target like the output is
            self.input = input_quality(self.val.lq, self.val.hq, self.val.hu_scale, self.loss_fn.setting,
                                       cfg.val_batch_size or cfg.batch_size, self.device)
        with self.memory:
            for epoch in range(self.start_epoch, cfg.epochs):
                phase = self._phase(epoch)
                lr = float(self.optimizer.param_groups[0]["lr"])
                rec = self._train_epoch(epoch)
                if epoch + 1 == self.nan_at_epoch:
                    rec["train_loss"] = float("nan")  # testing aid (INJECT_NAN_ENV): an injected divergence
                if not math.isfinite(rec["train_loss"]):
                    raise TrainingFailed(f"train loss became {rec['train_loss']} at epoch {epoch + 1}")
                self.scheduler.step()
                row = {"epoch": epoch + 1, "phase": phase, "lr": lr, **rec,
                       "capture_time_s": pending_capture, "prune_time_s": pending_prune,
                       "loss_change": abs(rec["train_loss"] - prev_loss) if prev_loss is not None else None}
                pending_capture = pending_prune = 0.0
                if main:
                    v0 = time.perf_counter()
                    val = validate(self.model, self.val.lq, self.val.hq, self.val.hu_scale, self.loss_fn,
                                   cfg.val_batch_size or cfg.batch_size, self.precision.autocast, self.device)
                    self.per_slice = val.pop("_per_slice")
                    bad = {k: v for k, v in val.items() if isinstance(v, float) and not math.isfinite(v)}
                    if bad:  # a NaN metric is a failed run, never an 'ok' one with "nan" in its records
                        raise TrainingFailed(f"validation metric(s) {', '.join(bad)} became non-finite at epoch "
                                             f"{epoch + 1} (the network's output is not finite)")
                    row.update(val, val_time_s=time.perf_counter() - v0)
                    row.update(self.input)
                    row["sparsity"] = self._measured_sparsity()
                    sink.epoch(row)
                    rows.append(row)
                prev_loss = rec["train_loss"]
                # the hybrid switch: decided at the end of a dense epoch, pruning at the next one's start
                if phase == "dense" and cfg.sparsity.kind != "none" and epoch + 1 < cfg.epochs:
                    switch = (self.auto.update(rec["train_loss"]) if self.auto is not None
                              else epoch + 1 == cfg.sparsity.dense_epochs)
                    if switch:
                        self.switch_epoch = epoch + 1
                        pending_prune = self._prune()
                        pending_capture = self._build_step()
                if main and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs):
                    self._checkpoint(epoch + 1, self._phase(epoch + 1))
                    sink.checkpointed(epoch + 1)  # after the save: a stop between the two under-reports, never over
        if cfg.profile_steps > 0:
            self.copies = self._profile_copies()
            if sink is not None:
                sink.copies(self.copies)
        return self._summary(rows)

    _resumes: bool | None = None  # resumes_from_checkpoint's verdict, once reached (a collective under DDP)

    def resumes_from_checkpoint(self) -> bool:
        """Whether --resume restores ckpt.pt: global rank 0's verdict, on every rank (decided once).

        Rank 0 alone writes the checkpoint, but every rank reads it to resume: when a rank cannot
        see it (--out on a node-local disk), every rank refuses the resume together.
        """
        if self._resumes is not None:
            return self._resumes
        seen = gather((self.out / "ckpt.pt").exists(), self.dist)
        if seen[0][0] and not all(h for h, _ in seen):
            blind = ", ".join(f"rank {p['rank']} on {p['host']}" for h, p in seen if not h)
            raise UserError(f"--resume: {blind} cannot see {self.out / 'ckpt.pt'}, which every rank reads "
                            "to resume; put --out on a filesystem all nodes mount.")
        self._resumes = bool(seen[0][0])
        return self._resumes

    def _measured_sparsity(self) -> float:
        """Counted zeros of prunable weights (masked), or the fraction of parameters removed (structural)."""
        if self.sparsity_kind == "structural":
            return 1.0 - sum(p.numel() for p in self.model.parameters()) / self.params_dense
        return float(measure_sparsity(self.model)["overall"])

    def _profile_copies(self) -> dict[str, Any]:
        """The dedicated data-movement window, after the timed epochs (never inside them)."""
        it = {"gen": None}

        def run_steps(k: int) -> None:
            for _ in range(k):
                batch = next(it["gen"], None) if it["gen"] is not None else None
                if batch is None:
                    it["gen"] = self.loader.epoch(self.cfg.epochs)
                    batch = next(it["gen"])
                self.step(*batch)
            _sync(self.device)

        snap = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        result = self.profile(run_steps, self.cfg.profile_steps, self.device)
        with torch.no_grad():  # the profiled steps must not change the exported weights
            for k, v in self.model.state_dict().items():
                v.copy_(snap[k])
        return result

    def _summary(self, rows: list[dict]) -> dict[str, Any]:
        return run_summary(self, rows)


def train(cfg: TrainConfig, out_dir: str | Path, *, sink: RunSink, make_instruments: InstrumentsFactory,
          resume: bool = False, dist: Dist | None = None) -> dict[str, Any]:
    """Train one configuration; returns the summary (also handed to `sink.finish`).

    Raises UserError before anything is recorded when the configuration cannot run
    here or the sink refuses the destination; raises TrainingFailed (after
    `sink.fail`) when training itself fails. Only global rank 0 talks to the sink.

    Under DDP a UserError is raised on every rank together: each refusal one rank can reach
    alone (the destination, the data, a checkpoint out of sight) is first shared over the group,
    so the replicas can leave the group together. Any other failure may be one rank's alone.
    """
    dist = dist or Dist()
    out = Path(out_dir)
    check_runnable(cfg)
    refusal = None
    if dist.main:
        try:
            sink.open(cfg.to_dict(), resume)
        except UserError as e:
            refusal = str(e)
    if dist.world > 1:
        # rank 0 alone judges the destination; every rank must learn its verdict, or the others would
        # wait forever in the first collective while rank 0 has already left
        refusal = from_main(refusal)
    if refusal is not None:
        raise UserError(refusal)
    run = Run(cfg, out, make_instruments, resume, dist)  # data/model errors surface here, before any record
    if resume and run.resumes_from_checkpoint():  # a checkpoint out of some rank's sight is refused here
        refusal = None
        try:
            run.read_checkpoint()  # damaged or foreign: refused before any record, on every rank together
        except UserError as e:
            refusal = str(e)
        if (refusal := agree(refusal, dist)[0]) is not None:
            raise UserError(refusal)
    if dist.main:
        sink.start(cfg.to_dict(), {**run.precision.flags, "device": str(run.device), "world_size": dist.world})
    try:
        summary = run.fit(sink if dist.main else None)
        if dist.world > 1:
            summary.update(ddp_records(run))
            for rec in summary["ddp_ranks"]:  # where each rank ran (host, node, local rank): gathered at load
                rec.update(run.placement[rec["rank"]])
    except UserError:
        raise
    except Exception as e:  # NaN/inf loss, CUDA OOM, any crash: recorded, then reported as a failed run
        if out_of_space(e) or not out.is_dir():  # the disk's fault or a folder moved away, not the run's: left
            raise  # resumable ('running', as a kill leaves it), and no folder made again to say 'failed' in
        what = f"{type(e).__name__}: {e}"
        if dist.world > 1:
            what = _replicas_failure(e, what, dist, sink, len({p["node"] for p in run.placement}) > 1)
        if dist.main:
            sink.fail(what, traceback.format_exc(limit=8))
        raise TrainingFailed(what) from e
    if dist.main:
        atomic_save(weights_record(run.model, cfg.to_dict(), summary["epochs_completed"]), out / "weights.pt")
        sink.finish(summary)
    return summary


def _replicas_failure(e: Exception, what: str, dist: Dist, sink: RunSink, several_nodes: bool) -> str:
    """Under DDP, the failure `e` (`what`) as the run records it. A replica's own failure is told to rank 0 before
    the group breaks under it; the break, on rank 0, is then that told failure, named by rank and host. A break
    no replica explains is, when the replicas span `several_nodes`, a peer lost (a node, the network, a kill): not
    the run's failure, PeerLost, with the run left resumable and the reason in its summary (`RunSink.interrupt`);
    on one node, a replica killed there (the OOM killer, a crash below Python): a failure, as a killed
    single-process run's."""
    if not group_broke(e):
        if not dist.main:
            tell_failure(what, dist)
        return what
    if dist.main and (told := told_failure(dist)) is not None:
        return told
    if not several_nodes:
        return f"a replica ended without a word (killed, or crashed below Python): {what}"
    lost = f"lost the other replicas ({what.splitlines()[0][:240]})"
    if dist.main:
        sink.interrupt(lost)
    raise PeerLost(lost) from e
