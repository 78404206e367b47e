"""The harness side of one training run: a run-folder sink and the standard instruments.

`ddnet.trainer.train` trains; it is handed what measures (`standard_instruments`:
the time, memory and copy collectors) and where the records go (`RunFolder`:
`config.json`, `env.json`, `epochs.jsonl`, `copies.json`, `summary.json`, and a
progress bar). `train(cfg, out_dir)` here wires the two together: it is what
`bench train` and `bench run`'s cells call, and what the tests use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.collectors import MemoryCollector, TimeCollector, environment, profile_copies
from bench.store import append_jsonl, read_json, read_jsonl, rewrite_jsonl, write_json
from ddnet.config import TrainConfig
from ddnet.errors import UserError
from ddnet.hooks import Instruments, InstrumentsFactory
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


def prepare_out_dir(out_dir: Path, config: dict[str, Any], resume: bool) -> None:
    """Refuse to overwrite a finished run or silently restart an unfinished one."""
    summary = out_dir / "summary.json"
    if summary.exists() and read_json(summary).get("status") == "ok":
        raise UserError(f"{out_dir} already holds a finished run; choose a new --out folder.")
    has_epochs = (out_dir / "epochs.jsonl").exists() and (out_dir / "epochs.jsonl").stat().st_size > 0
    if has_epochs and not resume:
        raise UserError(f"{out_dir} already holds epochs of an unfinished run; add --resume to continue it.")
    if resume and (out_dir / "config.json").exists():
        if read_json(out_dir / "config.json") != config:
            raise UserError(f"{out_dir} holds a run of a different configuration; use a new --out folder.")


class RunFolder:
    """A run folder as the trainer's sink (`ddnet.hooks.RunSink`), with a progress bar over epochs."""

    def __init__(self, out_dir: str | Path, progress: bool = False) -> None:
        self.out = Path(out_dir)
        self.progress = progress
        self._bar: Progress | None = None
        self._task: Any = None

    def open(self, config: dict[str, Any], resume: bool) -> None:
        prepare_out_dir(self.out, config, resume)
        self.out.mkdir(parents=True, exist_ok=True)

    def start(self, config: dict[str, Any], env: dict[str, Any]) -> None:
        write_json(self.out / "config.json", config)
        write_json(self.out / "env.json", environment(env))
        write_json(self.out / "summary.json", {"status": "running", "error": None})
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
        if self._bar is not None:
            info = f"loss {row['train_loss']:.4g}"
            if "val_ms_ssim" in row:
                info += f"  MS-SSIM {row['val_ms_ssim']:.2f}%  {row['time_s']:.2f}s"
            self._bar.update(self._task, completed=row["epoch"], info=info)

    def copies(self, record: dict[str, Any]) -> None:
        write_json(self.out / "copies.json", record)

    def finish(self, summary: dict[str, Any]) -> None:
        self._close()
        write_json(self.out / "summary.json", summary)

    def fail(self, error: str, traceback: str) -> None:
        self._close()
        write_json(self.out / "summary.json", {
            "status": "failed", "error": error, "epochs_completed": len(self.epochs()), "traceback": traceback,
        })

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
          dist: Dist | None = None) -> dict[str, Any]:
    """Train `cfg` into the run folder `out_dir` with the standard instruments; returns the summary."""
    dist = dist or Dist()
    sink = RunFolder(out_dir, progress=progress and dist.main)
    try:
        return train_model(cfg, out_dir, sink=sink, make_instruments=standard_instruments(out_dir), resume=resume,
                           dist=dist)
    finally:
        sink._close()


def build_run(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, dist: Dist | None = None) -> Run:
    """A built (not yet trained) `ddnet.trainer.Run` with the standard instruments: for tests and benchmarks."""
    return Run(cfg, out_dir, standard_instruments(out_dir), resume, dist)
