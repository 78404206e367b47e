"""Checkpoint layouts: ours <-> the original DDNet code's, and one loader for any checkpoint.

The original implementation (the ComputeCOVID19+ `DD_net`, whose `weights_50_1.pt`
is a plain state dict) names its layers flatly: `batch1`/`conv1` (stem),
`dnet{1..4}.batch_norm{1,2}_{j}`/`conv{1,2}_{j}` (dense layers), `batch{2..5}`/
`conv{2..5}` (transitions) and `batch{6..13}`/`convT{1..8}` (decoder). Ours nests
them (`stem`, `encoder[i].block[j].bottleneck|grow`, `encoder[i].transition`,
`decoder[i].deconv5|deconv1`), each a BN -> conv unit. The table below maps unit
to unit by name; it was checked against the original forward pass:

- stem: `conv1(batch1(x))`, so `batch1` is the 1-channel BN on the input;
- dense layer j: `conv1_j(batch_norm1_j(x))` (1x1) then `conv2_j(batch_norm2_j(.))` (5x5);
- transition i: `conv{i+2}(batch{i+2}(D_i))`;
- decoder stage i: `convT{2i+1}(batch{2i+6}(cat(up(y), skip)))` (5x5) then
  `convT{2i+2}(batch{2i+7}(.))` (1x1): the upsampled path comes first in the
  concatenation, the skip second, exactly as in `DecoderStage.forward`.

The same order also shows in the shipped weights' BatchNorm statistics (see
tests/test_convert.py): feeding slices through the converted model reproduces
each BN's running mean per channel far better than any swapped assignment.
"""

from __future__ import annotations

import importlib
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from ddnet.config import ModelConfig
from ddnet.errors import UserError
from ddnet.model import DDNet
from ddnet.sparsity import conform_to_state_dict_

Layout = Literal["ours", "original"]

CKPT_FORMAT = "ddnet-bench-ckpt/1"
WEIGHTS_FORMAT = "ddnet-bench-weights/1"
STATE_DICT_FORMAT = "state-dict"
OUR_FORMATS = (CKPT_FORMAT, WEIGHTS_FORMAT)

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
CONV_SUFFIXES = ("weight", "bias")

# The original code trained on slices min-max normalised per image to [0, 1]
# (its dataset divides by max - min of each slice); its input BN's running mean is ~0.31.
ORIGINAL_NORMALISATION: dict[str, Any] = {"normalisation": "minmax", "hu_window": None}

# Prefixes added by wrappers: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ---------------------------------------------------------------------------- name table
def unit_table(layers_per_block: int = 4) -> list[tuple[str, str, str, str]]:
    """Every BN -> conv unit as (our unit prefix, original BN name, original conv name), plus its role.

    Returned rows are (ours, original_bn, original_conv, role); our BN is `<ours>.bn`
    and our conv `<ours>.conv`.
    """
    rows = [("stem", "batch1", "conv1", "stem 7x7")]
    for i in range(4):
        for j in range(layers_per_block):
            ours = f"encoder.{i}.block.{j}"
            orig = f"dnet{i + 1}"
            rows.append((f"{ours}.bottleneck", f"{orig}.batch_norm1_{j}", f"{orig}.conv1_{j}", "bottleneck 1x1"))
            rows.append((f"{ours}.grow", f"{orig}.batch_norm2_{j}", f"{orig}.conv2_{j}", "grow 5x5"))
        rows.append((f"encoder.{i}.transition", f"batch{i + 2}", f"conv{i + 2}", "transition 1x1"))
    for i in range(4):
        rows.append((f"decoder.{i}.deconv5", f"batch{6 + 2 * i}", f"convT{1 + 2 * i}", "deconv 5x5"))
        rows.append((f"decoder.{i}.deconv1", f"batch{7 + 2 * i}", f"convT{2 + 2 * i}", "deconv 1x1"))
    return rows


def name_table(layers_per_block: int = 4) -> OrderedDict[str, str]:
    """Full tensor-name map, our key -> original key (BN statistics included), in our module order."""
    table: OrderedDict[str, str] = OrderedDict()
    for ours, orig_bn, orig_conv, _ in unit_table(layers_per_block):
        for s in BN_SUFFIXES:
            table[f"{ours}.bn.{s}"] = f"{orig_bn}.{s}"
        for s in CONV_SUFFIXES:
            table[f"{ours}.conv.{s}"] = f"{orig_conv}.{s}"
    return table


