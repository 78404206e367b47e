"""Speed and the distance to the hardware's limit: every cell ranked by images/s and by time to quality.

Beyond the paper. Per cell: steady images/s, the training-time speedup over the
dense fp32 baseline (with its interval), time to quality, and the roofline
columns: achieved model FLOP/s (counted FLOPs of a training step per image,
forward + backward = 3x the counted forward, times images/s) as a % of the
device's peak for the precision used, and the estimated bytes a step moves per
image as a % of the device's memory bandwidth. The peaks come from the run's
env.json (`device_peak`: a datasheet figure for a known GPU, measured at start
on a CPU), one per environment (a CPU's: the median of its runs' measurements);
an unknown device leaves those columns empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report.artifact import Artifact, Table, register
from bench.report.artifacts.time_to_quality import reach, reached_text
from bench.report.cells import CellRuns
from bench.report.envview import EnvView, interval_notes, ratio
from bench.report.format import fmt_num, fmt_speedup, fmt_time, is_num
from bench.report.plotting import figure, save
from bench.report.runs import RunRecord, epoch_phase, is_warmup
from bench.roofline import DevicePeak, lookup_peak, roofline_row
from bench.stats import median


def _steady(cell: CellRuns) -> tuple[float | None, float | None]:
    """(images/s, counted FLOPs per image of a training step) of the steady epochs, median over repeats.

    Per run, the training-time estimate's rule (`RunRecord.train_time_est_s`): per phase, the median images of
    a non-warm-up epoch over the median non-warm-up epoch time, weighted by the phase's epochs; i.e. the images
    of the run over its estimate. So the ratio of two cells' images/s is their speedup (same images per epoch),
    and one slow epoch (a busy machine) moves neither: a mean over the epochs' time (26.6 vs 9.9 images/s,
    2.7x) stood beside a 1.79x speedup from medians.
    """
    ips, flops = [], []
    for r in cell.ok_runs:
        dense_f = _flops(r.summary, "flops_fwd_bwd_per_image_before_pruning")
        after_f = _flops(r.summary, "flops_fwd_bwd_per_image") or dense_f
        per_phase: dict[str, list[float]] = {}
        for row in r.epochs:
            if is_warmup(row, r.config) or not is_num(row.get("images_per_s")) or not is_num(row.get("time_s")):
                continue
            per_phase.setdefault(epoch_phase(row), []).append(float(row["images_per_s"]) * float(row["time_s"]))
        counts, seconds = r.phase_counts(), r.train_time_est_s()  # the speedup's own estimate
        if seconds is None or set(per_phase) != set(counts):  # a phase without a steady epoch: no estimate
            continue
        images = {p: counts[p] * float(median(n)) for p, n in per_phase.items()}  # the trainer's steps x batch
        total = sum(images.values())
        if seconds > 0 and total > 0:
            ips.append(total / seconds)
            per_image = {p: after_f if p == "sparse" else dense_f for p in images}
            if all(is_num(f) for f in per_image.values()):  # every phase's FLOPs known
                flops.append(sum(images[p] * float(per_image[p]) for p in images) / total)
    return (float(median(ips)) if ips else None, float(median(flops)) if flops else None)


def _flops(summary: dict[str, Any], key: str) -> float | None:
    """A training step's FLOPs per image; runs older than that record have the forward count (x3)."""
    if is_num(summary.get(key)):
        return float(summary[key])
    fwd = summary.get(key.replace("fwd_bwd", "fwd"))
    return 3.0 * fwd if is_num(fwd) else None


def _run_peak(r: RunRecord) -> DevicePeak | None:
    """The run's recorded device peak, else (older runs) the datasheet table's entry for its GPU model."""
    p = r.env.get("device_peak")
    if isinstance(p, dict) and not p.get("unknown") and "flops_tflops" in p:
        return DevicePeak(**{k: p[k] for k in ("name", "flops_tflops", "bandwidth_tbs", "source", "measured")})
    models = r.env.get("gpu_models") or []
    if models and str(r.summary.get("device", "")).startswith("cuda"):
        return lookup_peak(str(models[0]))
    return None


def env_peak(cells: list[CellRuns]) -> DevicePeak | None:
    """One peak for the whole environment, so that every cell's '% of peak' divides by the same number.

    A datasheet peak is the same for every run of one machine. A CPU's peak is measured at each run's
    start and moves with the load on a shared machine (0.09 to 0.23 TFLOP/s fp32 among six runs of
    one grid); dividing each cell by its own would rank the measurements, not the cells. So: per
    precision, the median over the runs' measurements, the range named in the source.
    """
    peaks = [p for c in cells for r in c.ok_runs if (p := _run_peak(r)) is not None]
    measured = [p for p in peaks if p.measured]
    if not measured:
        return peaks[0] if peaks else None
    keys = sorted({k for p in measured for k in p.flops_tflops})
    flops = {k: float(median([p.flops_tflops[k] for p in measured if k in p.flops_tflops])) for k in keys}
    bw = [p.bandwidth_tbs for p in measured]

    def spread(values: list[float], unit: str) -> str:
        return f"{float(median(values)):.3g} {unit} (runs {min(values):.3g}-{max(values):.3g})"

    parts = [f"{k} {spread([p.flops_tflops[k] for p in measured if k in p.flops_tflops], 'TFLOP/s')}" for k in keys]
    source = (f"median of {len(measured)} runs' measurements: {', '.join(parts)}, bandwidth {spread(bw, 'TB/s')}; "
              f"each {measured[0].source}")
    return DevicePeak(measured[0].name, flops, float(median(bw)), source, True)


