"""[any] Configuration as data: frozen keyword-only dataclasses, validated on creation.

``TrainSpec`` is the one picklable bundle that crosses from the driver to the workers. Every
check that needs neither the DataFrame nor the cluster happens here, in ``__post_init__``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from sparkdl._checks import expect_choice, expect_int, expect_number, fail
from sparkdl.data.readers import READERS, require_petastorm
from sparkdl.errors import ConfigError
from sparkdl.strategy_options import (
    PIPELINE_SCHEDULES,
    STRATEGY_OPTIONS,
    AllReduceOptions,
    FSDPOptions,
    LocalSGDOptions,
    ParameterServerOptions,
    PipelineOptions,
)

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "STRATEGIES",
    "READERS",
    "ModelSpec",
    "OptimConfig",
    "SyncConfig",
    "AllReduceOptions",
    "LocalSGDOptions",
    "ParameterServerOptions",
    "FSDPOptions",
    "PipelineOptions",
    "PIPELINE_SCHEDULES",
    "STRATEGY_OPTIONS",
    "CheckpointConfig",
    "ElasticConfig",
    "ELASTIC_BATCH",
    "FaultInjection",
    "FAULT_MODES",
    "TrainSpec",
    "resolve_import_path",
]

LOSSES = ("cross_entropy", "mse", "l1", "smooth_l1", "bce_with_logits", "nll")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adagrad")
STRATEGIES = ("allreduce", "local_sgd", "parameter_server", "fsdp", "pipeline")
FAULT_MODES = ("exit", "sigkill", "raise", "hang")


def _positive_int(name: str, value: Any, fix: str, *, allow_zero: bool = False) -> None:
    expect_int(name, value, fix, low=0 if allow_zero else 1)


def resolve_import_path(path: str) -> Any:
    """``"package.module:attr"`` → the object; ConfigError naming the path when it cannot."""
    if not isinstance(path, str) or ":" not in path:
        raise fail("import path", 'of the form "package.module:attribute"', path, "Fix the path")
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
                raise fail(
                    "model kwargs",
                    "empty for an nn.Module instance",
                    dict(self.kwargs),
                    "Pass a factory to use keyword arguments",
                )
        elif not callable(f):
            raise fail(
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
            raise fail(
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
    reader: str = "pyarrow"
    """How workers read the shards: "pyarrow", or "petastorm" (compat environment only)."""
    early_stopping_patience: int = 0
    """Stop after this many epochs without an improvement of ``early_stopping_metric``,
    keeping the best epoch's weights (0: off; train every epoch and keep the last). Needs a
    validation split."""
    early_stopping_metric: str = "loss"
    """The validation metric early stopping watches: "loss", the built-in metric (accuracy or
    mse) or a name in ``metrics``."""
    early_stopping_mode: str = "auto"
    """"min", "max", or "auto": min for loss and errors (mse, mae, rmse), max otherwise."""
    precision: str = "32"
    """"32", "bf16" (autocast to bfloat16, CPU and GPU) or "fp16" (autocast to float16 and a
    gradient scaler; GPU only). Parameters, optimizer state and the saved model stay fp32."""
    lr_schedule: str | Callable[..., Any] = "constant"
    """A name in sparkdl.knobs.LR_SCHEDULES or ``schedule(optimizer, total_steps) ->
    torch.optim.lr_scheduler.LRScheduler``; stepped once per optimizer step."""
    lr_schedule_options: Mapping[str, Any] = field(default_factory=dict)
    """"cosine"/"linear": ``min_lr_ratio`` (final LR ÷ learning_rate, default 0); "step":
    ``step_size`` (optimizer steps, default a third of the run) and ``gamma`` (default 0.1)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to learning_rate before the schedule (0: none)."""
    grad_clip_norm: float = 0.0
    """Clip the global gradient norm (L2, over every parameter) to this value; 0: off."""
    accumulate_steps: int = 1
    """Batches whose gradients add up before one optimizer step (1: off)."""
    weight_decay: float | None = None
    """Weight decay of a named optimizer (AdamW: decoupled; the others: L2 in the gradient);
    None: the optimizer's default (AdamW 0.01, the others 0)."""
    metrics: tuple[Any, ...] = ()
    """Extra metrics per epoch on the training and validation rows: names in
    sparkdl.knobs.METRIC_NAMES or torchmetrics.Metric instances."""
    class_weights: tuple[float, ...] | None = None
    """cross_entropy / nll only: one weight per class (torch's ``weight`` argument)."""

    def __post_init__(self) -> None:
        if isinstance(self.loss, str) and self.loss not in LOSSES:
            raise fail("loss", f"one of {LOSSES} or a callable", self.loss, "Pick a listed name")
        if not isinstance(self.loss, str) and not callable(self.loss):
            raise fail("loss", "a name or a callable", self.loss, "Pass e.g. loss='mse'")
        if isinstance(self.optimizer, str) and self.optimizer not in OPTIMIZERS:
            raise fail(
                "optimizer",
                f"one of {OPTIMIZERS} or a callable",
                self.optimizer,
                "Pick a listed name",
            )
        if not isinstance(self.optimizer, str) and not callable(self.optimizer):
            raise fail(
                "optimizer", "a name or a callable", self.optimizer, "Pass e.g. optimizer='sgd'"
            )
        lr = self.learning_rate
        if (
            isinstance(lr, bool)
            or not isinstance(lr, (int, float))
            or not math.isfinite(lr)
            or lr <= 0
        ):
            raise fail("learning_rate", "a finite number > 0", lr, "Use e.g. 1e-3")
        _positive_int("batch_size", self.batch_size, "Use e.g. batch_size=64")
        _positive_int("epochs", self.epochs, "Use e.g. epochs=5")
        _positive_int(
            "log_every_steps", self.log_every_steps, "Use 0 to log per epoch only", allow_zero=True
        )
        _positive_int(
            "early_stopping_patience",
            self.early_stopping_patience,
            "Use 0 to train every epoch",
            allow_zero=True,
        )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise fail("seed", "an integer", self.seed, "Use e.g. seed=0")
        expect_choice("reader", self.reader, READERS, 'Use reader="pyarrow"')
        if self.reader == "petastorm":
            require_petastorm()  # fail on the driver, not on every worker
        from sparkdl.knobs import check_knobs

        for name in ("metrics", "class_weights"):  # lists from Params or TOML → tuples
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        check_knobs(self)


