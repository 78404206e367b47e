"""The machines of a report: runs and cells split by environment fingerprint, and how each is described.

Runs from different machines (env.json 'fingerprint') are never mixed in one
ratio: every artifact is built once per environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.report.artifact import Table
from bench.report.cells import CellRuns
from bench.report.runs import UNKNOWN_ENV, RunRecord


@dataclass
class Environment:
    """One machine+software fingerprint and the cells measured on it."""

    fingerprint: str
    label: str
    """Short name used in tables and file names: env1, env2, ..."""
    runs: list[RunRecord]
    cells: list[CellRuns]
    tables: list[Table] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Tables or plots that failed to render, with the error (shown in the report, never silently dropped)."""

    def describe(self) -> dict[str, Any]:
        """GPU/CPU, driver, CUDA, cuDNN, torch, python, host, commits (dirty flags) of its runs."""
        envs = [r.env for r in self.runs if r.env]
        e = envs[0] if envs else {}
        gpus = e.get("gpu_models") or []
        device = sorted({str(r.env.get("device") or r.summary.get("device") or "") for r in self.runs} - {""})
        commits = sorted({
            f"{str(x.get('git_commit'))[:10]}{' (dirty)' if x.get('git_dirty') else ''}"
            for x in envs if x.get("git_commit")
        })
        return {
            "env": self.label,
            "fingerprint": self.fingerprint,
            "device": ", ".join(device) or "—",
            "GPU": ", ".join(gpus) if gpus else "none",
            "driver": e.get("gpu_driver") or "—",
            "CUDA": e.get("cuda_version") or "—",
            "cuDNN": e.get("cudnn_version") or "—",
            "torch": e.get("torch_version") or "—",
            "python": e.get("python_version") or "—",
            "CPU": e.get("cpu_model") or "—",
            "host": ", ".join(sorted({str(x.get("hostname")) for x in envs if x.get("hostname")})) or "—",
            "commit": ", ".join(commits) or "—",
            "dirty": any(bool(x.get("git_dirty")) for x in envs),
            "runs": len(self.runs),
        }


def environments(runs: list[RunRecord], cells: list[CellRuns]) -> list[Environment]:
    """One Environment per fingerprint, labelled env1, env2, ... (the unattributed 'unknown' last)."""
    fps = sorted({r.fingerprint for r in runs}, key=lambda f: (f == UNKNOWN_ENV, f))
    return [
        Environment(fp, f"env{i}", [r for r in runs if r.fingerprint == fp], [c for c in cells if c.fingerprint == fp])
        for i, fp in enumerate(fps, start=1)
    ]
