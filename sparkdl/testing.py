"""[driver] Helpers shared by tests, notebooks and the demo: a loopback-only local Spark session,
free loopback ports for servers started beside it, and a tiny synthetic classification DataFrame.

Spark's host name resolution picks an outside interface on many machines; everything here binds
to 127.0.0.1 and makes executors start the interpreter that runs this code (which has torch).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import TYPE_CHECKING

from sparkdl._checks import expect_int

if TYPE_CHECKING:
    import subprocess

    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "connect_unavailable",
    "connect_spark_session",
    "connect_server_command",
    "local_spark_session",
    "LOOPBACK",
    "free_port",
    "wait_for_port",
    "classification_frame",
]

LOOPBACK = "127.0.0.1"


def local_spark_session(
    master: str = "local[2]",
    app_name: str = "sparkdl",
    conf: dict[str, str] | None = None,
    *,
    ui: bool = True,
) -> SparkSession:
    """A SparkSession on this machine, bound to loopback, with executors on ``sys.executable``.

    ``master`` may be ``local[N]``, ``local-cluster[N,C,M]`` or a ``spark://`` URL.
    Reuses a running session with the same master; extra ``conf`` is applied on creation.
    ``ui`` starts the Spark UI (http://127.0.0.1:4040, where sparkdl's jobs carry the run's name
    and phase); tests and benchmarks turn it off.
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
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in {**_local_conf(master, ui), **(conf or {})}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _local_conf(master: str, ui: bool) -> dict[str, str]:
    """The Spark conf of a loopback-only session whose executors run ``sys.executable``."""
    conf = {
        "spark.driver.host": LOOPBACK,
        "spark.driver.bindAddress": LOOPBACK,
        "spark.ui.enabled": "true" if ui else "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": "4",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.pyspark.python": sys.executable,
        "spark.executorEnv.PYSPARK_PYTHON": sys.executable,
        "spark.executorEnv.SPARK_LOCAL_IP": LOOPBACK,
        "spark.python.worker.reuse": "true",
    }
    if master.startswith("local-cluster"):
        # Separate executor JVMs must find the same interpreter and package as the driver.
        conf["spark.executorEnv.PYTHONPATH"] = os.pathsep.join(sys.path)
    return conf


def connect_unavailable() -> str | None:
    """Why a local Spark Connect server cannot start here, or None when it can: pyspark ≥ 4
    (the 3.5 pip wheel has no Connect server) with its ``connect`` extra installed."""
    import pyspark

    if int(pyspark.__version__.split(".")[0]) < 4:
        return (
            f"pyspark {pyspark.__version__}'s pip wheel has no Spark Connect server (the "
            "compat environment); `make test` runs this tier on Spark 4"
        )
    try:
        from pyspark.sql.connect.utils import check_dependencies

        check_dependencies()
    except Exception as exc:
        return f"pyspark's Connect client is not installed ({exc}): pip install 'sparkdl-torch[connect]'"
    return None


def connect_spark_session(
    remote: str = "local[2]",
    app_name: str = "sparkdl",
    conf: dict[str, str] | None = None,
    *,
    ui: bool = False,
) -> SparkSession:
    """A Spark Connect session (Spark ≥ 3.5 client with pyspark's ``connect`` extra).

    ``remote`` is ``local[N]`` or ``local-cluster[N,C,M]``: pyspark starts a Connect server in
    this process (loopback only, executors on ``sys.executable``; a classic session running
    here is stopped first, one SparkContext per process), stopped again by ``spark.stop()``.
    Or ``sc://host:port`` of a running server (see :func:`connect_server_command`); ``conf``
    then holds runtime settings only.
    """
    import warnings

    os.environ.setdefault("SPARK_LOCAL_IP", LOOPBACK)
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
    from pyspark.sql import SparkSession

    global _LOCAL_SERVER_TOKEN
    settings = dict(conf or {})
    if remote.startswith("sc://") and os.environ.get(_TOKEN_ENV) == _LOCAL_SERVER_TOKEN:
        # pyspark left the token of a local server it started here in the environment; a
        # client that finds one speaks TLS, which a server started on its own does not
        os.environ.pop(_TOKEN_ENV, None)
    had_token = _TOKEN_ENV in os.environ
    if remote.startswith("local"):
        from pyspark.sql.session import SparkSession as ClassicSession

        active = ClassicSession._instantiatedSession
        if active is not None and active._sc._jsc is not None:
            active.stop()
        settings = {**_local_conf(remote, ui), **settings}
    builder = SparkSession.builder.remote(remote).appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    with warnings.catch_warnings():  # static settings are applied at start, then refused
        warnings.simplefilter("ignore")
        spark = builder.getOrCreate()
    if remote.startswith("local") and not had_token:
        _LOCAL_SERVER_TOKEN = os.environ.get(_TOKEN_ENV)
    return spark


