"""One typed configuration for a training run: every toggle is declared here, once.

Every toggle of DESIGN.md is a field of `TrainConfig` (or of its model, data
and sparsity parts); the choices of a `Literal` field are derived from the
`Literal` itself (`choices`), the command line's options, help texts and
defaults are generated from these fields (`ddnet.config_fields`, used by
`bench train`), a grid in ablations/ is a function that returns
`TrainConfig`s, and the report reads its settings back with
`TrainConfig.from_dict(..., lenient=True)`.

Any `TrainConfig` that exists is valid: `__post_init__` checks types, ranges
and combinations and raises `ConfigError` with one line that names the fix.
What depends on the machine (a CUDA device, enough GPUs) is checked once, at
process entry, by `check_runnable`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from ddnet.errors import UserError

Precision = Literal["fp32", "tf32", "amp-fp16", "amp-bf16"]
LoaderKind = Literal["host", "device"]
Graphs = Literal["off", "cuda-graph", "compile", "compile-cuda-graph"]
OptimizerImpl = Literal["default", "foreach", "fused"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
CompileScope = Literal["model", "step"]
SparsityKind = Literal["none", "random", "structured", "topk"]
Pattern = Literal["unstructured", "2:4"]
Scope = Literal["layer", "global"]
DeviceName = Literal["auto", "cpu", "cuda"]
Normalisation = Literal["window", "minmax"]
SynthMode = Literal["physics", "fast"]
Phantom = Literal["chest", "shepp-logan", "ellipses"]


def choices(literal: Any) -> tuple[str, ...]:
    """The values a `Literal[...]` type allows, in declaration order."""
    return tuple(typing.get_args(literal))


class ConfigError(UserError):
    """A configuration that cannot run; the message names the reason and the fix."""


def flag(name: str | None = None, unit: str = "", cli: bool = True) -> dict[str, Any]:
    """Field metadata: the command-line flag (default: --field-name), the unit shown in help, exposed or not."""
    return {"flag": name, "unit": unit, "cli": cli}


@dataclass
class ModelConfig:
    """Widths of DDNet. The defaults are the paper's network (566,451 parameters)."""

    base_width: int = field(default=16, metadata=flag(unit="channels"))
    """Channels of the stem, of every transition output and of each decoder stage."""
    growth: int = field(default=16, metadata=flag(unit="channels"))
    """Channels each dense layer adds (its 5x5 conv output)."""
    bottleneck: int = field(default=64, metadata=flag(unit="channels"))
    """Output channels of the 1x1 bottleneck conv inside each dense layer."""
    layers_per_block: int = field(default=4, metadata=flag(unit="layers"))
    """Composite layers per dense block (the paper's 'five layers' counts the input)."""

    def __post_init__(self) -> None:
        _check_types(self, "model.")
        for name in ("base_width", "growth", "bottleneck", "layers_per_block"):
            _at_least(self, name, 1)


