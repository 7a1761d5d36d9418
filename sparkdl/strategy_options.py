"""[any] Each synchronization strategy's options: frozen keyword-only dataclasses validated on
creation (``strategy_options`` on the estimator, ``**options`` of ``sparkdl.sync.prepare``).

``STRATEGY_OPTIONS`` maps a strategy's name to its class; ``sparkdl.config.SyncConfig`` turns a
plain dict into one (re-exported from ``sparkdl.config``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparkdl._checks import expect_bool, expect_choice, expect_int, expect_number, fail

__all__ = [
    "COMPRESSIONS",
    "PIPELINE_SCHEDULES",
    "STRATEGY_OPTIONS",
    "AllReduceOptions",
    "FSDPOptions",
    "LocalSGDOptions",
    "ParameterServerOptions",
    "PipelineOptions",
]

PIPELINE_SCHEDULES = ("gpipe", "1f1b")
COMPRESSIONS = ("fp16", "bf16", "powersgd")


def _positive_int(name: str, value: Any, fix: str, *, allow_zero: bool = False) -> None:
    expect_int(name, value, fix, low=0 if allow_zero else 1)


@dataclass(frozen=True, kw_only=True)
class AllReduceOptions:
    """``strategy="allreduce"``: DistributedDataParallel, optionally with compressed gradients."""

    compression: str | None = None
    """None (fp32 all-reduce), "fp16" or "bf16" (gradients cast before the all-reduce: half the
    bytes), or "powersgd" (low-rank gradient approximation with error feedback)."""
    powersgd_rank: int = 1
    """PowerSGD matrix approximation rank (≥ 1): bytes grow with it, and so does accuracy."""
    powersgd_warmup_steps: int = 10
    """Steps of plain fp32 all-reduce before PowerSGD starts (≥ 2: error feedback needs them)."""
    find_unused_parameters: bool = False
    """DDP's option: allow parameters that ``forward`` does not use in a step (an unused head,
    a branch taken by some inputs); costs a graph traversal per step."""
    static_graph: bool = False
    """DDP's option: the set of used parameters is the same every step (lets DDP skip the
    traversal and supports unused parameters and activation checkpointing)."""
    gradient_as_bucket_view: bool = False
    """DDP's option: gradients are views into the all-reduce buckets (saves one gradient copy
    of memory; ``param.grad`` must not be replaced then)."""
    bucket_cap_mb: float | None = None
    """DDP's option: bucket size in MiB (None: DDP's default, 25)."""

    def __post_init__(self) -> None:
        for name in ("find_unused_parameters", "static_graph", "gradient_as_bucket_view"):
            expect_bool(name, getattr(self, name))
        if self.bucket_cap_mb is not None:
            expect_number("bucket_cap_mb", self.bucket_cap_mb, "Use e.g. 25", above=0)
        if self.compression is not None and self.compression not in COMPRESSIONS:
            raise fail(
                "compression",
                f"None or one of {COMPRESSIONS}",
                self.compression,
                'Use e.g. compression="fp16"',
            )
        _positive_int("powersgd_rank", self.powersgd_rank, "Use e.g. powersgd_rank=1")
        steps = self.powersgd_warmup_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise fail(
                "powersgd_warmup_steps",
                "an integer ≥ 2 (error feedback needs plain all-reduce steps first)",
                steps,
                "Use e.g. powersgd_warmup_steps=10",
            )


@dataclass(frozen=True, kw_only=True)
class LocalSGDOptions:
    """``strategy="local_sgd"``: local steps, parameters averaged every ``sync_every`` steps."""

    sync_every: int = 8
    """Average parameters across workers after every this many local steps (≥ 1)."""
    warmup_steps: int = 0
    """Steps of plain gradient all-reduce before local steps start (≥ 0)."""

    def __post_init__(self) -> None:
        _positive_int("sync_every", self.sync_every, "Use e.g. sync_every=8")
        _positive_int("warmup_steps", self.warmup_steps, "Use e.g. 0", allow_zero=True)


@dataclass(frozen=True, kw_only=True)
class ParameterServerOptions:
    """``strategy="parameter_server"``: asynchronous SGD against parameter-server ranks."""

    max_staleness: int = 8
    """Largest number of server updates between the parameters a gradient was computed on and
    the moment it arrives; staler gradients are dropped (and counted), never applied (≥ 0)."""
    num_servers: int = 1
    """Ranks 0 … num_servers-1 each hold a shard of the parameters (whole tensors, balanced by
    size) and serve it from a thread, next to their own training (1 ≤ num_servers ≤ workers)."""

    def __post_init__(self) -> None:
        _positive_int("max_staleness", self.max_staleness, "Use e.g. 8", allow_zero=True)
        _positive_int("num_servers", self.num_servers, "Use e.g. num_servers=1")


@dataclass(frozen=True, kw_only=True)
class FSDPOptions:
    """``strategy="fsdp"``: parameters, gradients and optimizer state sharded (FSDP2)."""

    reshard_after_forward: bool = True
    """Free a unit's gathered parameters after its forward (less memory, one more all-gather in
    backward). The root unit always keeps them: backward needs them at once."""
    min_unit_params: int = 100_000
    """A direct child of the model holding at least this many parameters becomes its own FSDP
    unit (gathered only around its own compute); smaller ones are sharded with the root (fewer,
    larger collectives). 0: every child with parameters is a unit."""

    def __post_init__(self) -> None:
        if not isinstance(self.reshard_after_forward, bool):
            raise fail(
                "reshard_after_forward", "a bool", self.reshard_after_forward, "Use True or False"
            )
        _positive_int("min_unit_params", self.min_unit_params, "Use e.g. 100000", allow_zero=True)


@dataclass(frozen=True, kw_only=True)
class PipelineOptions:
    """``strategy="pipeline"``: the model cut by layers into stages, each rank trains one;
    ``num_workers = stages × replicas`` (the replicas of a stage all-reduce its gradients)."""

    stages: int | None = None
    """Pipeline stages (≥ 2); None: num_workers (one pipeline, no replicas). num_workers must
    be a multiple of it."""
    microbatches: int | None = None
    """Microbatches each batch is cut into (None: 2 × stages). Must divide batch_size, the rows
    one pipeline replica takes per step; "1f1b" needs at least ``stages`` of them."""
    schedule: str = "1f1b"
    """"gpipe" (every microbatch's forward, then every backward) or "1f1b" (after a warm-up,
    one forward then one backward: at most ``stages`` microbatches' activations held)."""
    split_points: tuple[str, ...] | None = None
    """Names of the modules to cut before, in order, ``stages - 1`` of them (e.g.
    ``["layers.4", "layers.8"]``; a name inside a child must be inside ``nn.Sequential``s).
    None: cut the model's top-level children into ``stages`` runs balanced by parameter count
    (see sparkdl.sync.pipeline_split)."""

    def __post_init__(self) -> None:
        if self.stages is not None:
            if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 2:
                raise fail(
                    "stages",
                    "an integer ≥ 2 (one stage is the whole model on every rank: no pipeline)",
                    self.stages,
                    'Use stages=2 or more, or strategy="allreduce" to replicate the model',
                )
        if self.microbatches is not None:
            _positive_int("microbatches", self.microbatches, "Use e.g. microbatches=4")
        expect_choice("schedule", self.schedule, PIPELINE_SCHEDULES, 'Use schedule="1f1b"')
        points = self.split_points
        if points is not None:
            if isinstance(points, str) or not isinstance(points, (list, tuple)):
                raise fail(
                    "split_points", "a list of module names", points, 'Use e.g. ["layers.4"]'
                )
            if not points or not all(isinstance(p, str) and p for p in points):
                raise fail(
                    "split_points",
                    "a non-empty list of module names (None: the automatic split)",
                    points,
                    'Use e.g. ["layers.4"], or leave it out',
                )
            if len(set(points)) != len(points):
                raise fail("split_points", "distinct names", points, "Drop the repeated name")
            object.__setattr__(self, "split_points", tuple(points))
            if self.stages is not None and len(points) != self.stages - 1:
                raise fail(
                    "split_points",
                    f"stages - 1 = {self.stages - 1} names (each cut adds a stage)",
                    list(points),
                    f"Name {self.stages - 1} cut points, or use stages={len(points) + 1}",
                )
        if self.stages is not None and self.microbatches is not None:
            self.resolved(self.stages)

    def resolved(self, num_workers: int, batch_size: int | None = None) -> tuple[int, int]:
        """(stages, microbatches) for ``num_workers`` ranks; ConfigError naming the numbers when
        they do not fit (workers not a multiple of stages, microbatches not dividing the batch)."""
        stages = self.stages or num_workers
        if stages < 2:
            raise fail(
                "num_workers",
                '≥ 2 for strategy="pipeline" (its stages default to num_workers)',
                num_workers,
                'Use num_workers ≥ 2, or strategy="allreduce" for a single worker',
            )
        if num_workers % stages:
            raise fail(
                "num_workers",
                f"a multiple of stages={stages} (num_workers = stages × replicas)",
                num_workers,
                f"Use num_workers={stages * max(num_workers // stages, 1)} or a stages that "
                f"divides {num_workers}",
            )
        if self.split_points is not None and len(self.split_points) != stages - 1:
            raise fail(
                "split_points",
                f"stages - 1 = {stages - 1} names (stages={stages})",
                list(self.split_points),
                f"Name {stages - 1} cut points, or set stages={len(self.split_points) + 1}",
            )
        microbatches = self.microbatches or 2 * stages
        if self.schedule == "1f1b" and microbatches < stages:
            raise fail(
                "microbatches",
                f'≥ stages={stages} with schedule="1f1b"',
                microbatches,
                f'Use microbatches={stages} or more, or schedule="gpipe"',
            )
        if batch_size is not None and batch_size % microbatches:
            divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
            raise fail(
                "microbatches",
                f"a divisor of batch_size={batch_size} (the rows one pipeline replica takes "
                "per step, cut into equal microbatches)",
                microbatches,
                f"Use one of {divisors[:6]} or a batch_size that is a multiple of {microbatches}",
            )
        return stages, microbatches


STRATEGY_OPTIONS: dict[str, type] = {
    "allreduce": AllReduceOptions,
    "local_sgd": LocalSGDOptions,
    "parameter_server": ParameterServerOptions,
    "fsdp": FSDPOptions,
    "pipeline": PipelineOptions,
}
"""Each strategy's options class: the keys ``strategy_options`` accepts for it."""
