"""What a run varied, as the report compares it: precision, loader, graphs, sparsity and schedule.

A run's `Setting` comes from its `config.json` (the truth of what ran),
falling back to the `cell.json` factors when the config is missing (a cell
skipped before it started). Settings, never grid names, decide which table a
cell belongs in and which cell is its baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PAPER_MP = ("amp-fp16", "amp-bf16")
"""Our precisions that are the paper's 'mixed precision'."""


@dataclass(frozen=True)
class Setting:
    """What a run varied: the optimization toggles and the sparsity schedule."""

    precision: str = "fp32"
    loader: str = "host"
    graphs: str = "off"
    channels_last: bool = False
    sparsity: str = "none"
    amount: float = 0.5
    pattern: str = "unstructured"
    dense_epochs: int | str = 0
    """Dense epochs before pruning, or 'auto'; 0 for a dense model."""
    batch_size: int = 32
    epochs: int = 50

    @property
    def dense(self) -> bool:
        """No pruning at all."""
        return self.sparsity == "none"

    @property
    def arch_off(self) -> bool:
        """None of the architecture-aware optimizations (fp32, host loader, eager, NCHW)."""
        return self.precision == "fp32" and self.loader == "host" and self.graphs == "off" and not self.channels_last

    @property
    def hybrid(self) -> bool:
        """Sparse after some dense epochs (Table 2's schedule), as opposed to pruned before training."""
        return not self.dense and self.dense_epochs != 0

    @property
    def model_key(self) -> tuple[Any, ...]:
        """Identifies the model being trained regardless of the architecture-aware toggles."""
        if self.dense:
            return ("none",)
        return (self.sparsity, self.amount, self.pattern, self.dense_epochs)

    def model_label(self) -> str:
        """'dense', 'random 50% from epoch 1', 'topk 50% 2:4, 25 dense + 25 sparse', 'structured 50%, auto switch'."""
        if self.dense:
            return "dense"
        pat = " 2:4" if self.pattern == "2:4" else ""
        head = f"{self.sparsity} {self.amount:.0%}{pat}"
        if self.dense_epochs == 0:
            return f"{head}, pruned before training"
        if self.dense_epochs == "auto":
            return f"{head}, auto switch"
        return f"{head}, {self.dense_epochs} dense + {self.epochs - int(self.dense_epochs)} sparse"

    def opt_parts(self) -> list[str]:
        """The architecture-aware optimizations switched on, in the paper's words where it has them."""
        parts = []
        if self.precision in PAPER_MP:
            parts.append(f"MP ({self.precision})")
        elif self.precision != "fp32":
            parts.append(self.precision)
        if self.loader == "device":
            parts.append("DoLL")
        if self.graphs == "cuda-graph":
            parts.append("GCO (cuda-graph)")
        elif self.graphs != "off":
            parts.append(f"graphs {self.graphs}")
        if self.channels_last:
            parts.append("channels-last")
        return parts

    def opt_label(self) -> str:
        """'none' or 'MP (amp-fp16) + DoLL + GCO (cuda-graph)'."""
        parts = self.opt_parts()
        return " + ".join(parts) if parts else "none"

    def label(self) -> str:
        """Model and optimizations in one line."""
        return f"{self.model_label()}; {self.opt_label()}"


def setting_from(config: dict[str, Any], factors: dict[str, Any] | None) -> Setting:
    """The Setting of a run: from config.json when present, else from cell.json factors."""
    if config:
        # flatten config.json's nested sparsity into the factors' flat shape
        sp = config.get("sparsity") or {}
        f = {**config, "sparsity": sp.get("kind", "none"), "amount": sp.get("amount", 0.5),
             "pattern": sp.get("pattern", "unstructured"), "dense_epochs": sp.get("dense_epochs", 0)}
    else:
        f = dict(factors or {})
    kind = str(f.get("sparsity", "none"))
    de = f.get("dense_epochs", 0)
    return Setting(
        precision=str(f.get("precision", "fp32")),
        loader=str(f.get("loader", "host")),
        graphs=str(f.get("graphs", "off")),
        channels_last=bool(f.get("channels_last", False)),
        sparsity=kind,
        amount=float(f.get("amount", 0.5)),
        pattern=str(f.get("pattern", "unstructured")),
        dense_epochs=0 if kind == "none" else (de if de == "auto" else int(de)),
        batch_size=int(f.get("batch_size", 32)),
        epochs=int(f.get("epochs", 50)),
    )
