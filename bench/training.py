"""The harness side of one training run: a run-folder sink and the standard instruments.

`ddnet.trainer.train` trains; it is handed what measures (`standard_instruments`:
the time, memory and copy collectors) and where the records go (`RunFolder`:
`config.json`, `env.json`, `epochs.jsonl`, `copies.json`, `summary.json`, and a
progress bar). `train(cfg, out_dir)` here wires the two together: it is what
`bench train` and `bench run`'s cells call, and what the tests use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.collectors import MemoryCollector, TimeCollector, environment, profile_copies
from bench.roofline import estimate_bytes_per_image, lookup_peak, measure_cpu_peak
from bench.store import (
    ALIVE_EVERY_S,
    ALIVE_NAME,
    TRAIN_LOCK,
    append_jsonl,
    lock_held,
    read_json,
    read_jsonl,
    read_summary,
    rewrite_jsonl,
    take_lock,
    write_json,
    writer_record,
)
from ddnet.config import ModelConfig, TrainConfig
from ddnet.errors import UserError, make_folder
from ddnet.hooks import Instruments, InstrumentsFactory
from ddnet.model import DDNet
from ddnet.trainer import Dist, Run
from ddnet.trainer import train as train_model


def standard_instruments(out_dir: str | Path) -> InstrumentsFactory:
    """The harness's collectors for a run into `out_dir` (the copy profile's trace lands there on rank 0)."""
    out = Path(out_dir)

    def make(device: torch.device, cfg: TrainConfig, main: bool) -> Instruments:
        def copies(run_steps, n_steps: int, dev: torch.device) -> dict[str, Any]:
            return profile_copies(run_steps, n_steps, out if main else None, dev)

        return Instruments(TimeCollector(device, warmup_epochs=cfg.warmup_epochs), MemoryCollector(device), copies)

    return make


LOCK_NAME = TRAIN_LOCK
RUN_FILES = frozenset({
    "config.json", "env.json", "epochs.jsonl", "summary.json", "ckpt.pt", "weights.pt", "copies.json", "trace.json",
    "train.log", "cell.json", "config.request.json",  # the last three: written by `bench run` before it starts us
})
"""What a run folder may hold; anything else (except hidden files and eval-* folders) is someone else's."""
TRAINER_FILES = ("config.json", "env.json", "epochs.jsonl", "summary.json", "ckpt.pt", "weights.pt", "copies.json")
"""The records `bench train` itself writes, each through a temporary `.<name>.*.tmp` renamed into place."""


