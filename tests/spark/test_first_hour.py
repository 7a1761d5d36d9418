"""What a new user trips over in the first hour (issue 14), through Spark local[2]: mistakes
found before launch, re-running a run directory, what the run reports."""

from __future__ import annotations

import datetime
import logging
import time

import pytest
import torch
from pyspark.sql import functions as F

from sparkdl.artifacts import RunDirectory
from sparkdl.errors import ConfigError
from sparkdl.testing import classification_frame

pytestmark = pytest.mark.timeout(600)


def three_to_two():
    return torch.nn.Linear(3, 2)


def four_to_two():  # the classic mistake: in_features does not match the data
    return torch.nn.Linear(4, 2)


@pytest.fixture(scope="module")
def frame(spark_local):
    base = classification_frame(spark_local, rows=96, features=3, seed=4)
    return base.select(*[F.col("features")[i].alias(f"x{i}") for i in range(3)], "label")


def _fit(small_estimator, run_dir, frame, **overrides):
    settings = dict(model=three_to_two, feature_cols=["x0", "x1", "x2"], epochs=2)
    settings.update(overrides)
    return small_estimator(run_dir, **settings).fit(frame)


def test_a_width_mismatch_is_a_config_error_before_launch(frame, tmp_path, small_estimator):
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        _fit(small_estimator, tmp_path / "run", frame, model=four_to_two)
    message = str(info.value)
    assert "mat1 and mat2" in message and "features (4, 3)" in message
    assert "['x0', 'x1', 'x2']" in message and "driver_check=False" in message
    assert time.monotonic() - start < 60
    assert RunDirectory(str(tmp_path / "run")).summary()["attempts"] == []  # no worker started


def test_a_run_that_never_trained_does_not_block_the_next(frame, tmp_path, small_estimator):
    run_dir = tmp_path / "run"
    with pytest.raises(Exception, match="nope"):  # a column typo: refused, nothing trained
        _fit(small_estimator, run_dir, frame, feature_cols=["x0", "nope", "x2"])
    assert RunDirectory(str(run_dir)).summary()["status"] == "failed"
    model = _fit(small_estimator, run_dir, frame)  # the corrected cell, run again: just works
    assert model.summary["status"] == "succeeded"
    # a run that trained is kept: refused, naming overwrite (and resume: it has a checkpoint)
    with pytest.raises(ConfigError, match="resume=True.*overwrite=True"):
        _fit(small_estimator, run_dir, frame)
    assert _fit(small_estimator, run_dir, frame, overwrite=True).summary["status"] == "succeeded"
    no_checkpoints = tmp_path / "plain"
    _fit(small_estimator, no_checkpoints, frame, checkpoint_every_epochs=0)
    with pytest.raises(ConfigError) as info:
        _fit(small_estimator, no_checkpoints, frame)
    assert "overwrite=True" in str(info.value) and "resume" not in str(info.value)


def test_what_the_run_reports(frame, tmp_path, small_estimator, caplog):
    caplog.set_level(logging.INFO, logger="sparkdl.progress")
    model = _fit(
        small_estimator,
        tmp_path / "run",
        frame,
        epochs=8,
        validation_fraction=0.25,
        early_stopping_patience=1,
        learning_rate=5.0,  # overshoots: the validation loss soon stops improving
    )
    summary = model.summary
    assert datetime.datetime.fromisoformat(summary["started_at_utc"].replace("Z", "+00:00"))
    assert summary["finished_at_utc"].endswith("Z")
    kept = summary["best_epoch"]
    losses = {
        r.epoch: r.value
        for r in model.metrics.filter("split = 'validation' and name = 'loss'").collect()
    }
    assert summary["metrics"]["validation/loss"] == pytest.approx(losses[kept])
    last = max(losses)
    assert summary["last_epoch_metrics"]["validation/loss"] == pytest.approx(losses[last])
    rows = model.metrics.collect()
    assert [(r.epoch, r.step) for r in rows] == sorted((r.epoch, r.step) for r in rows)
    assert dict(model.metrics.dtypes)["wall_time"] == "timestamp"
    # the dataset phase shows its progress too (pytest is no terminal: log lines, not a bar)
    phase = [r.getMessage() for r in caplog.records if "materialize:" in r.getMessage()]
    assert phase and phase[-1].startswith("run: materialize: ") and "Spark tasks done" in phase[-1]


def every_rank_raises():
    import sparkdl

    raise ValueError(f"bad batch on rank {sparkdl.get_context().rank}")


def test_when_both_ranks_fail_the_error_says_two(spark_local):
    import sparkdl
    from sparkdl.errors import WorkerGroupError

    jvm = spark_local.sparkContext._jvm
    executor_log = jvm.org.apache.logging.log4j.LogManager.getLogger(
        "org.apache.spark.executor.Executor"
    )
    before = str(executor_log.getLevel())
    with pytest.raises(WorkerGroupError) as info:
        sparkdl.Distributor(2, spark=spark_local, timeout_s=120).run(every_rank_raises)
    assert str(executor_log.getLevel()) == before  # quieted for the stage only
    error = info.value
    assert sorted(error.ranks) == [0, 1], str(error)
    assert str(error).startswith("2 rank(s) failed:")
    assert error.headline.startswith("2 rank(s) failed; rank ")
    assert all("bad batch on rank" in f.message for f in error.failures)
