"""[any] Small ready-made model factories, named by import path in job configs.

e.g. ``model = "sparkdl.models:mlp"`` with ``[model.kwargs] in_features = 64`` in a TOML config.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

__all__ = ["mlp"]


def mlp(
    in_features: int,
    out_features: int,
    hidden: Sequence[int] = (128, 64),
    dropout: float = 0.0,
) -> nn.Module:
    """A ReLU multi-layer perceptron: in_features → hidden... → out_features (logits)."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)
