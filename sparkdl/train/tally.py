"""[worker] The running totals of a worker's epoch in progress (loss, metric, gradient norms)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Tally"]


class Tally:
    """Running totals of the epoch in progress on this rank; after a resume the chief's also hold
    the whole group's totals from before the checkpoint (the other ranks' start from zero)."""

    def __init__(self, device: torch.device) -> None:
        # Losses accumulate on the device; reading them back (a sync on GPU) happens per window.
        self.window = torch.zeros((), dtype=torch.float64, device=device)
        self.score = torch.zeros((), dtype=torch.float64, device=device)  # correct or sq. error
        self.window_steps = 0
        self.loss_sum = 0.0
        self.lr = 0.0  # the learning rate the last optimizer step used
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=device)  # pre-clip, summed
        self.norm_steps = 0
        self.epoch_grad_norm = 0.0  # this rank's reported windows this epoch
        self.epoch_norm_steps = 0.0

    def reset(self) -> None:
        self.window.zero_()
        self.score.zero_()
        self.window_steps = 0
        self.loss_sum = 0.0
        self.grad_norm.zero_()
        self.norm_steps = 0
        self.epoch_grad_norm = self.epoch_norm_steps = 0.0

    def restore(self, totals: dict[str, Any]) -> None:
        self.window.fill_(float(totals.get("window", 0.0)))
        self.score.fill_(float(totals.get("score", 0.0)))
        self.window_steps = int(totals.get("window_steps", 0))
        self.loss_sum = float(totals.get("loss_sum", 0.0))
