"""Kinds of real users' inputs that used to fail (issue 13), through Spark local[2]:
StringIndexer labels, fractional labels refused before launch, a model with an unused head,
transform on a joined DataFrame, tuning with TrainValidationSplit/CrossValidator, and a model
from a module the executors cannot import."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
import torch
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml.feature import StringIndexer
from pyspark.ml.tuning import CrossValidator, ParamGridBuilder, TrainValidationSplit
from pyspark.sql import functions as F

from sparkdl.artifacts import RunDirectory
from sparkdl.errors import ConfigError, DataError, WorkerConfigError

pytestmark = pytest.mark.timeout(600)

FEATURES, ROWS = 4, 128


def linear():
    return torch.nn.Linear(FEATURES, 2)


class UnusedHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(FEATURES, 2)
        self.head = torch.nn.Linear(2, 2)  # never called by forward

    def forward(self, x):
        return self.body(x)


@pytest.fixture(scope="module")
def frame(spark_local):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(ROWS, FEATURES)).astype(np.float32)
    y = np.where(x[:, 0] > 0, "yes", "no")
    rows = [(x[i].tolist(), str(y[i]), i) for i in range(ROWS)]
    return spark_local.createDataFrame(rows, "features array<float>, answer string, id int")


@pytest.fixture
def estimator(small_estimator):
    """The conftest's small estimator with this module's linear model, batch 16, no step log."""

    def build(run_dir, **overrides):
        settings = dict(model=linear, batch_size=16, log_every_steps=0)
        settings.update(overrides)
        return small_estimator(run_dir, **settings)

    return build


@pytest.fixture(scope="module")
def indexed(frame):
    """label: a double column of class indices, as StringIndexer makes it."""
    return StringIndexer(inputCol="answer", outputCol="label").fit(frame).transform(frame)


def test_string_indexer_labels_train_a_classifier(indexed, tmp_path, estimator):
    assert dict(indexed.dtypes)["label"] == "double"
    model = estimator(tmp_path / "run", epochs=10, batch_size=8, learning_rate=0.5).fit(indexed)
    accuracy = model.transform(indexed).select(
        F.avg((F.col("prediction") == F.col("label")).cast("double"))
    )
    assert accuracy.first()[0] > 0.8


@pytest.mark.parametrize(("loss", "expr"), [("cross_entropy", "label + 0.5"), ("nll", "-label")])
def test_labels_that_are_no_class_index_are_refused_before_launch(
    indexed, tmp_path, loss, expr, estimator
):
    bad = indexed.withColumn("label", F.expr(expr))
    start = time.monotonic()
    with pytest.raises(DataError, match=r"label column 'label' must hold class indices"):
        estimator(tmp_path / "run", loss=loss).fit(bad)
    assert time.monotonic() - start < 60
    assert not os.path.exists(tmp_path / "run" / "data")  # refused before materialize


def test_an_unused_parameter_names_the_ddp_option_and_the_option_fixes_it(
    indexed, tmp_path, estimator
):
    with pytest.raises(WorkerConfigError, match="find_unused_parameters") as info:
        estimator(tmp_path / "a", model=UnusedHead).fit(indexed)
    attempts = RunDirectory(str(tmp_path / "a")).summary()["attempts"]
    assert len(attempts) == 1, info.value  # deterministic: not retried
    model = estimator(
        tmp_path / "b", model=UnusedHead, strategy_options={"find_unused_parameters": True}
    ).fit(indexed)
    assert model.summary["status"] == "succeeded"
    static = estimator(tmp_path / "c", model=UnusedHead, strategy_options={"static_graph": True})
    assert static.fit(indexed).summary["status"] == "succeeded"


def test_transform_leaves_columns_it_does_not_read_alone(indexed, tmp_path, spark_local, estimator):
    model = estimator(tmp_path / "run", probability_col="probability").fit(indexed)
    other = spark_local.createDataFrame(
        [(i, f"n{i}", i * 2.0) for i in range(ROWS)], "id int, name string, `a.b` double"
    )
    joined = indexed.join(other, indexed.id == other.id)  # two columns named "id"
    joined = joined.withColumn("my col", F.lit(1))
    scored = model.transform(joined)
    assert scored.columns == joined.columns + ["prediction", "probability"]
    assert scored.count() == ROWS
    row = scored.select("prediction", "probability", "`a.b`", "`my col`").first()
    assert len(row.probability) == 2 and row["my col"] == 1
    with pytest.raises(DataError, match="feature column 'features' must appear once"):
        model.transform(joined.crossJoin(indexed.select("features").limit(1)))


def test_tuning_keeps_every_fit_s_own_run(indexed, tmp_path, estimator):
    base = estimator(tmp_path / "tuning", epochs=2)
    grid = (
        ParamGridBuilder()
        .addGrid(base.getParam("learning_rate"), [0.05, 0.001])
        .addGrid(base.getParam("batch_size"), [16, 32])
        .build()
    )
    evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
    tvs = TrainValidationSplit(
        estimator=base, estimatorParamMaps=grid, evaluator=evaluator, trainRatio=0.75, seed=1
    )
    best = tvs.fit(indexed).bestModel
    runs = sorted(os.listdir(tmp_path / "tuning"))
    assert len(runs) == len(grid) + 1  # every grid point, then the refit of the best
    described = set()
    for name in runs:
        summary = RunDirectory(str(tmp_path / "tuning" / name)).summary()
        optim = summary["config"]["optim"]
        described.add((optim["learning_rate"], optim["batch_size"]))
    assert described == {(lr, b) for lr in (0.05, 0.001) for b in (16, 32)}
    lr, batch = (
        best.summary["config"]["optim"]["learning_rate"],
        best.summary["config"]["optim"]["batch_size"],
    )
    assert best.run_dir.endswith(os.path.basename(best.run_dir))
    assert f"learning_rate={lr}" in best.run_dir and f"batch_size={batch}" in best.run_dir

    cv_base = estimator(tmp_path / "cv", epochs=1)
    cv_grid = ParamGridBuilder().addGrid(cv_base.getParam("learning_rate"), [0.05, 0.001]).build()
    cv = CrossValidator(
        estimator=cv_base,
        estimatorParamMaps=cv_grid,
        evaluator=evaluator,
        numFolds=2,
        seed=1,
    )
    cv_model = cv.fit(indexed)
    assert cv_model.bestModel.summary["status"] == "succeeded"
    assert len(os.listdir(tmp_path / "cv")) == 2 * 2 + 1  # 2 points x 2 folds, + the refit


def test_a_model_from_a_module_executors_cannot_import_fails_once(
    indexed, tmp_path, monkeypatch, estimator
):
    (tmp_path / "helper_nb.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Linear(4, 2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import helper_nb  # importable on the driver only: executors do not have tmp_path

    try:
        start = time.monotonic()
        with pytest.raises(ConfigError, match="'helper_nb'.*addPyFile") as info:
            estimator(tmp_path / "run", model=helper_nb.make, max_restarts=3).fit(indexed)
        assert isinstance(info.value, WorkerConfigError)
        attempts = RunDirectory(str(tmp_path / "run")).summary()["attempts"]
        assert len(attempts) == 1 and time.monotonic() - start < 120
    finally:
        sys.modules.pop("helper_nb", None)


def test_any_column_name_spark_accepts_works_in_fit_and_transform(spark_local, tmp_path, estimator):
    names = [
        "sensor.temp",
        "wind speed",
        "température",
        "__sparkdl_validation__",
        "__sparkdl_valid",
    ]
    rng = np.random.default_rng(9)
    x = rng.normal(size=(ROWS, len(names))).astype(float)
    rows = [(*map(float, x[i]), int(x[i, 0] > 0), bool(i % 4 == 0)) for i in range(ROWS)]
    schema = ", ".join(f"`{n}` double" for n in names) + ", `label.y` int, `is val` boolean"
    df = spark_local.createDataFrame(rows, schema)
    model = estimator(
        tmp_path / "run",
        model=lambda: torch.nn.Linear(len(names), 2),
        feature_cols=names,
        label_col="label.y",
        validation_col="is val",
        epochs=3,
        batch_size=8,
    ).fit(df)
    assert "validation/loss" in model.summary["metrics"]
    scored = model.transform(df)
    assert scored.columns == df.columns + ["prediction"]
    assert scored.filter(F.col("prediction").isNull()).count() == 0


def test_small_splits_work_or_are_refused_before_training(indexed, tmp_path, estimator):
    # one validation row for two workers, smaller than a batch: trains, validates on that row
    one = indexed.withColumn("val", F.col("id") == 3)
    model = estimator(tmp_path / "one", validation_col="val", epochs=2).fit(one)
    assert "validation/loss" in model.summary["metrics"]
    # a batch larger than each worker's rows: refused right after the dataset is written
    start = time.monotonic()
    with pytest.raises(DataError, match=r"batch_size must be at most .* = 64\), got 100"):
        estimator(tmp_path / "big", batch_size=100).fit(indexed)
    assert time.monotonic() - start < 90
    assert RunDirectory(str(tmp_path / "big")).summary()["attempts"] == []  # no worker started
    with pytest.raises(DataError, match=r"at least num_shards \(2\) training rows, got 1"):
        estimator(tmp_path / "tiny").fit(indexed.limit(1))
