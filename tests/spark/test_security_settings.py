"""A local[2] session that authenticates and encrypts Spark's RPC: sparkdl refuses to open its
own unencrypted channels before any task starts, unless the operator opts in."""

from __future__ import annotations

import logging
import os
import time

import pytest

from sparkdl.errors import ConfigError

pytestmark = pytest.mark.timeout(600)

DIGITS = os.path.join(os.path.dirname(__file__), "..", "..", "data", "digits", "train.parquet")


@pytest.fixture(scope="module")
def secure_spark():
    """Its own session (Spark fixes security settings when a context starts), stopped after."""
    from pyspark.sql import SparkSession

    from sparkdl.testing import local_spark_session

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
    conf = {
        "spark.authenticate": "true",
        "spark.authenticate.secret": "sparkdl-test-secret",
        "spark.network.crypto.enabled": "true",
    }
    spark = local_spark_session("local[2]", app_name="sparkdl-tests-secure", conf=conf, ui=False)
    yield spark
    spark.stop()


def test_refused_before_anything_runs_then_allowed_with_one_warning(
    secure_spark, tmp_path, digits_estimator, caplog
):
    train = secure_spark.read.parquet(DIGITS)
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        digits_estimator(tmp_path / "refused", epochs=1).fit(train)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "spark.authenticate=true" in message and "spark.network.crypto.enabled=true" in message
    assert "spark.sparkdl.allowUnencrypted=true" in message
    assert not os.path.exists(tmp_path / "refused")  # nothing written, no task launched

    caplog.set_level(logging.WARNING, logger="sparkdl")
    model = digits_estimator(tmp_path / "allowed", epochs=2, allow_unencrypted=True).fit(train)
    assert model.summary["status"] == "succeeded"
    warnings = [r for r in caplog.records if "not protected" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
