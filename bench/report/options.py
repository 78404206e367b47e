"""The report's knobs from the command line, and where it looks for runs by default.

Kept free of heavy imports: `bench.report` re-exports these for the CLI, which
every `bench` process loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_RESULTS = Path("results/runs")
"""The folder `bench report` searches when none is given."""


@dataclass
class Options:
    """Report knobs from the command line."""

    tolerance_pp: float = 0.5
    """Time to quality: target = dense fp32 baseline's final MS-SSIM minus this (percentage points)."""
    target_pct: float | None = None
    """Time to quality: an absolute MS-SSIM target (percent) instead of baseline minus tolerance."""
    target_input: bool = False
    """Time to quality: the target is the low-dose input's own MS-SSIM ('beats the input')."""

