"""Config validation: every bad value is a ConfigError naming the field and the fix."""

from __future__ import annotations

import pickle

import pytest
import torch.nn as nn

from sparkdl.config import CheckpointConfig, ModelSpec, OptimConfig, SyncConfig, TrainSpec
from sparkdl.errors import ConfigError

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"learning_rate": -0.1}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"loss": "hinge"}, "loss"),
        ({"optimizer": "lion"}, "optimizer"),
        ({"log_every_steps": -1}, "log_every_steps"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_optim_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field) as info:
        OptimConfig(**kwargs)
    assert "got" in str(info.value)


def test_configs_are_frozen_and_keyword_only():
    config = OptimConfig(batch_size=8)
    with pytest.raises(AttributeError):
        config.batch_size = 9  # type: ignore[misc]
    with pytest.raises(TypeError):
        OptimConfig("mse")  # type: ignore[misc]


def test_unknown_strategy_and_bad_checkpoint_values():
    with pytest.raises(ConfigError, match="strategy"):
        SyncConfig(strategy="gossip")
    with pytest.raises(ConfigError, match="keep_last"):
        CheckpointConfig(keep_last=0)


def test_model_spec_accepts_module_factory_and_import_path():
    assert isinstance(ModelSpec(factory=nn.Linear(2, 1)).build(), nn.Linear)
    assert isinstance(ModelSpec(factory=lambda: nn.Linear(2, 1)).build(), nn.Linear)
    spec = ModelSpec(factory="sparkdl.models:mlp", kwargs={"in_features": 4, "out_features": 3})
    assert spec.import_path == "sparkdl.models:mlp"
    assert spec.build()(__import__("torch").zeros(2, 4)).shape == (2, 3)


def test_model_spec_errors():
    with pytest.raises(ConfigError, match="nosuchmodule"):
        ModelSpec(factory="nosuchmodule:f")
    with pytest.raises(ConfigError, match="model"):
        ModelSpec(factory=42)
    with pytest.raises(ConfigError, match="raised"):
        ModelSpec(factory=lambda: 1 / 0).build()
    with pytest.raises(ConfigError, match="nn.Module"):
        ModelSpec(factory=lambda: "not a module").build()


def test_train_spec_pickles_and_checks_paths():
    spec = TrainSpec(
        model=ModelSpec(factory="sparkdl.models:mlp", kwargs={"in_features": 2, "out_features": 2}),
        dataset_path="/tmp/ds",
        run_dir="/tmp/run",
    )
    assert pickle.loads(pickle.dumps(spec)) == spec
    with pytest.raises(ConfigError, match="run_dir"):
        TrainSpec(model=spec.model, dataset_path="/tmp/ds", run_dir="")
