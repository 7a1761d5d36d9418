"""The connect tier: sparkdl from a Spark Connect session (Spark 4 only; see
``sparkdl.testing.connect_unavailable`` for the skip reason elsewhere)."""

from __future__ import annotations

import os

import pytest

from sparkdl.testing import connect_unavailable

DIGITS = os.path.join(os.path.dirname(__file__), "..", "..", "data", "digits")
UNAVAILABLE = connect_unavailable()


@pytest.fixture(scope="module")
def spark_connect():
    """A Spark Connect session on a server pyspark starts in this process (``remote("local[2]")``,
    loopback only); stopped with its server when the module ends."""
    if UNAVAILABLE:
        pytest.skip(UNAVAILABLE)
    from sparkdl.testing import connect_spark_session

    spark = connect_spark_session("local[2]", app_name="sparkdl-tests-connect")
    yield spark
    spark.stop()


@pytest.fixture(scope="module")
def connect_digits(spark_connect):
    """(train, test) DataFrames of data/digits read through the Connect session."""
    train = spark_connect.read.parquet(os.path.join(DIGITS, "train.parquet"))
    test = spark_connect.read.parquet(os.path.join(DIGITS, "test.parquet"))
    return train, test
