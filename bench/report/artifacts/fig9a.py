"""Fig. 9(a) of the paper: data movement (HtoD, DtoH, DtoD, memset) per loader, from a profiled window."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bench.report.artifact import Artifact, Needs, Table, register
from bench.report.envview import EnvView, paper_model_with
from bench.report.format import fmt_bytes, fmt_num, is_num
from bench.report.plotting import bars_with_ci, figure, save
from bench.report.runs import RunRecord
from bench.report.setting import Setting


def needs(_s: Setting, p: int) -> bool:
    """Cells run with a profiled copy window (--profile-steps > 0)."""
    return p > 0


_COPY_KEY = re.compile(r"^copies_([A-Za-z0-9]+)_bytes$")
_KIND_ORDER = ("HtoD", "DtoH", "DtoD", "Memset", "HtoH", "Other")


def copies_rows(run: RunRecord) -> list[dict[str, Any]]:
    """One row per copy kind of a run's profiled window (from summary 'copies' or copies.json)."""
    cp = run.copies or {}
    # copies_<Kind>_bytes, where Kind is one word (HtoD, DtoD, Memset, HtoH, ...): not _share_bytes, not total.
    found = {m.group(1) for k in cp if (m := _COPY_KEY.match(k)) and m.group(1) != "total"}
    kinds = [k for k in _KIND_ORDER if k in found] + sorted(found - set(_KIND_ORDER))
    device = cp.get("copies_device", "cuda")
    measure = "CPU copy ops (aten::copy_/fill_/zero_)" if device == "cpu" else "CUDA memcpy/memset activities"
    out = []
    for k in kinds:
        share_t, share_b = cp.get(f"copies_{k}_share_time"), cp.get(f"copies_{k}_share_bytes")
        out.append({
            "kind": k,
            "copies_device": device,
            "measure": measure,
            "bytes": cp.get(f"copies_{k}_bytes"),
            "time_ms": cp.get(f"copies_{k}_time_ms"),
            "count": cp.get(f"copies_{k}_count"),
            "share_time_pct": 100.0 * share_t if is_num(share_t) else None,
            "share_bytes_pct": 100.0 * share_b if is_num(share_b) else None,
            "steps": cp.get("copies_steps"),
        })
    return out


def build(env: EnvView) -> Table | None:
    """Fig. 9(a): shares and bytes of HtoD, DtoH, DtoD and memset per loader."""
    cells = [c for c in env.cells if any(r.copies for r in c.ok_runs)]
    if not cells:
        return None
    paper = env.paper["fig9a"]
    csv, md, others = [], [], []
    for c in sorted(cells, key=lambda c: (c.grid, c.setting.loader != "host", c.name)):
        run = next(r for r in c.ok_runs if r.copies)  # the profiled window of the first finished repeat
        # the paper profiled its loaders alone: fp32, eager, no other toggle (mixed precision or a graph moves
        # other bytes); a cell with more on gets no paper share
        as_paper = paper_model_with(c.setting, "doll")
        if not as_paper:
            others.append(c.name)
        for k in copies_rows(run):
            loader = c.setting.loader
            # a CPU's copy ops (aten::fill_ read as Memset) are no CUDA copies: the paper's GPU shares never
            # stand beside them (its 9 % memset once stood beside a CPU's fill_ share)
            gpu = as_paper and k["copies_device"] != "cpu"
            p_share = paper["share_pct"].get(loader, {}).get(k["kind"]) if gpu else None
            p_gb = paper["htod_gb"].get(loader) if k["kind"] == "HtoD" and gpu else None
            bound = paper["htod_gb_bound"].get(loader) if p_gb is not None else None
            row = {**env.head(c), **k, "run": run.rel, "paper_share_pct": p_share, "paper_htod_gb": p_gb,
                   "paper_htod_gb_bound": bound}
            csv.append(row)
            md.append({
                "grid": row["grid"], "cell": c.name, "loader": loader, "measure": k["measure"], "kind": k["kind"],
                "share of time %": fmt_num(k["share_time_pct"], 1), "share of bytes %": fmt_num(k["share_bytes_pct"], 1),
                "share % (paper)": fmt_num(p_share, 0),
                "bytes (window)": fmt_bytes(k["bytes"]),
                "HtoD (paper)": "—" if p_gb is None else f"{'<' if bound == 'below' else '~'}{p_gb} GB",
                "time": fmt_num(k["time_ms"], 2, " ms"), "count": k["count"],
                "steps": k["steps"],
            })
    notes = [
        "Figures come from a dedicated profiled window of `steps` training steps, not from the timed epochs; "
        "the paper's byte totals cover its own (unstated) profile length.",
        "Paper (Fig. 9a): HtoD 60% (DDL) vs 7% (DoLL), DtoD 24% vs 64%, memset 9% vs 22%; HtoD ~7 GB vs < 1 GB. "
        + paper.get("share_note", ""),
    ]
    if others:
        notes.append(f"{', '.join(others)}: profiled with more on than the loader (mixed precision, graphs, "
                     "compile or other toggles) or on a model the paper has no figure for, which moves other "
                     "bytes: no paper share beside it.")
    if any(r["copies_device"] == "cpu" for r in csv):
        notes.append("On a CPU there is no host-device copy: the rows are CPU copy ops (HtoH = aten::copy_, "
                     "Memset = fill_/zero_) and are not comparable with the paper's GPU profile: no paper share beside them.")
    return Table("fig9a", "Fig. 9(a) analogue: data movement per loader", csv, md, list(md[0].keys()), notes)


def plot(table: Table, path: Path) -> Path | None:
    """Share of data movement per kind and loader (time and bytes), paper shares as diamonds."""
    rows = [r for r in table.csv_rows if is_num(r.get("share_time_pct")) or is_num(r.get("share_bytes_pct"))]
    if not rows:
        return None
    for r in rows:
        r["arm"] = f"{r['loader']} ({r['cell']})"
    fig, (a1, a2) = figure(11, 4.2, ncols=2)
    bars_with_ci(a1, rows, "kind", "arm", "share_time_pct", paper="paper_share_pct")
    a1.set_ylabel("share of copy time (%)")
    bars_with_ci(a2, rows, "kind", "arm", "share_bytes_pct", paper="paper_share_pct")
    a2.set_ylabel("share of bytes moved (%)")
    for a in (a1, a2):
        a.set_xlabel("")
    measure = "CPU copy ops" if any(r.get("copies_device") == "cpu" for r in rows) else "CUDA copies"
    fig.suptitle(f"{table.title} ({measure}; diamonds: paper)", fontsize=10)
    return save(fig, path)


register(Artifact(
    key="fig9a",
    title="Fig. 9(a) analogue",
    build=build,
    plot=plot,
    needs=Needs("cells run with --profile-steps > 0 (copy profile), host and device loader", needs),
    fills=("fig9",),
))
