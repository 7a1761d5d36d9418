"""The bad-input matrix through TorchEstimator.fit on Spark local[2]: every case is a clear error
(no hang, no restart loop), and nothing half-written looks complete.

Covered elsewhere and not repeated here: missing column, wrong dtype, nulls, empty DataFrame and
fewer rows than workers (tests/spark/test_estimator.py), NaN/inf per column kind and ragged
arrays at the materialize level (tests/spark/test_materialize.py), a truncated checkpoint on
resume (tests/unit/test_checkpoint.py), a raising or hanging rank (tests/spark/test_reliability.py).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from pyspark.sql import functions as F

import sparkdl
from sparkdl.artifacts import RunDirectory
from sparkdl.errors import (
    ConfigError,
    DataError,
    WorkerConfigError,
    WorkerDataError,
)
from sparkdl.testing import classification_frame

pytestmark = pytest.mark.timeout(600)

FEATURES, ROWS = 4, 96


def small_model():
    return torch.nn.Linear(FEATURES, 2)


def regressor():
    return torch.nn.Linear(FEATURES, 1)


def broken_factory():
    raise RuntimeError("the factory cannot build this model")


@pytest.fixture(scope="module")
def frame(spark_local):
    return classification_frame(spark_local, rows=ROWS, features=FEATURES, seed=5)


@pytest.fixture(scope="module")
def estimator(small_estimator):
    """``estimator(run_dir, **overrides)``: the small estimator (tests/conftest.py) on small_model."""
    return functools.partial(small_estimator, model=small_model)


def _run_json(run_dir):
    return RunDirectory(str(run_dir)).summary()


def _nothing_complete(run_dir):
    assert not os.path.exists(os.path.join(run_dir, "model", "state_dict.pt"))
    if os.path.exists(os.path.join(run_dir, "run.json")):
        assert _run_json(run_dir)["status"] == "failed"


def _poison(column, value):
    """Row 7's first feature (or its label) replaced by ``value``."""
    if column == "label":
        return lambda df: df.withColumn(
            "label", F.when(F.col("id") == 7, F.lit(value)).otherwise(F.col("label"))
        )
    return lambda df: df.withColumn(
        "features",
        F.when(
            F.col("id") == 7, F.expr(f"transform(features, (x, i) -> if(i = 0, {value}, x))")
        ).otherwise(F.col("features")),
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_poison("features", "cast('NaN' as float)"), "'features' must hold only finite"),
        (_poison("features", "cast('Infinity' as float)"), "on_invalid='skip'"),
        (_poison("label", float("inf")), "'label' must hold only finite"),
        (
            lambda df: df.withColumn(
                "features",
                F.when(F.col("id") == 3, F.slice("features", 1, 2)).otherwise(F.col("features")),
            ),
            "one non-zero length",
        ),
    ],
    ids=["nan-feature", "inf-feature", "inf-label", "ragged-array"],
)
def test_invalid_values_fail_before_training(frame, tmp_path, change, match, estimator):
    df = change(frame.withColumn("id", F.monotonically_increasing_id())).drop("id")
    with pytest.raises(DataError, match=match):
        estimator(tmp_path / "run").fit(df)
    _nothing_complete(tmp_path / "run")
    assert not os.path.exists(tmp_path / "run" / "data" / "_sparkdl_manifest.json")


def test_on_invalid_skip_drops_the_rows_and_trains(frame, tmp_path, estimator):
    df = frame.withColumn("id", F.monotonically_increasing_id())
    df = _poison("features", "cast('NaN' as float)")(df)
    df = df.withColumn(
        "label", F.when(F.col("id") == 9, F.lit(float("inf"))).otherwise(F.col("label"))
    ).drop("id")
    # the label is now a double column: a regression
    model = estimator(
        tmp_path / "run", on_invalid="skip", epochs=1, model=regressor, loss="mse"
    ).fit(df)
    manifest = sparkdl.ShardedDataset.load(os.path.join(model.run_dir, "data")).manifest
    assert manifest.splits["train"] == ROWS - 2
    assert _run_json(model.run_dir)["status"] == "succeeded"