def _strip_wrappers(sd: Mapping[str, Any]) -> OrderedDict[str, Any]:
    out: OrderedDict[str, Any] = OrderedDict()
    for k, v in sd.items():
        for p in _WRAPPER_PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _layers_per_block_ours(sd: Mapping[str, Any]) -> int:
    return sum(1 for k in sd if k.startswith("encoder.0.block.") and k.endswith(".bottleneck.conv.weight")) or 4


def _layers_per_block_original(sd: Mapping[str, Any]) -> int:
    return sum(1 for k in sd if k.startswith("dnet1.conv1_") and k.endswith(".weight")) or 4


def detect_layout(sd: Mapping[str, Any]) -> Layout:
    """'ours' or 'original', from the key names; UserError when neither fits."""
    keys = list(_strip_wrappers(sd))
    if any(k.startswith(("stem.", "encoder.", "decoder.")) for k in keys):
        return "ours"
    if any(k.startswith("dnet1.") for k in keys) or any(k.startswith(("convT", "batch1.")) for k in keys):
        return "original"
    first = keys[0] if keys else "(no keys)"
    raise UserError(
        f"the state dict is neither a ddnet-bench nor an original DDNet layout (first key '{first}'); "
        "pass a checkpoint written by `bench train` or the original code's weights file."
    )


def _rename(sd: Mapping[str, Any], table: Mapping[str, str], what: str) -> OrderedDict[str, Any]:
    out: OrderedDict[str, Any] = OrderedDict()
    for k, v in sd.items():
        if k not in table:
            raise UserError(f"unexpected tensor '{k}' in a state dict of the {what} layout; is this a DDNet checkpoint?")
        out[table[k]] = v
    return out


