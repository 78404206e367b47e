"""Hand-made run folders for the report tests, and independent recomputation of what the report prints.

Run folders are fabricated by hand here, following the run-folder contract
(config.json, env.json, epochs.jsonl, summary.json, cell.json), and every
number the report prints is recomputed in the tests from epochs.jsonl with
numpy, independently of bench.report's own helpers. Not a test module: the
report tests (tests/test_report_*.py) import from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.cli import main
from bench.paper import load_paper
from bench.report.artifact import Table
from bench.report.artifacts import ARTIFACTS
from bench.report.cells import group_cells
from bench.report.environments import environments
from bench.report.envview import EnvView
from bench.report.options import Options
from bench.report.runs import load_runs
from ddnet.config import DataConfig, ModelConfig, SparsityConfig, TrainConfig

FP_A = "aaaaaaaaaaaaaaaa"
FP_B = "bbbbbbbbbbbbbbbb"
EPOCHS = 6


# ---------------------------------------------------------------------------------- fabrication


def _cfg(precision="fp32", loader="host", graphs="off", kind="none", dense_epochs=0, batch_size=4,
         epochs=EPOCHS, profile_steps=0) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(base_width=4, growth=4, bottleneck=8),
        data=DataConfig(image_size=32, n_train=8, n_val=4),
        sparsity=SparsityConfig(kind=kind, dense_epochs=dense_epochs if kind != "none" else 0),
        epochs=epochs, batch_size=batch_size, precision=precision, loader=loader, graphs=graphs,
        device="cpu", profile_steps=profile_steps,
    )


def _env(fp: str) -> dict[str, Any]:
    return {
        "fingerprint": fp, "device": "cpu", "gpu_models": [], "gpu_driver": None, "cuda_version": None,
        "cudnn_version": None, "torch_version": "2.9-test", "python_version": "3.11.9",
        "cpu_model": f"Test CPU {fp[:2]}", "hostname": f"host-{fp[:2]}", "git_commit": "abcdef1234567890",
        "git_dirty": True,
    }


def write_run(root: Path, grid: str, cell: str, cfg: TrainConfig, times: list[float], ms_ssim: list[float], *,
              repeat: int = 0, fp: str = FP_A, status: str = "ok", error: str | None = None,
              reason: str | None = None, capture: list[float] | None = None, copies: dict | None = None,
              staging_s: float = 0.0, prune_s: float = 0.0, switch_epoch: int | None = None, rss_gib: float = 1.0,
              write_env: bool = True, measured_kind: str | None = None, extra_row: dict | None = None) -> Path:
    """One run folder by the contract: a row per epoch in `times`, the summary from the same numbers."""
    d = root / grid / f"{cell}-r{repeat}"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    (d / "cell.json").write_text(json.dumps({
        "grid": grid, "cell": cell, "repeat": repeat, "label": f"label of {cell}",
        "factors": {"precision": cfg.precision, "loader": cfg.loader, "graphs": cfg.graphs,
                    "sparsity": cfg.sparsity.kind, "dense_epochs": cfg.sparsity.dense_epochs},
    }))
    if write_env:
        (d / "env.json").write_text(json.dumps(_env(fp)))
    sparse = cfg.sparsity.kind != "none"
    de = switch_epoch if cfg.sparsity.dense_epochs == "auto" else cfg.sparsity.dense_epochs
    rows, prev = [], None
    for i, t in enumerate(times):
        phase = "sparse" if sparse and i >= de else "dense"
        loss = 1.0 / (i + 1) ** 2
        rows.append({
            "epoch": i + 1, "phase": phase, "warmup": i == 0, "time_s": t, "val_time_s": 0.1,
            "train_loss": loss, "val_loss": loss * 1.1, "val_ms_ssim": ms_ssim[i], "val_ms_ssim_std": 1.0 + 0.1 * i,
            "val_psnr": 30.0, "lr": 1e-4, "sparsity": 0.5 if phase == "sparse" else 0.0,
            "capture_time_s": capture[i] if capture else 0.0,
            "prune_time_s": prune_s if sparse and i == de else 0.0,
            "loss_change": None if prev is None else abs(loss - prev),
            "mem_rss_peak_gib": rss_gib, "mem_source": "rss", **(extra_row or {}),
        })
        prev = loss
    (d / "epochs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cost = sum(r["time_s"] + r["capture_time_s"] + r["prune_time_s"] for r in rows)
    kind = measured_kind or ("none" if not sparse else ("structural" if cfg.sparsity.kind == "structured" else "masked"))
    summary = {
        "status": status, "error": error, "reason": reason, "epochs_completed": len(rows),
        "total_time_s": cost + staging_s if status == "ok" else None,
        "train_time_s": sum(times), "staging_time_s": staging_s, "staging_bytes": 0,
        "capture_time_s": sum(capture) if capture else 0.0,
        "params": 1000 if kind != "structural" else 600, "effective_params": 500 if sparse else 1000,
        "flops_fwd_per_image": 2.0e6 if kind != "structural" else 1.2e6, "flops_fwd_per_image_before_pruning": 2.0e6,
        "sparsity": {"overall": 0.5 if sparse else 0.0, "kind": kind, "per_layer": {},
                     "requested_amount": 0.5, "pattern": "unstructured"},
        "switch_epoch": (de if sparse else None), "switch_rule": "loss change within 10x" if switch_epoch else None,
        "final_val_ms_ssim": ms_ssim[len(rows) - 1] if status == "ok" else None,
        "final_val_ms_ssim_std": rows[-1]["val_ms_ssim_std"] if status == "ok" and rows else None,
        "device": "cpu", "copies": copies, "memory": {"mem_rss_peak_gib": rss_gib, "mem_source": "rss"},
    }
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def _times(center: float, seed: int, n: int = EPOCHS, first: float = 3.0) -> list[float]:
    """Epoch times around `center` (2% noise), the first (warm-up) `first` times slower."""
    rng = np.random.default_rng(seed)
    t = list(center * (1.0 + 0.02 * rng.standard_normal(n)))
    t[0] *= first
    return [float(x) for x in t]


def _hybrid_times(dense_c: float, sparse_c: float, de: int, seed: int) -> list[float]:
    t = _times(dense_c, seed)
    s = _times(sparse_c, seed + 100)
    return t[:de] + s[de:]


QUAL = [50.0, 70.0, 80.0, 85.0, 88.0, 90.0]


def _copies(htod: float, dtod: float, memset: float, htod_bytes: int) -> dict[str, Any]:
    total_ms = htod + dtod + memset
    b = {"HtoD": htod_bytes, "DtoH": 1000, "DtoD": 4 * htod_bytes, "Memset": 2 * htod_bytes}
    tb = sum(b.values())
    out: dict[str, Any] = {"copies_device": "cuda", "copies_steps": 5}
    for k, ms in (("HtoD", htod), ("DtoH", 0.0), ("DtoD", dtod), ("Memset", memset)):
        out[f"copies_{k}_time_ms"] = ms
        out[f"copies_{k}_bytes"] = b[k]
        out[f"copies_{k}_count"] = 3
        out[f"copies_{k}_share_time"] = ms / total_ms
        out[f"copies_{k}_share_bytes"] = b[k] / tb
    out["copies_total_time_ms"] = total_ms
    out["copies_total_bytes"] = tb
    return out


def build_main(root: Path) -> None:
    """A grid 'full' with repeats, a 'table1' grid at batch 1 and a 'fig9' grid with copy profiles."""
    for r in range(3):
        write_run(root, "full", "fp32-host-off-dense", _cfg(), _times(10.0, 10 + r), QUAL, repeat=r)
        write_run(root, "full", "fp32-host-off-random-hybrid3", _cfg(kind="random", dense_epochs=3),
                  _hybrid_times(10.0, 8.0, 3, 20 + r), [q - 0.2 for q in QUAL], repeat=r, prune_s=0.3)
        write_run(root, "full", "amp-bf16-host-off-dense", _cfg(precision="amp-bf16"), _times(7.0, 30 + r),
                  [q - 0.1 for q in QUAL], repeat=r, rss_gib=0.6)
        # Same epoch times as the baseline: must come out as "no measurable change".
        write_run(root, "full", "fp32-device-off-dense", _cfg(loader="device"), _times(10.0, 10 + r), QUAL,
                  repeat=r, staging_s=0.5)
    write_run(root, "full", "fp32-host-off-topk-hybrid3", _cfg(kind="topk", dense_epochs=3),
              _hybrid_times(10.0, 9.0, 3, 40), [q - 1.0 for q in QUAL])
    write_run(root, "full", "fp32-host-off-structured-hybrid3", _cfg(kind="structured", dense_epochs=3),
              _hybrid_times(10.0, 6.0, 3, 45), [q - 0.3 for q in QUAL])
    write_run(root, "full", "fp32-host-off-random-auto", _cfg(kind="random", dense_epochs="auto"),
              _hybrid_times(10.0, 8.0, 2, 47), [q - 0.4 for q in QUAL], switch_epoch=2)
    write_run(root, "full", "amp-bf16-device-cuda-graph-random-hybrid3",
              _cfg(precision="amp-bf16", loader="device", graphs="cuda-graph", kind="random", dense_epochs=3),
              _hybrid_times(5.0, 4.0, 3, 50), [q - 0.3 for q in QUAL], capture=[2.0, 0, 0, 1.0, 0, 0], staging_s=0.4)
    write_run(root, "full", "fp32-host-cuda-graph-dense", _cfg(graphs="cuda-graph"), _times(9.0, 60), QUAL,
              capture=[2.5, 0, 0, 0, 0, 0])
    write_run(root, "table1", "dense", _cfg(batch_size=1), _times(20.0, 70), [60, 80, 90, 95, 96, 97.0])
    write_run(root, "table1", "random-sparse", _cfg(batch_size=1, kind="random", dense_epochs=0),
              _times(15.0, 71), [30, 35, 38, 40, 41, 42.0])
    write_run(root, "fig9", "host-profile", _cfg(profile_steps=5), _times(10.0, 80), QUAL,
              copies=_copies(60.0, 24.0, 9.0, 7_000_000))
    write_run(root, "fig9", "device-profile", _cfg(loader="device", profile_steps=5), _times(9.0, 81), QUAL,
              copies=_copies(7.0, 64.0, 22.0, 900_000))


# ---------------------------------------------------------------------------------- recomputation


def _rows(d: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (d / "epochs.jsonl").read_text().splitlines() if x.strip()]


def _est(d: Path) -> float | None:
    """Phase-weighted training time: per phase, epochs x median of its non-warm-up epoch times.

    None when a phase has only warm-up epochs (its steady time is unknown).
    """
    rows = _rows(d)
    total = 0.0
    for phase in ("dense", "sparse"):
        ph = [r for r in rows if r["phase"] == phase]
        if not ph:
            continue
        steady = [r["time_s"] for r in ph if not r["warmup"]]
        if not steady:
            return None
        total += len(ph) * float(np.median(steady))
    return total


def _cell_est(root: Path, grid: str, cell: str) -> float:
    return float(np.median([_est(d) for d in sorted((root / grid).glob(f"{cell}-r*"))]))


def _epoch_p50(d: Path) -> float:
    return float(np.median([r["time_s"] for r in _rows(d) if not r["warmup"]]))


def _row(df: pd.DataFrame, cell: str, grid: str | None = None) -> pd.Series:
    sub = df[df["cell"] == cell]
    if grid is not None:
        sub = sub[sub["grid"] == grid]
    assert len(sub) == 1, f"expected one row for {cell}, got {len(sub)}"
    return sub.iloc[0]


def _csv(root: Path, key: str) -> pd.DataFrame:
    return pd.read_csv(root / "report" / "tables" / f"{key}.csv")


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def views(root: Path, opts: Options | None = None) -> list[EnvView]:
    """Each environment's view of the runs under `root`, as `bench report` builds it (no files, no plots)."""
    runs = load_runs(root)
    paper = load_paper()
    return [EnvView(e.fingerprint, e.label, e.cells, opts or Options(), paper)
            for e in environments(runs, group_cells(runs))]


def table(root: Path, key: str, opts: Options | None = None) -> Table:
    """Artifact `key` of the only environment under `root`, built in memory (fast: nothing is drawn)."""
    (view,) = views(root, opts)
    t = ARTIFACTS[key].build(view)
    assert t is not None, f"{key} has no rows"
    return t


def by_cell(t: Table, cell: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (CSV row, Markdown row) of `cell` in table `t` (exactly one)."""
    hits = [i for i, r in enumerate(t.csv_rows) if r["cell"] == cell]
    assert len(hits) == 1, f"expected one row for {cell}, got {len(hits)}: {[r['cell'] for r in t.csv_rows]}"
    return t.csv_rows[hits[0]], t.md_rows[hits[0]]
