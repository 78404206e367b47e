"""Train DDNet for one configuration and write its run folder.

`train(cfg, out_dir)` is the whole job: build (model, optimizer, loaders,
step: every toggle decided here, once), then epochs. Each epoch appends one
row to `epochs.jsonl` and replaces `ckpt.pt` atomically, so a killed run
resumes (`resume=True`) on the same trajectory. The trainer never knows
about grids; collectors (time, memory, copies, environment) come from
`bench.collectors`.
"""

from __future__ import annotations

import math
import os
import random
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ddnet.config import TrainConfig, check_runnable, resolve_device
from ddnet.errors import UserError
from ddnet.loss import DDNetLoss, slice_metrics
from ddnet.model import DDNet
from ddnet.optim import (
    DeviceLoader,
    GraphedStep,
    HostLoader,
    StepParts,
    build_step,
    make_optimizer,
    setup_precision,
    stage_on_device,
)

CKPT_FORMAT = "ddnet-bench-ckpt/1"
WEIGHTS_FORMAT = "ddnet-bench-weights/1"


class TrainingFailed(RuntimeError):
    """Training itself went wrong (NaN/inf loss, OOM): recorded in summary.json, exit status 3."""


@dataclass
class Dist:
    """Where this process sits among the replicas."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


# ----------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch CPU and CUDA, for the checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves a torn checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def validate(model: nn.Module, lq: torch.Tensor, hq: torch.Tensor, hu_scale: torch.Tensor,
             loss_fn: DDNetLoss, batch_size: int, autocast, device: torch.device) -> dict[str, Any]:
    """Validation under eval() and no_grad(): loss and per-slice MS-SSIM (%), PSNR (dB), RMSE (HU)."""
    was_training = model.training
    model.eval()
    losses, cols = [], {"ms_ssim_pct": [], "psnr_db": [], "rmse_hu": []}
    for i in range(0, lq.shape[0], batch_size):
        x = lq[i : i + batch_size].to(device)
        y = hq[i : i + batch_size].to(device)
        with autocast(device.type):
            out = model(x)
        out = out.float()
        losses.append(loss_fn(out, y) * x.shape[0])
        for k, v in slice_metrics(out, y, hu_scale[i : i + batch_size].to(device), loss_fn.setting).items():
            cols[k].append(v)
    model.train(was_training)
    m, p, r = (torch.cat(cols[k]).double().cpu() for k in ("ms_ssim_pct", "psnr_db", "rmse_hu"))
    return {
        "val_loss": float(torch.stack(losses).sum().item() / lq.shape[0]),
        "val_ms_ssim": float(m.mean()),
        "val_ms_ssim_std": float(m.std(unbiased=False)),
        "val_psnr": float(p.mean()),
        "val_psnr_std": float(p.std(unbiased=False)),
        "val_rmse_hu": float(r.mean()),
        "_per_slice": (m.tolist(), p.tolist(), r.tolist()),
    }


# ----------------------------------------------------------------- the run


class Run:
    """One training run: everything built once from the config, then `fit()`."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, resume: bool, progress: bool, dist: Dist) -> None:
        from bench.collectors import MemoryCollector, TimeCollector

        self.cfg, self.out, self.resume, self.progress, self.dist = cfg, out_dir, resume, progress, dist
        self.device = self._pick_device()
        seed_everything(cfg.seed)
        self.precision = setup_precision(cfg, self.device)
        self.fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.timer = TimeCollector(self.device, warmup_epochs=cfg.warmup_epochs)
        self.memory = MemoryCollector(self.device)
        self.staging: dict[str, Any] = {"staging_time_s": 0.0, "staging_bytes": 0}
        self._load_data()
        self.model = self._build_model()
        self.loss_fn = DDNetLoss(self.image_side)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=cfg.gamma)
        self.masks = None
        self.sparsity_kind = "none"
        self.sparsity_report: dict[str, Any] = {}
        self.switch_epoch: int | None = None
        self.start_epoch = 0
        self.auto = None
        if cfg.sparsity.kind != "none" and cfg.sparsity.dense_epochs == "auto":
            from ddnet.sparsity import AutoSwitch

            self.auto = AutoSwitch(patience=cfg.sparsity.auto_patience, max_epoch=cfg.epochs - 1)
        self.flops_dense = self._flops()
        self.params_dense = sum(p.numel() for p in self.model.parameters())
        self.ddp_model: nn.Module = self.model
        self.step = None

    # -------------------------------------------------------------- build
    def _pick_device(self) -> torch.device:
        name = resolve_device(self.cfg.device)
        if name == "cuda":
            # one GPU per replica on this node: under torchrun LOCAL_RANK, else the rank (one node)
            index = int(os.environ.get("LOCAL_RANK", self.dist.rank))
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        return torch.device("cpu")

    def _load_data(self) -> None:
        from ddnet.data import SliceDataset, load_split

        cfg, dist = self.cfg, self.dist
        # DoLL under DDP: only rank 0 reads the files; the others receive the tensors by broadcast
        read_here = dist.main or cfg.loader == "host"
        train = load_split(cfg.data, "train") if read_here else None
        self.read_files = read_here
        if dist.main:
            self.val = load_split(cfg.data, "val")
        if train is not None and len(train) < cfg.batch_size:
            raise UserError(
                f"the training set has {len(train)} slices, fewer than --batch-size {cfg.batch_size}; "
                "lower --batch-size or add data (--n-train)."
            )
        if cfg.loader == "device":
            lq_d, hq_d, self.staging = stage_on_device(
                train.lq if train is not None else None, train.hq if train is not None else None,
                self.device, cfg.channels_last, dist.rank, dist.world,
            )
            self.loader = DeviceLoader(lq_d, hq_d, cfg, dist.rank, dist.world)
            self.image_side = int(min(lq_d.shape[-2:]))
        else:
            self.loader = HostLoader(SliceDataset(train), cfg, self.device, dist.rank, dist.world)
            self.image_side = int(min(train.lq.shape[-2:]))

    def _build_model(self) -> nn.Module:
        model = DDNet(self.cfg.model)
        if self.cfg.init:
            from ddnet.convert import load_model_weights

            loaded, _info = load_model_weights(self.cfg.init, device="cpu")
            want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            got = {k: tuple(v.shape) for k, v in loaded.state_dict().items()}
            if want != got:
                first = next(k for k in want if want[k] != got.get(k))
                raise UserError(
                    f"--init {self.cfg.init} does not match the configured model: {first} is {got.get(first)} "
                    f"there but {want[first]} here; set --base-width to the checkpoint's width."
                )
            model = loaded
        return model.to(self.device, memory_format=self.fmt)

    def _flops(self) -> int | None:
        from ddnet.sparsity import count_flops

        try:
            return int(count_flops(self.model, self.image_side)["flops_fwd"])
        except Exception:  # FLOP counting is a record, never a reason to stop a run
            return None

    def _post_step(self):
        """What runs after every optimizer step: re-apply masks (pruned weights stay exactly zero)."""
        if self.masks is None:
            return lambda: None
        masks, model = self.masks, self.model
        return lambda: masks.apply_(model)

    def _build_step(self) -> float:
        """(Re)build the train step; returns capture time. Called at start and after pruning."""
        model = self.model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DDP(model, device_ids=ids)
        parts = StepParts(self.ddp_model, self.loss_fn, self.optimizer, self.precision, self.device,
                          self._post_step())
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
        from ddnet.sparsity import sparsify_

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
        state = {
            "format": CKPT_FORMAT,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "model_config": self.cfg.to_dict()["model"],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
            "masks": self.masks.state_dict() if self.masks is not None else None,
            "sparsity_kind": self.sparsity_kind,
            "sparsity_report": self.sparsity_report,
            "phase": phase,
            "switch_epoch": self.switch_epoch,
            "auto": self.auto.state_dict() if self.auto is not None else None,
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "normalisation": {"normalisation": self.cfg.data.normalisation,
                              "hu_window": list(self.cfg.data.hu_window)},
        }
        atomic_save(state, self.out / "ckpt.pt")

    def _restore(self) -> list[dict]:
        """Load ckpt.pt; drop epoch rows past it. Returns the kept rows."""
        from bench.store import read_jsonl, rewrite_jsonl
        from ddnet.sparsity import Masks, conform_to_state_dict_

        ck = torch.load(self.out / "ckpt.pt", map_location=self.device, weights_only=False)
        if ck.get("config") != self.cfg.to_dict():
            raise UserError(f"{self.out} holds a run of a different configuration; use a new --out folder.")
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
        if self.auto is not None and ck["auto"] is not None:
            self.auto.load_state_dict(ck["auto"])
        set_rng_state(ck["rng"])
        self.start_epoch = ck["epoch"]
        rows = [r for r in read_jsonl(self.out / "epochs.jsonl") if r["epoch"] <= self.start_epoch]
        if self.dist.main:
            rewrite_jsonl(self.out / "epochs.jsonl", rows)
        return rows

    # -------------------------------------------------------------- epochs
    def _phase(self, epoch: int) -> str:
        return "sparse" if self.switch_epoch is not None and epoch >= self.switch_epoch else "dense"

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        step, timer = self.step, self.timer
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        n = 0
        self.memory.epoch_begin()
        timer.epoch_begin(epoch)
        for lq, hq in self.loader.epoch(epoch):
            timer.batch_ready()
            loss_sum += step(lq, hq)  # stays on the device: no per-step host sync
            timer.step_end()
            n += 1
        rec = timer.epoch_end()  # the one sync of the epoch
        if self.dist.world > 1:
            import torch.distributed as dist

            dist.all_reduce(loss_sum)
            n *= self.dist.world
        rec["train_loss"] = float(loss_sum.item() / max(n, 1))
        rec.update(self.memory.epoch_end())
        rec["images_per_s"] = n * (self.cfg.batch_size // self.dist.world) / rec["time_s"] if rec["time_s"] else None
        return rec

    def fit(self) -> dict[str, Any]:
        from bench.store import append_jsonl

        cfg, out, main = self.cfg, self.out, self.dist.main
        rows: list[dict] = []
        if self.resume and (out / "ckpt.pt").exists():
            rows = self._restore()
        elif self.resume and main:
            # killed before the first checkpoint: any row written has no state to go with it
            from bench.store import rewrite_jsonl

            if (out / "epochs.jsonl").exists():
                rewrite_jsonl(out / "epochs.jsonl", [])
        if not rows and cfg.sparsity.kind != "none" and cfg.sparsity.dense_epochs == 0:
            self.switch_epoch = 0
        # --dense-epochs 0 prunes before the first step (the paper's Table 1 setting)
        pending_prune = self._prune() if self.switch_epoch == 0 and self.start_epoch == 0 else 0.0
        pending_capture = self._build_step()
        per_slice = None
        prev_loss = rows[-1]["train_loss"] if rows else None
        bar = _Progress(self.progress and main, cfg.epochs, self.start_epoch)
        with ExitStack() as stack:
            stack.enter_context(self.memory)
            live = stack.enter_context(bar)
            for epoch in range(self.start_epoch, cfg.epochs):
                phase = self._phase(epoch)
                lr = float(self.optimizer.param_groups[0]["lr"])
                rec = self._train_epoch(epoch)
                if cfg.fail_at_epoch is not None and epoch + 1 == cfg.fail_at_epoch:
                    rec["train_loss"] = float("nan")  # testing aid: an injected divergence
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
                                   cfg.batch_size, self.precision.autocast, self.device)
                    per_slice = val.pop("_per_slice")
                    row.update(val, val_time_s=time.perf_counter() - v0)
                    row["sparsity"] = self._measured_sparsity()
                    append_jsonl(out / "epochs.jsonl", row)
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
                live(epoch + 1, row)
                if main:
                    rows.append(row)
        self.copies = self._profile_copies() if cfg.profile_steps > 0 else None
        if self.copies is not None and main:
            from bench.store import write_json

            write_json(out / "copies.json", self.copies)
        return self._summary(rows, per_slice)

    def _measured_sparsity(self) -> float:
        """Counted zeros of prunable weights (masked), or the fraction of parameters removed (structural)."""
        from ddnet.sparsity import measure_sparsity

        if self.sparsity_kind == "structural":
            return 1.0 - sum(p.numel() for p in self.model.parameters()) / self.params_dense
        return float(measure_sparsity(self.model)["overall"])

    def _profile_copies(self) -> dict[str, Any]:
        """The dedicated data-movement window, after the timed epochs (never inside them)."""
        from bench.collectors import profile_copies

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
        result = profile_copies(run_steps, self.cfg.profile_steps, self.out if self.dist.main else None,
                                self.device)
        with torch.no_grad():  # the profiled steps must not change the exported weights
            for k, v in self.model.state_dict().items():
                v.copy_(snap[k])
        return result

    def _summary(self, rows: list[dict], per_slice) -> dict[str, Any]:
        from ddnet.sparsity import measure_sparsity

        sp = measure_sparsity(self.model)
        last = rows[-1] if rows else {}
        train_time = sum(r["time_s"] for r in rows)
        capture = sum(r.get("capture_time_s", 0.0) for r in rows)
        prune = sum(r.get("prune_time_s", 0.0) for r in rows)
        summary = {
            "status": "ok",
            "error": None,
            "epochs_completed": len(rows),
            "train_time_s": train_time,
            "capture_time_s": capture,
            "prune_time_s": prune,
            **self.staging,
            "total_time_s": train_time + capture + prune + self.staging["staging_time_s"],
            "params": sp["params"],
            "effective_params": sp["effective_params"],
            "flops_fwd_per_image_before_pruning": self.flops_dense,
            "flops_fwd_per_image": self._flops(),
            "sparsity": {
                "overall": sp["overall"], "kind": self.sparsity_kind, "per_layer": sp["per_layer"],
                "requested_amount": self.cfg.sparsity.amount if self.cfg.sparsity.kind != "none" else 0.0,
                "pattern": self.cfg.sparsity.pattern, "report": self.sparsity_report,
            },
            "switch_epoch": self.switch_epoch,
            "switch_rule": self.auto.rule if self.auto is not None else None,
            "final_val_ms_ssim": last.get("val_ms_ssim"),
            "final_val_ms_ssim_std": last.get("val_ms_ssim_std"),
            "final_val_psnr": last.get("val_psnr"),
            "final_val_rmse_hu": last.get("val_rmse_hu"),
            "msssim_setting": self.loss_fn.setting.to_dict(),
            "device": str(self.device),
            "precision_flags": self.precision.flags,
            "copies": self.copies,
            "memory": self.memory.summary(),
            "world_size": self.dist.world,
        }
        if per_slice is not None:
            names = self.val.names
            m, p, r = per_slice
            summary["val_slices"] = [
                {"name": n, "ms_ssim": a, "psnr": b, "rmse_hu": c} for n, a, b, c in zip(names, m, p, r, strict=True)
            ]
        return summary


