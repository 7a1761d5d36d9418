"""Shared fixtures; one marker per tier (unit, dist, spark, cluster, gpu), each test with a timeout."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ["PYSPARK_PYTHON"] = sys.executable


@pytest.fixture(scope="session")
def spark_local_session():
    """A ``local[2]`` SparkSession bound to loopback, shared by the whole test session."""
    from sparkdl.testing import local_spark_session

    spark = local_spark_session("local[2]", app_name="sparkdl-tests")
    yield spark


@pytest.fixture(scope="module")
def spark_local(spark_local_session):
    """The shared ``local[2]`` session, recreated if a cluster test stopped it."""
    from sparkdl.testing import local_spark_session

    if spark_local_session.sparkContext._jsc is None:
        return local_spark_session("local[2]", app_name="sparkdl-tests")
    return spark_local_session


@pytest.fixture(scope="session")
def spark_local_cluster():
    """A ``local-cluster[2,1,1024]`` SparkSession: two separate executor JVMs on loopback.

    Stops any other session first (one SparkContext per process) and stops itself at the end.
    """
    from sparkdl.testing import local_spark_session

    spark = local_spark_session("local-cluster[2,1,1024]", app_name="sparkdl-tests-cluster")
    yield spark
    spark.stop()


def pytest_collection_modifyitems(config, items):
    """Tier marker from the directory; GPU tests skip without CUDA.

    Test modules are not importable on Spark's Python workers, so functions defined in them
    travel by value.
    """
    from pyspark import cloudpickle

    for module in {item.module for item in items if getattr(item, "module", None)}:
        cloudpickle.register_pickle_by_value(module)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing means the env is broken anyway
        has_cuda = False
    for item in items:
        parts = item.path.parts
        for tier in ("unit", "dist", "spark", "cluster", "gpu"):
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
        if "gpu" in parts and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
