"""[driver] Pre-launch checks: what would otherwise fail late or hang, caught before any task starts.

Worker count against task slots, dynamic allocation, the GPU amount per task. Each failure is a
ConfigError that names the Spark conf key to set and why.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

from sparkdl.errors import ConfigError

if TYPE_CHECKING:
    from sparkdl.launch.rendezvous import LaunchOptions

__all__ = [
    "SLOT_WAIT_CAP_S",
    "check_dynamic_allocation",
    "check_gpu_conf",
    "check_launch",
    "check_slots",
    "task_slots",
]

log = logging.getLogger("sparkdl")

SLOT_WAIT_CAP_S = 30.0
"""Longest wait for executors to register before the slot check gives its verdict."""
_POLL_S = 0.1


def check_launch(sc: Any, options: LaunchOptions, *, timeout_s: float) -> None:
    """Every check that must pass before a task starts; each failure is a ConfigError."""
    conf = sc.getConf()
    check_dynamic_allocation(conf)
    check_gpu_conf(conf, options.use_gpu, master=sc.master)
    check_slots(sc, options.num_workers, wait_s=timeout_s)


def check_dynamic_allocation(conf: Any) -> None:
    """Barrier stages refuse dynamic allocation; say so before Spark does, with the fix."""
    value = str(conf.get("spark.dynamicAllocation.enabled", "false") or "false").strip().lower()
    if value == "true":
        raise ConfigError(
            "spark.dynamicAllocation.enabled must be false for barrier-mode training, got true. "
            "Start the SparkSession with spark.dynamicAllocation.enabled=false and a fixed "
            "spark.executor.instances."
        )


def check_gpu_conf(conf: Any, use_gpu: bool, master: str = "") -> None:
    """use_gpu needs Spark to hand each task a GPU (spark.task.resource.gpu.amount), which
    Spark's ``local[N]`` master never does: its tasks would wait for a GPU forever."""
    if not use_gpu:
        return
    amount = conf.get("spark.task.resource.gpu.amount", None)
    try:
        ok = amount is not None and float(amount) > 0
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(
            f"spark.task.resource.gpu.amount must be > 0 with use_gpu=True, got {amount!r}. "
            "Set spark.task.resource.gpu.amount=1, spark.executor.resource.gpu.amount and a "
            "GPU discovery script (spark.executor.resource.gpu.discoveryScript), or use_gpu=False."
        )
    if re.fullmatch(r"local(\[.*\])?", master or ""):
        raise ConfigError(
            f"the Spark master must assign GPUs to tasks with use_gpu=True, got {master}, which "
            "never does (tasks would wait forever). Use local-cluster[...], a cluster master, "
            "or Distributor(..., local_mode=True) for plain processes on this machine."
        )


def task_slots(sc: Any) -> int | None:
    """Tasks Spark can run at once for the default resource profile; None if unknown.

    Uses the internal ``SparkContext.maxNumConcurrentTasks`` (with a ResourceProfile since Spark
    3.1, without before).
    """
    try:
        jsc = sc._jsc.sc()
    except Exception:
        return None
    try:
        profile = jsc.resourceProfileManager().defaultResourceProfile()
        return int(jsc.maxNumConcurrentTasks(profile))
    except Exception:
        try:
            return int(jsc.maxNumConcurrentTasks())
        except Exception:
            return None


def _static_slot_limit(sc: Any) -> int | None:
    """Slot ceiling known from the master URL alone: local[N] and local-cluster[N,C,M]."""
    master = sc.master or ""
    try:
        cpus = max(1, int(float(sc.getConf().get("spark.task.cpus", "1") or 1)))
    except ValueError:
        cpus = 1
    cluster = re.fullmatch(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*\d+\s*\]", master)
    if cluster:
        return int(cluster.group(1)) * (int(cluster.group(2)) // cpus)
    return None


def check_slots(sc: Any, num_workers: int, *, wait_s: float) -> None:
    """num_workers must fit in the task slots available at once, or Spark waits for minutes.

    In local mode the count is final; in cluster modes executors may still be registering, so
    wait up to ``wait_s`` for enough slots. If the count cannot be read, warn and go on.
    """
    is_local = (sc.master or "").startswith("local") and not sc.master.startswith("local-cluster")
    ceiling = _static_slot_limit(sc)
    slots = task_slots(sc)
    # A master whose size is known (local-cluster) will get its executors: wait the whole
    # launch timeout for them on a busy machine; elsewhere give up sooner and say why.
    if ceiling is None:
        wait_s = min(wait_s, SLOT_WAIT_CAP_S)
    deadline = time.monotonic() + wait_s
    while (
        not is_local
        and slots is not None
        and slots < num_workers
        and (ceiling is None or num_workers <= ceiling)
        and time.monotonic() < deadline
    ):
        time.sleep(_POLL_S)
        slots = task_slots(sc)
    if slots is None:
        log.warning("cannot read Spark's task slots; launching %d workers unchecked", num_workers)
        return
    if slots < num_workers:
        raise ConfigError(
            f"num_workers must be at most the task slots Spark can give at once, got "
            f"{num_workers} with {slots} slot(s) on master {sc.master}. Lower num_workers, or "
            "give the application more executors or cores (spark.executor.instances, "
            "spark.executor.cores, spark.task.cpus, spark.task.resource.gpu.amount)."
        )
