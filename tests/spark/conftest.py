"""Fixtures of the spark tier that more than one module uses."""

from __future__ import annotations

import os

import pytest

DIGITS = os.path.join(os.path.dirname(__file__), "..", "..", "data", "digits")


@pytest.fixture(scope="module")
def digits(spark_local):
    """(train, test) DataFrames of data/digits (``features`` array of 64, ``label`` 0–9)."""
    train = spark_local.read.parquet(os.path.join(DIGITS, "train.parquet"))
    test = spark_local.read.parquet(os.path.join(DIGITS, "test.parquet"))
    return train, test
