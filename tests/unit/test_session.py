"""sparkdl.session: the seam over classic and Spark Connect sessions, without Spark."""

from __future__ import annotations

import logging

import pytest

from sparkdl.errors import ConfigError
from sparkdl.session import ConnectSide, _local_slots, is_connect, spark_side

pytestmark = pytest.mark.timeout(30)


class _Conf:
    def __init__(self, values, hidden=()):
        self.values, self.hidden = values, set(hidden)

    def get(self, key, default=None):
        if key in self.hidden:
            raise RuntimeError(f"[CONFIG_NOT_AVAILABLE] {key} is not available to clients")
        return self.values.get(key, default)


def _connect_session(version="4.0.1", conf=None, hidden=()):
    """A stand-in whose class lives where pyspark's Connect session does."""
    cls = type("SparkSession", (), {"__module__": "pyspark.sql.connect.session"})
    session = cls()
    session.version = version
    session.conf = _Conf(conf or {"spark.master": "local[4]"}, hidden)
    return session


def test_connect_sessions_are_told_apart_by_their_class():
    assert is_connect(_connect_session())
    assert not is_connect(object())
    assert isinstance(spark_side(_connect_session()), ConnectSide)


@pytest.mark.parametrize("version", ["3.4.1", "3.3.0"])
def test_a_connect_server_older_than_3_5_is_refused_naming_its_version(version):
    with pytest.raises(ConfigError, match=rf"Spark 3\.5 or newer, got {version}: .*barrier"):
        spark_side(_connect_session(version))


def test_a_hidden_setting_falls_back_to_its_default_and_is_said_once(caplog):
    caplog.set_level(logging.INFO, logger="sparkdl")
    side = spark_side(_connect_session(hidden={"spark.sparkdl.test.hidden"}))
    assert side.conf("spark.sparkdl.test.hidden", "false") == "false"
    assert side.conf("spark.sparkdl.test.hidden", "false") == "false"
    said = [r.getMessage() for r in caplog.records if "spark.sparkdl.test.hidden" in r.getMessage()]
    assert len(said) == 1 and "does not show" in said[0] and "CONFIG_NOT_AVAILABLE" in said[0]


def test_connect_slots_come_from_a_local_master_only():
    side = spark_side(_connect_session(conf={"spark.master": "local[4]", "spark.task.cpus": "2"}))
    assert side.task_slots() == 2
    remote = spark_side(_connect_session(conf={"spark.master": "spark://h:7077"}))
    assert remote.task_slots() is None  # unknown: the launch timeout bounds the wait
    assert _local_slots("local") == 1 and _local_slots("local[3]") == 3
    assert _local_slots("local[2, 4]") == 2 and _local_slots("yarn") is None
    assert _local_slots("local[*]") >= 1
