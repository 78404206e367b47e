"""One typed configuration for a training run.

Every toggle of DESIGN.md is a field here; the CLI's options map onto these
fields one to one and a grid in ablations/ is a function that returns a list
of `TrainConfig`. Impossible combinations are refused by `check_runnable`
with one line that names the reason and the fix, before any training starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from ddnet.errors import UserError

Precision = Literal["fp32", "tf32", "amp-fp16", "amp-bf16"]
LoaderKind = Literal["host", "device"]
Graphs = Literal["off", "cuda-graph", "compile"]
SparsityKind = Literal["none", "random", "structured", "topk"]
Pattern = Literal["unstructured", "2:4"]
Scope = Literal["layer", "global"]
DeviceName = Literal["auto", "cpu", "cuda"]
Normalisation = Literal["window", "minmax"]
SynthMode = Literal["physics", "fast"]
Phantom = Literal["chest", "shepp-logan", "ellipses"]

PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "amp-fp16", "amp-bf16")
LOADERS: tuple[str, ...] = ("host", "device")
GRAPHS: tuple[str, ...] = ("off", "cuda-graph", "compile")
SPARSITIES: tuple[str, ...] = ("none", "random", "structured", "topk")
PATTERNS: tuple[str, ...] = ("unstructured", "2:4")


class ConfigError(UserError):
    """A configuration that cannot run; the message names the reason and the fix."""


@dataclass
class ModelConfig:
    """Widths of DDNet. The defaults are the paper's network (566,451 parameters)."""

    base_width: int = 16
    """Channels of the stem, of every transition output and of each decoder stage."""
    growth: int = 16
    """Channels each dense layer adds (its 5x5 conv output)."""
    bottleneck: int = 64
    """Output channels of the 1x1 bottleneck conv inside each dense layer."""
    layers_per_block: int = 4
    """Composite layers per dense block (the paper's 'five layers' counts the input)."""


@dataclass
class DataConfig:
    """Where the slices come from and how they are normalised."""

    source: str = "synthetic"
    """'synthetic' to generate phantoms on the fly, or a folder holding {train,val,test}/{HQ,LQ}/."""
    image_size: int = 128
    """Side of the (square) synthetic slices; must be divisible by 16. Ignored for real data."""
    n_train: int = 64
    """Synthetic training slices."""
    n_val: int = 16
    """Synthetic validation slices."""
    synth_mode: SynthMode = "fast"
    """'physics': projection, Poisson + electronic noise, FBP; 'fast': image-domain correlated noise."""
    dose: float = 0.25
    """Dose fraction of the simulated low-dose scan (0.25 = quarter dose)."""
    phantom: Phantom = "chest"
    """Kind of synthetic phantom."""
    normalisation: Normalisation = "window"
    """'window': fixed HU window to [0, 1]; 'minmax': per-image min-max to [0, 1] (the paper's choice)."""
    hu_window: tuple[float, float] = (-1024.0, 1024.0)
    """HU range mapped to [0, 1] when normalisation is 'window' (values outside are clipped)."""
    data_seed: int = 1234
    """Seed of the synthetic generator (independent of the training seed)."""


@dataclass
class SparsityConfig:
    """Pruning and the hybrid dense-then-sparse schedule."""

    kind: SparsityKind = "none"
    """none, random (unstructured), structured (channels removed for real), topk (magnitude)."""
    amount: float = 0.5
    """Fraction pruned: of each layer's weights (random, topk) or of prunable channels (structured)."""
    pattern: Pattern = "unstructured"
    """'2:4': in every 4 consecutive weights along the input-channel dimension exactly 2 are zero."""
    scope: Scope = "layer"
    """topk only: 'layer' prunes `amount` of each layer, 'global' ranks all layers together."""
    dense_epochs: int | Literal["auto"] = 0
    """Dense epochs before pruning (0 prunes before training, the paper's Table 1); 'auto' uses the loss."""
    auto_patience: int = 3
    """'auto': epochs the loss change must stay within one order of magnitude before switching."""


