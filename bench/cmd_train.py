"""`bench train`: one training run into one folder.

Every option maps onto a field of `ddnet.config.TrainConfig`. `--config
FILE.json` loads a whole config (what `bench run` writes per cell); options
given explicitly on the command line override it. `--nproc N` starts N
replicas (DistributedDataParallel; NCCL on GPUs, gloo on CPUs); under
`torchrun` the replicas come from its environment instead.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import typer

from ddnet.config import ConfigError, TrainConfig, check_static
from ddnet.errors import UserError

EXIT_FAILED = 3  # training itself failed (NaN loss, OOM, crash); the folder records why


def _dense_epochs(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--dense-epochs {value!r} must be an integer or 'auto'.") from None


def build_config(config: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """TrainConfig from an optional JSON file plus the options that were given (None = not given)."""
    cfg = TrainConfig()
    if config is not None:
        if not config.is_file():
            raise UserError(f"--config {config} does not exist; pass a JSON file written by `bench run` or "
                            "TrainConfig.to_dict().")
        try:
            cfg = TrainConfig.from_dict(json.loads(config.read_text()))
        except json.JSONDecodeError as e:
            raise UserError(f"--config {config} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    given = {k: v for k, v in overrides.items() if v is not None}
    if given:
        cfg = cfg.replace(**given)
    check_static(cfg)
    return cfg


def train_cmd(
    out: Path = typer.Option(..., "--out", help="Run folder to write (config.json, env.json, epochs.jsonl, ...)."),
    config: Path | None = typer.Option(None, "--config", help="JSON TrainConfig to start from."),
    precision: str | None = typer.Option(None, help="fp32 | tf32 | amp-fp16 | amp-bf16  [default: fp32]"),
    loader: str | None = typer.Option(None, help="host (DataLoader) | device (DoLL)  [default: host]"),
    graphs: str | None = typer.Option(None, help="off | cuda-graph | compile  [default: off]"),
    channels_last: bool | None = typer.Option(None, "--channels-last/--no-channels-last",
                                              help="channels_last memory format."),
    sparsity: str | None = typer.Option(None, help="none | random | structured | topk  [default: none]"),
    amount: float | None = typer.Option(None, help="Fraction pruned  [default: 0.5]"),
    pattern: str | None = typer.Option(None, help="unstructured | 2:4  [default: unstructured]"),
    scope: str | None = typer.Option(None, help="topk: layer | global  [default: layer]"),
    dense_epochs: str | None = typer.Option(None, help="Dense epochs before pruning, or 'auto'  [default: 0]"),
    epochs: int | None = typer.Option(None, help="Total epochs  [default: 50]"),
    batch_size: int | None = typer.Option(None, help="Global batch size  [default: 32]"),
    lr: float | None = typer.Option(None, help="Adam learning rate  [default: 1e-4]"),
    data: str | None = typer.Option(None, help="'synthetic' or a folder with {train,val,test}/{HQ,LQ}/"),
    image_size: int | None = typer.Option(None, help="Synthetic slice side, divisible by 16  [default: 128]"),
    n_train: int | None = typer.Option(None, help="Synthetic training slices  [default: 64]"),
    n_val: int | None = typer.Option(None, help="Synthetic validation slices  [default: 16]"),
    synth_mode: str | None = typer.Option(None, help="Synthetic low-dose model: fast | physics  [default: fast]"),
    normalisation: str | None = typer.Option(None, help="window | minmax  [default: window]"),
    base_width: int | None = typer.Option(None, help="DDNet base width  [default: 16, the paper's]"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda  [default: auto]"),
    seed: int | None = typer.Option(None, help="Seed of weights, shuffling and pruning  [default: 0]"),
    nproc: int | None = typer.Option(None, help="Replicas (DDP)  [default: 1]"),
    num_workers: int | None = typer.Option(None, help="DataLoader workers (host loader)  [default: 2]"),
    profile_steps: int | None = typer.Option(None, help="Steps of the profiled data-movement window  [default: 0]"),
    init: str | None = typer.Option(None, "--init", help="Start from this checkpoint (ours or the original layout)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an unfinished run in --out from its checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train DDNet once and write the run folder."""
    overrides = {
        "precision": precision, "loader": loader, "graphs": graphs, "channels_last": channels_last,
        "sparsity.kind": sparsity, "sparsity.amount": amount, "sparsity.pattern": pattern,
        "sparsity.scope": scope, "sparsity.dense_epochs": _dense_epochs(dense_epochs),
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "data.source": data,
        "data.image_size": image_size, "data.n_train": n_train, "data.n_val": n_val,
        "data.synth_mode": synth_mode, "data.normalisation": normalisation, "model.base_width": base_width,
        "device": device, "seed": seed, "nproc": nproc, "num_workers": num_workers,
        "profile_steps": profile_steps, "init": init,
    }
    cfg = build_config(config, overrides)
    if cfg.init is not None and not Path(cfg.init).is_file():
        raise UserError(f"--init {cfg.init} does not exist; pass a checkpoint file (ckpt.pt, weights.pt or "
                        "an original DDNet state dict).")
    run_training(cfg, out, resume=resume, progress=not quiet)


