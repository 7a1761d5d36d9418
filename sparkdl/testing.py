"""[driver] Helpers shared by tests, notebooks and the demo: a loopback-only local Spark session.

Spark's host name resolution picks an outside interface on many machines; everything here binds
to 127.0.0.1 and makes executors start the interpreter that runs this code (which has torch).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["local_spark_session", "LOOPBACK"]

LOOPBACK = "127.0.0.1"


def local_spark_session(
    master: str = "local[2]",
    app_name: str = "sparkdl",
    conf: dict[str, str] | None = None,
) -> SparkSession:
    """A SparkSession on this machine, bound to loopback, with executors on ``sys.executable``.

    ``master`` may be ``local[N]``, ``local-cluster[N,C,M]`` or a ``spark://`` URL.
    Reuses a running session with the same master; extra ``conf`` is applied on creation.
    """
    os.environ.setdefault("SPARK_LOCAL_IP", LOOPBACK)
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if (
        active is not None
        and active.sparkContext._jsc is not None
        and active.sparkContext.master == master
    ):
        return active
    if active is not None:
        active.stop()
    builder = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.driver.host", LOOPBACK)
        .config("spark.driver.bindAddress", LOOPBACK)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.pyspark.python", sys.executable)
        .config("spark.executorEnv.PYSPARK_PYTHON", sys.executable)
        .config("spark.executorEnv.SPARK_LOCAL_IP", LOOPBACK)
        .config("spark.python.worker.reuse", "true")
    )
    if master.startswith("local-cluster"):
        # Separate executor JVMs must find the same interpreter and package as the driver.
        builder = builder.config("spark.executorEnv.PYTHONPATH", os.pathsep.join(sys.path))
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