@dataclass
class TrainConfig:
    """A whole training run: model, data, optimizer and the optimization toggles."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    epochs: int = 50
    """Total epochs (dense + sparse)."""
    batch_size: int = 32
    """Global batch size (split across replicas under DDP)."""
    lr: float = 1e-4
    """Adam learning rate."""
    gamma: float = 0.95
    """ExponentialLR decay, stepped once per epoch."""
    seed: int = 0
    """Seed of weights, shuffling and pruning."""
    device: DeviceName = "auto"
    """auto picks cuda when available, else cpu."""
    precision: Precision = "fp32"
    """fp32 (TF32 off everywhere), tf32, amp-fp16 (autocast + GradScaler), amp-bf16 (autocast)."""
    loader: LoaderKind = "host"
    """host: torch DataLoader; device: DoLL, the whole set staged on the device once."""
    graphs: Graphs = "off"
    """off: eager; cuda-graph: whole step captured with torch.cuda.graph; compile: torch.compile."""
    channels_last: bool = False
    """Use the channels_last memory format for model and inputs."""
    num_workers: int = 2
    """DataLoader workers for the host loader."""
    nproc: int = 1
    """Replicas (DistributedDataParallel); 1 trains in this process."""
    warmup_epochs: int = 1
    """Epochs marked as warm-up in the timing records (still trained and logged)."""
    profile_steps: int = 0
    """Steps of the dedicated profiled window for data-movement figures (0: no profiling)."""
    checkpoint_every: int = 1
    """Write a resumable checkpoint every N epochs (and always at the end)."""
    init: str | None = None
    """Checkpoint to start from (ours or the original implementation's layout)."""
    fail_at_epoch: int | None = None
    """Testing aid: inject a NaN loss at this epoch (to exercise failure handling)."""

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-normal dict (nested dataclasses become dicts, tuples lists): equal to its JSON round trip."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys are an error so typos do not pass silently."""
        d = dict(d)
        sub = {
            "model": ModelConfig,
            "data": DataConfig,
            "sparsity": SparsityConfig,
        }
        kwargs: dict[str, Any] = {}
        for name, typ in sub.items():
            if name in d:
                part = dict(d.pop(name))
                if name == "data" and "hu_window" in part:
                    part["hu_window"] = tuple(part["hu_window"])
                kwargs[name] = _build(typ, part)
        kwargs.update(d)
        return _build(cls, kwargs)

    def key(self) -> str:
        """Short stable hash of everything that defines the run."""
        blob = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def replace(self, **changes: Any) -> TrainConfig:
        """Copy with top-level fields changed; use dotted names for nested ones ('data.image_size')."""
        d = self.to_dict()
        for k, v in changes.items():
            target = d
            *parents, leaf = k.split(".")
            for p in parents:
                target = target[p]
            if leaf not in target:
                raise ConfigError(f"unknown config field '{k}'")
            if dataclasses.is_dataclass(v):  # a whole sub-config, e.g. sparsity=SparsityConfig(...)
                v = json.loads(json.dumps(dataclasses.asdict(v)))
            target[leaf] = v
        return TrainConfig.from_dict(d)


def _build(typ: type, kwargs: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(typ)}
    unknown = set(kwargs) - names
    if unknown:
        raise ConfigError(f"unknown {typ.__name__} field(s): {', '.join(sorted(unknown))}")
    return typ(**kwargs)


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when a CUDA device is visible, else 'cpu'."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def check_static(cfg: TrainConfig) -> None:
    """Checks that need no hardware: value ranges and choices. Raises ConfigError."""
    def choice(value: Any, options: tuple[str, ...], flag: str) -> None:
        if value not in options:
            raise ConfigError(f"{flag} {value!r} is not one of {', '.join(options)}.")

    choice(cfg.precision, PRECISIONS, "--precision")
    choice(cfg.loader, LOADERS, "--loader")
    choice(cfg.graphs, GRAPHS, "--graphs")
    choice(cfg.sparsity.kind, SPARSITIES, "--sparsity")
    choice(cfg.sparsity.pattern, PATTERNS, "--pattern")
    if cfg.epochs < 1:
        raise ConfigError("--epochs must be at least 1.")
    if cfg.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1.")
    if not 0.0 <= cfg.sparsity.amount < 1.0:
        raise ConfigError(f"--amount {cfg.sparsity.amount} must be in [0, 1).")
    de = cfg.sparsity.dense_epochs
    if de != "auto":
        if not isinstance(de, int) or de < 0:
            raise ConfigError(f"--dense-epochs {de!r} must be a non-negative integer or 'auto'.")
        if cfg.sparsity.kind != "none" and de >= cfg.epochs:
            raise ConfigError(
                f"--dense-epochs {de} leaves no sparse epoch out of --epochs {cfg.epochs}; "
                f"use --dense-epochs below {cfg.epochs} or --sparsity none."
            )
    if cfg.sparsity.pattern == "2:4" and cfg.sparsity.kind in ("structured",):
        raise ConfigError("--pattern 2:4 applies to random and topk pruning; use --pattern unstructured.")
    if cfg.sparsity.pattern == "2:4" and cfg.sparsity.kind != "none" and cfg.sparsity.amount != 0.5:
        raise ConfigError("--pattern 2:4 prunes exactly half; use --amount 0.5.")
    if cfg.sparsity.scope == "global" and cfg.sparsity.pattern == "2:4":
        raise ConfigError("--pattern 2:4 fixes the zeros per group, so it cannot rank globally; use --scope layer.")
    if cfg.sparsity.scope == "global" and cfg.sparsity.kind != "topk":
        raise ConfigError("global scope ranks magnitudes, so it needs --sparsity topk.")
    if cfg.data.source == "synthetic" and cfg.data.image_size % 16:
        raise ConfigError(f"--image-size {cfg.data.image_size} must be divisible by 16 (four 2x poolings).")
    if cfg.nproc < 1:
        raise ConfigError("--nproc must be at least 1.")
    if cfg.batch_size % cfg.nproc:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by --nproc {cfg.nproc}.")


def check_runnable(cfg: TrainConfig) -> None:
    """Refuse combinations this machine cannot run, naming the fix. Raises ConfigError."""
    import torch

    check_static(cfg)
    device = resolve_device(cfg.device)
    cuda = device == "cuda"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is visible; use --device cpu.")
    if cfg.graphs == "cuda-graph" and not cuda:
        raise ConfigError("--graphs cuda-graph needs a CUDA device; use --graphs off or compile on a CPU.")
    if cfg.precision == "amp-fp16" and not cuda:
        raise ConfigError("--precision amp-fp16 needs a CUDA device (GradScaler); use amp-bf16 or fp32 on a CPU.")
    if cfg.precision == "tf32" and not cuda:
        raise ConfigError("--precision tf32 is a tensor-core format of CUDA GPUs; use fp32 on a CPU.")
    if cfg.graphs == "cuda-graph" and cfg.nproc > 1:
        raise ConfigError(
            "--graphs cuda-graph with --nproc > 1 is not supported (DDP's bucketed all-reduce "
            "is not captured here); use --nproc 1 or --graphs compile."
        )
    if cfg.graphs == "compile" and cfg.nproc > 1:
        raise ConfigError("--graphs compile with --nproc > 1 is not supported here; use --nproc 1 or --graphs off.")
    if cuda and cfg.nproc > torch.cuda.device_count():
        raise ConfigError(
            f"--nproc {cfg.nproc} needs {cfg.nproc} GPUs but {torch.cuda.device_count()} are visible; "
            "lower --nproc."
        )
