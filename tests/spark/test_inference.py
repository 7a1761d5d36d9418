"""TorchModel.transform and save/load without training: feature kinds, outputs, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pyspark.ml.feature import VectorAssembler
from pyspark.sql import functions as F

import sparkdl
from sparkdl.errors import CheckpointError, ConfigError, DataError
from sparkdl.ml import inference

pytestmark = pytest.mark.timeout(240)


def _linear(in_features=3, out_features=4, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features)


@pytest.fixture(scope="module")
def frame(spark_local):
    """a: double, b: array<double>[2], v: vector(a, b0, b1), plus their numpy matrix."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 3))
    rows = [(i, float(r[0]), [float(r[1]), float(r[2])]) for i, r in enumerate(x)]
    df = spark_local.createDataFrame(rows, "id long, a double, b array<double>")
    df = df.withColumn("b0", F.col("b")[0]).withColumn("b1", F.col("b")[1])
    df = VectorAssembler(inputCols=["a", "b0", "b1"], outputCol="v").transform(df)
    return df, x.astype(np.float32)


def _expected(module, x):
    with torch.no_grad():
        return module(torch.from_numpy(x))


def _by_id(df, *cols):
    return [tuple(r) for r in df.orderBy("id").select(*cols).collect()]


@pytest.mark.parametrize(
    "feature_cols",
    [["a", "b"], ["v"], ["a", "b0", "b1"]],
    ids=["scalar+array", "vector", "scalars"],
)
def test_feature_kinds_predict_the_forward_pass(frame, feature_cols):
    df, x = frame
    module = _linear()
    model = sparkdl.TorchModel(
        module, feature_cols=feature_cols, feature_dim=3, probability_col="probability"
    )
    out = model.transform(df)
    assert out.columns == [*df.columns, "prediction", "probability"]
    assert dict(out.dtypes)["v"] == "vector"  # input columns are left as they were
    rows = _by_id(out, "prediction", "probability")
    logits = _expected(module, x)
    assert [r[0] for r in rows] == logits.argmax(dim=1).double().tolist()
    probs = np.array([r[1] for r in rows])
    np.testing.assert_allclose(probs, torch.softmax(logits, dim=1).numpy(), rtol=1e-5, atol=1e-6)


def test_regression_outputs_the_value_and_small_batches_agree(frame):
    df, x = frame
    module = _linear(out_features=1)
    model = sparkdl.TorchModel(
        module, feature_cols=["v"], classification=False, inference_batch_size=7
    )
    model.setPredictionCol("y_hat").setProbabilityCol("ignored_for_regression")
    out = model.transform(df)
    assert "ignored_for_regression" not in out.columns
    got = [r[0] for r in _by_id(out, "y_hat")]
    np.testing.assert_allclose(got, _expected(module, x)[:, 0].numpy(), rtol=1e-5, atol=1e-6)


def test_map_in_arrow_fallback_matches_arrow_udf(frame, monkeypatch):
    df, _ = frame
    model = sparkdl.TorchModel(_linear(), feature_cols=["a", "b"], probability_col="p")
    fast = _by_id(model.transform(df), "prediction", "p")
    monkeypatch.setattr(inference, "USE_ARROW_UDF", False)
    slow = model.transform(df)
    assert slow.columns == [*df.columns, "prediction", "p"]
    assert _by_id(slow, "prediction", "p") == fast


def test_missing_feature_column_is_named(frame):
    model = sparkdl.TorchModel(_linear(), feature_cols=["a", "nope"], feature_dim=3)
    with pytest.raises(DataError, match="'nope'"):
        model.transform(frame[0])


def test_non_numeric_feature_column_is_named(frame):
    df = frame[0].withColumn("s", F.lit("x"))
    model = sparkdl.TorchModel(_linear(), feature_cols=["a", "s"], feature_dim=3)
    with pytest.raises(DataError, match="'s'.*string"):
        model.transform(df)


def test_wrong_width_names_the_column_and_widths(frame):
    df = frame[0]
    scalars = sparkdl.TorchModel(_linear(), feature_cols=["a", "b0"], feature_dim=3)
    with pytest.raises(DataError, match=r"width must be 3.*2 numeric columns"):
        scalars.transform(df)  # known from the schema: raised on the driver
    arrays = sparkdl.TorchModel(_linear(), feature_cols=["b"], feature_dim=3)
    with pytest.raises(Exception, match=r"feature width must be 3.*'b': 2"):
        arrays.transform(df).collect()  # array widths are seen on the executors


def test_existing_output_column_is_refused(frame):
    model = sparkdl.TorchModel(_linear(), feature_cols=["v"], prediction_col="a")
    with pytest.raises(DataError, match="'a'"):
        model.transform(frame[0])


def test_save_load_pickled_architecture_needs_trust(frame, tmp_path):
    df, _ = frame
    module = _linear()
    model = sparkdl.TorchModel(module, feature_cols=["v"], feature_dim=3, probability_col="p")
    model.save(str(tmp_path / "m"))
    with pytest.raises(ConfigError, match="overwrite"):
        model.save(str(tmp_path / "m"))  # refused before anything is written
    with pytest.raises(CheckpointError, match="trust_pickle"):
        sparkdl.TorchModel.load(str(tmp_path / "m"))
    with sparkdl.ml.trust_pickle():
        loaded = sparkdl.TorchModel.load(str(tmp_path / "m"))
    assert loaded.uid == model.uid and loaded.getProbabilityCol() == "p"
    assert loaded.feature_dim == 3 and loaded.classification
    assert _by_id(loaded.transform(df), "prediction", "p") == _by_id(
        model.transform(df), "prediction", "p"
    )