def _options_owner(key: str) -> list[str]:
    return [name for name, cls in STRATEGY_OPTIONS.items() if key in {f.name for f in fields(cls)}]


@dataclass(frozen=True, kw_only=True)
class SyncConfig:
    """How workers synchronize (one switch: ``strategy``) and that strategy's options."""

    strategy: str = "allreduce"
    """One of STRATEGIES: "allreduce" (DDP), "local_sgd", "parameter_server", "fsdp" or
    "pipeline"."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Options of the strategy, the fields of its class in STRATEGY_OPTIONS (e.g.
    ``{"compression": "fp16"}`` for allreduce); validated here, on the driver."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise fail(
                "strategy",
                f"one of {STRATEGIES}",
                self.strategy,
                'Use strategy="allreduce" unless you need another mode',
            )
        if not isinstance(self.options, Mapping):
            raise fail("strategy_options", "a dict", self.options, 'Pass e.g. {"sync_every": 8}')
        self.typed_options()

    def typed_options(self) -> Any:
        """The options as the strategy's options dataclass (ConfigError on a bad key or value)."""
        cls = STRATEGY_OPTIONS[self.strategy]
        allowed = sorted(f.name for f in fields(cls))
        for key in self.options:
            if key in allowed:
                continue
            owners = _options_owner(key)
            if owners:
                raise fail(
                    key,
                    f"used with strategy={owners[0]!r}",
                    f"{key}={self.options[key]!r} with strategy={self.strategy!r}",
                    f"Use strategy={owners[0]!r} or drop {key!r}",
                )
            raise fail(
                f"strategy_options key {key!r}",
                f"one of {allowed} for strategy={self.strategy!r}",
                key,
                "Check the spelling",
            )
        if self.strategy == "allreduce" and self.options.get("compression") != "powersgd":
            for key in ("powersgd_rank", "powersgd_warmup_steps"):
                if key in self.options:
                    raise fail(
                        key,
                        'used with compression="powersgd"',
                        f"{key} with compression={self.options.get('compression')!r}",
                        'Add compression="powersgd" or drop it',
                    )
        return cls(**dict(self.options))

    def check_world_size(self, num_workers: int, batch_size: int | None = None) -> None:
        """Checks that need the worker count (and, for "pipeline", the batch size): run on the
        driver before launching."""
        if self.strategy == "fsdp" and num_workers < 2:
            raise fail(
                "num_workers",
                '≥ 2 for strategy="fsdp" (it shards over a process group, and one worker has none)',
                num_workers,
                'Use num_workers ≥ 2, or strategy="allreduce" for a single worker',
            )
        opts = self.typed_options()
        if self.strategy == "parameter_server" and opts.num_servers > num_workers:
            raise fail(
                "num_servers",
                f"at most num_workers ({num_workers}): servers run on ranks 0 … num_servers-1",
                opts.num_servers,
                "Lower num_servers",
            )
        if self.strategy == "pipeline":
            opts.resolved(num_workers, batch_size)


ELASTIC_BATCH = ("per_worker", "global")


