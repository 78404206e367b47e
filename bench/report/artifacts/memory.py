"""Peak memory per precision (the paper quotes 62 GB fp32 vs 27 GB mixed precision), each figure named for what it measures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report.artifact import Artifact, Needs, Table, register
from bench.report.cells import CellRuns
from bench.report.envview import EnvView, paper_model_with, ratio
from bench.report.format import fmt_num, is_num
from bench.report.plotting import bars_with_ci, figure, save
from bench.report.setting import PAPER_MP, Setting

PAPER_IMAGE_SIDE = 512
"""The paper's slices (512x512 chest CT): its 62 / 27 GB are for that size."""


def as_paper_measured(c: CellRuns, paper: dict[str, Any]) -> bool:
    """Whether the paper's 62 / 27 GB compare with `c`: fp32 or mixed precision alone (DoLL's staged set, a
    graph's private pool, compile or other toggles change the peak), the dense or a hybrid 50 % model, at the
    paper's batch (32) and 512 px."""
    s = c.setting
    sides = {(r.config.get("data") or {}).get("image_size") for r in c.runs if r.config}
    return (paper_model_with(s, "mixed_precision") and (s.dense or s.hybrid)
            and s.batch_size == paper["reference"]["batch_size"] and sides == {PAPER_IMAGE_SIDE})


def needs(s: Setting, _p: int) -> bool:
    """Cells at a precision other than fp32 (compared with their fp32 counterpart)."""
    return s.precision != "fp32"


_MEM_ORDER = (
    ("mem_nvml_process_used_peak_gib", "NVML, this process"),
    ("mem_nvml_device_used_peak_gib", "NVML, whole device"),
    ("mem_allocator_peak_reserved_gib", "torch allocator, reserved"),
    ("mem_allocator_peak_allocated_gib", "torch allocator, allocated"),
    ("mem_rss_peak_gib", "host RSS (process)"),
)


def build(env: EnvView) -> Table | None:
    """Peak memory per precision, each figure named for what it measures."""
    cells = [c for c in env.cells if c.has_numbers and any(r.memory() for r in c.ok_runs)]
    if not cells:
        return None
    fp8 = env.paper["fig8"]["memory_gb"]
    csv, md = [], []
    for c in sorted(cells, key=lambda c: (c.grid, str(c.setting.model_key), c.setting.loader, c.setting.graphs,
                                         c.setting.precision)):
        peaks = {k: c.med(lambda r, k=k: r.memory().get(k) if is_num(r.memory().get(k)) else None)
                 for k, _ in _MEM_ORDER}
        source = next((r.memory().get("mem_source") for r in c.ok_runs if r.memory().get("mem_source")), None)
        primary = next(((k, name) for k, name in _MEM_ORDER if is_num(peaks[k])), (None, None))
        fp32 = env.find(c, precision="fp32") if c.setting.precision != "fp32" else None
        pkey = primary[0]
        fp32_peak = (fp32.med(lambda r, k=pkey: r.memory().get(k) if is_num(r.memory().get(k)) else None)
                     if fp32 is not None and pkey else None)
        paper_gb = {"fp32": fp8["fp32"], **dict.fromkeys(PAPER_MP, fp8["mixed_precision"])}.get(
            c.setting.precision) if as_paper_measured(c, env.paper) else None
        row = {**env.head(c), **peaks, "mem_source": source, "primary_measure": primary[1],
               "primary_peak_gib": peaks[primary[0]] if primary[0] else None,
               "fp32_cell": fp32.name if fp32 else None,
               "fp32_over_this": ratio(fp32_peak, peaks[primary[0]] if primary[0] else None),
               "paper_gb": paper_gb,
               "paper_fp32_over_mp": fp8["fp32"] / fp8["mixed_precision"] if paper_gb is not None else None}
        csv.append(row)
        md.append({
            "grid": row["grid"], "cell": c.name, "precision": c.setting.precision,
            "peak": fmt_num(row["primary_peak_gib"], 3, " GiB"), "measure": primary[1] or "—",
            "allocator peak allocated": fmt_num(peaks["mem_allocator_peak_allocated_gib"], 3, " GiB"),
            "fp32 / this": fmt_num(row["fp32_over_this"], 2, "x"),
            "paper": f"{paper_gb} GB" if paper_gb is not None else "—",
            "paper fp32 / MP": fmt_num(row["paper_fp32_over_mp"], 2, "x") if c.setting.precision in PAPER_MP else "—",
        })
    notes = ["Paper: 62 GB (fp32) vs 27 GB (mixed precision), measure not stated, at batch 32 and 512 px. "
             "Its column stands beside cells measured as it was only: fp32 or mixed precision alone (DoLL's "
             "staged set, a graph's private pool, compile and other toggles change the peak), the dense or a "
             "hybrid 50 % model, batch 32, 512 px. On a CPU only the process's host RSS is measured: it is not "
             "GPU memory and not comparable with the paper."]
    return Table("memory", "Peak memory per precision", csv, md, list(md[0].keys()), notes)


def plot(table: Table, path: Path) -> Path | None:
    """Peak memory per cell, coloured by precision, with the measure in the axis label."""
    rows = [r for r in table.csv_rows if is_num(r.get("primary_peak_gib"))]
    if not rows:
        return None
    fig, ax = figure(9, 4.5)
    bars_with_ci(ax, rows, "cell", "precision", "primary_peak_gib")
    measures = sorted({str(r["primary_measure"]) for r in rows})
    ax.set_ylabel(f"peak memory (GiB): {', '.join(measures)}", fontsize=8)
    ax.set_xlabel("")
    ax.set_title(f"{table.title} (paper: 62 GB fp32, 27 GB mixed precision)", fontsize=10)
    return save(fig, path)


register(Artifact(
    key="memory",
    title="Peak memory per precision",
    build=build,
    plot=plot,
    needs=Needs("cells at fp32 and at a lower precision", needs),
    fills=("fig8a", "full", "smoke"),
))
