"""[driver] Elastic sizing: how many workers each launch gets when ``num_workers=(min, max)``.

A barrier stage has a fixed size, so elasticity happens between attempts, on Spark's own
machinery (the task slots its executors offer), in the spirit of torchrun's
``--nnodes=min:max`` and Horovod Elastic:

- **first launch**: as many workers as slots allow within the range (waiting up to the launch
  timeout for ``min_workers`` slots, as a fixed size waits for its own);
- **shrink**: after an attempt failed (a worker or executor lost), wait ``wait_s`` for the lost
  slots, then launch with the slots there are (at least ``min_workers``);
- **grow**: while an attempt runs, :class:`GrowWatch` polls the slots; when more are free than
  workers run, and ``grow_interval_s`` passed since the last size change, it writes the run
  directory's resize request. Every rank reads it at its next checkpoint (the chief reads,
  then broadcasts), they stop there, and the driver relaunches larger from that checkpoint.

Only sizes the strategy and the batch accept are launched (:meth:`ElasticConfig.sizes`: a
pipeline's multiples of ``stages``, a global batch's divisors). The slot count is Spark's
(classic sessions: the executors' cores ÷ ``spark.task.cpus``); where it cannot be read (Spark
Connect on a remote cluster) launches use ``max_workers`` and never grow.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from sparkdl import storage
from sparkdl.config import ElasticConfig
from sparkdl.errors import ConfigError
from sparkdl.rundir.layout import RunLayout

__all__ = [
    "ElasticSizer",
    "GrowWatch",
    "SizeChange",
    "elastic_config",
    "launch_sizes",
    "make_sizer",
]

log = logging.getLogger("sparkdl")

_POLL_S = 1.0


def elastic_config(values: dict[str, Any]) -> ElasticConfig | None:
    """The estimator's Params → an ElasticConfig for a ``num_workers`` range, None for an int;
    ConfigError naming a bad value."""
    return ElasticConfig.from_num_workers(
        values["num_workers"],
        wait_s=values.get("elastic_wait_s", 30.0),
        grow_interval_s=values.get("elastic_grow_interval_s", 300.0),
        batch=values.get("elastic_batch", "per_worker"),
    )


def launch_sizes(config: ElasticConfig, sync: Any, batch_size: int) -> list[int]:
    """The sizes in the range the strategy and the batch accept; ConfigError when none is, or
    when a pipeline leaves ``stages`` to follow the size (its checkpoints are per stage)."""
    if sync.strategy == "pipeline" and sync.typed_options().stages is None:
        raise ConfigError(
            "strategy_options stages must be set with a num_workers range under "
            f'strategy="pipeline" (it defaults to num_workers, and a checkpoint\'s pieces are '
            f"per stage), got None with num_workers=({config.min_workers}, "
            f"{config.max_workers}). Pass e.g. strategy_options={{'stages': 2}}"
        )

    def check(size: int) -> None:
        batch = config.per_worker_batch(batch_size, size)
        sync.check_world_size(size, batch_size=batch)

    sizes = config.sizes(check)
    if not sizes:
        check(config.min_workers)  # raises the first size's own reason
        raise ConfigError(
            f"num_workers must allow a size strategy={sync.strategy!r} accepts, got "
            f"({config.min_workers}, {config.max_workers}). Widen the range"
        )
    skipped = [n for n in range(config.min_workers, config.max_workers + 1) if n not in sizes]
    if skipped:
        log.info(
            "sparkdl: num_workers range (%d, %d): sizes %s are never launched (strategy %r or "
            "the %s batch cannot use them); launches pick among %s",
            config.min_workers,
            config.max_workers,
            skipped,
            sync.strategy,
            config.batch.replace("_", "-"),
            sizes,
        )
    if sync.strategy == "parameter_server":
        log.info(
            "sparkdl: elastic parameter server: the worker count follows the slots, the "
            "servers stay num_servers=%d at every size",
            sync.typed_options().num_servers,
        )
    return sizes


def make_sizer(
    side: Any,
    config: ElasticConfig,
    sync: Any,
    checkpoint: Any,
    batch_size: int,
    *,
    timeout_s: float,
) -> ElasticSizer:
    """(driver, before anything is written) The sizer of an elastic fit; ConfigError when
    ``max_workers`` exceeds the slots a ``local[N]``/``local-cluster`` master can ever offer."""
    from sparkdl.launch.checks import static_slot_limit

    if not checkpoint.every_steps and not checkpoint.every_epochs:
        log.warning(
            "sparkdl: num_workers is a range but checkpoints are off: the run can shrink after "
            "a loss (from the start) but never grows. Set checkpoint_every_steps"
        )
    ceiling = None if side is None else static_slot_limit(side)
    if side is not None and re.fullmatch(r"local(\[.*\])?", side.master or ""):
        ceiling = side.task_slots()  # local[N]: the count is final
    if side is not None and ceiling is not None and config.max_workers > ceiling:
        raise ConfigError(
            f"max_workers must be at most the task slots master {side.master} can ever offer, "
            f"got {config.max_workers} with {ceiling} slot(s). Lower max_workers"
        )
    sizes = launch_sizes(config, sync, batch_size)
    return ElasticSizer(side, config, sizes, timeout_s=timeout_s)


@dataclass(frozen=True)
class SizeChange:
    """One launch's size: which attempt, how many workers, from which step, and why."""

    attempt: int
    workers: int
    start_step: int
    why: str
    """"start", "shrink" (fewer slots after a loss), "grow" (slots returned), "restart"."""


