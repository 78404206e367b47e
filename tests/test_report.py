"""bench report: the paper's numbers, and tables re-computed from hand-made and real run folders.

Run folders are fabricated by hand here, following the run-folder contract
(config.json, env.json, epochs.jsonl, summary.json, cell.json), and every
number the report prints is recomputed in the test from epochs.jsonl with
numpy, independently of bench.report's own helpers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from bench.paper import load_paper
from bench.report.build import make_report
from bench.report.options import Options
from ddnet.config import DataConfig, ModelConfig, SparsityConfig, TrainConfig
from ddnet.errors import UserError

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
              write_env: bool = True, measured_kind: str | None = None) -> Path:
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
            "mem_rss_peak_gib": rss_gib, "mem_source": "rss",
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


# ---------------------------------------------------------------------------------- paper numbers


def test_paper_numbers_are_shipped_exactly():
    p = load_paper()
    t1 = {r["sparsity_kind"]: r for r in p["table1"]["rows"]}
    assert (t1["none"]["ms_ssim_pct"], t1["none"]["ms_ssim_std_pct"], t1["none"]["time_min"]) == (97.22, 1.49, 235)
    assert (t1["random"]["ms_ssim_pct"], t1["random"]["ms_ssim_std_pct"], t1["random"]["time_min"]) == (42.39, 2.10, 175)
    assert t1["random"]["sparsity_pct"] == 50 and t1["none"]["sparsity_pct"] == 0
    assert p["table1"]["hyperparameters"] == {"batch_size": 1, "lr": 0.0001, "gamma": 0.95, "epochs": 50}
    t2 = {r["sparsity_kind"]: r for r in p["table2"]["rows"]}
    assert set(t2) == {"structured", "random", "topk"}
    assert (t2["structured"]["speedup_x"], t2["structured"]["ms_ssim_pct"], t2["structured"]["ms_ssim_std_pct"],
            t2["structured"]["accuracy_drop_pct"]) == (1.14, 97.75, 1.62, 0.0)
    assert (t2["random"]["speedup_x"], t2["random"]["ms_ssim_pct"], t2["random"]["ms_ssim_std_pct"],
            t2["random"]["accuracy_drop_pct"]) == (1.14, 97.30, 2.17, 0.0)
    assert (t2["topk"]["speedup_x"], t2["topk"]["ms_ssim_pct"], t2["topk"]["ms_ssim_std_pct"],
            t2["topk"]["accuracy_drop_pct"]) == (1.14, 96.98, 2.02, 0.02)
    assert p["table2"]["schedule"] == {"dense_epochs": 25, "sparse_epochs": 25} and p["table2"]["amount"] == 0.5
    ref = p["reference"]
    assert (ref["batch_size"], ref["time_to_target_min"], ref["target_ms_ssim_pct"]) == (32, 79, 97.22)
    sx = p["fig8"]["speedup_x"]
    assert sx["mixed_precision"] == {"dense": 1.49, "sparse": 1.34}
    assert sx["doll"] == {"dense": 1.21, "sparse": 1.21}
    assert sx["gco"]["dense"] == 1.16
    assert sx["all_three"] == {"dense": 1.7, "sparse": 1.6}
    assert sx["all_three_hybrid_vs_dense_baseline"] == {"dense": 1.94, "sparse": 1.94}
    assert p["fig8"]["memory_gb"] == {"fp32": 62, "mixed_precision": 27}
    f9 = p["fig9a"]
    assert f9["share_pct"]["host"] == {"HtoD": 60, "DtoD": 24, "Memset": 9}
    assert f9["share_pct"]["device"] == {"HtoD": 7, "DtoD": 64, "Memset": 22}
    assert f9["htod_gb"] == {"host": 7, "device": 1}
    assert f9["htod_gb_bound"] == {"host": "about", "device": "below"}
    f4 = p["fig4"]
    assert f4["hybrid_split"] == {"dense_epochs": 25, "sparse_epochs": 25}
    assert f4["loss_change_saturation_epoch"] == 28 and f4["total_epochs"] == 50
    for key in ("table1", "table2", "reference", "fig8", "fig9a", "fig9b", "fig4"):
        assert "Table" in p[key]["source"] or "Fig." in p[key]["source"] or "Section" in p[key]["source"]
        assert "page" in p[key]["source"]
    assert "Chaturvedi" in " ".join(p["paper"]["authors"])


# ---------------------------------------------------------------------------------- the fabricated grid


@pytest.fixture(scope="module")
def main_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    build_main(root)
    rep = make_report(root, root / "report", opts=Options(n_boot=1000))
    return root, rep


def _csv(root: Path, key: str) -> pd.DataFrame:
    return pd.read_csv(root / "report" / "tables" / f"{key}.csv")


def test_table1_numbers_match_the_folders(main_report):
    root, rep = main_report
    df = _csv(root, "table1")
    dense, sparse = _row(df, "dense", "table1"), _row(df, "random-sparse", "table1")
    assert dense["ms_ssim_pct"] == pytest.approx(97.0) and sparse["ms_ssim_pct"] == pytest.approx(42.0)
    assert sparse["ms_ssim_std_pct"] == pytest.approx(1.5)
    assert dense["paper_ms_ssim_pct"] == 97.22 and dense["paper_time_min"] == 235
    assert sparse["paper_ms_ssim_pct"] == 42.39 and sparse["paper_time_min"] == 175
    assert sparse["paper_speedup_x"] == pytest.approx(235 / 175)
    dd, sd = root / "table1" / "dense-r0", root / "table1" / "random-sparse-r0"
    assert sparse["epoch_time_s_p50"] == pytest.approx(_epoch_p50(sd))
    assert sparse["speedup_x"] == pytest.approx(_epoch_p50(dd) / _epoch_p50(sd))
    total = lambda d: sum(r["time_s"] for r in _rows(d))  # noqa: E731
    assert sparse["speedup_total_x"] == pytest.approx(total(dd) / total(sd))
    assert sparse["drop_pp"] == pytest.approx(55.0)
    assert sparse["drop_rel_pct"] == pytest.approx(100 * 55.0 / 97.0)
    # One run per arm: 5 vs 5 non-warm-up epochs are bootstrapped.
    assert sparse["speedup_ci_method"] == "epochs (5 vs 5)"
    assert sparse["speedup_lo_x"] <= sparse["speedup_x"] <= sparse["speedup_hi_x"]
    # The 'full' grid at batch 4 has no cell pruned before training: it is not in Table 1.
    assert set(df["grid"]) == {"table1"}


def test_table2_speedups_and_drops_match_the_folders(main_report):
    root, _ = main_report
    df = _csv(root, "table2")
    base = _cell_est(root, "full", "fp32-host-off-dense")
    rnd = _row(df, "fp32-host-off-random-hybrid3")
    assert rnd["speedup_x"] == pytest.approx(base / _cell_est(root, "full", "fp32-host-off-random-hybrid3"))
    assert rnd["speedup_ci_method"] == "repeats (3 vs 3)"
    assert rnd["speedup_lo_x"] <= rnd["speedup_x"] <= rnd["speedup_hi_x"]
    assert rnd["speedup_verdict"] == "faster"
    assert rnd["paper_speedup_x"] == 1.14 and rnd["paper_ms_ssim_pct"] == 97.30
    assert rnd["ms_ssim_pct"] == pytest.approx(89.8)
    assert rnd["drop_pp"] == pytest.approx(0.2)
    assert rnd["drop_rel_pct"] == pytest.approx(100 * 0.2 / 90.0)
    assert rnd["speedup_ours_over_paper"] == pytest.approx(rnd["speedup_x"] / 1.14)
    # Per-phase medians of the hybrid schedule.
    d0 = root / "full" / "fp32-host-off-random-hybrid3-r0"
    sparse_p50 = float(np.median([
        float(np.median([r["time_s"] for r in _rows(d) if r["phase"] == "sparse" and not r["warmup"]]))
        for d in sorted((root / "full").glob("fp32-host-off-random-hybrid3-r*"))
    ]))
    assert rnd["epoch_time_sparse_s_p50"] == pytest.approx(sparse_p50)
    assert d0.exists()
    topk = _row(df, "fp32-host-off-topk-hybrid3")  # 1 repeat vs 3: epochs are bootstrapped
    assert topk["speedup_x"] == pytest.approx(base / _est(root / "full" / "fp32-host-off-topk-hybrid3-r0"))
    assert topk["speedup_ci_method"].startswith("epochs (")
    assert topk["paper_accuracy_drop_pct"] == 0.02
    st = _row(df, "fp32-host-off-structured-hybrid3")
    assert st["paper_ms_ssim_pct"] == 97.75
    assert _row(df, "fp32-host-off-random-auto")["switch_epoch"] == 2


def test_fig8_speedups_verdicts_and_paper_columns(main_report):
    root, _ = main_report
    a = _csv(root, "fig8a")
    base = _cell_est(root, "full", "fp32-host-off-dense")
    amp = _row(a, "amp-bf16-host-off-dense")
    assert amp["speedup_vs_model_x"] == pytest.approx(base / _cell_est(root, "full", "amp-bf16-host-off-dense"))
    assert amp["speedup_vs_model_verdict"] == "faster" and amp["speedup_vs_model_lo_x"] > 1.0
    assert amp["paper_vs_model_x"] == 1.49
    assert amp["ours_over_paper_vs_model"] == pytest.approx(amp["speedup_vs_model_x"] / 1.49)
    dev = _row(a, "fp32-device-off-dense")
    assert dev["speedup_vs_model_x"] == pytest.approx(1.0)
    assert dev["speedup_vs_model_lo_x"] <= 1.0 <= dev["speedup_vs_model_hi_x"]
    assert dev["speedup_vs_model_verdict"] == "no measurable change"
    assert dev["paper_vs_model_x"] == 1.21
    gco = _row(a, "fp32-host-cuda-graph-dense")
    assert gco["paper_vs_model_x"] == 1.16
    b = _csv(root, "fig8b")
    combo = _row(b, "amp-bf16-device-cuda-graph-random-hybrid3")
    assert combo["model_baseline_cell"] == "fp32-host-off-random-hybrid3"
    assert combo["dense_baseline_cell"] == "fp32-host-off-dense"
    est = _est(root / "full" / "amp-bf16-device-cuda-graph-random-hybrid3-r0")
    assert combo["speedup_vs_model_x"] == pytest.approx(_cell_est(root, "full", "fp32-host-off-random-hybrid3") / est)
    assert combo["speedup_vs_dense_x"] == pytest.approx(base / est)
    assert combo["paper_vs_model_x"] == 1.6 and combo["paper_vs_dense_x"] == 1.94
    md = (root / "report" / "report.md").read_text()
    assert "no measurable change" in md


def test_fig9_copies_and_graph_epochs(main_report):
    root, _ = main_report
    df = _csv(root, "fig9a")
    host = df[(df["cell"] == "host-profile") & (df["kind"] == "HtoD")].iloc[0]
    assert host["share_time_pct"] == pytest.approx(100 * 60 / 93)
    assert host["bytes"] == 7_000_000
    assert host["paper_share_pct"] == 60 and host["paper_htod_gb"] == 7
    dev = df[(df["cell"] == "device-profile") & (df["kind"] == "DtoD")].iloc[0]
    assert dev["share_time_pct"] == pytest.approx(100 * 64 / 93) and dev["paper_share_pct"] == 64
    assert set(df["measure"]) == {"CUDA memcpy/memset activities"}
    b = _csv(root, "fig9b")
    g = _row(b, "fp32-host-cuda-graph-dense")
    assert g["eager_cell"] == "fp32-host-off-dense"
    assert g["capture_time_s"] == pytest.approx(2.5)
    ep = pd.read_csv(root / "report" / "tables" / "fig9b_epochs.csv")
    g1 = ep[(ep["cell"] == "fp32-host-cuda-graph-dense") & (ep["epoch"] == 1)].iloc[0]
    assert g1["capture_time_s"] == pytest.approx(2.5)
    assert g1["time_s"] == pytest.approx(_rows(root / "full" / "fp32-host-cuda-graph-dense-r0")[0]["time_s"])
    e1 = ep[(ep["cell"] == "fp32-host-off-dense") & (ep["epoch"] == 3)].iloc[0]
    assert e1["time_s"] == pytest.approx(float(np.median(
        [_rows(d)[2]["time_s"] for d in sorted((root / "full").glob("fp32-host-off-dense-r*"))])))


def test_fig4_time_to_quality_memory_and_sparsity(main_report):
    root, _ = main_report
    c = _csv(root, "fig4c")
    auto = _row(c, "fp32-host-off-random-auto")
    assert auto["dense_epochs_run"] == 2 and auto["sparse_epochs_run"] == 4
    assert _row(c, "fp32-host-off-random-hybrid3")["dense_epochs_run"] == 3
    curves = pd.read_csv(root / "report" / "tables" / "fig4ab_curves.csv")
    assert set(curves[curves["cell"] == "fp32-host-off-random-auto"]["switch_epoch"]) == {2}

    t = _csv(root, "ttq")
    target = 90.0 - 0.5  # baseline's final MS-SSIM minus the default tolerance
    amp = _row(t, "amp-bf16-host-off-dense")
    assert amp["target_ms_ssim_pct"] == pytest.approx(target)
    # amp's curve is QUAL - 0.1: 89.9 >= 89.5 first at epoch 6.
    assert amp["reached_epoch"] == 6
    per_run = [sum(r["time_s"] + r["capture_time_s"] + r["prune_time_s"] for r in _rows(d))
               for d in sorted((root / "full").glob("amp-bf16-host-off-dense-r*"))]
    assert amp["ttq_s"] == pytest.approx(float(np.median(per_run)))
    topk = _row(t, "fp32-host-off-topk-hybrid3")  # 89.0 never reaches 89.5
    assert topk["repeats_reached"] == 0 and pd.isna(topk["ttq_s"])
    md = (root / "report" / "report.md").read_text()
    assert "never reached" in md
    t1 = _row(t, "random-sparse", "table1")
    assert t1["target_ms_ssim_pct"] == pytest.approx(96.5)  # its own grid's baseline (97.0) - 0.5

    m = _csv(root, "memory")
    assert _row(m, "amp-bf16-host-off-dense")["primary_measure"] == "host RSS (process)"
    assert _row(m, "amp-bf16-host-off-dense")["fp32_over_this"] == pytest.approx(1.0 / 0.6)
    assert _row(m, "amp-bf16-host-off-dense")["paper_gb"] == 27

    s = _csv(root, "sparsity")
    assert "simulated" in _row(s, "fp32-host-off-random-hybrid3")["note"]
    st = _row(s, "fp32-host-off-structured-hybrid3")
    assert st["sparsity_kind_measured"] == "structural"
    assert st["params"] == 600 and st["params_dense_baseline"] == 1000
    assert st["flops_fwd_per_image"] == 1.2e6 and st["flops_fwd_per_image_before_pruning"] == 2.0e6


def test_report_markdown_header_plots_and_files(main_report):
    root, rep = main_report
    out = root / "report"
    md = (out / "report.md").read_text()
    for title in ("Table 1 analogue", "Table 2 analogue", "Fig. 8(a)", "Fig. 8(b)", "Fig. 9(a)", "Fig. 9(b)",
                  "Fig. 4(c)", "Fig. 4(a,b)", "Peak memory", "Time to quality", "Sparsity"):
        assert title in md, title
    assert "Test CPU aa" in md and "abcdef1234 (dirty)" in md and "2.9-test" in md
    assert "## Not run" not in md and rep.not_run == {}
    assert "Rendering problems" not in md
    pngs = sorted((out / "figures").glob("*.png"))
    assert {p.stem for p in pngs} >= {"table1", "table2", "fig8a", "fig8b", "fig9a", "fig9b", "fig4c", "fig4ab",
                                      "memory", "ttq"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{p.name}" in md
    for key in ("table1", "table2", "fig8a", "status", "environments"):
        assert (out / "tables" / f"{key}.csv").exists()
    assert (out / "tables" / "table2.md").read_text().count("|") > 10
    raw = pd.read_csv(out / "tables" / "epochs_raw.csv")
    assert len(raw) == sum(len(_rows(p.parent)) for p in root.rglob("epochs.jsonl"))
    one = raw[(raw["cell"] == "fp32-host-off-dense") & (raw["repeat"] == 2) & (raw["epoch"] == 4)].iloc[0]
    assert one["time_s"] == pytest.approx(_rows(root / "full" / "fp32-host-off-dense-r2")[3]["time_s"])


def test_same_inputs_give_the_same_intervals(main_report, tmp_path):
    root, _ = main_report
    again = make_report(root, tmp_path / "again", opts=Options(n_boot=1000))
    a = _csv(root, "table2")
    b = pd.read_csv(again.out / "tables" / "table2.csv")
    assert a["speedup_lo_x"].notna().sum() >= 3
    assert a["speedup_lo_x"].equals(b["speedup_lo_x"]) and a["speedup_hi_x"].equals(b["speedup_hi_x"])


# ---------------------------------------------------------------------------------- partial, mixed, empty


def test_partial_failed_and_skipped_runs_are_named(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "smoke", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    write_run(root, "smoke", "fp32-host-off-random-hybrid3", _cfg(kind="random", dense_epochs=3),
              _times(10.0, 2)[:2], QUAL[:2], status="running")
    write_run(root, "smoke", "amp-bf16-host-off-dense", _cfg(precision="amp-bf16"), _times(7.0, 3)[:2], QUAL[:2],
              status="failed", error="non-finite loss (nan) at epoch 3")
    write_run(root, "smoke", "fp32-host-cuda-graph-dense", _cfg(graphs="cuda-graph"), [], [], status="skipped",
              reason="--graphs cuda-graph needs a CUDA device", write_env=False)
    rep = make_report(root, opts=Options(n_boot=200))
    md = rep.report_md.read_text()
    assert rep.out == root / "report"
    assert "running (partial: 2/6 epochs)" in md
    assert "non-finite loss (nan) at epoch 3" in md
    assert "skipped: --graphs cuda-graph needs a CUDA device" in md
    status = pd.read_csv(rep.out / "tables" / "status.csv")
    assert set(status["status"]) == {"ok", "running", "failed", "skipped"}
    # The skipped cell has no env.json: it belongs to the grid's only machine.
    assert set(status["env"]) == {"env1"}
    t2 = pd.read_csv(rep.out / "tables" / "table2.csv")
    part = _row(t2, "fp32-host-off-random-hybrid3")
    assert part["status"].startswith("running (partial") and pd.isna(part["speedup_x"])
    f8 = pd.read_csv(rep.out / "tables" / "fig8a.csv")
    assert "non-finite loss" in _row(f8, "amp-bf16-host-off-dense")["status"]
    assert pd.isna(_row(f8, "amp-bf16-host-off-dense")["speedup_vs_model_x"])
    # Tables with no cell at all are listed as not run, with a grid that would fill them.
    assert "## Not run" in md
    assert "table1" in rep.not_run and "`bench run --grid table1`" in md
    assert "fig9a" in rep.not_run and "`bench run --grid fig9`" in md


def test_warmup_only_phase_and_zero_quality_baseline(tmp_path):
    """Smoke-sized runs: a hybrid whose dense phase is one warm-up epoch, and MS-SSIM 0 everywhere."""
    root = tmp_path / "runs"
    write_run(root, "smoke", "fp32-host-off-dense", _cfg(epochs=2), [5.0, 0.8], [0.0, 0.0])
    write_run(root, "smoke", "fp32-host-off-random-hybrid1", _cfg(kind="random", dense_epochs=1, epochs=2),
              [1.3, 0.1], [0.0, 0.0], prune_s=0.05)
    rep = make_report(root, opts=Options(n_boot=200))
    md = rep.report_md.read_text()
    assert "Rendering problems" not in md
    row = _row(pd.read_csv(rep.out / "tables" / "table2.csv"), "fp32-host-off-random-hybrid1")
    # The warm-up epoch is never passed off as the dense phase's steady time.
    assert pd.isna(row["speedup_x"])
    assert "only warm-up epochs" in row["speedup_ci_method"] and "only warm-up epochs" in md
    assert row["speedup_total_x"] == pytest.approx(5.8 / 1.45)
    assert row["drop_pp"] == 0.0 and pd.isna(row["drop_rel_pct"])


def test_two_environments_are_never_mixed(tmp_path):
    root = tmp_path / "runs"
    for fp, amp_c in ((FP_A, 5.0), (FP_B, 8.0)):
        write_run(root / fp[:1], "fig8a", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL, fp=fp)
        write_run(root / fp[:1], "fig8a", "amp-bf16-host-off-dense", _cfg(precision="amp-bf16"), _times(amp_c, 2),
                  QUAL, fp=fp)
    # Grid 'solo': the baseline ran on A only, the arm on B only: no ratio may be formed.
    write_run(root / "a", "solo", "fp32-host-off-dense", _cfg(), _times(10.0, 3), QUAL, fp=FP_A)
    write_run(root / "b", "solo", "fp32-device-off-dense", _cfg(loader="device"), _times(5.0, 4), QUAL, fp=FP_B)
    rep = make_report(root, opts=Options(n_boot=200))
    df = pd.read_csv(rep.out / "tables" / "fig8a.csv")
    amp = df[(df["cell"] == "amp-bf16-host-off-dense")].set_index("fingerprint")
    for fp in (FP_A, FP_B):
        d = root / fp[:1] / "fig8a"
        expected = _epoch_p50(d / "fp32-host-off-dense-r0") / _epoch_p50(d / "amp-bf16-host-off-dense-r0")
        assert amp.loc[fp, "speedup_vs_model_x"] == pytest.approx(expected)
    assert amp.loc[FP_A, "env"] != amp.loc[FP_B, "env"]
    solo = df[df["cell"] == "fp32-device-off-dense"].iloc[0]
    assert solo["fingerprint"] == FP_B and pd.isna(solo["speedup_vs_model_x"])
    assert solo["speedup_vs_model_ci_method"] == "no baseline cell"
    md = rep.report_md.read_text()
    assert md.count("## Results on env") == 2
    assert len(pd.read_csv(rep.out / "tables" / "environments.csv")) == 2
    assert {p.name for p in (rep.out / "figures").glob("fig8a-*.png")} == {"fig8a-env1.png", "fig8a-env2.png"}


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_empty_or_missing_folder_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        code, _, err = _cli(["report", str(folder)], capsys)
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("error: ") and str(folder) in lines[0]
        assert "bench run --grid smoke" in lines[0]
    with pytest.raises(UserError, match="no run folders"):
        make_report(tmp_path / "empty")


def test_existing_report_is_not_overwritten_without_force(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    code, out, _ = _cli(["report", str(root), "--n-boot", "200"], capsys)
    assert code == 0 and "report.md" in out
    marker = root / "report" / "report.md"
    before = marker.read_text()
    code, _, err = _cli(["report", str(root), "--n-boot", "200"], capsys)
    assert code == 2 and "--force" in err and marker.read_text() == before
    code, _, _ = _cli(["report", str(root), "--force", "--n-boot", "200"], capsys)
    assert code == 0 and marker.exists()
    # --force never deletes a folder that is not a report.
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a report folder"):
        make_report(root, other, force=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_target_option_sets_time_to_quality_target(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "g", "fp32-host-off-dense", _cfg(), _times(10.0, 1), QUAL)
    rep = make_report(root, opts=Options(target_pct=80.0, n_boot=200))
    row = pd.read_csv(rep.out / "tables" / "ttq.csv").iloc[0]
    assert row["target_ms_ssim_pct"] == 80.0 and row["reached_epoch"] == 3
    rows = _rows(root / "g" / "fp32-host-off-dense-r0")
    assert row["ttq_s"] == pytest.approx(sum(r["time_s"] for r in rows[:3]))


# ---------------------------------------------------------------------------------- end to end


SMOKE_EPOCHS = 4  # 2 dense + 2 sparse epochs for the hybrid cells: each phase has a non-warm-up epoch


@pytest.fixture(scope="module")
def smoke_runs(smoke_grid):
    """The session's real `bench run --grid smoke` on the CPU (conftest.py), shared with the runner tests."""
    out, res = smoke_grid
    assert list(out.rglob("summary.json")), res.stdout[-2000:] + res.stderr[-2000:]
    return out