def test_corrupt_parquet_input_is_a_data_error(frame, spark_local, tmp_path, estimator):
    source = str(tmp_path / "input")
    frame.repartition(2).write.parquet(source)
    with open(os.path.join(source, "part-99999-corrupt.parquet"), "wb") as fh:
        fh.write(b"PAR1 this is not a parquet file at all PAR1")
    df = spark_local.read.schema(frame.schema).parquet(source)
    with pytest.raises(DataError, match="must be readable"):
        estimator(tmp_path / "run").fit(df)
    _nothing_complete(tmp_path / "run")


def test_corrupt_shard_in_a_dataset_fails_once_with_a_data_error(frame, tmp_path, estimator):
    ds = sparkdl.materialize(
        frame, str(tmp_path / "ds"), feature_cols=["features"], label_col="label", num_shards=2
    )
    shard = os.path.join(ds.path.removeprefix("file://"), ds.manifest.shards[1].files[0].path)
    with open(shard, "r+b") as fh:
        fh.seek(20)
        fh.write(b"\x00" * 16)
    with pytest.raises(WorkerDataError, match="sha256") as info:
        estimator(tmp_path / "run").fit(sparkdl.ShardedDataset.load(str(tmp_path / "ds")))
    assert isinstance(info.value, sparkdl.WorkerGroupError)
    assert len(_run_json(tmp_path / "run")["attempts"]) == 1  # deterministic: no restart
    _nothing_complete(tmp_path / "run")


def test_model_factory_raising_is_a_config_error_without_restarts(frame, tmp_path, estimator):
    # found by the driver's pre-launch check: no worker starts
    with pytest.raises(ConfigError, match="cannot build this model"):
        estimator(tmp_path / "run", model=broken_factory).fit(frame)
    assert _run_json(tmp_path / "run")["attempts"] == []
    # without that check, on the workers: raised once, never restarted
    with pytest.raises(WorkerConfigError, match="cannot build this model") as info:
        estimator(tmp_path / "run2", model=broken_factory, driver_check=False).fit(frame)
    assert isinstance(info.value, ConfigError)
    assert len(_run_json(tmp_path / "run2")["attempts"]) == 1
    _nothing_complete(tmp_path / "run2")


def test_loss_turning_nan_stops_naming_the_step(frame, tmp_path, estimator):
    def nan_loss(outputs, labels):
        return outputs.sum() * float("nan")

    with pytest.raises(WorkerDataError, match=r"finite.*step 2"):
        estimator(tmp_path / "run", loss=nan_loss).fit(frame)
    assert len(_run_json(tmp_path / "run")["attempts"]) == 1
    _nothing_complete(tmp_path / "run")


def test_existing_run_dir_needs_overwrite_or_resume(frame, tmp_path, estimator):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("someone else's files")
    with pytest.raises(ConfigError, match="holding other files.*overwrite=True"):
        estimator(tmp_path / "run").fit(frame)
    with pytest.raises(ConfigError, match="run.json"):
        estimator(tmp_path / "run", resume=True).fit(frame)
    assert os.listdir(tmp_path / "run") == ["notes.txt"]


def test_unwritable_run_dir_is_a_config_error(frame, tmp_path, estimator):
    (tmp_path / "file").write_text("a file, not a directory")
    with pytest.raises(ConfigError, match="writable"):
        estimator(tmp_path / "file" / "run").fit(frame)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_restarts": -1}, "max_restarts"),
        ({"checkpoint_every_steps": -5}, "checkpoint_every_steps"),
        ({"checkpoint_every_epochs": 1.5}, "checkpoint_every_epochs"),
        ({"keep_last": 0}, "keep_last"),
        ({"on_invalid": "drop"}, "on_invalid"),
        ({"fault_injection": {"rank": 0, "mode": "explode"}}, "mode"),
        ({"fault_injection": "kill rank 1"}, "fault_injection"),
        ({"overwrite": True, "resume": True}, "resume"),
    ],
)
def test_invalid_reliability_values(tmp_path, frame, kwargs, match, estimator):
    with pytest.raises(ConfigError, match=match):
        estimator(tmp_path / "run", **kwargs).fit(frame)
    assert not os.path.exists(tmp_path / "run")
