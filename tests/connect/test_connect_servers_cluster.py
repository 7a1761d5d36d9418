"""The other two ways into Spark Connect: ``remote("local-cluster[2,1,1024]")`` (separate
executor JVMs) and a Connect server started on its own (``spark-submit --class
...SparkConnectServer``, bound to 127.0.0.1, stopped by its PID) reached at ``sc://host:port``.

(``_cluster.py``: collected last, as these replace the process's SparkContext.)"""

from __future__ import annotations

import functools
import os
import subprocess

import pytest
import torch

import sparkdl
from sparkdl.testing import (
    classification_frame,
    connect_server_command,
    connect_spark_session,
    connect_unavailable,
    free_port,
    wait_for_port,
)

UNAVAILABLE = connect_unavailable()
pytestmark = [
    pytest.mark.timeout(480),
    pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or ""),
]


def small_model():
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def rank_sum(x):
    import torch.distributed as dist

    from sparkdl.context import get_context

    t = torch.tensor([float(get_context().rank + x)])
    dist.all_reduce(t)
    return t.item()


def _train_and_predict(spark, run_dir, small_estimator):
    """A Distributor run, then a fit and a transform: what a notebook does first."""
    assert sparkdl.Distributor(2, spark=spark, timeout_s=180).run(rank_sum, 1) == [3.0, 3.0]
    frame = classification_frame(spark, rows=96, features=6, classes=3, seed=3, partitions=2)
    estimator = functools.partial(small_estimator, model=small_model)
    model = estimator(run_dir, epochs=1).fit(frame)
    predicted = model.transform(frame).select("prediction").toPandas()["prediction"]
    assert len(predicted) == 96 and set(predicted) <= {0, 1, 2}


def test_remote_local_cluster(tmp_path, small_estimator):
    spark = connect_spark_session("local-cluster[2,1,1024]", app_name="sparkdl-connect-cluster")
    try:
        assert spark.conf.get("spark.master") == "local-cluster[2,1,1024]"
        _train_and_predict(spark, tmp_path / "run", small_estimator)
    finally:
        spark.stop()


@pytest.fixture
def connect_server(tmp_path):
    """``sc://127.0.0.1:PORT`` of a Spark Connect server started on its own (local[2])."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()  # its SparkContext would not matter, but its port 4040 and memory do
    port = free_port()
    log_path = tmp_path / "connect-server.log"
    with open(log_path, "wb") as log:
        # not the token pyspark left here for an earlier local server: this one is open
        env = {k: v for k, v in os.environ.items() if k != "SPARK_CONNECT_AUTHENTICATE_TOKEN"}
        proc = subprocess.Popen(
            connect_server_command(port), stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        wait_for_port(port, timeout_s=180, process=proc, log=str(log_path))
        yield f"sc://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


_CLIENT = r"""
import sys

import torch

import sparkdl
from sparkdl.testing import classification_frame, connect_spark_session


def rank_sum(x):
    import torch.distributed as dist

    from sparkdl.context import get_context

    t = torch.tensor([float(get_context().rank + x)])
    dist.all_reduce(t)
    return t.item()


spark = connect_spark_session(sys.argv[1], app_name="sparkdl-connect-server")
assert sparkdl.Distributor(2, spark=spark, timeout_s=180).run(rank_sum, 1) == [3.0, 3.0]
frame = classification_frame(spark, rows=96, features=6, classes=3, seed=3, partitions=2)
model = sparkdl.TorchEstimator(
    model=lambda: torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)),
    feature_cols=["features"], label_col="label", batch_size=8, epochs=1, num_workers=2,
    run_dir=sys.argv[2],
).fit(frame)
predicted = model.transform(frame).select("prediction").toPandas()["prediction"]
assert len(predicted) == 96 and set(predicted) <= {0, 1, 2}
spark.stop()
print("CLIENT OK", flush=True)
"""


def test_a_separately_started_connect_server(connect_server, tmp_path):
    """The notebook's view: a fresh client process (no local server's state in it) that only
    knows the server's address."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "SPARK_CONNECT_AUTHENTICATE_TOKEN"}
    env.pop("SPARK_REMOTE", None)
    done = subprocess.run(
        [sys.executable, "-c", _CLIENT, connect_server, str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0 and "CLIENT OK" in done.stdout, done.stderr[-3000:]
