"""`bench train`: one training run into one folder.

Every option is generated from a field of `ddnet.config.TrainConfig` (flag,
type, help from the field's docstring, choices from its `Literal`, default and
unit): a new toggle is a new field there and appears here by itself. `--config
FILE.json` loads a whole config (what `bench run` writes per cell); options
given explicitly on the command line override it. `--nproc N` starts N
replicas on this node (DistributedDataParallel; NCCL on GPUs, gloo on CPUs);
under `torchrun` the replicas come from its environment instead, on one node
or several: each replica drives the GPU of its local rank, global rank 0 alone
writes the run folder (so --out must be writable where rank 0 lands; every
rank reads it only to --resume), and a refusal or failure on any rank ends
every rank (a refusal is shared over the group; a crash drops the group, and a
peer stuck in a collective gives up after DDNET_BENCH_DIST_TIMEOUT_S).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import json
import os
import socket
import sys
import time
import traceback
import typing
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import typer

from bench import signals
from bench.cell_log import EXIT_NO_SPACE, EXIT_PEER_LOST, PLANNED_DEVICE_ENV, DeviceGone
from bench.store import read_jsonl
from bench.training import train
from ddnet.config import (
    ConfigError,
    TrainConfig,
    absolute_source,
    check_runnable,
    resolve_device,
    warn_synthetic_only,
)
from ddnet.config_fields import ConfigField, config_fields
from ddnet.errors import UserError, out_of_space
from ddnet.replicas import PeerLost
from ddnet.trainer import Dist, TrainingFailed

DIST_TIMEOUT_S = 600
"""Longest any collective may wait for the other replicas (seconds); DIST_TIMEOUT_ENV overrides it."""
DIST_TIMEOUT_ENV = "DDNET_BENCH_DIST_TIMEOUT_S"
EXIT_FAILED = 3  # training itself failed (NaN loss, OOM, crash); the folder records why


def _option(field: ConfigField) -> tuple[inspect.Parameter, Any]:
    """A typer option for one config field: its flag, type, help with choices, unit and default."""
    name = field.param
    help_text = field.doc
    if field.choices and typing.get_origin(field.type) is typing.Literal:
        help_text += f" One of: {', '.join(field.choices)}."
    elif field.choices:  # int or 'auto'
        help_text += f" An integer or {', '.join(field.choices)}."
    default = "none" if field.default is None else field.default
    unit = f" {field.unit}" if field.unit else ""
    help_text += f"  \\[default: {default}{unit}]"  # escaped: typer's rich help would read [..] as markup
    if field.type is bool:
        decl = (f"{field.flag}/--no-{field.flag[2:]}",)
        typ: Any = bool | None
    else:
        decl = (field.flag,)
        typ = {int: int, float: float}.get(field.type, str) | None
    opt = typer.Option(None, *decl, help=help_text, show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=typ), typ


def _convert(field: ConfigField, value: Any) -> Any:
    """Command-line text to the field's value where typer cannot do it (int or 'auto')."""
    if field.choices and value not in field.choices and int in typing.get_args(field.type):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{field.flag} {value!r} must be an integer or one of "
                              f"{', '.join(field.choices)}.") from None
    return value


FIELDS = config_fields()

PRESETS: dict[str, dict[str, Any]] = {
    # The combination that measured fastest: results/gpu/h200-2026-11-26 (one NVIDIA H200, 512 px, batch 32,
    # gpu_quick grid): amp-fp16 150.5 images/s, 1.51x [1.48, 1.54] the fp32 baseline's 99.8; the next were
    # amp-fp16 + cuda-graph (1.49x) and amp-bf16 + DoLL + cuda-graph (1.47x, measured on a second H200).
    # The fast-path toggles added since (cudnn_benchmark, fused Adam, channels_last, compile modes) have not
    # been measured on a GPU yet; the `speed` grid will decide whether they join.
    "fastest": {"precision": "amp-fp16"},
}
"""Named sets of options (`--preset NAME`), each resting on a committed measurement."""


def build_config(config: Path | None, overrides: dict[str, Any], run: bool = False) -> TrainConfig:
    """TrainConfig from an optional JSON file plus the options that were given (None = not given).

    `run`: the file is a run folder's own config.json, read by `--resume` alone (messages say so)."""
    cfg = TrainConfig()
    if config is not None:
        if not config.is_file():
            raise UserError(f"--config {config} does not exist; pass a JSON file written by `bench run` or "
                            "TrainConfig.to_dict().")
        named = f"{config}, the run's config that --resume reads," if run else f"--config {config}"
        fix = "; restore it, or start the run again in a new --out folder." if run else "."
        try:
            cfg = TrainConfig.from_dict(json.loads(config.read_text()))
        except json.JSONDecodeError as e:
            raise UserError(f"{named} is not valid JSON ({e.msg} at line {e.lineno}){fix}") from None
        except UnicodeDecodeError:  # binary garbage: bytes that are not UTF-8
            raise UserError(f"{named} is not a JSON text file (its bytes are not UTF-8){fix}") from None
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = cfg.replace(**given) if given else cfg
    return absolute_data(cfg)


