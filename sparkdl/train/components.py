"""[worker] Named losses and optimizers, resolved on the worker from their config values.

What a model may return, and which part of it is the prediction (:func:`prediction_of`): a
tensor is the prediction; a tuple or list → its first element; a dict (or any mapping) → the
value under ``"prediction"``, else ``"logits"``, else its first value; an object with a
``logits`` attribute (a Hugging Face ``ModelOutput``) → that; another dataclass → its first
field. A callable ``loss`` receives the output untouched; named losses, the built-in metrics,
validation, early stopping and ``TorchModel.transform`` use the prediction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from sparkdl.config import OptimConfig
from sparkdl.errors import ConfigError

__all__ = [
    "build_loss",
    "build_optimizer",
    "build_row_loss",
    "is_classification",
    "metric_name",
    "metric_sum",
    "prediction_of",
]

_LOSSES: dict[str, Callable[..., nn.Module]] = {
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


def prediction_of(outputs: Any) -> torch.Tensor:
    """The prediction tensor inside a model's output (see the module docstring for the rule).

    Raises ConfigError naming the output's type when there is no tensor to take.
    """
    found: Any = outputs
    if isinstance(outputs, (tuple, list)) and outputs:
        found = outputs[0]
    elif isinstance(outputs, Mapping) and outputs:
        for key in ("prediction", "logits"):
            if key in outputs:
                found = outputs[key]
                break
        else:
            found = next(iter(outputs.values()))
    elif not isinstance(outputs, torch.Tensor) and isinstance(
        getattr(outputs, "logits", None), torch.Tensor
    ):
        found = outputs.logits
    elif dataclasses.is_dataclass(outputs) and not isinstance(outputs, type):
        fields = dataclasses.fields(outputs)
        found = getattr(outputs, fields[0].name) if fields else None
    if not isinstance(found, torch.Tensor):
        raise ConfigError(
            f"the model's output must be a tensor, or a tuple/list (first element), dict "
            f"('prediction' or 'logits' key, else the first value) or dataclass holding one, "
            f"got {type(outputs).__name__} (prediction candidate: {type(found).__name__}). "
            "Return the prediction tensor first, or pass a callable loss and no built-in metric"
        )
    return found


def metric_sum(name: str | None, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of the metric (correct predictions or squared errors), on the device.

    ``outputs`` is what the model returned; the metric reads :func:`prediction_of` of it.
    """
    if name is None:
        return torch.zeros((), dtype=torch.float64)
    outputs = prediction_of(outputs).detach()
    if name == "accuracy":
        return (outputs.argmax(dim=1) == labels).sum().double()
    if name == "mse" and outputs.numel() == labels.numel():
        return (outputs.reshape(labels.shape).double() - labels.double()).pow(2).sum()
    return torch.zeros((), dtype=torch.float64, device=outputs.device)


def build_loss(config: OptimConfig) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """The loss function ``loss(outputs, labels)``.

    A callable ``config.loss`` gets the model's output untouched. A named loss gets its
    prediction (:func:`prediction_of`) and labels of the kind it needs: class indices as int64
    for ``cross_entropy``/``nll`` (whole-valued float labels, e.g. from ``StringIndexer``, are
    cast; the driver refuses fractional ones before launch), and for the other losses float
    labels of the prediction's dtype and shape (an integer 0/1 label works with
    ``bce_with_logits``).
    """
    if not isinstance(config.loss, str):
        return config.loss
    loss = _named_loss(config)
    if config.loss in ("cross_entropy", "nll"):

        def indexed(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
            if labels.dtype != torch.int64:  # whole floats (StringIndexer), int32 ...
                labels = labels.long()
            prediction = prediction_of(outputs)
            _check_class_weights(config, prediction, loss)
            return loss(prediction, labels)

        return indexed

    def shaped(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        outputs = prediction_of(outputs)
        labels = labels.to(outputs.dtype)
        if outputs.dim() == 2 and outputs.shape[1] == 1 and labels.dim() == 1:
            outputs = outputs.squeeze(1)
        return loss(outputs, labels)

    return shaped


def build_row_loss(config: OptimConfig) -> Callable[[Any, Any, torch.Tensor], torch.Tensor]:
    """With sample weights: ``loss(outputs, labels, weights)`` → the sum over the batch of
    each row's loss times its weight (the caller divides by the weight sum of the global
    batch). A named loss computes the per-row loss (``reduction="none"``, averaged over any
    other dimensions, e.g. the labels of a multi-label row); a callable ``config.loss`` is
    called as ``loss(outputs, labels, weights)`` and its result used as it is."""
    if not isinstance(config.loss, str):
        return config.loss
    loss = _named_loss(config, reduction="none")
    indexed = config.loss in ("cross_entropy", "nll")

    def weighted(outputs: Any, labels: Any, weights: torch.Tensor) -> torch.Tensor:
        outputs = prediction_of(outputs)
        if indexed:
            _check_class_weights(config, outputs, loss)
            rows = loss(outputs, labels if labels.dtype == torch.int64 else labels.long())
        else:
            labels = labels.to(outputs.dtype)
            if outputs.dim() == 2 and outputs.shape[1] == 1 and labels.dim() == 1:
                outputs = outputs.squeeze(1)
            rows = loss(outputs, labels)
        rows = rows.reshape(rows.shape[0], -1).mean(dim=1) if rows.dim() > 1 else rows
        return (rows * weights.to(rows.dtype)).sum()

    return weighted


def _named_loss(config: OptimConfig, **kwargs: Any) -> nn.Module:
    """The named loss module, with ``class_weights`` as torch's ``weight`` when given."""
    if config.class_weights is not None:
        kwargs["weight"] = torch.tensor(config.class_weights, dtype=torch.float32)
    return _LOSSES[str(config.loss)](**kwargs)


def _check_class_weights(config: OptimConfig, prediction: torch.Tensor, loss: nn.Module) -> None:
    """ConfigError unless there is one class weight per output column (class); moves the
    weights to the prediction's device."""
    weights = config.class_weights
    if weights is None:
        return
    loss.to(prediction.device)
    if prediction.dim() < 2 or prediction.shape[1] == len(weights):
        return
    raise ConfigError(
        f"class_weights must hold one weight per class, got {len(weights)} weights for a model "
        f"output of {prediction.shape[1]} classes (shape {tuple(prediction.shape)}). Give "
        f"{prediction.shape[1]} weights"
    )


def build_optimizer(config: OptimConfig, params: Iterable[Any]) -> torch.optim.Optimizer:
    """A named optimizer at ``learning_rate`` and ``weight_decay``, or the user's
    ``optimizer(params)``."""
    if not isinstance(config.optimizer, str):
        return config.optimizer(params)
    named = {
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "sgd": torch.optim.SGD,
        "rmsprop": torch.optim.RMSprop,
        "adagrad": torch.optim.Adagrad,
    }[config.optimizer]
    if config.weight_decay is None:  # the optimizer's own default (AdamW: 0.01, else 0)
        return named(params, lr=config.learning_rate)
    return named(params, lr=config.learning_rate, weight_decay=config.weight_decay)
