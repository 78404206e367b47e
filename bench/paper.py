"""The paper's published numbers, shipped as data in `results/paper/paper.json`.

Every section of that file carries a `source` that quotes the paper (table or
figure, section and page), so a reader can check each number the report puts
beside ours. Chaturvedi, Cao, Feng, "Optimizing Deep Learning for Biomedical
Imaging".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ddnet.errors import UserError

PAPER_JSON = Path(__file__).resolve().parents[1] / "results" / "paper" / "paper.json"
"""Where the paper's numbers live (the repository's results/paper/)."""

PAPER_SECTIONS = ("paper", "table1", "table2", "reference", "fig8", "fig9a", "fig9b", "fig4")


def load_paper(path: str | Path | None = None) -> dict[str, Any]:
    """The paper's numbers as a dict (see results/paper/paper.json); raises UserError if missing or broken."""
    path = Path(path) if path is not None else PAPER_JSON
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise UserError(f"paper numbers not found at {path}; restore results/paper/paper.json from git.") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"paper numbers in {path} are not valid JSON ({exc}); restore it from git.") from exc
    missing = [s for s in PAPER_SECTIONS if s not in data]
    if missing:
        raise UserError(f"paper numbers in {path} lack section(s) {', '.join(missing)}; restore it from git.")
    return data


def table1_row(paper: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """Table 1's row for sparsity kind 'none' (dense) or 'random' (50% sparse from the start)."""
    return next((r for r in paper["table1"]["rows"] if r["sparsity_kind"] == kind), None)


def table2_row(paper: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """Table 2's row for a sparsity kind (structured, random, topk), or None."""
    return next((r for r in paper["table2"]["rows"] if r["sparsity_kind"] == kind), None)
