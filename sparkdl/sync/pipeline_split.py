"""[worker] Cutting a model into pipeline stages: which layers each stage holds.

The model must compute its top-level children in order, each taking the previous one's
output: an ``nn.Sequential`` does, and so does a module whose ``forward`` just calls its
children one after another (the driver checks this on a batch before launch: the stages run in
order must give the model's own output). A split point may name a module deeper inside, e.g.
``"layers.4"``; each module on the way to it is then opened up into its children, which is
exact only for ``nn.Sequential`` containers (others are refused).

The automatic split (no ``split_points``) cuts only before a child that holds parameters, so
an activation or dropout stays with the layer before it; among those cuts it takes the ones
that make the largest stage's parameter count smallest (the earliest cuts win ties). Every
stage must hold parameters: a stage without any would have nothing to train.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from sparkdl.errors import ConfigError

__all__ = ["StagePart", "check_split_on_batch", "leftover_state", "split_model"]

Unit = tuple[str, nn.Module]
"""A named piece of the model that goes whole into one stage."""


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _units(model: nn.Module, split_points: Sequence[str]) -> list[Unit]:
    """The model's top-level children, opened up until every split point is one of them."""
    units: list[Unit] = list(model.named_children())
    for point in split_points:
        while not any(name == point for name, _ in units):
            index = next(
                (i for i, (name, _) in enumerate(units) if point.startswith(name + ".")), None
            )
            if index is None:
                shown = [name for name, _ in units][:12]
                raise ConfigError(
                    f"split_points must name modules of the model, got {point!r}. Modules it "
                    f"can cut before: {shown}{' …' if len(units) > 12 else ''}"
                )
            name, container = units[index]
            if not isinstance(container, nn.Sequential):
                raise ConfigError(
                    f"split_points must reach {point!r} through nn.Sequential containers, got "
                    f"{name!r}, a {type(container).__name__} (its forward may not run its "
                    f"children in order). Cut before {name!r} itself, or make it an "
                    "nn.Sequential"
                )
            inner = [(f"{name}.{child}", m) for child, m in container.named_children()]
            units[index : index + 1] = inner
    return units


def _balanced_starts(sizes: list[int], parts: int) -> list[int]:
    """Where parts 1 … parts-1 start, over blocks of ``sizes``: the largest part smallest."""
    n = len(sizes)
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    start = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):  # part k holds blocks j … i-1
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], start[k][i] = cost, j
    starts, i = [], n
    for k in range(parts, 1, -1):
        i = start[k][i]
        starts.append(i)
    return sorted(starts)


def split_model(
    model: nn.Module, stages: int, split_points: Sequence[str] | None = None
) -> list[list[Unit]]:
    """The units of each of ``stages`` stages, in order (ConfigError when it cannot be cut)."""
    units = _units(model, split_points or ())
    if split_points:
        names = [name for name, _ in units]
        cuts = [names.index(point) for point in split_points]
        if cuts[0] == 0 or any(b <= a for a, b in zip(cuts, cuts[1:])):
            raise ConfigError(
                f"split_points must be in the order the model runs its layers, after the first, "
                f"got {list(split_points)} (positions {cuts} among {len(names)} layers). Sort "
                "them, and do not cut before the first layer"
            )
        bounds = [0, *cuts, len(units)]
    else:
        # Blocks: each layer with parameters, with the parameter-free layers that follow it.
        blocks = [i for i, (_, m) in enumerate(units) if _params(m) > 0]
        if len(blocks) < stages:
            raise ConfigError(
                f"the model must have at least stages={stages} top-level children holding "
                f"parameters to cut between, got {len(blocks)} among "
                f"{[type(m).__name__ for _, m in units][:12]}. Pass split_points naming "
                "modules inside them (e.g. 'layers.4'), or use fewer stages"
            )
        ends = [*blocks[1:], len(units)]
        sizes = [_params(nn.ModuleList([m for _, m in units[a:b]])) for a, b in zip(blocks, ends)]
        sizes[0] += sum(_params(m) for _, m in units[: blocks[0]])
        bounds = [0, *(blocks[i] for i in _balanced_starts(sizes, stages)), len(units)]
    parts = [units[a:b] for a, b in zip(bounds, bounds[1:])]
    owner: dict[int, int] = {}
    for k, part in enumerate(parts):
        for _, module in part:
            for name, p in module.named_parameters():
                if owner.setdefault(id(p), k) != k:
                    raise ConfigError(
                        f"pipeline stages must not share parameters, got {name!r} of "
                        f"{type(module).__name__} in stages {owner[id(p)]} and {k} (tied "
                        "weights). Untie them, or cut so the sharing layers share a stage"
                    )
    for k, part in enumerate(parts):
        if not any(_params(m) for _, m in part):
            raise ConfigError(
                f"every pipeline stage must hold parameters, got stage {k} with only "
                f"{[name for name, _ in part]}. Move the cut points so each stage has a layer "
                "with parameters"
            )
    return parts


