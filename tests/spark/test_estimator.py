"""TorchEstimator end to end in Spark local[2]: accuracy, run directory, metrics, bad input."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
from pyspark.sql import functions as F

import sparkdl
from sparkdl.errors import ConfigError, DataError
from sparkdl.rundir.model_dir import load_module

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def estimator(digits_estimator):
    """``estimator(run_dir, **overrides)``: the digits estimator (tests/conftest.py)."""
    return functools.partial(digits_estimator, log_every_steps=10)


@pytest.fixture(scope="module")
def fitted(digits, tmp_path_factory, estimator):
    run_dir = tmp_path_factory.mktemp("runs") / "digits"
    return estimator(run_dir).fit(digits[0])


def test_digits_reaches_95_percent_with_two_workers(fitted, digits):
    scored = fitted.transform(digits[1])
    accuracy = scored.select(F.avg((F.col("prediction") == F.col("label")).cast("double"))).first()[
        0
    ]
    assert accuracy >= 0.95


def test_run_directory_is_complete(fitted, spark_local):
    run_dir = fitted.run_dir
    with open(os.path.join(run_dir, "run.json")) as fh:
        run = json.load(fh)
    assert run["status"] == "succeeded"
    assert run["world_size"] == 2
    assert run["versions"]["torch"].startswith("2.")
    assert run["timings"]["total_s"] > 0 and "train/loss" in run["metrics"]
    state = torch.load(os.path.join(run_dir, "model", "state_dict.pt"), weights_only=True)
    module = load_module(os.path.join(run_dir, "model"))  # import path: no pickle needed
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())
    metrics = spark_local.read.parquet(os.path.join(run_dir, "metrics"))
    assert set(metrics.columns) == {"epoch", "step", "split", "name", "value", "wall_time"}
    losses = [
        r.value
        for r in metrics.filter("split = 'train' and name = 'loss'").orderBy("epoch").collect()
    ]
    assert len(losses) == 15 and losses[-1] < losses[0]
    assert fitted.metrics.count() == metrics.count()


def test_lambda_model_and_sharded_dataset_input(digits, tmp_path, estimator):
    ds = sparkdl.materialize(
        digits[0], str(tmp_path / "ds"), feature_cols=["features"], label_col="label", num_shards=2
    )
    est = estimator(
        tmp_path / "run",
        model=lambda: torch.nn.Linear(64, 10),
        model_kwargs=None,
        epochs=1,
        optimizer="sgd",
        learning_rate=0.1,
    )
    model = est.fit(ds)
    assert isinstance(model.module, torch.nn.Linear)
    with pytest.raises(sparkdl.CheckpointError, match="trust_pickle"):
        load_module(os.path.join(model.run_dir, "model"))
    assert isinstance(
        load_module(os.path.join(model.run_dir, "model"), trust_pickle=True), torch.nn.Linear
    )


def test_existing_run_dir_is_refused_then_overwritten(fitted, digits, estimator):
    with pytest.raises(ConfigError, match="overwrite"):
        estimator(fitted.run_dir, epochs=1).fit(digits[0])


def test_failed_run_is_marked_failed(digits, tmp_path, estimator):
    def bad_loss(outputs, labels):
        raise RuntimeError("loss exploded on purpose")

    with pytest.raises(sparkdl.WorkerGroupError, match="loss exploded on purpose"):
        estimator(tmp_path / "run", loss=bad_loss, epochs=1, driver_check=False).fit(digits[0])
    with open(tmp_path / "run" / "run.json") as fh:
        run = json.load(fh)
    assert run["status"] == "failed" and "loss exploded" in run["error"]["message"]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda df: df.drop("label"), (DataError, ConfigError), "label"),
        (lambda df: df.withColumn("features", F.lit("x")), (DataError, ConfigError), "features"),
        (
            lambda df: df.withColumn(
                "label", F.when(F.col("label") == 3, None).otherwise(F.col("label"))
            ),
            DataError,
            "null",
        ),
        (lambda df: df.limit(0), DataError, "at least one row"),
        (lambda df: df.limit(1), DataError, "1"),
    ],
    ids=["missing-label", "string-features", "null-labels", "empty", "fewer-rows-than-workers"],
)
def test_bad_dataframes_fail_before_training(digits, tmp_path, change, error, match, estimator):
    with pytest.raises(error, match=match):
        estimator(tmp_path / "run", epochs=1).fit(change(digits[0]))
    assert not os.path.exists(tmp_path / "run" / "model" / "state_dict.pt")


def test_more_workers_than_slots_fails_fast(digits, tmp_path, estimator):
    with pytest.raises(ConfigError, match="slots"):
        estimator(tmp_path / "run", num_workers=3).fit(digits[0])
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"loss": "hinge"}, "loss"),
        ({"optimizer": "lion"}, "optimizer"),
        ({"num_workers": 0}, "num_workers"),
        ({"feature_cols": []}, "feature_cols"),
    ],
)
def test_invalid_values_fail_on_construction(tmp_path, kwargs, match, estimator):
    with pytest.raises(ConfigError, match=match):
        estimator(tmp_path / "run", **kwargs)
