"""[any] Configuration as data: frozen keyword-only dataclasses, validated on creation.

``TrainSpec`` is the one picklable bundle that crosses from the driver to the workers. Every
check that needs neither the DataFrame nor the cluster happens here, in ``__post_init__``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sparkdl.errors import ConfigError

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "STRATEGIES",
    "ModelSpec",
    "OptimConfig",
    "SyncConfig",
    "CheckpointConfig",
    "FaultInjection",
    "FAULT_MODES",
    "TrainSpec",
    "resolve_import_path",
]

LOSSES = ("cross_entropy", "mse", "l1", "smooth_l1", "bce_with_logits", "nll")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adagrad")
STRATEGIES = ("allreduce",)
COMPRESSIONS = ("fp16", "bf16", "powersgd")
FAULT_MODES = ("exit", "sigkill", "raise", "hang")


def _fail(field_name: str, constraint: str, value: Any, fix: str) -> ConfigError:
    return ConfigError(f"{field_name} must be {constraint}, got {value!r}. {fix}.")


def _positive_int(name: str, value: Any, fix: str, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(name, f"an integer ≥ {low}", value, fix)


def resolve_import_path(path: str) -> Any:
    """``"package.module:attr"`` → the object; ConfigError naming the path when it cannot."""
    if not isinstance(path, str) or ":" not in path:
        raise _fail("import path", 'of the form "package.module:attribute"', path, "Fix the path")
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"import path {path!r} could not be resolved: {exc}. "
            "Check the module is installed on the driver and the executors"
        ) from exc
    return obj


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """How to build the model on each worker."""

    factory: Any
    """An ``nn.Module``, a zero-argument callable returning one, or ``"package.module:factory"``."""
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments for a factory (callable or import path); must be empty for a module."""

    def __post_init__(self) -> None:
        import torch.nn as nn

        f = self.factory
        if isinstance(f, str):
            resolve_import_path(f)  # fail on the driver, not on every worker
        elif isinstance(f, nn.Module):
            if self.kwargs:
                raise _fail(
                    "model kwargs",
                    "empty for an nn.Module instance",
                    dict(self.kwargs),
                    "Pass a factory to use keyword arguments",
                )
        elif not callable(f):
            raise _fail(
                "model",
                "an nn.Module, a callable returning one, or an import path",
                type(f).__name__,
                'Pass e.g. model=lambda: MyNet() or "pkg.mod:make_net"',
            )

    @property
    def import_path(self) -> str | None:
        """The factory's import path when it has one (saved so the model rebuilds without pickle)."""
        return self.factory if isinstance(self.factory, str) else None

    def build(self) -> Any:
        """A fresh module (a deep copy when the spec holds a module instance)."""
        import copy

        import torch.nn as nn

        f = self.factory
        if isinstance(f, nn.Module):
            return copy.deepcopy(f)
        factory = resolve_import_path(f) if isinstance(f, str) else f
        try:
            module = factory(**dict(self.kwargs))
        except Exception as exc:
            raise ConfigError(
                f"the model factory {f!r} raised {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(module, nn.Module):
            raise _fail(
                "the model factory's result",
                "an nn.Module",
                type(module).__name__,
                "Return the module from the factory",
            )
        return module


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Loss, optimizer and the shape of training."""

    loss: str | Callable[..., Any] = "cross_entropy"
    """A name in LOSSES or a callable ``loss(outputs, labels) -> scalar tensor``."""
    optimizer: str | Callable[..., Any] = "adam"
    """A name in OPTIMIZERS or a callable ``optimizer(params) -> torch.optim.Optimizer``."""
    learning_rate: float = 1e-3
    """Learning rate for a named optimizer (> 0)."""
    batch_size: int = 64
    """Rows per batch on each worker; the global batch is batch_size × num_workers."""
    epochs: int = 1
    """Passes over the training split."""
    seed: int = 0
    """Seeds model initialisation and the per-epoch shuffle."""
    shuffle: bool = True
    """Shuffle rows each epoch (seeded by seed and epoch)."""
    log_every_steps: int = 50
    """Record the cross-rank mean training loss every this many steps (0: per epoch only)."""

    def __post_init__(self) -> None:
        if isinstance(self.loss, str) and self.loss not in LOSSES:
            raise _fail("loss", f"one of {LOSSES} or a callable", self.loss, "Pick a listed name")
        if not isinstance(self.loss, str) and not callable(self.loss):
            raise _fail("loss", "a name or a callable", self.loss, "Pass e.g. loss='mse'")
        if isinstance(self.optimizer, str) and self.optimizer not in OPTIMIZERS:
            raise _fail(
                "optimizer",
                f"one of {OPTIMIZERS} or a callable",
                self.optimizer,
                "Pick a listed name",
            )
        if not isinstance(self.optimizer, str) and not callable(self.optimizer):
            raise _fail(
                "optimizer", "a name or a callable", self.optimizer, "Pass e.g. optimizer='sgd'"
            )
        lr = self.learning_rate
        if (
            isinstance(lr, bool)
            or not isinstance(lr, (int, float))
            or not math.isfinite(lr)
            or lr <= 0
        ):
            raise _fail("learning_rate", "a finite number > 0", lr, "Use e.g. 1e-3")
        _positive_int("batch_size", self.batch_size, "Use e.g. batch_size=64")
        _positive_int("epochs", self.epochs, "Use e.g. epochs=5")
        _positive_int(
            "log_every_steps", self.log_every_steps, "Use 0 to log per epoch only", allow_zero=True
        )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _fail("seed", "an integer", self.seed, "Use e.g. seed=0")


@dataclass(frozen=True, kw_only=True)
class SyncConfig:
    """How workers synchronize (one switch: ``strategy``) and that strategy's options."""

    strategy: str = "allreduce"
    """One of STRATEGIES; "allreduce" is DistributedDataParallel."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Strategy options (e.g. compression for allreduce); validated by the strategy."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise _fail(
                "strategy",
                f"one of {STRATEGIES}",
                self.strategy,
                'Use strategy="allreduce" unless you need another mode',
            )


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """When the chief writes checkpoints and how many it keeps."""

    every_epochs: int = 1
    """Checkpoint at the end of every this many epochs (0: never by epoch)."""
    every_steps: int = 0
    """Checkpoint every this many global steps (0: never by step)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a newer one commits."""

    def __post_init__(self) -> None:
        _positive_int(
            "checkpoint_every_epochs", self.every_epochs, "Use 0 to disable", allow_zero=True
        )
        _positive_int(
            "checkpoint_every_steps", self.every_steps, "Use 0 to disable", allow_zero=True
        )
        _positive_int("keep_last", self.keep_last, "Keep at least one checkpoint")


@dataclass(frozen=True, kw_only=True)
class FaultInjection:
    """A deliberate failure for tests: rank ``rank`` fails inside global step ``step`` (counted
    from 1, after the forward pass, before backward) on launch attempt ``attempt`` only.

    It travels in TrainSpec (never through an environment variable), so it reaches the
    workers exactly like the rest of the run's configuration.
    """

    rank: int = 0
    """The rank that fails."""
    step: int = 1
    """Global step (1-based) inside which it fails."""
    attempt: int = 0
    """Launch attempt on which it fails (0: the first); restarts count up from there."""
    mode: str = "exit"
    """"exit": os._exit(1); "sigkill": SIGKILL to itself; "raise": RuntimeError; "hang": sleep
    forever (the peers' collective timeout must end the group)."""

    def __post_init__(self) -> None:
        _positive_int("fault_injection rank", self.rank, "Use 0 for the chief", allow_zero=True)
        _positive_int("fault_injection step", self.step, "Steps count from 1")
        _positive_int("fault_injection attempt", self.attempt, "Use 0", allow_zero=True)
        if self.mode not in FAULT_MODES:
            raise _fail("fault_injection mode", f"one of {FAULT_MODES}", self.mode, "Pick one")

    @classmethod
    def coerce(cls, value: Any) -> tuple[FaultInjection, ...]:
        """None, a FaultInjection, a dict of its fields, or a list of those → a tuple."""
        if value is None:
            return ()
        items = value if isinstance(value, (list, tuple)) else [value]
        faults = []
        for item in items:
            if isinstance(item, cls):
                faults.append(item)
            elif isinstance(item, Mapping):
                try:
                    faults.append(cls(**dict(item)))
                except TypeError as exc:
                    raise _fail(
                        "fault_injection",
                        "a dict with keys rank, step, attempt, mode",
                        dict(item),
                        "Remove unknown keys",
                    ) from exc
            else:
                raise _fail(
                    "fault_injection",
                    "None, a FaultInjection, a dict or a list of them",
                    item,
                    'Pass e.g. {"rank": 1, "step": 5, "mode": "exit"}',
                )
        return tuple(faults)


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    """Everything a worker needs to train; picklable, and the only thing shipped to workers."""

    model: ModelSpec
    dataset_path: str
    """Root of a materialized ShardedDataset (its manifest must exist)."""
    run_dir: str
    """Run directory on storage every worker can reach; the chief writes model/metrics here."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: tuple[FaultInjection, ...] = ()
    """Deliberate failures for tests (see FaultInjection); empty in real runs."""

    def __post_init__(self) -> None:
        for name, value in (("dataset_path", self.dataset_path), ("run_dir", self.run_dir)):
            if not isinstance(value, str) or not value:
                raise _fail(name, "a non-empty path or URI", value, "Pass a directory")