@dataclass
class DataConfig:
    """Where the slices come from and how they are normalised."""

    source: str = field(default="synthetic", metadata=flag("--data"))
    """'synthetic' to generate phantoms, or a folder holding {train,val,test}/{HQ,LQ}/."""
    image_size: int = field(default=128, metadata=flag(unit="px"))
    """Side of the (square) synthetic slices; must be divisible by 16. Ignored for real data."""
    n_train: int = field(default=64, metadata=flag(unit="slices"))
    """Synthetic training slices."""
    n_val: int = field(default=16, metadata=flag(unit="slices"))
    """Synthetic validation slices."""
    synth_mode: SynthMode = "fast"
    """'physics': projection, Poisson + electronic noise, FBP; 'fast': image-domain correlated noise."""
    dose: float = field(default=0.25, metadata=flag(unit="fraction of full dose"))
    """Dose fraction of the simulated low-dose scan (0.25 = quarter dose)."""
    phantom: Phantom = "chest"
    """Kind of synthetic phantom."""
    normalisation: Normalisation = "window"
    """'window': fixed HU window to [0, 1]; 'minmax': per-image min-max to [0, 1] (the paper's choice)."""
    hu_window: tuple[float, float] = field(default=(-1024.0, 1024.0), metadata=flag(cli=False))
    """HU range mapped to [0, 1] when normalisation is 'window' (values outside are clipped)."""
    data_seed: int = 1234
    """Seed of the synthetic generator (independent of the training seed)."""

    def __post_init__(self) -> None:
        if isinstance(self.hu_window, list):
            self.hu_window = tuple(self.hu_window)
        _check_types(self, "data.")
        if not self.source:
            raise ConfigError("--data is empty; use --data synthetic or a data folder.")
        for name in ("image_size", "n_train", "n_val"):
            _at_least(self, name, 1)
        if self.source == "synthetic" and self.image_size % 16:
            raise ConfigError(f"--image-size {self.image_size} must be divisible by 16 (four 2x poolings).")
        if not 0.0 < self.dose <= 1.0:
            raise ConfigError(f"--dose {self.dose} must be in (0, 1] (0.25 = quarter dose).")
        lo, hi = self.hu_window
        if not lo < hi:
            raise ConfigError(f"hu_window {self.hu_window} must be (low, high) with low < high.")
        _at_least(self, "data_seed", 0)


def warn_synthetic_only(flags: list[str], source: str) -> None:
    """Warn that options shaping synthetic data (`flags` given, e.g. ['--image-size']) do nothing for a data
    folder; nothing when `source` is 'synthetic' or no such option was given."""
    if source == "synthetic" or not flags:
        return
    warnings.warn(f"{', '.join(flags)} only shape{'s' if len(flags) == 1 else ''} synthetic data: the slices in "
                  f"{source} are used as they are, at their own size and count; drop "
                  f"{'it' if len(flags) == 1 else 'them'}.", UserWarning, stacklevel=3)


@dataclass
class SparsityConfig:
    """Pruning and the hybrid dense-then-sparse schedule."""

    kind: SparsityKind = field(default="none", metadata=flag("--sparsity"))
    """none, random (unstructured), structured (channels removed for real), topk (magnitude)."""
    amount: float = field(default=0.5, metadata=flag(unit="fraction"))
    """Fraction pruned: of each layer's weights (random, topk) or of prunable channels (structured)."""
    pattern: Pattern = "unstructured"
    """'2:4': in every 4 consecutive weights along the input-channel dimension exactly 2 are zero."""
    scope: Scope = "layer"
    """topk only: 'layer' prunes `amount` of each layer, 'global' ranks all layers together."""
    dense_epochs: int | Literal["auto"] = field(default=0, metadata=flag(unit="epochs"))
    """Dense epochs before pruning (0 prunes before training, the paper's Table 1); 'auto' uses the loss."""
    auto_patience: int = field(default=3, metadata=flag(unit="epochs"))
    """'auto': epochs the loss change must stay within one order of magnitude before switching."""

    @property
    def masked(self) -> bool:
        """random and topk: the layers stay dense and a mask zeroes weights (the dense kernels still run)."""
        return self.kind in ("random", "topk")

    def __post_init__(self) -> None:
        _check_types(self, "sparsity.")
        if not 0.0 <= self.amount < 1.0:
            raise ConfigError(f"--amount {self.amount} must be in [0, 1).")
        if self.dense_epochs != "auto":
            _at_least(self, "dense_epochs", 0)
        _at_least(self, "auto_patience", 1)
        if self.pattern == "2:4" and self.kind == "structured":
            raise ConfigError("--pattern 2:4 applies to random and topk pruning; use --pattern unstructured.")
        if self.pattern == "2:4" and self.kind != "none" and self.amount != 0.5:
            raise ConfigError("--pattern 2:4 prunes exactly half; use --amount 0.5.")
        if self.scope == "global" and self.pattern == "2:4":
            raise ConfigError("--pattern 2:4 fixes the zeros per group, so it cannot rank globally; use --scope layer.")
        if self.scope == "global" and self.kind != "topk":
            raise ConfigError("global scope ranks magnitudes, so it needs --sparsity topk.")


