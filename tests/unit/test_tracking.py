"""The mlflow Param without Spark or a tracking store: its validation, the missing-package error,
how Params and metric rows become MLflow params and metrics, and predict_pandas (the logged
model's predict) against the executors' arithmetic."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch

import sparkdl
from sparkdl.errors import ConfigError
from sparkdl.ml.tracking import (
    FitTracker,
    MlflowConfig,
    metric_key,
    metric_rows,
    param_value,
    redact,
    require_mlflow,
)
from sparkdl.train.metrics import MetricsLog

pytestmark = pytest.mark.timeout(60)


def _estimator(**overrides):
    kwargs = dict(
        model="sparkdl.models:mlp",
        model_kwargs={"in_features": 4, "out_features": 3},
        feature_cols=["a", "b"],
        label_col="y",
        run_dir="/tmp/unused",
    )
    kwargs.update(overrides)
    return sparkdl.TorchEstimator(**kwargs)


def test_mlflow_values_coerce_to_a_config():
    assert MlflowConfig.coerce(False) is None and MlflowConfig.coerce(None) is None
    assert MlflowConfig.coerce(True) == MlflowConfig()
    config = MlflowConfig.coerce({"experiment": "digits", "log_model": False})
    assert config == MlflowConfig(experiment="digits", log_model=False)
    assert config.tracking_uri is None and config.run_name is None


@pytest.mark.parametrize(
    "value, message",
    [
        ({"experiments": "x"}, r"mlflow keys must be among .*got 'experiments'"),
        ({"log_model": "yes"}, r"mlflow\['log_model'\] must be True or False, got 'yes'"),
        ({"tracking_uri": 5}, r"mlflow\['tracking_uri'\] must be a non-empty string"),
        ({"run_name": " "}, r"mlflow\['run_name'\] must be a non-empty string"),
        ("true", r"mlflow must be True, False or a dict"),
        (1, r"mlflow must be True, False or a dict"),
    ],
)
def test_bad_mlflow_values_are_config_errors_on_the_driver(value, message):
    with pytest.raises(ConfigError, match=message):
        MlflowConfig.coerce(value)
    with pytest.raises(ConfigError, match=message):
        _estimator(mlflow=value)
    est = _estimator()
    with pytest.raises(ConfigError, match=message):
        est.setMlflow(value)
    assert est.getMlflow() is False  # the setter left the old value


def test_mlflow_param_has_a_default_a_setter_and_a_config_key():
    from sparkdl.cli import training_defaults

    est = _estimator(mlflow={"experiment": "e"})
    assert est.getMlflow() == {"experiment": "e"}
    assert est.setMlflow(True).getMlflow() is True
    assert training_defaults()["mlflow"] is False
    assert est.describe()["mlflow"] is True


def test_missing_package_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow → ImportError
    with pytest.raises(ConfigError, match=r"pip install 'sparkdl-torch\[mlflow\]'"):
        require_mlflow()
    est = _estimator(mlflow=True)  # set without the package: refused at fit, before any work
    with pytest.raises(ConfigError, match="mlflow must be importable"):
        est.fit(object())


def test_no_config_tracker_does_nothing():
    tracker = FitTracker.start(False, estimator=_estimator(), run=None)  # type: ignore[arg-type]
    assert not tracker.active
    tracker.finish(None, None, None, step=1)  # type: ignore[arg-type]
    tracker.fail(None, RuntimeError("x"))  # type: ignore[arg-type]


def _factory():
    return torch.nn.Linear(2, 2)


def test_param_values_read_well():
    assert param_value("adam") == "adam" and param_value(1e-3) == "0.001"
    assert param_value(None) == "None" and param_value(True) == "True"
    assert param_value(["a", "b"]) == '["a", "b"]'
    assert param_value({"b": 1, "a": [2]}) == '{"a": [2], "b": 1}'
    assert param_value(_factory) == f"{__name__}._factory"
    assert param_value(torch.nn.Linear(2, 2)) == "torch.nn.modules.linear.Linear"
    assert param_value({"fn": _factory}) == f'{{"fn": "{__name__}._factory"}}'
    assert len(param_value("x" * 10_000)) == 6000


def test_credentials_never_reach_mlflow():
    assert redact("https://user:secret@host:5000/x") == "https://***@host:5000/x"
    assert redact("sqlite:///tmp/a.db") == "sqlite:///tmp/a.db"
    config = MlflowConfig(tracking_uri="https://u:p@host")
    assert config.describe()["tracking_uri"] == "https://***@host"


def test_metric_keys_are_valid_mlflow_names():
    assert metric_key("train", "loss") == "train/loss"
    assert metric_key("validation", "f1(macro)") == "validation/f1_macro_"


def test_metric_rows_one_per_key_and_step_latest_wins(tmp_path):
    run_dir = str(tmp_path)
    first = MetricsLog(run_dir, enabled=True, attempt=0)
    first.record(0, 2, "train", "step_loss", 1.0)
    first.record(0, 4, "train", "step_loss", 0.9)
    first.flush()
    again = MetricsLog(run_dir, enabled=True, attempt=1)  # a restart writes step 4 again
    again.record(0, 4, "train", "step_loss", 0.8)
    again.record(0, 4, "train", "loss", 0.85)
    again.flush()
    rows = [(k, v, s) for k, v, _, s in metric_rows(first.dir)]
    assert rows == [
        ("train/step_loss", 1.0, 2),
        ("train/loss", 0.85, 4),
        ("train/step_loss", 0.8, 4),
    ]
    assert metric_rows(str(tmp_path / "none")) == []


def test_predict_pandas_matches_the_executors_arithmetic():
    from pyspark.ml.linalg import Vectors

    from sparkdl.ml.inference import features_from_arrays
    from sparkdl.ml.model import TorchModel

    torch.manual_seed(0)
    module = torch.nn.Linear(5, 3)
    model = TorchModel(module, feature_cols=["v", "arr", "x"], probability_col="p", feature_dim=5)
    frame = pd.DataFrame(
        {
            "v": [Vectors.dense([1.0, 2.0]), Vectors.dense([0.5, -1.0])],
            "arr": [np.array([3.0, 4.0], np.float32), [0.0, 1.0]],
            "x": [7, 8],
        },
        index=[10, 11],
    )
    got = model.predict_pandas(frame)
    assert list(got.columns) == ["prediction", "p"] and list(got.index) == [10, 11]
    import pyarrow as pa

    features = features_from_arrays(
        [pa.array([[1.0, 2.0], [0.5, -1.0]]), pa.array([[3.0, 4.0], [0.0, 1.0]]), pa.array([7, 8])],
        ["v", "arr", "x"],
        5,
    )
    with torch.no_grad():
        out = module(torch.from_numpy(features))
    assert got["prediction"].tolist() == out.argmax(1).double().tolist()
    assert np.allclose(np.stack(got["p"]), torch.softmax(out, 1).numpy())
    with pytest.raises(sparkdl.DataError, match="feature column 'x' must exist"):
        model.predict_pandas(frame.drop(columns="x"))