def run_training(cfg: TrainConfig, out: Path, resume: bool = False, progress: bool = True) -> None:
    """Run in this process, under torchrun, or spawn `cfg.nproc` replicas; exit 3 if training failed."""
    from ddnet.config import check_runnable
    from ddnet.trainer import Dist, TrainingFailed, train

    check_runnable(cfg)  # refuse before spawning anything
    try:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
            _torchrun_worker(cfg, out, resume, progress)
        elif cfg.nproc > 1:
            _spawn(cfg, out, resume, progress)
        else:
            summary = train(cfg, out, resume=resume, progress=progress, dist=Dist())
            _print_summary(summary, out)
    except TrainingFailed as e:
        typer.echo(f"error: training failed: {e} (recorded in {out / 'summary.json'})", err=True)
        sys.exit(EXIT_FAILED)


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    ms = summary.get("final_val_ms_ssim")
    ms_txt = f"{ms:.2f} +/- {summary['final_val_ms_ssim_std']:.2f} %" if ms is not None else "n/a"
    typer.echo(
        f"done: {summary['epochs_completed']} epochs in {summary['total_time_s']:.1f} s, "
        f"val MS-SSIM {ms_txt}, sparsity {summary['sparsity']['overall']:.3f} ({summary['sparsity']['kind']}) "
        f"-> {out}"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(rank: int, world: int, cuda: bool) -> None:
    import torch
    import torch.distributed as dist

    if not cuda:
        # replicas share the cores: without this each would start one thread per core
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    else:
        # before the first collective: NCCL's object broadcasts run on the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)


def _leave_group() -> None:
    """Leave the process group together: a rank that tears gloo down while rank 0 still writes the
    run folder can abort at exit ("terminate called without an active exception")."""
    import torch.distributed as dist

    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _replica(cfg: TrainConfig, out: Path, resume: bool, progress: bool, rank: int, world: int) -> None:
    """One DDP replica: join the group, train, leave together. Only rank 0 prints and writes."""
    from ddnet.config import resolve_device
    from ddnet.trainer import Dist, train

    _init_group(rank, world, resolve_device(cfg.device) == "cuda")
    try:
        summary = train(cfg, out, resume=resume, progress=progress and rank == 0, dist=Dist(rank, world))
        if rank == 0:
            _print_summary(summary, out)
    finally:
        _leave_group()


def _worker(rank: int, cfg_dict: dict, out: str, resume: bool, progress: bool, port: int) -> None:
    """Entry point of a replica started by `--nproc N` (torch.multiprocessing spawn)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = TrainConfig.from_dict(cfg_dict)
    _replica(cfg, Path(out), resume, progress, rank, cfg.nproc)


def _spawn(cfg: TrainConfig, out: Path, resume: bool, progress: bool) -> None:
    import torch.multiprocessing as mp

    from ddnet.trainer import TrainingFailed

    try:
        mp.start_processes(_worker, args=(cfg.to_dict(), str(out), resume, progress, _free_port()),
                           nprocs=cfg.nproc, start_method="spawn")
    except mp.ProcessRaisedException as e:
        first = str(e).strip().splitlines()[-1]
        if "UserError" in first or "ConfigError" in first or "DataError" in first:
            raise UserError(first.split(":", 1)[-1].strip()) from None
        raise TrainingFailed(first) from None
    except mp.ProcessExitedException as e:  # a replica died from a signal (OOM killer, abort)
        raise TrainingFailed(str(e).strip().splitlines()[-1]) from None


def _torchrun_worker(cfg: TrainConfig, out: Path, resume: bool, progress: bool) -> None:
    """A replica started by torchrun: rank and world size come from its environment."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _replica(cfg.replace(nproc=world), out, resume, progress, rank, world)