def absolute_data(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its data folder `absolute_source`: the run folder's config.json must name the same data from
    wherever it is read (--resume, `bench eval`, the report)."""
    full = absolute_source(cfg.data.source)
    return cfg if full == cfg.data.source else cfg.replace(**{"data.source": full})


def config_from_options(options: dict[str, Any]) -> TrainConfig:
    """The TrainConfig that `--config`, `--preset` and the field options describe (None = not given)."""
    by_name = {f.param: f for f in FIELDS}
    overrides = {by_name[k].path: _convert(by_name[k], v) for k, v in options.items()
                 if k in by_name and v is not None}
    preset = options["preset"]
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"--preset {preset!r} is not one of {', '.join(PRESETS)}.")
        overrides = {**PRESETS[preset], **overrides}  # options given explicitly beat the preset
        if resolve_device(options.get("device") or "auto") != "cuda":
            raise UserError(f"--preset {preset} was measured on a GPU and needs CUDA (it sets "
                            f"{PRESETS[preset]}); drop --preset on a CPU.")
    cfg = build_config(options["config"], overrides, run=bool(options.get("from_run")))
    _check_given(cfg, [f for f in FIELDS if options.get(f.param) is not None])
    return cfg


_PRUNING_ONLY = ("sparsity.amount", "sparsity.pattern", "sparsity.scope", "sparsity.dense_epochs",
                 "sparsity.auto_patience")
"""Fields that only shape pruning: given on the command line with --sparsity none, they would do nothing."""
_SYNTHETIC_ONLY = ("data.image_size", "data.n_train", "data.n_val", "data.synth_mode", "data.dose", "data.phantom",
                   "data.data_seed")
"""Fields that only shape synthetic data: given with --data DIR, they would do nothing."""


def _check_given(cfg: TrainConfig, given: list[ConfigField]) -> None:
    """Refuse options given explicitly that this run would ignore; warn of a run that times no epoch."""
    idle = [f.flag for f in given if f.path in _PRUNING_ONLY]
    if cfg.sparsity.kind == "none" and idle:
        raise UserError(f"{', '.join(idle)} shape{'s' if len(idle) == 1 else ''} pruning, which --sparsity none "
                        "does not do; add --sparsity random, structured or topk, or drop "
                        f"{'it' if len(idle) == 1 else 'them'}.")
    warn_synthetic_only([f.flag for f in given if f.path in _SYNTHETIC_ONLY], cfg.data.source)
    if 1 < cfg.epochs <= cfg.warmup_epochs:
        warnings.warn(f"--warmup-epochs {cfg.warmup_epochs} marks all {cfg.epochs} epochs as warm-up, so none "
                      "is timed at steady state and the report gives this run no time per epoch; use "
                      f"--warmup-epochs below {cfg.epochs}.", UserWarning, stacklevel=2)


def train_cmd(**options: Any) -> None:
    """Train DDNet once and write the run folder."""
    saved = Path(options["out"]) / "config.json"
    by_name = {f.param for f in FIELDS}
    alone = all(options.get(k) is None for k in by_name)
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1  # a rank that cannot see the folder: build alike
    if options["resume"] and options["config"] is None and options["preset"] is None and (alone or not torchrun):
        if saved.is_file():  # the run as configured; options given beside it override, so a refusal names them
            options = {**options, "config": saved, "from_run": True}
        elif alone:  # else the defaults (50 epochs of 128 px) would train in the run's place
            raise UserError(f"--resume alone reads {saved}, which does not exist: {_no_config(saved.parent)}.")
    cfg = config_from_options(options)
    if cfg.init is not None and not Path(cfg.init).is_file():
        raise UserError(_init_missing(Path(cfg.init)))
    run_training(cfg, options["out"], resume=options["resume"], progress=not options["quiet"])


def _init_missing(init: Path) -> str:
    """Why `--init` names no file, and which to pass: a folder's own weights.pt or ckpt.pt when it has one."""
    if not init.is_dir():
        return (f"--init {init} does not exist; pass a checkpoint file (ckpt.pt, weights.pt or an original DDNet "
                "state dict).")
    held = [init / name for name in ("weights.pt", "ckpt.pt") if (init / name).is_file()]
    if held:
        return f"--init {init} is a folder; pass the checkpoint file in it, e.g. --init {held[0]}."
    return (f"--init {init} is a folder that holds no weights.pt or ckpt.pt; pass a checkpoint file (ckpt.pt, "
            "weights.pt or an original DDNet state dict).")


def _no_config(out: Path) -> str:
    """Why a folder given to `--resume` alone has no config.json, as far as the folder tells, and the fix."""
    if not out.is_dir():
        return (f"{out} is a file; pass the run's folder" if out.exists() else
                "no such folder, so nothing to resume; pass the run's folder, or drop --resume to start a run")
    if any((out / name).exists() for name in ("ckpt.pt", "epochs.jsonl", "summary.json")):
        return "the folder holds a run's other records; restore it, or give the run's options beside --resume"
    return ("the run was stopped before it wrote its records, so nothing trained yet; run the command that "
            "started it again, without --resume")


def config_parameters() -> list[inspect.Parameter]:
    """`--config`, `--preset` and one option per config field: what `config_from_options` reads."""
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("config", kw, annotation=Path | None, default=typer.Option(
            None, "--config", help="JSON TrainConfig to start from; options given here override it.")),
        inspect.Parameter("preset", kw, annotation=str | None, default=typer.Option(
            None, "--preset", help=f"Named options resting on a measurement ({', '.join(PRESETS)}; see README); "
                                   "options given explicitly override it.")),
    ]
    return params + [_option(field)[0] for field in FIELDS]


