"""Shared fixtures; one marker per tier (unit, dist, spark, cluster, s3, gpu), each test with a timeout."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ["PYSPARK_PYTHON"] = sys.executable


@pytest.fixture(scope="module")
def spark_local():
    """A ``local[2]`` SparkSession bound to loopback (reused across modules while it lives)."""
    from sparkdl.testing import local_spark_session

    return local_spark_session("local[2]", app_name="sparkdl-tests")


@pytest.fixture(scope="module")
def spark_local_cluster():
    """A ``local-cluster[2,1,1024]`` SparkSession: two separate executor JVMs on loopback.

    One SparkContext per process: asking for it stops a local[2] session (and vice versa);
    collection puts the *_cluster.py modules last so that happens once.
    """
    from sparkdl.testing import local_spark_session

    return local_spark_session("local-cluster[2,1,1024]", app_name="sparkdl-tests-cluster")


@pytest.fixture(scope="session", autouse=True)
def _stop_spark_at_exit():
    yield
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()


def pytest_collection_modifyitems(config, items):
    """Tier marker from the directory; GPU tests skip without CUDA.

    Test modules are not importable on Spark's Python workers, so functions defined in them
    travel by value.
    """
    from pyspark import cloudpickle

    for module in {item.module for item in items if getattr(item, "module", None)}:
        cloudpickle.register_pickle_by_value(module)
    items.sort(key=lambda item: item.path.name.endswith("_cluster.py"))  # stable: cluster last
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing means the env is broken anyway
        has_cuda = False
    for item in items:
        parts = item.path.parts
        for tier in ("unit", "dist", "spark", "cluster", "s3", "gpu"):
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
        if "gpu" in parts and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
