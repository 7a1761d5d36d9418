"""[driver] One seam over the two kinds of SparkSession: classic and Spark Connect.

A classic session has a SparkContext in this process (job groups, a status tracker, the JVM's
task slots); a Spark Connect session (``SparkSession.builder.remote(...)``, Databricks
serverless and shared notebooks, ``spark.api.mode=connect``) is a client of a remote server and
has none of these. Every driver-side use of them goes through :func:`spark_side`, which returns
a :class:`ClassicSide` or a :class:`ConnectSide` with the same small API:

========================  ==========================================  ==============================
what                      classic                                     Connect
========================  ==========================================  ==============================
``conf(key)``             ``SparkContext.getConf()`` (static too)     ``spark.conf`` (logged once
                                                                      when the server hides a key)
``job_phase(text)``       a job group + description                   a job tag (``spark.addTag``)
``cancel(handle)``        ``cancelJobGroup``                          ``spark.interruptTag``
``tasks(handle)``         the status tracker's task counts            None (not visible)
``task_slots()``          ``maxNumConcurrentTasks`` (internal)        None, or N of ``local[N]``
========================  ==========================================  ==============================

Nothing here imports pyspark at module level.
"""

from __future__ import annotations

import abc
import logging
import os
import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from sparkdl.errors import ConfigError

__all__ = [
    "MIN_CONNECT_VERSION",
    "ClassicSide",
    "ConnectSide",
    "SparkSide",
    "is_connect",
    "spark_side",
]

log = logging.getLogger("sparkdl")

MIN_CONNECT_VERSION = (3, 5)
"""Oldest Spark Connect server sparkdl runs on: barrier ``mapInArrow`` arrived in Spark 3.5."""
_JOB_PROPERTIES = ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel")


def is_connect(spark: Any) -> bool:
    """Whether ``spark`` is a Spark Connect session (no SparkContext in this process)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def spark_side(spark: Any = None) -> SparkSide:
    """The seam for ``spark``, or for the active (else a new, from the builder) session.

    Raises ConfigError for a Spark Connect server older than :data:`MIN_CONNECT_VERSION`.
    """
    if spark is None:
        from pyspark.sql import SparkSession

        spark = SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()
    if is_connect(spark):
        return ConnectSide(spark)
    return ClassicSide(spark)


def _slug(description: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", description).strip("-")[:60]
    return f"{slug or 'sparkdl'}-{uuid.uuid4().hex[:8]}"


def _local_slots(master: str) -> int | None:
    """Task slots a ``local[N]`` master gives (``local``: 1, ``local[*]``: this machine's cores;
    the server runs here with such a master), else None."""
    found = re.fullmatch(r"local(?:\[(\d+|\*)(?:,\s*\d+)?\])?", master or "")
    if not found:
        return None
    if found.group(1) in (None, ""):
        return 1
    if found.group(1) == "*":
        return os.cpu_count() or 1
    return int(found.group(1))


class SparkSide(abc.ABC):
    """What sparkdl's driver needs from a SparkSession; see the module doc for the two kinds."""

    kind = "spark"

    def __init__(self, spark: Any) -> None:
        self.spark = spark

    @property
    def master(self) -> str:
        return str(self.conf("spark.master") or "")

    @abc.abstractmethod
    def conf(self, key: str, default: str | None = None) -> str | None:
        """The value of Spark conf ``key``, or ``default`` when unset."""

    def task_cpus(self) -> int:
        """``spark.task.cpus`` (at least 1)."""
        try:
            return max(1, int(float(self.conf("spark.task.cpus", "1") or 1)))
        except ValueError:
            return 1

    @abc.abstractmethod
    def job_phase(self, description: str) -> AbstractContextManager[str]:
        """(driver) Spark jobs started inside carry a fresh handle (a job group or a tag) named
        after ``description``; the context yields the handle, for :meth:`cancel` and
        :meth:`tasks`."""

    def describe(self, text: str | None) -> None:  # noqa: B027 - a no-op unless overridden
        """Describe the next jobs in the Spark UI (classic only; Connect shows the phase tag)."""

    @abc.abstractmethod
    def cancel(self, handle: str) -> None:
        """Cancel the running jobs of ``handle``."""

    def tasks(self, handle: str) -> tuple[int, int, int] | None:
        """(started, done, total) tasks over ``handle``'s jobs so far; None when not visible."""
        return None

    def task_slots(self) -> int | None:
        """Tasks the cluster can run at once; None when unknown."""
        return None

    def driver_host(self) -> str:
        """An address of this process that executors can reach (the driver channel binds it)."""
        return socket.gethostname()

    @contextmanager
    def quiet_task_failure_logs(self) -> Iterator[None]:
        """Silence the JVM's duplicate task-failure logs while a stage runs (classic only)."""
        yield