def _signature() -> tuple[inspect.Signature, dict[str, Any]]:
    """train_cmd's parameters: the run folder and run options, then one option per config field."""
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("out", kw, annotation=Path, default=typer.Option(
        ..., "--out", help="Run folder to write (config.json, env.json, epochs.jsonl, summary.json, ...).")),
        *config_parameters()]
    for name, flag_, text in (("resume", "--resume", "Continue an unfinished run in --out from its checkpoint."),
                              ("quiet", "--quiet", "No progress bar.")):
        params.append(inspect.Parameter(name, kw, annotation=bool, default=typer.Option(False, flag_, help=text)))
    return inspect.Signature(params), {p.name: p.annotation for p in params} | {"return": None}


train_cmd.__signature__, train_cmd.__annotations__ = _signature()  # type: ignore[attr-defined]


def run_training(cfg: TrainConfig, out: Path, resume: bool = False, progress: bool = True) -> None:
    """Run in this process, under torchrun, or spawn `cfg.nproc` replicas; exit 3 if training failed."""
    if os.environ.get(PLANNED_DEVICE_ENV) == "cuda" and cfg.device != "cpu" and not torch.cuda.is_available():
        # a grid cell planned on a GPU that is gone: never fall back to the CPU (hours a cell, another machine)
        raise DeviceGone("this cell's grid was planned on a CUDA device but none is visible now (the GPU failed "
                         "or was taken away); check it (nvidia-smi), then run the same command again.")
    check_runnable(cfg)  # refuse before spawning anything
    if not ("RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1):
        _run_training(cfg, out, resume, progress, None)
        return
    try:  # a torchrun replica: whatever the outcome, leave without the interpreter's finalization
        _run_training(cfg, out, resume, progress, Dist.from_torchrun())
    except SystemExit as e:
        _hard_exit(e.code if isinstance(e.code, int) else 1)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        _hard_exit(2)
    except BaseException:
        traceback.print_exc()
        _hard_exit(1)
    _hard_exit(0)


FAIL_LINGER_S = 3.0
"""How long a failed torchrun replica waits before it exits (see `_hard_exit`)."""


def _hard_exit(code: int) -> None:
    """End a torchrun replica now: gloo's worker threads can still hold tensors when the interpreter
    finalizes and abort the process ("terminate called without an active exception", SIGABRT), which
    torchrun would report instead of our exit code (seen on two-node CPU runs, after success and failure).

    A failing replica lingers `FAIL_LINGER_S` first: its agent stops every other replica (SIGTERM) as soon as
    it exits, and global rank 0 needs a moment to see the broken collective and record the failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code != 0:
        time.sleep(FAIL_LINGER_S)
    os._exit(code)


def _run_training(cfg: TrainConfig, out: Path, resume: bool, progress: bool, me: Dist | None) -> None:
    """Train here (`me` None), as the torchrun replica `me`, or spawn `cfg.nproc` replicas; exit 3 on failure."""
    where = f"recorded in {out / 'summary.json'}"
    try:
        if me is not None:
            if cfg.graphs != "off":  # check_runnable saw this node's --nproc; the world is what DDP forbids
                raise UserError(f"--graphs {cfg.graphs} with {me.world} replicas (torchrun) is not supported; "
                                "use --graphs off under DDP.")
            if not me.main:  # this replica records nothing: global rank 0 writes the folder, wherever it runs
                where = f"rank {me.rank} on {me.host}; global rank 0 records the run in {out}"
            _replica(cfg.replace(nproc=me.world), out, resume, progress, me)
        elif cfg.nproc > 1:
            with signals.sigterm_unwinds():
                _spawn(cfg, out, resume, progress)
        else:
            with signals.sigterm_unwinds():
                summary = train(cfg, out, resume=resume, progress=progress, dist=Dist(), launched=True)
            _print_summary(summary, out)
    except KeyboardInterrupt as e:  # typer turns it into exit status 130, silently
        how = signals.stopped_how(e)
        if (out / "ckpt.pt").exists() or read_jsonl(out / "epochs.jsonl"):
            typer.echo(f"{how}: {out} stays resumable; run the same command with --resume to continue from "
                       "its last checkpoint.", err=True)
        else:  # before the first checkpoint: nothing to resume, and the plain command starts it again
            typer.echo(f"{how} before the first checkpoint of {out}: nothing trained is kept; run the same "
                       "command again to start it.", err=True)
        signals.end_like(e)
        raise
    except PeerLost as e:  # a node lost, the network cut: not the run's failure
        typer.echo(f"error: {e}; nothing is recorded as failed: run the same command with --resume to continue "
                   "from the last checkpoint.", err=True)
        sys.exit(EXIT_PEER_LOST)
    except TrainingFailed as e:
        typer.echo(f"error: training failed: {e} ({where})", err=True)
        sys.exit(EXIT_FAILED)
    except OSError as e:  # a full disk, a folder turned read-only: one line, never a traceback
        where = e.filename or out
        if not out.is_dir():  # moved or deleted under the run: nothing is recorded there, nor as failed
            typer.echo(f"error: {out} was moved or deleted while the run wrote into it ({e.strerror or e}); "
                       "nothing is recorded as failed: if you moved it, continue with `bench train --out "
                       "<its new place> --resume`.", err=True)
            sys.exit(EXIT_FAILED)
        if out_of_space(e):  # nothing recorded as failed: the run resumes from its last checkpoint
            typer.echo(f"error: cannot write {where} (the disk is full: {e.strerror or e}); free some space, "
                       f"then run the same command with --resume to continue from the last checkpoint.", err=True)
            sys.exit(EXIT_NO_SPACE)
        typer.echo(f"error: cannot write {where} ({e.strerror or e}); free some space or choose a writable "
                   f"--out, then add --resume to continue.", err=True)
        sys.exit(EXIT_FAILED)


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    ms = summary.get("final_val_ms_ssim")
    ms_txt = f"{ms:.2f} +/- {summary['final_val_ms_ssim_std']:.2f} %" if ms is not None else "n/a"
    if summary.get("input_ms_ssim") is not None:  # a denoiser must beat its input
        ms_txt += f" (input {summary['input_ms_ssim']:.2f} %)"
    typer.echo(
        f"done: {summary['epochs_completed']} epoch{'' if summary['epochs_completed'] == 1 else 's'} in {summary['total_time_s']:.1f} s, "
        f"val MS-SSIM {ms_txt}, {_sparsity_text(summary['sparsity'])} -> {out}"
    )


def _sparsity_text(sp: dict[str, Any]) -> str:
    """'dense', 'sparsity 0.500 (masked)' (zeros counted), or, where the layers were shrunk and hold no zeros,
    'structural: 49.5 % of parameters removed (476,379 -> 240,563)'."""
    report = sp.get("report") if isinstance(sp.get("report"), dict) else {}
    before, after = report.get("params_before"), report.get("params_after")
    if sp.get("kind") == "structural" and isinstance(before, int) and isinstance(after, int) and before > 0:
        return f"structural: {100 * (before - after) / before:.1f} % of parameters removed ({before:,} -> {after:,})"
    if sp.get("kind") == "none":
        return "dense"
    return f"sparsity {sp['overall']:.3f} ({sp['kind']})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_threads(local_world: int) -> int | None:
    """Threads for each of a node's `local_world` CPU replicas: the CPUs this process may run on (its affinity
    mask: what Slurm, a cgroup cpuset or taskset gives it, not the whole machine's count) shared between them.
    None when OMP_NUM_THREADS is set (torchrun sets 1 when it starts several replicas per node): that stands."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - no sched_getaffinity (macOS)
        cpus = os.cpu_count() or 1
    return max(1, cpus // local_world)


def _init_group(me: Dist, cuda: bool) -> None:
    if not cuda:
        if (threads := replica_threads(me.local_world)) is not None:
            torch.set_num_threads(threads)  # without it each replica would start one thread per core
    else:
        if me.local_rank >= torch.cuda.device_count():
            raise UserError(f"rank {me.rank} on {me.host} is local rank {me.local_rank} but this node has "
                            f"{torch.cuda.device_count()} GPU(s); start at most that many replicas per node "
                            "(--nproc-per-node, --nproc).")
        # before the first collective: NCCL's object broadcasts run on the current device
        torch.cuda.set_device(me.local_rank)
    # a replica that dies or hangs must not leave the others waiting forever in a collective
    timeout = datetime.timedelta(seconds=float(os.environ.get(DIST_TIMEOUT_ENV, DIST_TIMEOUT_S)))
    dist.init_process_group("nccl" if cuda else "gloo", rank=me.rank, world_size=me.world, timeout=timeout)


def _leave_group() -> None:
    """Leave the process group together: a rank that tears gloo down while rank 0 still writes the
    run folder can abort at exit ("terminate called without an active exception")."""
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _drop_group() -> None:
    """Leave the process group alone, at once: after a failure of this rank's own, the others may sit in a
    collective it will never join, so a barrier would only wait for the timeout. Closing our end makes
    their collectives fail now (gloo sees the connection close; NCCL at the latest at its timeout)."""
    with contextlib.suppress(Exception):  # the original failure is the one to report
        dist.destroy_process_group()


def _replica(cfg: TrainConfig, out: Path, resume: bool, progress: bool, me: Dist) -> None:
    """One DDP replica: join the group, train, leave. Only global rank 0 prints and writes."""
    if not me.main:  # the same config and data on every rank: rank 0 says it once
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(ddnet|bench)\.")
    _init_group(me, resolve_device(cfg.device) == "cuda")
    try:
        summary = train(cfg, out, resume=resume, progress=progress and me.main, dist=me, launched=True)
    except UserError:
        # under DDP a UserError is every rank's at once (ddnet.trainer.train): leave together, and let
        # nothing that goes wrong on the way out hide the refusal
        with contextlib.suppress(Exception):
            _leave_group()
        raise
    except BaseException:
        _drop_group()
        raise
    _leave_group()
    if me.main:
        _print_summary(summary, out)


def _worker(rank: int, cfg_dict: dict, out: str, resume: bool, progress: bool, port: int, parent: int) -> None:
    """Entry point of a replica started by `--nproc N` (torch.multiprocessing spawn)."""
    from bench.cli import one_line_warnings  # noqa: PLC0415 - a spawned process starts without the CLI's setup

    signals.die_with_parent(parent)
    one_line_warnings()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = TrainConfig.from_dict(cfg_dict)
    _replica(cfg, Path(out), resume, progress, Dist(rank, cfg.nproc))  # one node: local rank = rank
    # done: leave before the interpreter finalizes, as a torchrun replica does (`_hard_exit`); gloo's threads
    # can abort a finishing process, which the spawner reports as a replica killed by SIGABRT (seen in CI).
    # A failure needs no such exit: the spawner reads the exception from the file it wrote first.
    _hard_exit(0)


REPLICA_STOP_S = 10.0  # how long replicas get to end by themselves after a Ctrl-C (the terminal's reaches them)


def _spawn(cfg: TrainConfig, out: Path, resume: bool, progress: bool) -> None:
    try:
        ctx = mp.start_processes(_worker, args=(cfg.to_dict(), str(out), resume, progress, _free_port(),
                                                os.getpid()), nprocs=cfg.nproc, start_method="spawn", join=False)
        try:
            while not ctx.join():
                pass
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM to this process alone: the replicas stop with it
            signals.stop_processes(ctx.processes, 0.0 if isinstance(e, signals.Terminated) else REPLICA_STOP_S)
            raise
    except mp.ProcessRaisedException as e:
        first = str(e).strip().splitlines()[-1]
        if "UserError" in first or "ConfigError" in first or "DataError" in first:
            raise UserError(first.split(":", 1)[-1].strip()) from None
        raise TrainingFailed(first) from None
    except mp.ProcessExitedException as e:  # a replica died from a signal (OOM killer, abort)
        raise TrainingFailed(str(e).strip().splitlines()[-1]) from None
