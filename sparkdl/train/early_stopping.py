"""[worker] Early stopping on a validation metric (the loss by default), and the best epoch's weights kept for saving.

The decision is a pure function of the (all-reduced, hence identical on every rank) validation
losses seen so far; only the chief holds a copy of the best weights (it alone saves the model).
The training loop (``sparkdl.train.worker``) takes the snapshots and runs the collectives.
"""

from __future__ import annotations

import math

import torch

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Stop after ``patience`` epochs without a strict improvement: a lower value with
    ``mode="min"`` (losses, errors), a higher one with ``mode="max"`` (accuracy, AUC, ...)."""

    def __init__(self, patience: int, mode: str = "min") -> None:
        self.patience = patience
        self.mode = mode
        self.best_value = math.inf if mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        """The best epoch's weights on the chief (a CPU state dict); None on other ranks."""
        self.epochs_without_improvement = 0

    def improves(self, value: float) -> bool:
        return value < self.best_value if self.mode == "min" else value > self.best_value

    def update(
        self,
        epoch: int,
        value: float,
        *,
        improved: bool,
        state: dict[str, torch.Tensor] | None = None,
    ) -> bool:
        """Record epoch ``epoch``'s validation value; True when training should stop.

        ``improved`` is the decision every rank agreed on; ``state`` the chief's weights then.
        """
        if improved:
            self.best_value, self.best_epoch = value, epoch
            self.epochs_without_improvement = 0
            self.best_state = state
        else:
            self.epochs_without_improvement += 1
        return self.epochs_without_improvement >= self.patience
