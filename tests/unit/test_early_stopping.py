"""Early stopping and per-epoch metrics at world size 1: stops, keeps the best weights."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sparkdl.artifacts import epoch_metrics, plot_epochs
from sparkdl.config import ModelSpec, OptimConfig, TrainSpec
from sparkdl.context import WorkerEnv
from sparkdl.data import materialize
from sparkdl.data.manifest import write_dataset
from sparkdl.errors import ConfigError
from sparkdl.train.early_stopping import EarlyStopping
from sparkdl.train.worker import run_worker

pytestmark = pytest.mark.timeout(60)


def _table(rng, n, flip=False, regression=False):
    x = rng.normal(size=(n, 3)).astype(np.float32)
    if regression:
        y = (x @ np.array([1.0, -2.0, 0.5], dtype=np.float32) + 0.3).astype(np.float32)
    else:
        y = (x.sum(axis=1) > 0).astype(np.int64)
        y = 1 - y if flip else y  # validation labels the model learns to get wrong
    return pa.table({"f": pa.array(list(x), pa.list_(pa.float32())), "y": y})


def _spec(tmp_path, *, flip=True, regression=False, validation=True, **optim):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "ds")
    write_dataset(
        path,
        [_table(rng, 128, regression=regression)],
        feature_cols=["f"],
        label_col="y",
        validation_shards=[_table(rng, 32, flip, regression)] if validation else None,
    )
    settings = dict(batch_size=16, epochs=20, learning_rate=0.1, log_every_steps=0)
    settings.update(optim)
    out = 1 if regression else 2
    return TrainSpec(
        model=ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 3, "out_features": out}),
        dataset_path=path,
        run_dir=str(tmp_path / "run"),
        optim=OptimConfig(**settings),
    )


def _metric(run_dir, split, name):
    table = pq.read_table(os.path.join(run_dir, "metrics")).to_pandas()
    rows = table[(table.split == split) & (table.name == name)].sort_values("epoch")
    return dict(zip(rows.epoch, rows.value))


def test_stops_after_patience_and_keeps_the_best_epoch(tmp_path):
    spec = _spec(tmp_path, early_stopping_patience=2)
    result = run_worker(spec, WorkerEnv())
    losses = _metric(spec.run_dir, "validation", "loss")
    best = min(losses, key=losses.get)
    assert result.epochs == len(losses) == best + 3 < spec.optim.epochs
    assert result.best_epoch == best
    module = torch.nn.Linear(3, 2)
    state = os.path.join(spec.run_dir, "model", "state_dict.pt")
    module.load_state_dict(torch.load(state, weights_only=True))
    table = pq.read_table(os.path.join(spec.dataset_path, "validation")).to_pandas()
    x = torch.tensor(np.stack(table.f.to_numpy())), torch.tensor(table.y.to_numpy())
    with torch.no_grad():
        kept = torch.nn.functional.cross_entropy(module(x[0]), x[1]).item()
    assert kept == pytest.approx(losses[best], rel=1e-5)  # the best epoch's weights, not the last
    assert set(_metric(spec.run_dir, "train", "accuracy")) == set(losses)
    assert set(_metric(spec.run_dir, "validation", "accuracy")) == set(losses)
    # the result reports the kept model's metrics; the last epoch's come separately
    assert result.metrics["validation/loss"] == pytest.approx(losses[best])
    assert result.last_metrics["validation/loss"] == pytest.approx(losses[max(losses)])


def test_regression_records_mse_and_plots(tmp_path):
    spec = _spec(tmp_path, regression=True, loss="mse", epochs=3)
    result = run_worker(spec, WorkerEnv())
    assert result.epochs == 3 and result.best_epoch is None
    train, validation = (_metric(spec.run_dir, s, "mse") for s in ("train", "validation"))
    assert len(train) == len(validation) == 3 and validation[2] < validation[0]
    loss = _metric(spec.run_dir, "validation", "loss")  # the mse loss is the mse metric
    assert all(validation[e] == pytest.approx(loss[e], rel=1e-5) for e in loss)
    rows = epoch_metrics(os.path.join(spec.run_dir, "metrics"))
    written = plot_epochs(rows, str(tmp_path / "plots"), best_epoch=1)
    assert sorted(os.path.basename(p) for p in written) == ["loss.png", "mse.png"]
    assert all(os.path.getsize(p) > 1000 for p in written)


def test_early_stopping_without_validation_split_is_a_config_error(tmp_path):
    spec = _spec(tmp_path, validation=False, early_stopping_patience=1)
    with pytest.raises(ConfigError, match="validation split"):
        run_worker(spec, WorkerEnv())


def test_early_stopping_rule():
    stop = EarlyStopping(patience=2)
    decisions = [
        stop.update(e, v, improved=stop.improves(v), state={"epoch": torch.tensor(e)})
        for e, v in enumerate([3.0, 2.0, 2.0, 1.0, 1.5, 1.2])
    ]
    assert decisions == [False, False, False, False, False, True]
    assert stop.best_epoch == 3 and stop.best_value == 1.0
    assert stop.best_state is not None and int(stop.best_state["epoch"]) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"validation_col": "v", "validation_fraction": 0.1}, "validation_fraction must be 0"),
        ({"validation_col": "y"}, "must not be a feature or label"),
        ({"validation_col": 3}, "validation_col must be None or a column name"),
    ],
)
def test_materialize_validation_col_settings_fail_before_touching_data(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        materialize(None, "/unused", feature_cols=["f"], label_col="y", num_shards=1, **kwargs)
