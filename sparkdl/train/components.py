"""[worker] Named losses and optimizers, resolved on the worker from their config values."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from sparkdl.config import OptimConfig

__all__ = ["build_loss", "build_optimizer", "is_classification", "metric_name", "metric_sum"]

_LOSSES: dict[str, Callable[[], nn.Module]] = {
    "cross_entropy": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "l1": nn.L1Loss,
    "smooth_l1": nn.SmoothL1Loss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
    "nll": nn.NLLLoss,
}


def is_classification(config: OptimConfig) -> bool:
    """Whether labels are class indices (accuracy is then reported)."""
    return config.loss in ("cross_entropy", "nll")


def metric_name(config: OptimConfig) -> str | None:
    """The per-epoch quality metric: accuracy for class labels, mse for regression losses."""
    if is_classification(config):
        return "accuracy"
    if config.loss in ("mse", "l1", "smooth_l1"):
        return "mse"
    return None  # bce_with_logits or a custom loss: no metric beyond the loss


def metric_sum(name: str | None, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of the metric (correct predictions or squared errors), on the device."""
    if name == "accuracy":
        return (outputs.argmax(dim=1) == labels).sum().double()
    if name == "mse" and outputs.numel() == labels.numel():
        return (outputs.reshape(labels.shape).double() - labels.double()).pow(2).sum()
    return torch.zeros((), dtype=torch.float64, device=outputs.device)


def build_loss(config: OptimConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function; regression losses get outputs and labels of the same shape."""
    if not isinstance(config.loss, str):
        return config.loss
    loss = _LOSSES[config.loss]()
    if config.loss in ("cross_entropy", "nll"):
        return loss

    def shaped(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(outputs.dtype)
        if outputs.dim() == 2 and outputs.shape[1] == 1 and labels.dim() == 1:
            outputs = outputs.squeeze(1)
        return loss(outputs, labels)

    return shaped


def build_optimizer(config: OptimConfig, params: Iterable[Any]) -> torch.optim.Optimizer:
    """A named optimizer at ``learning_rate``, or the user's ``optimizer(params)``."""
    if not isinstance(config.optimizer, str):
        return config.optimizer(params)
    lr = config.learning_rate
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    return torch.optim.Adagrad(params, lr=lr)
