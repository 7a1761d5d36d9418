"""TorchEstimator / TorchModel Params without a Spark session: table, getters, copy, checks."""

from __future__ import annotations

import inspect

import pytest
import torch

import sparkdl
from sparkdl.errors import ConfigError
from sparkdl.ml.estimator import ESTIMATOR_PARAMS

pytestmark = pytest.mark.timeout(60)

KEYWORDS = (
    "model feature_cols label_col run_dir loss optimizer learning_rate batch_size epochs "
    "num_workers use_gpu seed model_kwargs strategy strategy_options validation_fraction "
    "shuffle log_every_steps overwrite collective_timeout_s"
).split()


def _estimator(**overrides):
    kwargs = dict(
        model="sparkdl.models:mlp",
        model_kwargs={"in_features": 4, "out_features": 3},
        feature_cols=("a", "b"),
        label_col="y",
        run_dir="/tmp/unused",
    )
    kwargs.update(overrides)
    return sparkdl.TorchEstimator(**kwargs)


def test_constructor_keywords_are_the_params_table():
    names = [s.name for s in ESTIMATOR_PARAMS]
    assert set(KEYWORDS) <= set(names)
    signature = inspect.signature(sparkdl.TorchEstimator)
    assert list(signature.parameters) == names
    assert signature.parameters["learning_rate"].default == 1e-3
    assert {p.name for p in _estimator().params} == set(names)


def test_getters_setters_copy_and_explain():
    est = _estimator()
    assert est.getFeatureCols() == ["a", "b"]  # tuples normalised to lists
    assert est.getLearningRate() == 1e-3 and not est.isSet(est.learning_rate)
    assert est.setLearningRate(0.1).setEpochs(4) is est
    assert est.getLearningRate() == 0.1 and est.optim.epochs == 4
    copy = est.copy({est.batch_size: 8})
    assert copy.uid == est.uid and copy.getBatchSize() == 8 and est.getBatchSize() == 64
    assert copy.getLearningRate() == 0.1
    text = est.explainParams()
    assert "early_stopping_patience" in text and "learning_rate" in text and "current: 0.1" in text
    described = est.describe()
    assert described["model_kwargs"] == {"in_features": 4, "out_features": 3}
    assert described["optim"]["learning_rate"] == 0.1 and described["sync"]["options"] == {}
    assert described["checkpoint"]["every_epochs"] == 1 and described["num_workers"] == 2


def test_callables_are_described_by_name():
    def my_loss(out, y):
        return out.sum()

    est = _estimator(model=lambda: torch.nn.Linear(2, 3), model_kwargs=None, loss=my_loss)
    assert est.getModelKwargs() == {}
    assert est.describe()["optim"]["loss"].endswith("my_loss")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"early_stopping_patience": -1}, "early_stopping_patience"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"validation_fraction": 0.1, "validation_col": "v"}, "validation_col"),
        ({"inference_batch_size": 0}, "inference_batch_size"),
        ({"inference_device": "tpu"}, "inference_device"),
        ({"num_workers": True}, "num_workers"),
        ({"lr": 0.1}, "lr"),
    ],
)
def test_bad_values_raise_config_error_naming_the_param(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        _estimator(**kwargs)


def test_required_params_and_failed_setter_keeps_the_old_value():
    with pytest.raises(ConfigError, match="run_dir must be set"):
        sparkdl.TorchEstimator(model="sparkdl.models:mlp", feature_cols=["a"], label_col="y")
    est = _estimator()
    with pytest.raises(ConfigError, match="batch_size"):
        est.setParams(epochs=3, batch_size=-1)
    assert est.getEpochs() == 1 and est.getBatchSize() == 64


def test_model_params():
    model = sparkdl.TorchModel(torch.nn.Linear(2, 2), feature_cols=["f"], probability_col="p")
    assert model.getPredictionCol() == "prediction" and model.getProbabilityCol() == "p"
    assert model.setInferenceBatchSize(16).getInferenceBatchSize() == 16
    assert model.copy().module is model.module
    with pytest.raises(ConfigError, match="feature_cols"):
        sparkdl.TorchModel(torch.nn.Linear(2, 2), feature_cols=[])
    with pytest.raises(ConfigError, match="run_dir"):
        _ = model.summary
