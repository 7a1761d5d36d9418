"""Spark ML integration: Pipeline fit/save/load (fresh process), regression, early stopping."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from pyspark.ml import Pipeline
from pyspark.ml.feature import StandardScaler, VectorAssembler
from pyspark.sql import functions as F

import sparkdl
from sparkdl.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.timeout(600)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EPOCHS = 12


def _regressor(run_dir, **overrides):
    kwargs = dict(
        model="sparkdl.models:mlp",
        model_kwargs={"in_features": 2, "out_features": 1, "hidden": []},  # linear regression
        feature_cols=["scaled"],
        label_col="y",
        loss="mse",
        optimizer="sgd",
        learning_rate=0.1,
        batch_size=16,
        epochs=EPOCHS,
        num_workers=2,
        validation_fraction=0.2,
        log_every_steps=0,
        run_dir=str(run_dir),
    )
    kwargs.update(overrides)
    return sparkdl.TorchEstimator(**kwargs)


def _pipeline(run_dir):
    return Pipeline(
        stages=[
            VectorAssembler(inputCols=["a", "b"], outputCol="raw"),
            StandardScaler(inputCol="raw", outputCol="scaled", withMean=True),
            _regressor(run_dir),
        ]
    )


@pytest.fixture(scope="module")
def linear_data(spark_local):
    """y = 2a - 3b + 0.5 with a and b on very different scales (the scaler matters)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 3, 400), rng.normal(1, 0.5, 400)
    rows = [
        (i, float(x), float(z), float(2 * x - 3 * z + 0.5)) for i, (x, z) in enumerate(zip(a, b))
    ]
    return spark_local.createDataFrame(rows, "id long, a double, b double, y double")


@pytest.fixture(scope="module")
def pipeline_model(linear_data, tmp_path_factory):
    return _pipeline(tmp_path_factory.mktemp("runs") / "regression").fit(linear_data)


def _predictions(df):
    return [r.prediction for r in df.orderBy("id").select("prediction").collect()]


def test_pipeline_regression_fits_the_line(pipeline_model, linear_data):
    torch_model = pipeline_model.stages[-1]
    assert isinstance(torch_model, sparkdl.TorchModel) and not torch_model.classification
    scored = pipeline_model.transform(linear_data)
    assert dict(scored.dtypes)["prediction"] == "double"
    rmse = scored.select(F.sqrt(F.avg((F.col("prediction") - F.col("y")) ** 2))).first()[0]
    assert rmse < 0.3  # the target's standard deviation is about 6.2


def test_metrics_summary_and_plots(pipeline_model):
    model = pipeline_model.stages[-1]
    summary = model.summary
    assert summary["status"] == "succeeded" and summary["epochs_run"] == EPOCHS
    assert summary["config"]["optim"]["loss"] == "mse" and summary["best_epoch"] is None
    validation = model.metrics.filter("split = 'validation' and name = 'mse'").count()
    assert validation == EPOCHS
    plots = sorted(os.listdir(os.path.join(model.run_dir, "plots")))
    assert plots == ["loss.png", "mse.png"]


def test_pipeline_model_loads_in_a_fresh_process_with_equal_predictions(
    pipeline_model, linear_data, tmp_path
):
    path, data, out = (str(tmp_path / n) for n in ("pipeline", "input", "out.json"))
    pipeline_model.save(path)
    linear_data.write.parquet(data)
    script = (
        "import json, sys\n"
        "from pyspark.ml import PipelineModel\n"
        "from sparkdl.testing import local_spark_session\n"
        "spark = local_spark_session('local[1]')\n"
        "model = PipelineModel.load(sys.argv[1])\n"
        "df = model.transform(spark.read.parquet(sys.argv[2]))\n"
        "rows = df.orderBy('id').select('prediction').collect()\n"
        "torch_model = model.stages[-1]\n"
        "json.dump({'uid': torch_model.uid, 'cols': torch_model.getFeatureCols(),\n"
        "           'dim': torch_model.feature_dim,\n"
        "           'predictions': [r.prediction for r in rows]}, open(sys.argv[3], 'w'))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    subprocess.run(
        [sys.executable, "-c", script, path, data, out], env=env, check=True, timeout=360
    )
    with open(out) as fh:
        loaded = json.load(fh)
    original = pipeline_model.stages[-1]
    assert (loaded["uid"], loaded["cols"], loaded["dim"]) == (original.uid, ["scaled"], 2)
    expected = _predictions(pipeline_model.transform(linear_data))
    assert loaded["predictions"] == pytest.approx(expected, rel=1e-6)