def _total(d: Path) -> float:
    return json.loads((d / "summary.json").read_text())["total_time_s"]


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_end_to_end_smoke_grid_report(smoke_runs, capsys):
    out = smoke_runs
    code, stdout, err = _cli(["report", str(out), "--out", str(out / "report"), "--n-boot", "500"], capsys)
    assert code == 0, err
    assert "report.md" in stdout
    rdir = out / "report"
    md = (rdir / "report.md").read_text()
    summaries = {p.parent: json.loads(p.read_text()) for p in out.rglob("summary.json")}
    assert summaries and any(s["status"] == "ok" for s in summaries.values())
    status = pd.read_csv(rdir / "tables" / "status.csv")
    assert len(status) == len(summaries)
    for s in summaries.values():
        if s["status"] == "skipped":  # cuda-graph cells on a CPU
            assert f"skipped: {s['reason']}" in md
        elif s["status"] == "failed":
            assert s["error"].splitlines()[0][:40] in md

    def cell_dir(name: str) -> Path:
        hits = [d for d in summaries if json.loads((d / "cell.json").read_text())["cell"] == name]
        assert len(hits) == 1, name
        return hits[0]

    base = cell_dir("fp32-host-off-dense")
    assert summaries[base]["status"] == "ok"
    assert _est(base) == pytest.approx(SMOKE_EPOCHS * float(np.median([r["time_s"] for r in _rows(base)[1:]])))

    # Table 2: the three sparsity types, hybrid 2 + 2, against the dense baseline.
    t2 = pd.read_csv(rdir / "tables" / "table2.csv")
    assert set(t2["sparsity"]) == {"random", "structured", "topk"}
    for _, row in t2.iterrows():
        d = cell_dir(row["cell"])
        if summaries[d]["status"] != "ok":
            assert pd.isna(row["speedup_x"])
            continue
        assert row["speedup_x"] == pytest.approx(_est(base) / _est(d))
        assert row["speedup_total_x"] == pytest.approx(_total(base) / _total(d))
        last, blast = _rows(d)[-1], _rows(base)[-1]
        assert row["ms_ssim_pct"] == pytest.approx(last["val_ms_ssim"])
        assert row["drop_pp"] == pytest.approx(blast["val_ms_ssim"] - last["val_ms_ssim"])
        assert row["switch_epoch"] == SMOKE_EPOCHS // 2

    # Fig. 8(a): each optimization alone over the same model without it.
    f8 = pd.read_csv(rdir / "tables" / "fig8a.csv")
    for name, model_base, paper in (("amp-bf16-host-off-dense", "fp32-host-off-dense", 1.49),
                                    ("fp32-device-off-dense", "fp32-host-off-dense", 1.21),
                                    ("amp-bf16-host-off-topk-hybrid2", "fp32-host-off-topk-hybrid2", 1.34)):
        row = _row(f8, name)
        if summaries[cell_dir(name)]["status"] == "ok" and summaries[cell_dir(model_base)]["status"] == "ok":
            assert row["model_baseline_cell"] == model_base
            assert row["speedup_vs_model_x"] == pytest.approx(_est(cell_dir(model_base)) / _est(cell_dir(name)))
        assert row["paper_vs_model_x"] == paper

    # Time to quality against the baseline's own final value minus 0.5 pp.
    t = pd.read_csv(rdir / "tables" / "ttq.csv")
    b = _row(t, "fp32-host-off-dense")
    assert b["target_ms_ssim_pct"] == pytest.approx(summaries[base]["final_val_ms_ssim"] - 0.5)
    rows = _rows(base)
    first = next(r for r in rows if r["val_ms_ssim"] >= b["target_ms_ssim_pct"])
    assert b["reached_epoch"] == first["epoch"]
    spent = summaries[base].get("staging_time_s") or 0.0
    spent += sum(r["time_s"] + r["capture_time_s"] + r["prune_time_s"] for r in rows[: first["epoch"]])
    assert b["ttq_s"] == pytest.approx(spent)

    # CPU runs: memory is host RSS, named as such; masked sparsity is called simulated.
    m = pd.read_csv(rdir / "tables" / "memory.csv")
    assert set(m["primary_measure"]) == {"host RSS (process)"}
    sp = pd.read_csv(rdir / "tables" / "sparsity.csv")
    for _, row in sp.iterrows():
        if row["sparsity_kind_measured"] == "masked":
            assert "simulated" in row["note"]
    assert (rdir / "figures" / "table2.png").exists() and (rdir / "figures" / "fig8a.png").exists()