class ElasticSizer:
    """Picks each launch's size from the task slots Spark offers (see the module docstring)."""

    def __init__(
        self, side: Any, config: ElasticConfig, allowed: list[int], *, timeout_s: float
    ) -> None:
        if not allowed:
            raise ConfigError(
                f"num_workers must allow at least one size the strategy and batch accept, got "
                f"({config.min_workers}, {config.max_workers}) with none. Widen the range"
            )
        self.side, self.config, self.allowed, self.timeout_s = side, config, allowed, timeout_s
        self.changed_at = time.monotonic()

    def slots(self) -> int | None:
        """Task slots Spark offers now (None: unknown; local processes: max_workers)."""
        if self.side is None:
            return self.config.max_workers
        return self.side.task_slots()

    def _fitting(self, slots: int | None) -> int | None:
        if slots is None:
            return self.allowed[-1]
        fitting = [n for n in self.allowed if n <= slots]
        return fitting[-1] if fitting else None

    def first_size(self) -> int:
        """(driver) The first launch's size: as many as the slots allow, waiting up to the
        launch timeout for the smallest allowed size."""
        return self._wait_for(self.allowed[0], self.timeout_s, settle=0.0)

    def after_failure(self, previous: int) -> int:
        """(driver) The size after a failed attempt of ``previous`` workers: wait ``wait_s`` for
        their slots, then take what there is (waiting up to the launch timeout for the
        smallest allowed size)."""
        deadline = time.monotonic() + self.config.wait_s
        while time.monotonic() < deadline:
            slots = self.slots()
            if slots is None or slots >= previous:
                break
            time.sleep(_POLL_S)
        return self._wait_for(self.allowed[0], self.timeout_s, settle=0.0)

    def _wait_for(self, least: int, wait_s: float, settle: float) -> int:
        deadline = time.monotonic() + wait_s
        while True:
            size = self._fitting(self.slots())
            if size is not None and size >= least:
                return size
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"num_workers must find at least min_workers={least} task slots, got "
                    f"{self.slots()} after waiting {wait_s:g} s. Give the application more "
                    "executors or cores, or lower min_workers"
                )
            time.sleep(_POLL_S)

    def grow_target(self, current: int) -> int | None:
        """A larger allowed size the slots fit now, once ``grow_interval_s`` has passed since
        the last size change; else None."""
        if time.monotonic() - self.changed_at < self.config.grow_interval_s:
            return None
        slots = self.slots() if self.side is not None else None
        size = self._fitting(slots) if slots is not None else None
        return size if size is not None and size > current else None

    def changed(self) -> None:
        """Note a size change now (the grow interval counts from here)."""
        self.changed_at = time.monotonic()


class GrowWatch:
    """(driver) While an attempt of ``current`` workers runs, ask it to stop at its next
    checkpoint once :meth:`ElasticSizer.grow_target` offers more; ``target`` says how many."""

    def __init__(self, sizer: ElasticSizer, run_dir: str, attempt: int, current: int) -> None:
        self.sizer, self.attempt, self.current = sizer, attempt, current
        self.path = RunLayout(run_dir).resize_request
        self.target: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sparkdl-grow", daemon=True)

    def __enter__(self) -> GrowWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(_POLL_S):
            try:
                target = self.sizer.grow_target(self.current)
            except Exception as exc:  # a slot count that cannot be read: no grow this time
                log.debug("sparkdl: grow check failed: %s", exc)
                continue
            if target is None:
                continue
            request = {"attempt": self.attempt, "workers": target}
            storage.write_file(self.path, json.dumps(request).encode())
            self.target = target
            log.warning(
                "sparkdl: task slots for %d workers (running %d); the group stops at its next "
                "checkpoint and relaunches larger",
                target,
                self.current,
            )
            return
