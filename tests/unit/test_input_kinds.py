"""Kinds of real users' inputs that used to fail (issue 13), at world size 1 without Spark:
label types vs losses, models whose output is not one tensor, state dicts with non-tensor
entries, DDP's options, and a payload the executors cannot unpickle."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections import namedtuple

import numpy as np
import pyarrow as pa
import pytest
import torch

from sparkdl.config import (
    AllReduceOptions,
    CheckpointConfig,
    ModelSpec,
    OptimConfig,
    SyncConfig,
    TrainSpec,
)
from sparkdl.context import WorkerEnv
from sparkdl.data.manifest import write_dataset
from sparkdl.errors import CheckpointError, ConfigError, DataError
from sparkdl.rundir.checkpoints import list_complete
from sparkdl.rundir.model_dir import load_module, state_bytes, write_model_json
from sparkdl.train.components import build_loss, prediction_of
from sparkdl.train.worker import run_worker

pytestmark = pytest.mark.timeout(120)

FEATURES = 4


def _dataset(path, *, label_type=pa.int64(), label_values=None, rows=64, validation_rows=0):
    rng = np.random.default_rng(0)

    def table(n):
        x = rng.normal(size=(n, FEATURES)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64) if label_values is None else label_values[:n]
        return pa.table(
            {"x": pa.array(list(x), pa.list_(pa.float32())), "y": pa.array(y).cast(label_type)}
        )

    write_dataset(
        str(path),
        [table(rows)],
        feature_cols=["x"],
        label_col="y",
        validation_shards=[table(validation_rows)] if validation_rows else None,
    )
    return str(path)


def _spec(tmp_path, dataset, factory, **optim):
    settings = {"batch_size": 8, "epochs": 2, "log_every_steps": 4, "learning_rate": 0.1}
    checkpoint = optim.pop("checkpoint", CheckpointConfig())
    settings.update(optim)
    return TrainSpec(
        model=ModelSpec(factory=factory),
        dataset_path=dataset,
        run_dir=str(tmp_path / "run"),
        optim=OptimConfig(**settings),
        checkpoint=checkpoint,
    )


# ---------------------------------------------------------------- 1. label type vs loss


@pytest.mark.parametrize(
    "loss", ["cross_entropy", "nll", "mse", "l1", "smooth_l1", "bce_with_logits"]
)
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.float32, torch.float64, torch.int32])
def test_every_named_loss_takes_every_label_kind(loss, label_dtype):
    fn = build_loss(OptimConfig(loss=loss))
    if loss in ("cross_entropy", "nll"):
        outputs = torch.randn(6, 3).log_softmax(dim=1)
        labels = torch.tensor([0, 1, 2, 2, 1, 0]).to(label_dtype)
        expected = fn(outputs, torch.tensor([0, 1, 2, 2, 1, 0]))
    else:
        outputs = torch.randn(6, 1)
        labels = torch.tensor([0, 1, 1, 0, 1, 0]).to(label_dtype)
        expected = fn(outputs, torch.tensor([0.0, 1, 1, 0, 1, 0]))
    value = fn(outputs, labels)
    assert torch.isfinite(value) and torch.equal(value, expected)


def test_a_double_label_trains_a_classifier(tmp_path):
    """StringIndexer's output: whole-valued doubles, read as class indices."""
    dataset = _dataset(tmp_path / "ds", label_type=pa.float64(), validation_rows=16)
    result = run_worker(_spec(tmp_path, dataset, lambda: torch.nn.Linear(FEATURES, 2)), WorkerEnv())
    assert result.metrics["validation/accuracy"] > 0.6


def test_fractional_or_negative_class_labels_are_refused_on_the_driver(tmp_path):
    from sparkdl.data.dataset import ShardedDataset
    from sparkdl.ml.estimator import TorchEstimator

    for name, values in (("frac", [0.0, 1.0, 0.5] * 22), ("neg", [0.0, 1.0, -1.0] * 22)):
        ds = ShardedDataset.load(
            _dataset(tmp_path / name, label_type=pa.float64(), label_values=np.array(values))
        )
        est = TorchEstimator(
            model=lambda: torch.nn.Linear(FEATURES, 2),
            feature_cols=["x"],
            label_col="y",
            run_dir=str(tmp_path / "run"),
        )
        with pytest.raises(DataError, match=r"label column 'y' must hold class indices.*got"):
            est._check_labels(ds)
        est.setLoss("mse")
        est._check_labels(ds)  # a regression loss takes any number


# ---------------------------------------------------------------- 2. outputs that are not one tensor