@dataclass(frozen=True, kw_only=True)
class ElasticConfig:
    """``num_workers=(min, max)``: the worker count follows the cluster's task slots.

    The first launch takes as many workers as slots allow between the two; after a lost worker
    the next launch waits ``wait_s`` for its slot, then goes on with the slots there are (at
    least ``min_workers``); when more slots free up the running group stops at its next
    checkpoint and relaunches larger (at most once per ``grow_interval_s``).
    """

    min_workers: int
    max_workers: int
    wait_s: float = 30.0
    """After a lost worker: how long to wait for its slot before launching smaller."""
    grow_interval_s: float = 300.0
    """Least time between two size changes before a grow (a flapping cluster does not thrash)."""
    batch: str = "per_worker"
    """"per_worker": batch_size rows per worker (the global batch changes with the size);
    "global": the global batch stays batch_size × max_workers, each worker takes its share
    (sizes that do not divide it are never launched)."""

    def __post_init__(self) -> None:
        expect_int("min_workers", self.min_workers, "Use e.g. num_workers=(1, 4)")
        expect_int("max_workers", self.max_workers, "Use e.g. num_workers=(1, 4)")
        if self.min_workers > self.max_workers:
            raise fail(
                "num_workers",
                "a range (min_workers, max_workers) with min ≤ max",
                (self.min_workers, self.max_workers),
                f"Use e.g. ({self.max_workers}, {self.min_workers})",
            )
        expect_number("elastic_wait_s", self.wait_s, "Use e.g. 30", at_least=0, below=math.inf)
        expect_number(
            "elastic_grow_interval_s",
            self.grow_interval_s,
            "Use e.g. 300",
            at_least=0,
            below=math.inf,
        )
        expect_choice("elastic_batch", self.batch, ELASTIC_BATCH, 'Use "per_worker" or "global"')

    @classmethod
    def from_num_workers(cls, num_workers: Any, **settings: Any) -> ElasticConfig | None:
        """None for an int ``num_workers`` (a fixed size); a config for a ``(min, max)`` pair."""
        if isinstance(num_workers, (list, tuple)):
            if len(num_workers) != 2:
                raise fail(
                    "num_workers",
                    "an integer or a pair (min_workers, max_workers)",
                    num_workers,
                    "Use e.g. num_workers=(2, 8)",
                )
            return cls(min_workers=num_workers[0], max_workers=num_workers[1], **settings)
        expect_int("num_workers", num_workers, "Use e.g. num_workers=2, or a range (2, 8)")
        return None

    def sizes(self, check: Callable[[int], Any]) -> list[int]:
        """The sizes in [min, max] that ``check(size)`` accepts (it raises ConfigError for the
        others: a pipeline's stage multiple, a global batch that does not divide, ...)."""
        good = []
        for size in range(self.min_workers, self.max_workers + 1):
            try:
                check(size)
            except ConfigError:
                continue
            good.append(size)
        return good

    def per_worker_batch(self, batch_size: int, world_size: int) -> int:
        """Rows per worker per step at ``world_size``: batch_size, or with ``batch="global"``
        the share of the global batch batch_size × max_workers (ConfigError if it does not
        divide)."""
        if self.batch == "per_worker":
            return batch_size
        total = batch_size * self.max_workers
        if total % world_size:
            raise fail(
                "elastic_batch",
                f'"per_worker", or "global" with a world size dividing the global batch '
                f"{total} (batch_size {batch_size} × max_workers {self.max_workers})",
                f"global at {world_size} workers",
                "Pick a batch_size whose global batch every size in the range divides",
            )
        return total // world_size


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
            raise fail("fault_injection mode", f"one of {FAULT_MODES}", self.mode, "Pick one")

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
                    raise fail(
                        "fault_injection",
                        "a dict with keys rank, step, attempt, mode",
                        dict(item),
                        "Remove unknown keys",
                    ) from exc
            else:
                raise fail(
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
    elastic: ElasticConfig | None = None
    """With ``num_workers=(min, max)``: the range and how the batch follows the size."""
    faults: tuple[FaultInjection, ...] = ()
    """Deliberate failures for tests (see FaultInjection); empty in real runs."""
    transform_fn: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """Runs in the loader thread on every training batch's dict before the model sees it
    (see ``ShardLoader``'s ``transform``); None: the batches as built."""
    inference_transform_fn: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """The same for validation batches (None: ``transform_fn``), e.g. without augmentation."""

    def __post_init__(self) -> None:
        for name, value in (("dataset_path", self.dataset_path), ("run_dir", self.run_dir)):
            if not isinstance(value, str) or not value:
                raise fail(name, "a non-empty path or URI", value, "Pass a directory")
        for name in ("transform_fn", "inference_transform_fn"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise fail(name, "None or a function of the batch dict", value, "Pass a function")