class _Progress:
    """A rich progress bar over epochs with the live loss and MS-SSIM (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self):
        if not self.enabled:
            return lambda epoch, row: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.fields[info]}"))
        self.bar.__enter__()
        task = self.bar.add_task("epochs", total=self.total, completed=self.done, info="")

        def update(epoch: int, row: dict) -> None:
            info = f"loss {row['train_loss']:.4g}"
            if "val_ms_ssim" in row:
                info += f"  MS-SSIM {row['val_ms_ssim']:.2f}%  {row['time_s']:.2f}s"
            self.bar.update(task, completed=epoch, info=info)

        return update

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


# ----------------------------------------------------------------- entry points


def prepare_out_dir(out_dir: Path, cfg: TrainConfig, resume: bool) -> None:
    """Refuse to overwrite a finished run or silently restart an unfinished one."""
    from bench.store import read_json

    summary = out_dir / "summary.json"
    if summary.exists() and read_json(summary).get("status") == "ok":
        raise UserError(f"{out_dir} already holds a finished run; choose a new --out folder.")
    has_epochs = (out_dir / "epochs.jsonl").exists() and (out_dir / "epochs.jsonl").stat().st_size > 0
    if has_epochs and not resume:
        raise UserError(f"{out_dir} already holds epochs of an unfinished run; add --resume to continue it.")
    if resume and (out_dir / "config.json").exists():
        old = read_json(out_dir / "config.json")
        if old != cfg.to_dict():
            raise UserError(f"{out_dir} holds a run of a different configuration; use a new --out folder.")


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
          dist: Dist | None = None) -> dict[str, Any]:
    """Train one configuration into `out_dir`; returns the summary (also written to summary.json).

    Raises UserError before anything is written when the configuration cannot
    run here; raises TrainingFailed (after writing a 'failed' summary) when
    training itself fails.
    """
    from bench.collectors import environment
    from bench.store import write_json

    dist = dist or Dist()
    out = Path(out_dir)
    check_runnable(cfg)
    refusal = None
    if dist.main:
        try:
            prepare_out_dir(out, cfg, resume)
        except UserError as e:
            refusal = str(e)
    if dist.world > 1:
        # rank 0 alone judges the folder; every rank must learn its verdict, or the others would
        # wait forever in the first collective while rank 0 has already left
        refusal = _from_main(refusal)
    if refusal is not None:
        raise UserError(refusal)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    run = Run(cfg, out, resume, progress, dist)  # data/model errors surface here, before any file
    if dist.main:
        write_json(out / "config.json", cfg.to_dict())
        write_json(out / "env.json", {**environment(run.precision.flags), "device": str(run.device),
                                      "world_size": dist.world})
        write_json(out / "summary.json", {"status": "running", "error": None})
    try:
        summary = run.fit()
        if dist.world > 1:
            summary.update(_ddp_records(run))
    except UserError:
        raise
    except Exception as e:  # NaN/inf loss, CUDA OOM, any crash: recorded, then reported as a failed run
        if dist.main:
            from bench.store import read_jsonl

            rows = read_jsonl(out / "epochs.jsonl")
            write_json(out / "summary.json", {
                "status": "failed", "error": f"{type(e).__name__}: {e}", "epochs_completed": len(rows),
                "traceback": traceback.format_exc(limit=8),
            })
        raise TrainingFailed(f"{type(e).__name__}: {e}") from e
    if dist.main:
        atomic_save({"format": WEIGHTS_FORMAT, "model": run.model.state_dict(),
                     "model_config": cfg.to_dict()["model"],
                     "normalisation": {"normalisation": cfg.data.normalisation,
                                       "hu_window": list(cfg.data.hu_window)},
                     "epoch": summary["epochs_completed"]},
                    out / "weights.pt")
        write_json(out / "summary.json", summary)
    return summary


def _from_main(value: Any) -> Any:
    """Rank 0's `value`, on every rank (a pickled broadcast over the process group)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _ddp_records(run: Run) -> dict[str, Any]:
    """Facts about the replicas, gathered to rank 0: who read files, shards, final weights' checksum."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().double().flatten().cpu() for p in run.model.parameters()])
    mine = {
        "rank": run.dist.rank,
        "read_files": run.read_files,
        "weights_checksum": float(flat.sum().item()),
        "weights_abs_checksum": float(flat.abs().sum().item()),
        "epoch0_indices": run.loader.indices(0),
    }
    gathered: list[Any] = [None] * run.dist.world
    dist.all_gather_object(gathered, mine)
    return {"ddp_ranks": gathered}