@dataclass
class TrainConfig:
    """A whole training run: model, data, optimizer and the optimization toggles."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    epochs: int = field(default=50, metadata=flag(unit="epochs"))
    """Total epochs (dense + sparse)."""
    batch_size: int = field(default=32, metadata=flag(unit="slices"))
    """Global batch size (split across replicas under DDP)."""
    lr: float = 1e-4
    """Adam learning rate."""
    gamma: float = field(default=0.95, metadata=flag(unit="per epoch"))
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
    """off: eager; cuda-graph: whole step captured with torch.cuda.graph; compile: torch.compile;
    compile-cuda-graph: the compiled model inside our captured step."""
    channels_last: bool = False
    """Use the channels_last memory format for model and inputs."""
    cudnn_benchmark: bool = False
    """cuDNN autotuning: time the convolution algorithms once per shape and keep the fastest (shapes are fixed)."""
    deterministic: bool = False
    """Deterministic kernels only (torch.use_deterministic_algorithms, cuDNN deterministic, a matmul upsampling):
    on a GPU, reruns and resumes repeat bit for bit, at some speed."""
    optimizer_impl: OptimizerImpl = "default"
    """Adam's implementation: torch's default choice, the multi-tensor 'foreach' one, or the 'fused' kernel."""
    compile_mode: CompileMode = "default"
    """torch.compile mode for --graphs compile / compile-cuda-graph (reduce-overhead adds compile's own CUDA graphs)."""
    compile_scope: CompileScope = "model"
    """--graphs compile: compile the model's forward only, or the whole step (forward, loss, backward, Adam)."""
    val_batch_size: int = field(default=0, metadata=flag(unit="slices"))
    """Slices per validation forward pass (0: the training --batch-size)."""
    num_workers: int = field(default=2, metadata=flag(unit="processes"))
    """DataLoader workers for the host loader."""
    nproc: int = field(default=1, metadata=flag(unit="processes"))
    """Replicas (DistributedDataParallel); 1 trains in this process."""
    warmup_epochs: int = field(default=1, metadata=flag(unit="epochs"))
    """Epochs marked as warm-up in the timing records (still trained and logged)."""
    profile_steps: int = field(default=0, metadata=flag(unit="steps"))
    """Steps of the dedicated profiled window for data-movement figures (0: no profiling)."""
    checkpoint_every: int = field(default=1, metadata=flag(unit="epochs"))
    """Write a resumable checkpoint every N epochs (and always at the end)."""
    init: str | None = field(default=None, metadata=flag("--init"))
    """Checkpoint to start from (ours or the original implementation's layout)."""

    def __post_init__(self) -> None:
        for name, typ in (("model", ModelConfig), ("data", DataConfig), ("sparsity", SparsityConfig)):
            if not isinstance(getattr(self, name), typ):
                raise ConfigError(f"'{name}' must be a {typ.__name__} (a JSON object in a config file), "
                                  f"got {type(getattr(self, name)).__name__}.")
        _check_types(self, "")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"--lr {self.lr} must be a positive finite number, e.g. --lr 1e-4.")
        if not math.isfinite(self.gamma) or not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"--gamma {self.gamma} must be in (0, 1], e.g. --gamma 0.95.")
        for name, least in (("epochs", 1), ("batch_size", 1), ("nproc", 1), ("num_workers", 0), ("seed", 0),
                            ("warmup_epochs", 0), ("profile_steps", 0), ("checkpoint_every", 1), ("val_batch_size", 0)):
            _at_least(self, name, least)
        de = self.sparsity.dense_epochs
        if de == "auto" and self.sparsity.kind != "none" and self.epochs < 2:
            raise ConfigError(f"--dense-epochs auto needs a dense and a sparse epoch, so --epochs 2 or more "
                              f"(got {self.epochs}); raise --epochs or give --dense-epochs 0.")
        if de != "auto" and self.sparsity.kind != "none" and de >= self.epochs:
            raise ConfigError(
                f"--dense-epochs {de} leaves no sparse epoch out of --epochs {self.epochs}; "
                f"use --dense-epochs below {self.epochs} or --sparsity none."
            )
        if self.compile_mode != "default" and self.graphs not in ("compile", "compile-cuda-graph"):
            raise ConfigError(f"--compile-mode {self.compile_mode} applies to torch.compile; "
                              "use --graphs compile (or compile-cuda-graph) or drop --compile-mode.")
        if self.compile_scope == "step" and self.graphs != "compile":
            raise ConfigError("--compile-scope step compiles the whole step with torch.compile; use --graphs compile.")
        if self.graphs == "compile-cuda-graph" and self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ConfigError(f"--compile-mode {self.compile_mode} brings torch.compile's own CUDA graphs, which cannot "
                              "sit inside our captured step; use --graphs compile with it, or "
                              "--compile-mode default / max-autotune-no-cudagraphs.")
        if self.deterministic and self.cudnn_benchmark:
            raise ConfigError("--cudnn-benchmark picks cuDNN's algorithms by timing, so a rerun may pick others and "
                              "round differently; drop it or --deterministic.")
        if self.batch_size % self.nproc:
            raise ConfigError(f"--batch-size {self.batch_size} must be divisible by --nproc {self.nproc}.")

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-normal dict (nested dataclasses become dicts, tuples lists): equal to its JSON round trip."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any], lenient: bool = False) -> TrainConfig:
        """Inverse of `to_dict`. Unknown keys are an error (typos must not pass silently) unless
        `lenient`, which drops them (run folders written by older versions, for the report)."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object of TrainConfig fields, got {type(d).__name__}.")
        d = dict(d)
        kwargs: dict[str, Any] = {}
        for name, typ in (("model", ModelConfig), ("data", DataConfig), ("sparsity", SparsityConfig)):
            if name in d:
                part = d.pop(name)
                if not isinstance(part, dict):
                    raise ConfigError(f"'{name}' must be a JSON object of {typ.__name__} fields, "
                                      f"got {type(part).__name__}.")
                kwargs[name] = _build(typ, part, lenient)
        kwargs.update(d)
        return _build(cls, kwargs, lenient)

    def key(self) -> str:
        """Short stable hash of everything that defines the run."""
        blob = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def replace(self, **changes: Any) -> TrainConfig:
        """Copy with fields changed; dotted names for nested ones ('data.image_size'). Validated as a whole."""
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


TOGGLES: tuple[str, ...] = (
    "precision", "loader", "graphs", "channels_last", "cudnn_benchmark", "deterministic", "optimizer_impl",
    "compile_mode", "compile_scope", "sparsity.kind", "sparsity.amount", "sparsity.pattern", "sparsity.dense_epochs",
)
"""The optimization toggles among the fields (dotted paths): what a grid varies and the report compares.
Everything else (data, widths, epochs, batch, lr, ...) is the context two cells must share to be compared."""


def toggle_values(cfg: TrainConfig) -> dict[str, Any]:
    """{leaf name: value} of every toggle of `cfg` ('sparsity.kind' -> 'sparsity', others by their leaf)."""
    d = cfg.to_dict()
    out: dict[str, Any] = {}
    for path in TOGGLES:
        value: Any = d
        for part in path.split("."):
            value = value[part]
        out["sparsity" if path == "sparsity.kind" else path.split(".")[-1]] = value
    return out


# ---------------------------------------------------------------------- validation


def cli_flag(f: dataclasses.Field) -> str:
    """The command-line flag of a field: its metadata's, else --field-name."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _check_types(obj: Any, prefix: str) -> None:
    """Each field holds a value of its declared type (a config file can hold anything)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            continue
        value = getattr(obj, f.name)
        ok, want = _matches(value, typ)
        if ok:
            continue
        if typing.get_origin(typ) is Literal:
            raise ConfigError(f"{cli_flag(f)} {value!r} is not one of {', '.join(typing.get_args(typ))}.")
        raise ConfigError(f"{cli_flag(f)} must be {want}, got {value!r} ('{prefix}{f.name}' in a config file).")


def _matches(value: Any, typ: Any) -> tuple[bool, str]:
    """(value fits typ, what typ is in words) for the types our configs use."""
    origin = typing.get_origin(typ)
    if origin is Literal:
        opts = typing.get_args(typ)
        return value in opts and isinstance(value, str), "one of " + ", ".join(map(str, opts))
    if origin in (typing.Union, types.UnionType):
        parts = [_matches(value, t) for t in typing.get_args(typ)]
        return any(ok for ok, _ in parts), " or ".join(w for _, w in parts)
    if typ is type(None):
        return value is None, "null"
    if typ is bool:
        return isinstance(value, bool), "true or false"
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool), "an integer"
    if typ is float:
        return isinstance(value, int | float) and not isinstance(value, bool), "a number"
    if typ is str:
        return isinstance(value, str), "a string"
    if origin is tuple:
        return (isinstance(value, tuple) and len(value) == len(typing.get_args(typ))
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)), "a pair of numbers"
    return True, str(typ)


def _at_least(obj: Any, name: str, least: int) -> None:
    value = getattr(obj, name)
    if value < least:
        f = next(f for f in dataclasses.fields(obj) if f.name == name)
        raise ConfigError(f"{cli_flag(f)} {value} must be at least {least}.")


def _build(typ: type, kwargs: dict[str, Any], lenient: bool = False) -> Any:
    names = {f.name for f in dataclasses.fields(typ)}
    unknown = set(kwargs) - names
    if unknown and not lenient:
        raise ConfigError(f"unknown {typ.__name__} field(s): {', '.join(sorted(unknown))}; "
                          "check the spelling in the config file.")
    return typ(**{k: v for k, v in kwargs.items() if k in names})


# ---------------------------------------------------------------------- the machine


def absolute_source(source: str) -> str:
    """A data source as every process reads it alike: 'synthetic', or the folder's absolute, normalised path
    (no '..', '~' or trailing '/'; symlinks kept, as the user named them)."""
    return source if source == "synthetic" else os.path.abspath(os.path.expanduser(source))


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when a CUDA device is visible, else 'cpu'."""
    import torch  # noqa: PLC0415 - the config itself must stay importable without torch (fast CLI help)

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def check_runnable(cfg: TrainConfig) -> None:
    """Refuse what this machine cannot run (the config itself is valid by construction), naming the fix."""
    import torch  # noqa: PLC0415 - see resolve_device

    device = resolve_device(cfg.device)
    cuda = device == "cuda"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is visible; use --device cpu.")
    if cfg.graphs in ("cuda-graph", "compile-cuda-graph") and not cuda:
        raise ConfigError(f"--graphs {cfg.graphs} needs a CUDA device; use --graphs off or compile on a CPU.")
    if cfg.precision == "amp-fp16" and not cuda:
        raise ConfigError("--precision amp-fp16 needs a CUDA device (GradScaler); use amp-bf16 or fp32 on a CPU.")
    if cfg.precision == "tf32" and not cuda:
        raise ConfigError("--precision tf32 is a tensor-core format of CUDA GPUs; use fp32 on a CPU.")
    if cfg.graphs in ("cuda-graph", "compile-cuda-graph") and cfg.nproc > 1:
        raise ConfigError(
            f"--graphs {cfg.graphs} with --nproc > 1 is not supported (DDP's bucketed all-reduce "
            "is not captured here); use --nproc 1 or --graphs off."
        )
    if cfg.graphs == "compile" and cfg.nproc > 1:
        raise ConfigError("--graphs compile with --nproc > 1 is not supported here; use --nproc 1 or --graphs off.")
    if cuda and cfg.nproc > torch.cuda.device_count():
        raise ConfigError(
            f"--nproc {cfg.nproc} needs {cfg.nproc} GPUs but {torch.cuda.device_count()} are visible; "
            "lower --nproc."
        )
