"""Checkpoints: seeding, RNG state, and atomic saves (a kill never leaves a torn file).

`ckpt.pt` (everything a resume needs) and `weights.pt` (the exported model) are the
only files the trainer writes itself; every other record goes to the harness's sink.
"""

from __future__ import annotations

import io
import os
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_FORMAT = "ddnet-bench-ckpt/1"
WEIGHTS_FORMAT = "ddnet-bench-weights/1"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch CPU and CUDA, for the checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    # torch.load(map_location=cuda) moves these byte tensors to the GPU; the setters take CPU ones only
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save into memory, then write a temporary file of this call's own, fsync it and rename it over `path`.

    A kill (or a power cut, thanks to the fsync) never leaves a torn `path`; two writers never share a
    temporary file. Serialising first makes a full disk an OSError (ENOSPC) from the write, where torch's
    own file writer says "unexpected pos ..."; a failed save removes its temporary file instead of
    leaving it to fill the disk.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file: name the one saved
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def weights_record(model: torch.nn.Module, cfg_dict: dict[str, Any], epoch: int) -> dict[str, Any]:
    """What `weights.pt` holds: the state dict, the model widths and the normalisation it was trained with."""
    return {"format": WEIGHTS_FORMAT, "model": model.state_dict(), "model_config": cfg_dict["model"],
            "normalisation": {"normalisation": cfg_dict["data"]["normalisation"],
                              "hu_window": list(cfg_dict["data"]["hu_window"])},
            "epoch": epoch}
