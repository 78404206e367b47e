"""What a run varied, as the report compares it: the optimization toggles and the sparsity schedule.

The toggles are not re-declared here: they are `ddnet.config.TOGGLES`, read from
the run's `config.json` through `TrainConfig.from_dict(..., lenient=True)` (so
folders written by older versions still report), with `TrainConfig`'s own
defaults for whatever an old config lacks; the `cell.json` factors stand in when
the config is missing (a cell skipped before it started). A new toggle in
`TrainConfig` appears here, in the tables' columns and in the baseline lookup by
itself. Settings, never grid names, decide which table a cell belongs in and
which cell is its baseline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ddnet.config import TOGGLES, ConfigError, TrainConfig, toggle_values

PAPER_MP = ("amp-fp16", "amp-bf16")
"""Our precisions that are the paper's 'mixed precision'."""

DEFAULTS: dict[str, Any] = toggle_values(TrainConfig())
"""Every toggle's value in the paper-faithful baseline (TrainConfig's defaults), by flat name."""
SPARSITY_KEYS = ("sparsity", "amount", "pattern", "dense_epochs")
ARCH_KEYS: tuple[str, ...] = tuple(k for k in DEFAULTS if k not in SPARSITY_KEYS)
"""The architecture-aware toggles (precision, loader, graphs, channels_last, cudnn_benchmark, ...)."""
ARCH_BASELINE: dict[str, Any] = {k: DEFAULTS[k] for k in ARCH_KEYS}
"""Every architecture-aware optimization off: fp32, host loader, eager, ... (the paper's baseline)."""

# how a toggle that is on reads in a label (precision, loader and graphs have the paper's words below)
_PART_LABELS = {
    "channels_last": lambda v: "channels-last" if v else None,
    "cudnn_benchmark": lambda v: "cuDNN autotune" if v else None,
    "deterministic": lambda v: "deterministic" if v else None,
    "optimizer_impl": lambda v: f"{v} Adam",
    "compile_mode": lambda v: f"compile {v}",
    "compile_scope": lambda v: "compiled whole step" if v == "step" else None,
}


@dataclass(frozen=True)
class Setting:
    """What a run varied: every toggle (by flat name, as attributes), plus the batch size and epochs."""

    toggles: tuple[tuple[str, Any], ...] = tuple(DEFAULTS.items())
    batch_size: int = 32
    epochs: int = 50

    def __getattr__(self, name: str) -> Any:
        for key, value in object.__getattribute__(self, "toggles"):
            if key == name:
                return value
        raise AttributeError(name)

    def values(self) -> dict[str, Any]:
        """{toggle: value} for every toggle."""
        return dict(self.toggles)

    def replace(self, **changes: Any) -> Setting:
        """A copy with toggles (or batch_size / epochs) changed."""
        extra = {k: changes.pop(k) for k in ("batch_size", "epochs") if k in changes}
        unknown = set(changes) - set(DEFAULTS)
        if unknown:
            raise KeyError(f"not toggles: {sorted(unknown)}")
        return dataclasses.replace(self, toggles=tuple({**self.values(), **changes}.items()), **extra)

    @property
    def dense(self) -> bool:
        """No pruning at all."""
        return self.sparsity == "none"

    @property
    def arch_key(self) -> tuple[Any, ...]:
        """The architecture-aware toggles' values, in a fixed order."""
        v = self.values()
        return tuple(v[k] for k in ARCH_KEYS)

    @property
    def arch_off(self) -> bool:
        """None of the architecture-aware optimizations: every such toggle at its baseline value."""
        return all(getattr(self, k) == ARCH_BASELINE[k] for k in ARCH_KEYS)

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

    def extra_parts(self) -> list[str]:
        """The toggles beyond the paper's three (precision, loader, graphs) that are on."""
        parts = []
        for key in ARCH_KEYS:
            if key in ("precision", "loader", "graphs") or getattr(self, key) == ARCH_BASELINE[key]:
                continue
            label = _PART_LABELS.get(key, lambda v, k=key: f"{k} {v}")(getattr(self, key))
            if label:
                parts.append(label)
        return parts

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
        return parts + self.extra_parts()

    def opt_label(self) -> str:
        """'none' or 'MP (amp-fp16) + DoLL + GCO (cuda-graph)'."""
        parts = self.opt_parts()
        return " + ".join(parts) if parts else "none"

    def label(self) -> str:
        """Model and optimizations in one line."""
        return f"{self.model_label()}; {self.opt_label()}"


def _flat_from_raw(config: dict[str, Any]) -> dict[str, Any]:
    """A config that no longer validates (hand-made, damaged): its toggles as written, defaults for the rest."""
    out = dict(DEFAULTS)
    for path in TOGGLES:
        value: Any = config
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            out["sparsity" if path == "sparsity.kind" else path.split(".")[-1]] = value
    return out


def setting_from(config: dict[str, Any], factors: dict[str, Any] | None) -> Setting:
    """The Setting of a run: from config.json when present, else from cell.json factors."""
    if config:
        try:
            cfg = TrainConfig.from_dict(config, lenient=True)
            values, batch, epochs = toggle_values(cfg), cfg.batch_size, cfg.epochs
        except (ConfigError, TypeError, ValueError, KeyError):
            values = _flat_from_raw(config)
            batch, epochs = config.get("batch_size", 32), config.get("epochs", 50)
    else:
        f = dict(factors or {})
        values = {**DEFAULTS, **{k: v for k, v in f.items() if k in DEFAULTS}}
        batch, epochs = f.get("batch_size", 32), f.get("epochs", 50)
    if values["sparsity"] == "none":
        values["dense_epochs"] = 0
    elif values["dense_epochs"] != "auto":
        values["dense_epochs"] = int(values["dense_epochs"])
    values["amount"] = float(values["amount"])
    values["channels_last"] = bool(values["channels_last"])
    return Setting(tuple(values.items()), int(batch), int(epochs))
