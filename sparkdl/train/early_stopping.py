"""[worker] Early stopping on the validation loss, and the best epoch's weights kept for saving.

The decision is a pure function of the (all-reduced, hence identical on every rank) validation
losses seen so far; only the chief holds a copy of the best weights (it alone saves the model).
The training loop (``sparkdl.train.worker``) takes the snapshots and runs the collectives.
"""

from __future__ import annotations

import math

import torch

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Stop after ``patience`` epochs without a strictly lower validation loss."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_value = math.inf
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        """The best epoch's weights on the chief (a CPU state dict); None on other ranks."""
        self.epochs_without_improvement = 0

    def improves(self, value: float) -> bool:
        return value < self.best_value

    def update(
        self,
        epoch: int,
        value: float,
        *,
        improved: bool,
        state: dict[str, torch.Tensor] | None = None,
    ) -> bool:
        """Record epoch ``epoch``'s validation loss; True when training should stop.

        ``improved`` is the decision every rank agreed on; ``state`` the chief's weights then.
        """
        if improved:
            self.best_value, self.best_epoch = value, epoch
            self.epochs_without_improvement = 0
            self.best_state = state
        else:
            self.epochs_without_improvement += 1
        return self.epochs_without_improvement >= self.patience
