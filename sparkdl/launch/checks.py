"""[driver] Pre-launch checks: what would otherwise fail late or hang, caught before any task starts.

Worker count against task slots, dynamic allocation, the GPU amount per task, and the
cluster's security settings. Each failure is a ConfigError that names the Spark conf key to set
and why.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

from sparkdl.errors import ConfigError

if TYPE_CHECKING:
    from sparkdl.launch.rendezvous import LaunchOptions
    from sparkdl.session import SparkSide

__all__ = [
    "ALLOW_UNENCRYPTED_CONF",
    "SECURITY_CONFS",
    "SLOT_WAIT_CAP_S",
    "check_security",
    "check_dynamic_allocation",
    "check_gpu_conf",
    "check_launch",
    "check_slots",
]

log = logging.getLogger("sparkdl")

SLOT_WAIT_CAP_S = 30.0
"""Longest wait for executors to register before the slot check gives its verdict."""
_POLL_S = 0.1


def check_launch(
    side: SparkSide, options: LaunchOptions, *, timeout_s: float, allow_unencrypted: bool = False
) -> str | None:
    """Every check that must pass before a task starts; each failure is a ConfigError. Returns
    the security warning to log once per launch when encryption is on and explicitly waived.

    ``side`` is :func:`sparkdl.session.spark_side` of the session: the cluster's settings are
    read through it (``spark.conf`` on Spark Connect, which says so when it hides one)."""
    warning = check_security(
        {key: side.conf(key) for key in (*SECURITY_CONFS, ALLOW_UNENCRYPTED_CONF)},
        allow_unencrypted=allow_unencrypted,
    )
    conf = {key: side.conf(key) for key in _LAUNCH_CONFS}
    check_dynamic_allocation(conf)
    check_gpu_conf(conf, options.use_gpu, master=side.master)
    check_slots(side, options.num_workers, wait_s=timeout_s)
    return warning


_LAUNCH_CONFS = ("spark.dynamicAllocation.enabled", "spark.task.resource.gpu.amount")


SECURITY_CONFS = {
    "spark.ssl.enabled": "TLS on Spark's RPC and web endpoints",
    "spark.network.crypto.enabled": "AES encryption of Spark's RPC traffic",
    "spark.io.encryption.enabled": "encryption of Spark's shuffle and spill files",
    "spark.authenticate": "authentication of Spark's RPC connections",
}
"""The Spark settings that say an operator wants Spark's own traffic protected."""
ALLOW_UNENCRYPTED_CONF = "spark.sparkdl.allowUnencrypted"
"""Spark conf that waives :func:`check_security` for every launch of the session."""

_SPARKDL_TRAFFIC = (
    "gradients and parameters between the workers (gloo/NCCL collectives, unencrypted and "
    "unauthenticated), the rendezvous store on the chief's task address (torch's TCPStore: "
    "no authentication; anyone who can reach its port during the launch can talk to it), and "
    "the driver channel (each message HMAC-authenticated with a per-run token, not encrypted); "
    "the run directory holds the model and checkpoints as the storage keeps them"
)


def _is_true(value: Any) -> bool:
    return str(value or "").strip().lower() == "true"


def check_security(conf: dict[str, Any], *, allow_unencrypted: bool = False) -> str | None:
    """(driver) Refuse to open sparkdl's own unencrypted channels on a cluster configured to
    protect Spark's traffic, unless waived.

    ``conf`` maps Spark conf keys (those of SECURITY_CONFS and ALLOW_UNENCRYPTED_CONF) to their
    values (None: unset; read through ``spark.conf``/``SparkConf``). Returns None when none of
    the settings is on; the warning to log when one is on and ``allow_unencrypted`` (or the
    conf) waives it; raises ConfigError naming the settings, the traffic and the opt-in
    otherwise. (TorchDistributor refuses ``spark.ssl.enabled`` the same way.)
    """
    on = [key for key in SECURITY_CONFS if _is_true(conf.get(key))]
    if not on:
        return None
    settings = ", ".join(f"{key}=true ({SECURITY_CONFS[key]})" for key in on)
    if allow_unencrypted or _is_true(conf.get(ALLOW_UNENCRYPTED_CONF)):
        return (
            f"sparkdl: the cluster sets {settings}, and sparkdl's own traffic is not protected "
            f"that way: {_SPARKDL_TRAFFIC}. Allowed by allow_unencrypted / "
            f"{ALLOW_UNENCRYPTED_CONF}=true."
        )
    raise ConfigError(
        f"the cluster's security settings must allow sparkdl's unencrypted channels, got "
        f"{settings}. sparkdl does not encrypt: {_SPARKDL_TRAFFIC}. If training traffic may "
        f"travel unencrypted on this network, set the Spark conf {ALLOW_UNENCRYPTED_CONF}=true "
        "or pass allow_unencrypted=True (TorchEstimator or Distributor); otherwise train on a "
        "network you trust without these settings"
    )


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


def static_slot_limit(side: SparkSide) -> int | None:
    """Slot ceiling known from the master URL alone: local-cluster[N,C,M]."""
    cluster = re.fullmatch(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*\d+\s*\]", side.master)
    if cluster:
        return int(cluster.group(1)) * (int(cluster.group(2)) // side.task_cpus())
    return None


def check_slots(side: SparkSide, num_workers: int, *, wait_s: float) -> None:
    """num_workers must fit in the task slots available at once, or Spark waits for minutes.

    In local mode the count is final; in cluster modes executors may still be registering, so
    wait up to ``wait_s`` for enough slots. If the count cannot be read, warn and go on.
    """
    master = side.master
    is_local = master.startswith("local") and not master.startswith("local-cluster")
    ceiling = static_slot_limit(side)
    slots = side.task_slots()
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
        slots = side.task_slots()
    if slots is None:
        if side.kind == "connect":
            log.info(
                "sparkdl: Spark Connect does not show the cluster's task slots; launching %d "
                "workers unchecked (the launch timeout bounds the wait for them)",
                num_workers,
            )
        else:
            log.warning(
                "cannot read Spark's task slots; launching %d workers unchecked", num_workers
            )
        return
    if slots < num_workers:
        raise ConfigError(
            f"num_workers must be at most the task slots Spark can give at once, got "
            f"{num_workers} with {slots} slot(s) on master {master}. Lower num_workers, or "
            "give the application more executors or cores (spark.executor.instances, "
            "spark.executor.cores, spark.task.cpus, spark.task.resource.gpu.amount)."
        )