def original_to_ours(sd: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """Rename an original-layout state dict to ours (tensors are shared, not copied)."""
    sd = _strip_wrappers(sd)
    inverse = {v: k for k, v in name_table(_layers_per_block_original(sd)).items()}
    return _rename(sd, inverse, "original")


def ours_to_original(sd: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """Rename one of our state dicts to the original layout, e.g. to run it in the original code."""
    sd = _strip_wrappers(sd)
    return _rename(sd, name_table(_layers_per_block_ours(sd)), "ddnet-bench")


# ---------------------------------------------------------------------------- reading files
# Globals a ckpt.pt may need besides tensors: NumPy arrays inside saved RNG states.
# Only these are ever allowed through the restricted unpickler; nothing is fully unpickled.
_NUMPY_GLOBALS = (
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar",
    "numpy.ndarray", "numpy.dtype",
)


def _allowed_global(name: str) -> Any | None:
    """The object behind an allow-listed global name (NumPy arrays, dtypes), else None."""
    module, _, attr = name.rpartition(".")
    allowed = name in _NUMPY_GLOBALS or (module == "numpy.dtypes" and attr.endswith("DType"))
    if not allowed:
        return None
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def _numpy_dtype_classes() -> list[Any]:
    try:
        dtypes = importlib.import_module("numpy.dtypes")
    except ImportError:
        return []
    return [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True, never a full unpickle.

    A ckpt.pt written by the trainer can hold NumPy RNG states, which the restricted
    unpickler refuses by default. Then the file is read again with NumPy's array
    globals (and nothing else) allowed, and accepted only if it carries our format
    marker; any other global in the file is refused by name.
    """
    def not_a_checkpoint(e: Exception) -> UserError:
        return UserError(
            f"{path} is not a PyTorch checkpoint ({type(e).__name__}); "
            "pass a ckpt.pt/weights.pt from `bench train` or a state dict saved with torch.save."
        )

    try:
        with warnings.catch_warnings():
            # e.g. "Detected pickle protocol 4": noise next to the one-line error a bad file gets
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # any failure here means "not a loadable checkpoint"
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip-format checkpoint at all
            raise not_a_checkpoint(first) from first
        allowed = [_allowed_global(n) for n in needed]
        if not needed or any(a is None for a in allowed):
            bad = next((n for n, a in zip(needed, allowed, strict=True) if a is None), None)
            if bad is None:
                raise not_a_checkpoint(first) from first
            raise UserError(
                f"{path} needs the Python global '{bad}' to load, which a checkpoint never should; "
                "refusing to unpickle it (re-save the weights with torch.save(model.state_dict(), ...))."
            ) from first
        # unpickling a dtype builds its numpy.dtypes.*DType class, which the scan does not list
        allowed += _numpy_dtype_classes()
        try:
            with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise not_a_checkpoint(e) from e
        if not (isinstance(obj, Mapping) and obj.get("format") in OUR_FORMATS):
            raise UserError(
                f"{path} holds NumPy objects but is not a ddnet-bench checkpoint; "
                "pass a ckpt.pt/weights.pt from `bench train` or a state dict of tensors."
            ) from first
        return obj


def _check_tensor_dict(sd: Any, path: Path, what: str) -> None:
    if not isinstance(sd, Mapping) or not sd:
        kind = type(sd).__name__ if not isinstance(sd, Mapping) else "empty dict"
        raise UserError(f"{path} holds a {kind}, not a state dict of tensors; pass a checkpoint of a DDNet model.")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise UserError(
                f"{path}: entry {k!r} of the {what} is a {type(v).__name__}, not a tensor; "
                "pass a checkpoint of a DDNet model."
            )


def infer_model_config(sd: Mapping[str, torch.Tensor], display: Mapping[str, str] | None = None) -> ModelConfig:
    """Widths of the net that wrote an our-layout state dict, from its tensor shapes.

    Uses layers that structured pruning keeps at full width: the transition
    output (base width) and input (base + layers * growth), and the widest
    bottleneck conv.
    """
    def shape(key: str) -> torch.Size:
        shown = (display or {}).get(key, key)
        if key not in sd:
            raise UserError(f"missing tensor '{shown}' in the state dict; it is needed to rebuild the model.")
        if sd[key].ndim != 4:
            raise UserError(f"tensor '{shown}' has shape {tuple(sd[key].shape)}, not that of a conv weight; "
                            "the checkpoint does not fit DDNet.")
        return sd[key].shape

    layers = _layers_per_block_ours(sd)
    base, c_in = shape("encoder.0.transition.conv.weight")[:2]
    growth = (c_in - base) // layers
    bottleneck = max(
        (shape(k)[0] for k in sd if k.startswith("encoder.") and k.endswith(".bottleneck.conv.weight")),
        default=None,
    )
    if bottleneck is None:
        bottleneck = shape("encoder.0.block.0.bottleneck.conv.weight")[0]  # raises: it is missing
    return ModelConfig(base_width=int(base), growth=int(growth), bottleneck=int(bottleneck),
                       layers_per_block=layers)


def _check_against(
    model: torch.nn.Module, sd: Mapping[str, torch.Tensor], display: Mapping[str, str]
) -> tuple[str, str] | None:
    """None when `sd` fits `model` exactly; else (kind, one-line description) of the first problem."""
    expected = model.state_dict()

    def name(k: str) -> str:
        shown = display.get(k, k)
        return f"'{shown}'" if shown == k else f"'{shown}' (ours: {k})"

    for k in expected:
        if k not in sd:
            return "missing", f"missing tensor {name(k)}"
    for k in sd:
        if k not in expected:
            return "unexpected", f"unexpected tensor {name(k)}"
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            return "shape", f"tensor {name(k)} has shape {tuple(sd[k].shape)} but the model expects {tuple(t.shape)}"
    return None


def _conform(model: DDNet, sd: Mapping[str, torch.Tensor]) -> bool:
    """Rebuild structurally pruned (narrower) layers to the shapes of `sd`; True when done."""
    conform_to_state_dict_(model, dict(sd))
    return True


def load_model_weights(path: str | Path, device: str | torch.device = "cpu") -> tuple[DDNet, dict[str, Any]]:
    """Build a DDNet from any checkpoint we know and load it strictly.

    Accepts a `bench train` checkpoint (ckpt.pt), exported weights (weights.pt), or a
    plain state dict in our layout or the original code's (detected from the keys).
    Returns the model (on `device`, in eval mode) and an info dict: path, layout,
    format, epoch (None when unknown), normalisation ({'normalisation', 'hu_window'}
    the checkpoint expects, or None when a plain state dict does not say),
    model_config, params, train_config (the training TrainConfig dict of a ckpt.pt, else None).
    """
    path = Path(path)
    if path.is_dir():
        inside = next((path / n for n in ("weights.pt", "ckpt.pt") if (path / n).is_file()), None)
        if inside is None:  # naming a file that is not there would send the user to a second error
            raise UserError(f"checkpoint {path} is a folder that holds no weights.pt or ckpt.pt; pass the path of a "
                            "checkpoint file (a run folder holds them once its first epoch, and the run, ends).")
        raise UserError(f"checkpoint {path} is a folder; pass a file in it, e.g. {inside} (a run folder holds "
                        "weights.pt and ckpt.pt).")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a ckpt.pt, weights.pt or .pt state dict.")
    obj = _torch_load(path)

    fmt = obj.get("format") if isinstance(obj, Mapping) else None
    epoch: int | None = None
    normalisation: dict[str, Any] | None = None
    model_config: dict[str, Any] | None = None
    train_config: dict[str, Any] | None = None
    if fmt in OUR_FORMATS:
        if "model" not in obj:
            raise UserError(f"{path} says {fmt} but has no 'model' entry; the file is damaged: use another checkpoint.")
        sd = obj["model"]
        _check_tensor_dict(sd, path, "'model' entry")
        epoch = int(obj["epoch"]) if obj.get("epoch") is not None else None
        normalisation = dict(obj["normalisation"]) if obj.get("normalisation") else None
        model_config = dict(obj["model_config"]) if obj.get("model_config") else None
        train_config = obj.get("config") if isinstance(obj.get("config"), Mapping) else None
    elif isinstance(obj, Mapping) and isinstance(fmt, str):
        raise UserError(f"{path} has an unknown checkpoint format '{fmt}'; this version reads {', '.join(OUR_FORMATS)}.")
    else:
        sd = obj
        _check_tensor_dict(sd, path, "state dict")
        fmt = STATE_DICT_FORMAT

    sd = _strip_wrappers(sd)
    layout = detect_layout(sd)
    if layout == "original":
        table = name_table(_layers_per_block_original(sd))
        inverse = {v: k for k, v in table.items()}
        unknown = next((k for k in sd if k not in inverse), None)
        if unknown is not None:
            raise UserError(f"{path}: unexpected tensor '{unknown}' for the original DDNet layout; "
                            "is this a DDNet checkpoint?")
        display = dict(table)  # messages name the file's own keys
        sd = original_to_ours(sd)
        normalisation = dict(ORIGINAL_NORMALISATION)
    else:
        display = {}

    try:
        cfg = ModelConfig(**model_config) if model_config else infer_model_config(sd, display)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except TypeError as e:  # a model_config with unknown fields
        raise UserError(f"{path}: its model_config does not fit this version's ModelConfig ({e}).") from None
    model = DDNet(cfg)
    problem = _check_against(model, sd, display)
    # Structured pruning writes narrower layers; only our own layout can hold them.
    if problem is not None and problem[0] == "shape" and layout == "ours" and _conform(model, sd):
        problem = _check_against(model, sd, display)
    if problem is not None:
        raise UserError(f"{path}: {problem[1]}; the checkpoint does not fit DDNet({_cfg_text(cfg)}).")
    model.load_state_dict(sd, strict=True)
    model.to(device).eval()

    info = {
        "path": str(path),
        "layout": layout,
        "format": fmt,
        "epoch": epoch,
        "normalisation": normalisation,
        "model_config": {
            "base_width": cfg.base_width, "growth": cfg.growth,
            "bottleneck": cfg.bottleneck, "layers_per_block": cfg.layers_per_block,
        },
        "params": sum(p.numel() for p in model.parameters()),
        "train_config": train_config,
    }
    return model, info


def _cfg_text(cfg: ModelConfig) -> str:
    return (f"base_width={cfg.base_width}, growth={cfg.growth}, bottleneck={cfg.bottleneck}, "
            f"layers_per_block={cfg.layers_per_block}")
