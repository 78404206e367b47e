"""Fig. 9(a): data-movement profile (HtoD, DtoH, DtoD, memset) of the host loader vs DoLL.

The paper's regime (`bench.grids.paper_base`: 5120 + 784 slices of 512 px, batch 32, 50 epochs): DoLL
stages the whole training set on the device, so its size is what the profile is about.
"""

from __future__ import annotations

from bench.grids import Cell, dense_model, standard_factors
from ddnet.config import TrainConfig

NAME = "fig9"
DESCRIPTION = "Fig. 9(a): copy profile of the dense model, host DataLoader vs DoLL (profile_steps 5)."

PROFILE_STEPS = 5


def cells(base: TrainConfig) -> list[Cell]:
    """Dense fp32 eager model with a profiled window, once per loader."""
    base = dense_model(base).replace(precision="fp32", graphs="off", profile_steps=PROFILE_STEPS)
    out = []
    for loader, label in (("host", "host DataLoader (DDL)"), ("device", "DoLL (device loader)")):
        cfg = base.replace(loader=loader)
        factors = {**standard_factors(cfg), "profile_steps": PROFILE_STEPS}
        out.append(Cell(f"{loader}-profile", f"DDNet dense, {label}, profiled", factors, cfg))
    return out