class ClassicSide(SparkSide):
    """A classic SparkSession: SparkContext, job groups, the status tracker."""

    kind = "classic"

    def __init__(self, spark: Any) -> None:
        super().__init__(spark)
        self.sc = spark.sparkContext

    @property
    def master(self) -> str:
        return str(self.sc.master or "")

    def conf(self, key: str, default: str | None = None) -> str | None:
        value = self.sc.getConf().get(key, None)
        if value is None:
            try:
                value = self.spark.conf.get(key, None)
            except Exception:
                value = None
        return default if value is None else str(value)

    @contextmanager
    def job_phase(self, description: str) -> Iterator[str]:
        sc = self.sc
        group = _slug(description)
        saved = {key: sc.getLocalProperty(key) for key in _JOB_PROPERTIES}
        sc.setJobGroup(group, description, interruptOnCancel=True)
        try:
            yield group
        finally:
            for key, value in saved.items():
                sc.setLocalProperty(key, value)

    def describe(self, text: str | None) -> None:
        self.sc.setJobDescription(text)  # type: ignore[arg-type]

    def cancel(self, handle: str) -> None:
        self.sc.cancelJobGroup(handle)

    def tasks(self, handle: str) -> tuple[int, int, int] | None:
        tracker = self.sc.statusTracker()
        started = done = total = 0
        for job_id in tracker.getJobIdsForGroup(handle):
            job = tracker.getJobInfo(job_id)
            for stage_id in job.stageIds if job is not None else ():
                stage = tracker.getStageInfo(stage_id)
                if stage is not None:
                    started += stage.numActiveTasks + stage.numCompletedTasks
                    started += stage.numFailedTasks
                    done += stage.numCompletedTasks
                    total += stage.numTasks
        return started, done, total

    def task_slots(self) -> int | None:
        """Uses the internal ``SparkContext.maxNumConcurrentTasks`` (with a ResourceProfile
        since Spark 3.1, without before)."""
        try:
            jsc = self.sc._jsc.sc()
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

    def driver_host(self) -> str:
        try:
            return str(self.conf("spark.driver.host") or "") or socket.gethostname()
        except Exception:
            return socket.gethostname()

    @contextmanager
    def quiet_task_failure_logs(self) -> Iterator[None]:
        saved: dict[str, Any] = {}
        configurator = None
        try:
            jvm = self.sc._jvm
            configurator = jvm.org.apache.logging.log4j.core.config.Configurator
            manager = jvm.org.apache.logging.log4j.LogManager
            for name in _TASK_FAILURE_LOGGERS:
                saved[name] = manager.getLogger(name).getLevel()
                configurator.setLevel(name, jvm.org.apache.logging.log4j.Level.OFF)
        except Exception as exc:  # another logging backend
            log.debug("sparkdl: cannot quiet Spark's task-failure logs (%s)", exc)
        try:
            yield
        finally:
            for name, level in saved.items():
                try:
                    configurator.setLevel(name, level)  # type: ignore[union-attr]
                except Exception as exc:
                    log.debug("sparkdl: cannot restore the level of %s (%s)", name, exc)


_TASK_FAILURE_LOGGERS = (
    "org.apache.spark.executor.Executor",
    "org.apache.spark.scheduler.TaskSetManager",
)
"""The JVM loggers that print a failed task's Python traceback and Java stack (twice) on the
driver's console; sparkdl's WorkerGroupError says the same, once and readably."""


class ConnectSide(SparkSide):
    """A Spark Connect session: ``spark.conf``, job tags, nothing of the server's scheduler.

    Raises ConfigError when the server is older than :data:`MIN_CONNECT_VERSION`.
    """

    kind = "connect"
    _hidden_logged: set[str] = set()

    def __init__(self, spark: Any) -> None:
        super().__init__(spark)
        version = str(getattr(spark, "version", "") or "")
        found = re.match(r"(\d+)\.(\d+)", version)
        if found and (int(found.group(1)), int(found.group(2))) < MIN_CONNECT_VERSION:
            raise ConfigError(
                f"the Spark Connect server must be Spark {MIN_CONNECT_VERSION[0]}."
                f"{MIN_CONNECT_VERSION[1]} or newer, got {version}: sparkdl launches its "
                "workers as a barrier mapInArrow stage, which older servers lack. Use a "
                "newer runtime, or a classic session"
            )

    def conf(self, key: str, default: str | None = None) -> str | None:
        try:
            value = self.spark.conf.get(key, None)
        except Exception as exc:
            if key not in self._hidden_logged:
                self._hidden_logged.add(key)
                log.info(
                    "sparkdl: the Spark Connect server does not show %s (%s); assuming %r",
                    key,
                    str(exc).splitlines()[0][:200],
                    default,
                )
            return default
        return default if value is None else str(value)

    @contextmanager
    def job_phase(self, description: str) -> Iterator[str]:
        tag = _slug(description)
        self.spark.addTag(tag)
        try:
            yield tag
        finally:
            try:
                self.spark.removeTag(tag)
            except Exception as exc:  # the session may be gone
                log.debug("sparkdl: cannot remove the job tag %s (%s)", tag, exc)

    def cancel(self, handle: str) -> None:
        self.spark.interruptTag(handle)

    def task_slots(self) -> int | None:
        slots = _local_slots(self.master)
        return None if slots is None else max(1, slots // self.task_cpus())

    def driver_host(self) -> str:
        """This client's address as the cluster sees it: ``spark.sparkdl.channelHost`` when set
        (where the executors reach this notebook), else the local address of the interface
        that routes to the Connect server, else the host name."""
        chosen = self.conf("spark.sparkdl.channelHost")
        if chosen:
            return chosen
        try:
            server = str(self.spark.client.host)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((server, 9))  # UDP: no packet is sent, a route is chosen
                return str(probe.getsockname()[0])
        except Exception:
            return socket.gethostname()