def test_unfitted_pipeline_and_estimator_round_trip(tmp_path):
    path = str(tmp_path / "pipeline")
    _pipeline(tmp_path / "run").save(path)
    est = Pipeline.load(path).getStages()[-1]
    assert isinstance(est, sparkdl.TorchEstimator)
    assert est.getLoss() == "mse" and est.getModelKwargs()["hidden"] == []
    assert est.getEpochs() == EPOCHS and est.getValidationFraction() == 0.2


def test_estimator_with_a_python_model_object_loads_only_when_trusted(tmp_path):
    est = _regressor(tmp_path / "run", model=lambda: torch.nn.Linear(2, 1), model_kwargs=None)
    est.save(str(tmp_path / "est"))
    with pytest.raises(CheckpointError, match="trust_pickle"):
        sparkdl.TorchEstimator.load(str(tmp_path / "est"))
    loaded = sparkdl.TorchEstimator.load(str(tmp_path / "est"), trust_pickle=True)
    assert isinstance(loaded.getModel()(), torch.nn.Linear) and loaded.getLoss() == "mse"


def test_early_stopping_needs_a_validation_split(linear_data, tmp_path):
    est = _regressor(tmp_path / "run", validation_fraction=0.0, early_stopping_patience=2)
    with pytest.raises(ConfigError, match="validation split"):
        est.fit(linear_data)
    assert not os.path.exists(tmp_path / "run")


@pytest.fixture(scope="module")
def early_stopped(digits, tmp_path_factory, digits_estimator):
    """Digits with a validation_col whose rows have shifted labels: validation loss rises."""
    is_validation = (F.hash(F.col("features").cast("string")) % 5) == 0
    df = digits[0].withColumn("is_validation", is_validation)
    df = df.withColumn(
        "label", F.when(F.col("is_validation"), (F.col("label") + 1) % 10).otherwise(F.col("label"))
    )
    est = digits_estimator(
        tmp_path_factory.mktemp("runs") / "early",
        epochs=20,
        validation_col="is_validation",
        early_stopping_patience=2,
        probability_col="probability",
    )
    return est.fit(df), df.filter("is_validation")


def test_early_stopping_stops_and_keeps_the_best_epoch(early_stopped):
    model, validation = early_stopped
    summary = model.summary
    epochs_run, best = summary["epochs_run"], summary["best_epoch"]
    assert epochs_run < 20 and best == epochs_run - 3
    rows = model.metrics.filter("split = 'validation' and name = 'loss'").collect()
    losses = {r.epoch: r.value for r in rows}
    assert sorted(losses) == list(range(epochs_run)) and min(losses, key=losses.get) == best
    # The kept model is the best epoch's: its cross-entropy on the validation rows is that loss.
    scored = model.transform(validation).select("label", "prediction", "probability").collect()
    kept = -np.mean([math.log(r.probability[r.label]) for r in scored])
    assert kept == pytest.approx(losses[best], rel=1e-3)
    assert all(abs(sum(r.probability) - 1) < 1e-4 for r in scored)
    assert all(int(np.argmax(r.probability)) == r.prediction for r in scored)
    assert sorted(os.listdir(os.path.join(model.run_dir, "plots"))) == ["accuracy.png", "loss.png"]
    dataset = sparkdl.ShardedDataset.load(os.path.join(model.run_dir, "data"))
    assert dataset.manifest.splits["validation"] == validation.count()
    assert [c["name"] for c in dataset.manifest.schema] == ["features", "label"]  # no flag column


def test_torch_model_save_load_needs_no_pickle_for_an_import_path(early_stopped, tmp_path):
    model, validation = early_stopped
    model.save(str(tmp_path / "m"))
    assert not os.path.exists(tmp_path / "m" / "objects.pkl")
    loaded = sparkdl.TorchModel.load(str(tmp_path / "m"))
    assert loaded.getProbabilityCol() == "probability" and loaded.run_dir == model.run_dir
    cols = ["prediction", "probability"]
    assert loaded.transform(validation).select(*cols).collect() == (
        model.transform(validation).select(*cols).collect()
    )