def _row(env: EnvView, c: CellRuns, peak: DevicePeak | None) -> dict[str, Any]:
    base = env.baseline(c)
    ips, flops = _steady(c)
    row: dict[str, Any] = {**env.head(c), "optimizations": c.setting.opt_label(), "images_per_s": ips,
                           "flops_fwd_bwd_per_image": flops}
    row.update(env.time_cols(c, base))
    target, how = env.target_for(c)
    # the time-to-quality table's rule: the target reached and held, a repeat that did not counting as never
    r = reach(c, target)
    row["ttq_s"] = r.seconds()
    row["ttq_target_pct"], row["ttq_rule"] = target, how
    # why there is no time: no target at all (no baseline to set one), or a target not reached and held
    row["ttq_missing"] = None if is_num(row["ttq_s"]) else f"no target: {how}" if target is None else reached_text(r)
    row["speedup_ttq_x"] = ratio(reach(base, target).seconds(), row["ttq_s"])
    bytes_est = c.med(lambda r: r.summary.get("bytes_per_image_est"))
    if is_num(ips) and is_num(flops):
        row.update(roofline_row(flops, bytes_est, ips, c.setting.precision, peak))
    # the peak is named even for a cell without a steady epoch (no roofline columns): the notes read it
    row["peak_device"], row["peak_source"] = (peak.name, peak.source) if peak else (None, None)
    return row


def build(env: EnvView) -> Table | None:
    """Every cell with numbers, ranked by images/s; its time to quality and its distance to the device's peaks."""
    cells = [c for c in env.cells if c.has_numbers]
    if not cells:
        return None
    peak = env_peak(cells)
    csv = sorted((_row(env, c, peak) for c in cells), key=lambda r: -(r["images_per_s"] or 0.0))
    ttq_rank = {id(r): i + 1 for i, r in enumerate(sorted((r for r in csv if is_num(r.get("ttq_s"))),
                                                           key=lambda r: r["ttq_s"]))}
    md = []
    for i, row in enumerate(csv, start=1):
        row["rank_images_per_s"], row["rank_ttq"] = i, ttq_rank.get(id(row))
        md.append({
            "rank": str(i), "grid": row["grid"], "cell": row["cell"], "optimizations": row["optimizations"],
            "images/s": fmt_num(row["images_per_s"], 1),
            "vs dense fp32 (95% CI)": fmt_speedup(row),
            "time to quality (rank)": (f"{fmt_time(row['ttq_s'])} ({row['rank_ttq']})" if is_num(row.get("ttq_s"))
                                       else row["ttq_missing"]),
            "TFLOP/s (% of peak)": _with_pct(row.get("achieved_tflops"), row.get("pct_of_peak_flops")),
            "GB/image (est.)": fmt_num(row.get("bytes_per_image_gb"), 2),
            "TB/s (% of bandwidth)": _with_pct(row.get("achieved_bandwidth_tbs"), row.get("pct_of_peak_bandwidth")),
            "bandwidth floor, images/s": fmt_num(row.get("bandwidth_floor_images_per_s"), 0),
        })
    notes = [
        "Ranked by steady images/s (non-warm-up epochs, median over repeats): a run's images over its "
        "training-time estimate (per phase, epochs x the median non-warm-up epoch time), so two cells' ratio of "
        "images/s is their speedup; time to quality ranks separately (target as in the time-to-quality table).",
        "TFLOP/s: counted FLOPs of a training step per image (3x the counted forward) x images/s, as a % of the "
        "device's dense peak for the cell's precision. GB/image: estimated traffic of a step (activations x3 + "
        "Adam's parameters, `bench.roofline`); the bandwidth floor is the device's bandwidth / that, an upper "
        "bound on images/s. Both are models, not counter readings.",
        "Peak, one for every cell of this environment: " + (f"{peak.name}: {peak.source}" if peak
                                                            else "unknown device: columns left empty rather "
                                                                 "than guessed") + ".",
        *interval_notes(csv),
    ]
    return Table("speed", "Speed and distance to the limit", csv, md, list(md[0].keys()), notes)


def _with_pct(value: Any, pct: Any) -> str:
    if not is_num(value):
        return "—"
    return f"{value:.3g} ({pct:.1f}%)" if is_num(pct) else f"{value:.3g}"


def plot(table: Table, path: Path) -> Path | None:
    """images/s per cell (ranked), with the % of the device's FLOP/s peak written on each bar."""
    rows = [r for r in table.csv_rows if is_num(r.get("images_per_s"))]
    if not rows:
        return None
    fig, ax = figure(9, 0.35 * len(rows) + 1.5)
    names = [r["cell"] for r in rows][::-1]
    values = [r["images_per_s"] for r in rows][::-1]
    ax.barh(names, values, color="tab:blue")
    for y, r in enumerate(rows[::-1]):
        if is_num(r.get("pct_of_peak_flops")):
            ax.text(r["images_per_s"], y, f" {r['pct_of_peak_flops']:.1f}% of peak", va="center", fontsize=7)
    ax.set_xlabel("images/s (steady epochs)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(table.title, fontsize=10)
    return save(fig, path)


register(Artifact(
    key="speed",
    title="Speed and distance to the limit",
    build=build,
    plot=plot,
    needs=None,  # every finished cell has a speed: never 'not run'
    fills=(),
))