_TOKEN_ENV = "SPARK_CONNECT_AUTHENTICATE_TOKEN"
_LOCAL_SERVER_TOKEN: str | None = None
"""The token pyspark generated (and left in the environment) for the last local Connect server
:func:`connect_spark_session` started."""


def connect_server_command(port: int, master: str = "local[2]") -> list[str]:
    """The command that starts a standalone Spark Connect server from the pip pyspark, bound
    to 127.0.0.1:``port``, with executors on ``sys.executable`` (stop it by its PID)."""
    import pyspark

    home = os.path.dirname(pyspark.__file__)
    command = [
        os.path.join(home, "bin", "spark-submit"),
        "--class",
        "org.apache.spark.sql.connect.service.SparkConnectServer",
        "--master",
        master,
        "--conf",
        f"spark.connect.grpc.binding.port={port}",
        "--conf",
        f"spark.connect.grpc.binding.address={LOOPBACK}",
    ]
    for key, value in _local_conf(master, ui=False).items():
        command += ["--conf", f"{key}={value}"]
    return command


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that nothing listens on at the moment of the call.

    The port is only probed, not held: start the server on it soon (another process may take
    it), or use it as a port that refuses connections.
    """
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int,
    *,
    host: str = LOOPBACK,
    timeout_s: float = 60.0,
    process: subprocess.Popen | None = None,
    log: str | None = None,
) -> None:
    """Return once something accepts TCP connections on ``host:port``; RuntimeError after
    ``timeout_s`` seconds, or as soon as ``process`` (the server's, when given) has exited.

    ``log`` (the server's log file) is named in the error, to say where to look.
    """
    see = f"; see {log}" if log else ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process {process.pid} exited with {process.returncode} before listening "
                f"on {host}:{port}{see}"
            )
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listened on {host}:{port} within {timeout_s:g} s{see}")


def classification_frame(
    spark: SparkSession,
    *,
    rows: int,
    features: int,
    classes: int = 2,
    seed: int = 0,
    partitions: int | None = None,
) -> DataFrame:
    """A small synthetic classification DataFrame: ``features array<float>, label int``.

    Features are standard normal draws (``numpy.random.default_rng(seed)``, so the same
    arguments give the same rows); the label counts the thresholds a row crosses, ``x[0] > 0``,
    ``x[1] > 0.5``, ``x[2] > 1``, … (``classes - 1`` of them), which a small model learns in a
    few epochs. ``partitions`` repartitions the result round robin.
    """
    import numpy as np

    expect_int("rows", rows, "Pass the number of rows to generate", low=0)
    expect_int("classes", classes, "Pass at least two classes", low=2)
    expect_int(
        "features", features, "Pass at least one feature per class boundary", low=classes - 1
    )
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    y = np.zeros(rows, dtype=np.int64)
    for j in range(classes - 1):
        y += x[:, j] > 0.5 * j
    data = [(x[i].tolist(), int(y[i])) for i in range(rows)]
    frame = spark.createDataFrame(data, "features array<float>, label int")
    return frame if partitions is None else frame.repartition(partitions)
