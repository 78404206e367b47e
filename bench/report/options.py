"""The report's knobs from the command line, and where it looks for runs by default.

Kept free of heavy imports: `bench.report` re-exports these for the CLI, which
every `bench` process loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ddnet.errors import UserError

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


def check_target(pct: float) -> None:
    """Refuse a --target that no MS-SSIM (percent) can mean: outside (0, 100], NaN or infinite."""
    if not 0.0 < pct <= 100.0:  # NaN fails both comparisons
        raise UserError(f"--target {pct:g} is not an MS-SSIM in percent; pass a value in (0, 100], e.g. "
                        "--target 97.22, or --target input.")
