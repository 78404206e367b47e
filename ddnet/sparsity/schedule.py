"""The hybrid schedule: the 'auto' dense-to-sparse switch and the phase of an epoch."""

from __future__ import annotations

import math
from typing import Any

from ddnet.errors import UserError

# ----------------------------------------------------------------------------- schedule


class AutoSwitch:
    """The '--dense-epochs auto' rule, after the paper's Fig. 4b.

    The paper plots the change of the loss per epoch on a log scale: it spans
    several orders of magnitude early on, then stays within one order of
    magnitude; that is when pruning stops hurting. Precisely, with L_t the mean
    training loss of dense epoch t (t = 1, 2, ...) and d_t = |L_t - L_{t-1}|
    (t >= 2), `update` returns True at the end of epoch t when

      (a) t >= min_epoch, and t >= patience + 1 (there are `patience` changes), and
          max(d_{t-patience+1..t}) / min(d_{t-patience+1..t}) <= 10
          (all zero counts as settled; a zero beside a non-zero change does not;
          a non-finite loss never settles), or
      (b) max_epoch is set and t >= max_epoch (forced, so at least one sparse
          epoch remains when the trainer passes epochs - 1).

    `switch_epoch` is then t, the number of dense epochs done. Once fired it
    keeps returning True and `switch_epoch` does not move.
    """

    RATIO = 10.0  # one order of magnitude

    def __init__(self, patience: int = 3, min_epoch: int = 2, max_epoch: int | None = None) -> None:
        if patience < 1:
            raise UserError(f"auto switch patience {patience} must be at least 1.")
        if min_epoch < 1:
            raise UserError(f"auto switch min_epoch {min_epoch} must be at least 1.")
        if max_epoch is not None and max_epoch < 1:
            raise UserError(f"auto switch max_epoch {max_epoch} must be at least 1; use --epochs 2 or more.")
        self.patience = patience
        self.min_epoch = min_epoch
        self.max_epoch = max_epoch
        self.losses: list[float] = []
        self.switch_epoch: int | None = None
        self.forced = False
        """True when it fired because max_epoch was reached, not because the loss settled."""
        self.rule = (
            f"prune after dense epoch t >= {min_epoch} once the last {patience} changes "
            f"|L_t - L_(t-1)| of the training loss lie within one order of magnitude "
            f"(max/min <= {self.RATIO:g})"
            + (f"; forced at epoch {max_epoch}" if max_epoch is not None else "")
        )

    def changes(self) -> list[float]:
        """d_t for t = 2..len(losses)."""
        return [abs(b - a) for a, b in zip(self.losses, self.losses[1:], strict=False)]

    def _settled(self) -> bool:
        d = self.changes()[-self.patience:]
        if len(d) < self.patience or not all(math.isfinite(v) for v in d):
            return False
        lo, hi = min(d), max(d)
        if hi == 0.0:
            return True
        return lo > 0.0 and hi / lo <= self.RATIO

    def update(self, train_loss: float) -> bool:
        """Record one finished dense epoch's training loss; True when it is time to prune now."""
        if self.switch_epoch is not None:
            return True
        self.losses.append(float(train_loss))
        t = len(self.losses)
        if t >= self.min_epoch and self._settled():
            self.switch_epoch = t
        elif self.max_epoch is not None and t >= self.max_epoch:
            self.switch_epoch = t
            self.forced = True
        return self.switch_epoch is not None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the rule mid-run."""
        return {"losses": list(self.losses), "switch_epoch": self.switch_epoch, "forced": self.forced}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.losses = [float(v) for v in d["losses"]]
        self.switch_epoch = d["switch_epoch"]
        self.forced = bool(d.get("forced", False))


def phase_of(epoch_index: int, dense_epochs: int | None) -> str:
    """'dense' or 'sparse' for the 0-based `epoch_index`.

    dense_epochs None means no switch is scheduled (yet): no sparsity, or an
    'auto' schedule that has not fired, so the epoch is dense.
    """
    if epoch_index < 0:
        raise ValueError(f"epoch_index must be >= 0, got {epoch_index}")
    if dense_epochs is None or epoch_index < dense_epochs:
        return "dense"
    return "sparse"