def leftover_state(model: nn.Module, parts: list[list[Unit]]) -> dict[str, Any]:
    """The model's state entries outside every stage's layers (non-tensor entries only, e.g.
    ``get_extra_state``): ConfigError for parameters or buffers there, which no stage trains."""
    names = [name for part in parts for name, _ in part]
    left = {
        key: value
        for key, value in model.state_dict().items()
        if not any(key.startswith(name + ".") for name in names)
    }
    tensors = sorted(k for k, v in left.items() if isinstance(v, torch.Tensor))
    if tensors:
        raise ConfigError(
            f"parameters and buffers must live in the layers the pipeline cuts between, got "
            f"{tensors[:8]} outside them (on the model itself or a container). Move them into "
            "a layer, or pass split_points that keep them inside one"
        )
    return left


class StagePart(nn.Module):
    """One stage's layers, run in order; its state dict keys are the whole model's."""

    def __init__(self, units: list[Unit]) -> None:
        super().__init__()
        self.names = [name for name, _ in units]
        self.layers = nn.ModuleList([module for _, module in units])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from sparkdl.data.inputs import call_model

        first, *rest = self.layers
        if kwargs:  # the first stage, fed named inputs
            x = call_model(first, kwargs)
        else:  # a tuple sent by the stage before travels as several tensors: one input again
            x = first(args[0] if len(args) == 1 else args)
        for layer in rest:
            x = layer(x)
        return x

    def model_state_dict(self) -> dict[str, Any]:
        """This stage's entries of the whole model's state dict (same keys, same tensors)."""
        return {
            f"{name}.{key}": value
            for name, layer in zip(self.names, self.layers)
            for key, value in layer.state_dict().items()
        }

    def load_model_state_dict(self, state: dict[str, Any]) -> None:
        """Load this stage's entries from a whole-model (or this stage's) state dict."""
        for name, layer in zip(self.names, self.layers):
            prefix = name + "."
            layer.load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )


def check_split_on_batch(
    model: nn.Module, parts: list[list[Unit]], inputs: Any, expected: Any
) -> None:
    """Run the stages in order on ``inputs``; ConfigError unless what travels between them is
    a tensor (or a tuple of tensors) and the last one's output equals ``expected`` (the
    model's own output on ``inputs``, in eval mode)."""
    from torch.utils._pytree import tree_leaves

    x: Any = None
    for k, part in enumerate(parts):
        stage = StagePart(part)
        x = (
            stage(**inputs)
            if isinstance(inputs, dict) and k == 0
            else stage(inputs if k == 0 else x)
        )
        travels = isinstance(x, torch.Tensor) or (
            isinstance(x, tuple) and all(isinstance(t, torch.Tensor) for t in x)
        )
        if k < len(parts) - 1 and not travels:
            raise ConfigError(
                f"what a pipeline stage hands the next must be a tensor or a tuple of tensors, "
                f"got {type(x).__name__} after {stage.names[-1]!r} (stage {k}). Cut elsewhere "
                "(split_points)"
            )
    got = tree_leaves(x)
    want = tree_leaves(expected)
    same = len(got) == len(want) and all(
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.shape == b.shape
        and torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5)
        for a, b in zip(got, want)
    )
    if not same:
        raise ConfigError(
            "the model must run its top-level children in order for strategy='pipeline' (each "
            "taking the previous one's output, as nn.Sequential does), got a different output "
            f"from its {len(parts)} stages run in order than from the model itself "
            f"(stages: {[[n for n, _ in p] for p in parts]}). Express the model as an "
            "nn.Sequential of its layers, or cut only inside nn.Sequential parts (split_points)"
        )