class WithAux(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = torch.nn.Linear(FEATURES, 2)

    def forward(self, x):
        logits = self.body(x)
        aux = logits.pow(2).mean()
        if self.kind == "tuple":
            return logits, aux
        if self.kind == "dict":
            return {"aux": aux, "logits": logits}
        if self.kind == "namedtuple":
            return Out(logits, aux)
        if self.kind == "dataclass":
            return DataOut(logits=logits, aux=aux)
        return "not a tensor"


Out = namedtuple("Out", ["logits", "aux"])


@dataclasses.dataclass
class DataOut:
    logits: torch.Tensor
    aux: torch.Tensor


@pytest.mark.parametrize("kind", ["tuple", "dict", "namedtuple", "dataclass"])
def test_structured_outputs_train_with_named_and_callable_losses(tmp_path, kind):
    dataset = _dataset(tmp_path / "ds", validation_rows=16)
    named = run_worker(_spec(tmp_path / "a", dataset, lambda: WithAux(kind)), WorkerEnv())
    assert 0 <= named.metrics["validation/accuracy"] <= 1  # metrics read the prediction

    def loss(outputs, labels):  # gets the output untouched
        logits, aux = (
            (outputs["logits"], outputs["aux"])
            if kind == "dict"
            else tuple(getattr(outputs, f.name) for f in dataclasses.fields(outputs))
            if kind == "dataclass"
            else outputs
        )
        return torch.nn.functional.cross_entropy(logits, labels) + 0.01 * aux

    custom = run_worker(
        _spec(tmp_path / "b", dataset, lambda: WithAux(kind), loss=loss), WorkerEnv()
    )
    assert custom.steps == 2 * (64 // 8)


def test_prediction_rule_and_a_clear_error_without_a_tensor():
    t = torch.ones(2, 3)
    assert prediction_of(t) is t
    assert prediction_of([t, 1]) is t and prediction_of((t,)) is t
    assert prediction_of({"aux": 1.0, "prediction": t}) is t
    assert prediction_of({"aux": torch.zeros(1), "logits": t}) is t
    assert prediction_of({"out": t}) is t
    assert prediction_of(DataOut(logits=t, aux=t * 0)) is t

    class HFOutput:  # transformers' ModelOutput: attribute access
        logits = t

    assert prediction_of(HFOutput()) is t
    with pytest.raises(ConfigError, match="model's output must be a tensor.*got str"):
        prediction_of("x")


def test_a_model_without_a_tensor_output_fails_once_with_a_config_error(tmp_path):
    dataset = _dataset(tmp_path / "ds")
    with pytest.raises(ConfigError, match="model's output must be a tensor"):
        run_worker(_spec(tmp_path, dataset, lambda: WithAux("none")), WorkerEnv())


# ---------------------------------------------------------------- 3. non-tensor state entries


class WithExtraState(torch.nn.Module):
    def __init__(self, extra=None) -> None:
        super().__init__()
        self.body = torch.nn.Linear(FEATURES, 2)
        self.extra = extra if extra is not None else {"vocab": ["a", "b"], "version": 2}

    def forward(self, x):
        return self.body(x)

    def get_extra_state(self):
        return self.extra

    def set_extra_state(self, state):
        self.extra = state


def test_extra_state_survives_checkpoints_early_stopping_and_the_model_file(tmp_path):
    dataset = _dataset(tmp_path / "ds", validation_rows=16)
    spec = _spec(
        tmp_path,
        dataset,
        WithExtraState,
        epochs=3,
        early_stopping_patience=2,
        checkpoint=CheckpointConfig(every_steps=5, keep_last=2),
    )
    result = run_worker(spec, WorkerEnv())
    assert list_complete(spec.run_dir)  # checkpoints with the extra state were written
    state = torch.load(os.path.join(result.model_dir, "state_dict.pt"), weights_only=True)
    module = WithExtraState(extra={})
    module.load_state_dict(state)
    assert module.extra == {"vocab": ["a", "b"], "version": 2}
    write_model_json(result.model_dir, ModelSpec(factory=WithExtraState), {})
    rebuilt = load_module(result.model_dir, model=lambda: WithExtraState(extra={}))
    assert rebuilt.extra == module.extra
    resumed = run_worker(spec, WorkerEnv(attempt=1))  # restores from the latest checkpoint
    assert resumed.resumed_from_step is not None


def test_extra_state_that_cannot_be_saved_weights_only_names_its_key(tmp_path):
    class Opaque:
        pass

    with pytest.raises(CheckpointError, match="'extra.x' must be tensors or plain Python values"):
        state_bytes({"w": torch.ones(1), "extra": {"x": Opaque()}})
    dataset = _dataset(tmp_path / "ds")
    spec = _spec(tmp_path, dataset, lambda: WithExtraState(extra={"o": Opaque()}), epochs=1)
    with pytest.raises(CheckpointError, match="'model._extra_state.o' must be tensors"):
        run_worker(spec, WorkerEnv())  # a CheckpointError: the launcher does not retry it


# ---------------------------------------------------------------- 4. DDP's own options


def test_ddp_options_are_allreduce_options():
    options = SyncConfig(
        strategy="allreduce",
        options={"find_unused_parameters": True, "static_graph": False, "bucket_cap_mb": 50},
    ).typed_options()
    assert isinstance(options, AllReduceOptions) and options.find_unused_parameters
    with pytest.raises(ConfigError, match="find_unused_parameters must be True or False"):
        AllReduceOptions(find_unused_parameters="yes")
    with pytest.raises(ConfigError, match="bucket_cap_mb must be a number > 0"):
        AllReduceOptions(bucket_cap_mb=0)
    with pytest.raises(ConfigError, match="find_unused_parameters"):
        SyncConfig(strategy="local_sgd", options={"find_unused_parameters": True})


# ---------------------------------------------------------------- 9. payloads executors cannot load


def test_a_payload_from_a_module_the_executors_lack_is_a_config_error(tmp_path, monkeypatch):
    from pyspark import cloudpickle

    from sparkdl.launch.rendezvous import unpickle_payload

    (tmp_path / "notebook_helpers.py").write_text("def make():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import notebook_helpers

    payload = cloudpickle.dumps((notebook_helpers.make, (), {}))  # by reference: module name
    monkeypatch.delitem(sys.modules, "notebook_helpers")
    os.remove(tmp_path / "notebook_helpers.py")
    with pytest.raises(
        ConfigError, match="'notebook_helpers'.*addPyFile.*register_pickle_by_value"
    ):
        unpickle_payload(cloudpickle, payload)