def prepare_out_dir(out_dir: Path, config: dict[str, Any], resume: bool) -> None:
    """Refuse every folder this run must not write into, naming the fix (UserError); nothing is changed.

    Refused: the current folder (an empty --out), a file, a folder holding files that are not a run,
    a finished run, a failed or unfinished run without --resume, and, with --resume, a run of
    another configuration or a damaged one.
    """
    if str(out_dir) in ("", "."):
        raise UserError("--out is empty or the current folder; pass a new folder for the run, e.g. --out runs/first.")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; pass a folder (new or empty) for the run.")
    if not out_dir.exists():
        return
    names = {p.name for p in out_dir.iterdir()}
    foreign = sorted(n for n in names if n not in RUN_FILES and not n.startswith((".", "eval-")))
    if foreign and "config.json" not in names and "cell.json" not in names:
        raise UserError(f"{out_dir} holds files that are not a bench run ({', '.join(foreign[:3])}); "
                        "pass a new or empty --out folder.")
    summary = read_summary(out_dir) or {}
    status = summary.get("status")
    if status == "ok":
        raise UserError(f"{out_dir} already holds a finished run; choose a new --out folder.")
    if status == "damaged" and not resume:
        raise UserError(f"{out_dir}/summary.json is damaged; add --resume to continue the run from its checkpoint, "
                        "or choose a new --out folder.")
    if status == "failed" and not resume:
        raise UserError(f"{out_dir} holds a failed run ({str(summary.get('error') or 'no error recorded')[:80]}); "
                        "add --resume to try again from its last checkpoint, or choose a new --out folder.")
    has_epochs = (out_dir / "epochs.jsonl").exists() and (out_dir / "epochs.jsonl").stat().st_size > 0
    if has_epochs and not resume:
        raise UserError(f"{out_dir} already holds epochs of an unfinished run; add --resume to continue it.")
    if (out_dir / "config.json").exists():
        try:
            old = read_json(out_dir / "config.json")
        except (OSError, ValueError):
            raise UserError(f"{out_dir}/config.json is damaged; choose a new --out folder.") from None
        if old != config:
            diff = config_differences(old, config)
            shown = "; ".join(diff[:3]) + ("; ..." if len(diff) > 3 else "")
            raise UserError(f"{out_dir} holds a run of a different configuration ({shown}); to continue it, run "
                            f"`bench train --out {out_dir} --resume` alone (it reads {out_dir}/config.json), or "
                            "use a new --out folder.")


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """'field: X there, Y here' for every leaf where two config dicts differ (dotted names)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in config_differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} there, {new!r} here"]


def device_peak(device: str) -> dict[str, Any]:
    """The device's peak FLOP/s and bandwidth for the report's distance-to-the-limit columns (env.json).

    A GPU's come from `bench.roofline`'s table of datasheet figures (an unknown GPU gets none: the
    report leaves the columns empty rather than guessing); a CPU's are measured now, in a quarter of
    a second (a matmul and a copy), and labelled as measured.
    """
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        peak = lookup_peak(name)
        return dataclasses.asdict(peak) if peak else {"name": name, "unknown": True}
    return dataclasses.asdict(measure_cpu_peak(seconds=0.25))


def roofline_inputs(config: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """What the report needs for achieved FLOP/s and bandwidth: FLOPs per image of a training step
    (forward + backward, counted as 3x the counted forward) and the estimated bytes one moves."""
    side = summary.get("image_side")
    if not side:
        return {}
    amp = config.get("precision") in ("amp-fp16", "amp-bf16")
    model = DDNet(ModelConfig(**config["model"]))
    out: dict[str, Any] = {
        "bytes_per_image_est": estimate_bytes_per_image(model, int(side), dtype_bytes=2 if amp else 4,
                                                        batch_size=int(config.get("batch_size", 1))),
        "bytes_per_image_note": "estimated for the dense net (activations x3 passes + Adam's parameter traffic)",
    }
    for key in ("flops_fwd_per_image_before_pruning", "flops_fwd_per_image"):
        if summary.get(key):
            out[key.replace("fwd", "fwd_bwd")] = 3 * summary[key]
    return out


def process_start() -> float | None:
    """This process's start on the `time.time()` clock.

    On Linux from its start tick and the boot-time clock (10 ms ticks; psutil's create_time
    adds the boot time, which /proc gives in whole seconds, and can be a second off);
    elsewhere psutil's create_time; None if neither can be read.
    """
    with contextlib.suppress(OSError, ValueError, AttributeError, IndexError):
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in ticks since boot
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    with contextlib.suppress(psutil.Error):
        return psutil.Process().create_time()
    return None


class Timeline:
    """Where a training process's wall time went, for the summary's `timeline_s` (seconds).

    `startup`: from the process's start to the run folder's opening (interpreter, imports,
    command line), for a process launched to train (`bench train`; None in-process);
    `build`: from there to the first record (destination checks, data read or staged, model
    built, FLOPs counted); `record_env`: `env.json` (NVML, git, a CPU's peak measurement);
    `fit`: from there to the summary, split into the `epochs` and `validation` this process
    ran and `fit_other` (step build or capture, the input's quality, checkpoints, the copy
    profile). What a launcher measures beyond `startup + build + record_env + fit` is
    the process's spawn and exit.
    """

    def __init__(self, launched: bool = False) -> None:
        self.born = process_start() if launched else None
        self.marks: dict[str, float] = {}
        self.epochs_s = 0.0
        self.validation_s = 0.0

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.time())

    def epoch(self, row: dict[str, Any]) -> None:
        self.epochs_s += float(row.get("time_s") or 0.0)
        self.validation_s += float(row.get("val_time_s") or 0.0)

    def record(self) -> dict[str, float | None]:
        now, m = time.time(), self.marks

        def span(a: float | None, b: float | None) -> float | None:
            return round(b - a, 3) if a is not None and b is not None else None

        fit = span(m.get("recorded"), now)
        return {
            "startup": span(self.born, m.get("open")),
            "build": span(m.get("open"), m.get("start")),
            "record_env": span(m.get("start"), m.get("recorded")),
            "fit": fit,
            "epochs": round(self.epochs_s, 3),
            "validation": round(self.validation_s, 3),
            "fit_other": round(fit - self.epochs_s - self.validation_s, 3) if fit is not None else None,
        }


class RunFolder:
    """A run folder as the trainer's sink (`ddnet.hooks.RunSink`), with a progress bar over epochs.

    `open` claims the folder with an exclusive lock held until the process ends (a second
    `bench train` into the same folder is refused at once, even a second later).
    """

    def __init__(self, out_dir: str | Path, progress: bool = False, launched: bool = False) -> None:
        self.out = Path(out_dir)
        self.progress = progress
        self._bar: Progress | None = None
        self._task: Any = None
        self._lock: Any = None
        self._made = False
        self._lock_made = False
        self._started = False
        self._config: dict[str, Any] = {}
        self._clock = Timeline(launched)
        self._next_alive = 0.0
        self._checkpoint_epoch: int | None = None  # in 'running' summaries, for `bench status` (None: not told yet)

    def open(self, config: dict[str, Any], resume: bool) -> None:
        self._clock.mark("open")
        busy = f"another `bench train` is writing {self.out}; wait for it or choose another --out."
        if lock_held(self.out / LOCK_NAME):  # before the folder's contents, which that run is changing
            raise UserError(busy)
        prepare_out_dir(self.out, config, resume)
        self._made = not self.out.exists()
        make_folder(self.out, "pass a writable --out folder.")
        self._lock_made = not (self.out / LOCK_NAME).exists()
        self._lock = take_lock(self.out / LOCK_NAME, "pass a writable --out folder.", busy)  # closed in release()
        prepare_out_dir(self.out, config, resume)  # again, now that no one else can change the folder
        for name in TRAINER_FILES:  # a write a kill cut short left its temporary file; no one else writes them
            for tmp in self.out.glob(f".{name}.*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def release(self, keep: bool = True) -> None:
        """Give the folder up; `keep=False` removes it when this run made it and wrote nothing but the lock."""
        self._close()
        if self._lock is None:
            return
        self._lock.close()
        self._lock = None
        if not keep and (self._made or self._lock_made):  # refused before any record: leave no trace
            (self.out / LOCK_NAME).unlink(missing_ok=True)
        if not keep and self._made:
            with contextlib.suppress(OSError):
                self.out.rmdir()  # only if empty

    @property
    def started(self) -> bool:
        """Records were written (config.json and the rest)."""
        return self._started

    def start(self, config: dict[str, Any], env: dict[str, Any]) -> None:
        self._clock.mark("start")
        self._started = True
        self._config = config
        write_json(self.out / "config.json", config)
        write_json(self.out / "env.json", {**environment(env), "device_peak": device_peak(str(env.get("device", "cpu")))})
        self._clock.mark("recorded")
        write_json(self.out / "summary.json", self._running())
        self.alive()
        if self.progress:
            self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[info]}"))
            self._bar.start()
            self._task = self._bar.add_task("epochs", total=config["epochs"], completed=0, info="")

    def epochs(self) -> list[dict[str, Any]]:
        return read_jsonl(self.out / "epochs.jsonl")

    def keep_epochs(self, rows: list[dict[str, Any]]) -> None:
        if (self.out / "epochs.jsonl").exists() or rows:
            rewrite_jsonl(self.out / "epochs.jsonl", rows)

    def epoch(self, row: dict[str, Any]) -> None:
        append_jsonl(self.out / "epochs.jsonl", row)
        self._clock.epoch(row)
        if self._bar is not None:
            info = f"loss {row['train_loss']:.4g}"
            if "val_ms_ssim" in row:
                info += f"  MS-SSIM {row['val_ms_ssim']:.2f}%  {row['time_s']:.2f}s"
            self._bar.update(self._task, completed=row["epoch"], info=info)

    def _running(self, **more: Any) -> dict[str, Any]:
        """The 'running' summary: who writes it and, once told, the epoch its checkpoint holds."""
        known = {"checkpoint_epoch": self._checkpoint_epoch} if self._checkpoint_epoch is not None else {}
        return {"status": "running", "error": None, "writer": writer_record(), **known, **more}

    def checkpointed(self, epoch: int) -> None:
        self._checkpoint_epoch = epoch
        with contextlib.suppress(OSError):  # a note for `bench status`, never a reason to stop the run
            write_json(self.out / "summary.json", self._running())

    def alive(self) -> None:
        """Touch ALIVE_NAME, at most every ALIVE_EVERY_S: the runners' sign that the run makes progress."""
        now = time.monotonic()
        if now < self._next_alive:
            return
        self._next_alive = now + ALIVE_EVERY_S
        with contextlib.suppress(OSError):  # a sign of life, never a reason to stop the run
            (self.out / ALIVE_NAME).touch()

    def copies(self, record: dict[str, Any]) -> None:
        write_json(self.out / "copies.json", record)

    def finish(self, summary: dict[str, Any]) -> None:
        self._close()
        summary.update(roofline_inputs(self._config, summary))  # in place: the caller's summary matches the file
        summary["timeline_s"] = self._clock.record()
        write_json(self.out / "summary.json", summary)

    def fail(self, error: str, traceback: str) -> None:
        self._close()
        with contextlib.suppress(OSError):  # a full disk must not hide the original failure behind this one
            write_json(self.out / "summary.json", {
                "status": "failed", "error": error, "epochs_completed": len(self.epochs()), "traceback": traceback,
            })

    def interrupt(self, why: str) -> None:
        self._close()
        with contextlib.suppress(OSError):  # still 'running': the executors and `bench status` see it resumable
            write_json(self.out / "summary.json", self._running(interrupted=why))

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
          dist: Dist | None = None, launched: bool = False) -> dict[str, Any]:
    """Train `cfg` into the run folder `out_dir` with the standard instruments; returns the summary.

    `launched`: this process was started to train (`bench train`), so the summary's
    `timeline_s.startup` counts from the process's start.
    """
    dist = dist or Dist()
    sink = RunFolder(out_dir, progress=progress and dist.main, launched=launched)
    try:
        return train_model(cfg, out_dir, sink=sink, make_instruments=standard_instruments(out_dir), resume=resume,
                           dist=dist)
    except UserError:
        # refused before training started (bad data, a model that does not fit): leave no trace of the attempt
        sink.release(keep=sink.started)
        raise
    finally:
        sink.release()


def build_run(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, dist: Dist | None = None) -> Run:
    """A built (not yet trained) `ddnet.trainer.Run` with the standard instruments: for tests and benchmarks."""
    return Run(cfg, out_dir, standard_instruments(out_dir), resume, dist)
