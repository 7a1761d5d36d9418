"""run_worker at world size 1, without a process group: the loop, metrics, model, NaN guard."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sparkdl.config import ModelSpec, OptimConfig, TrainSpec
from sparkdl.context import WorkerEnv
from sparkdl.data.manifest import write_dataset
from sparkdl.errors import DataError
from sparkdl.train.worker import run_worker

pytestmark = pytest.mark.timeout(60)


def _dataset(path, rows=96, validation_rows=0, label_scale=1.0):
    rng = np.random.default_rng(0)

    def table(n):
        x = rng.normal(size=(n, 3)).astype(np.float32)
        y = (x.sum(axis=1) > 0).astype(np.int64) * int(label_scale)
        return pa.table(
            {"a": x[:, 0], "b": pa.array(list(x[:, 1:]), pa.list_(pa.float32())), "y": y}
        )

    write_dataset(
        str(path),
        [table(rows)],
        feature_cols=["a", "b"],
        label_col="y",
        validation_shards=[table(validation_rows)] if validation_rows else None,
    )
    return str(path)


def _spec(tmp_path, dataset, **optim):
    settings = {"batch_size": 8, "epochs": 3, "log_every_steps": 4, "learning_rate": 0.05}
    settings.update(optim)
    return TrainSpec(
        model=ModelSpec(factory=lambda: torch.nn.Linear(3, 2)),
        dataset_path=dataset,
        run_dir=str(tmp_path / "run"),
        optim=OptimConfig(**settings),
    )


def test_world_of_one_trains_and_writes_metrics_and_model(tmp_path):
    dataset = _dataset(tmp_path / "ds", validation_rows=32)
    result = run_worker(_spec(tmp_path, dataset), WorkerEnv())
    assert result.steps == 3 * (96 // 8) and result.samples == 3 * 96
    assert result.model_dir is not None
    state = torch.load(os.path.join(result.model_dir, "state_dict.pt"), weights_only=True)
    assert set(state) == {"weight", "bias"}
    table = pq.read_table(os.path.join(tmp_path, "run", "metrics")).to_pandas()
    epoch_loss = table[(table.split == "train") & (table.name == "loss")].sort_values("epoch")
    assert list(epoch_loss.epoch) == [0, 1, 2]
    assert epoch_loss.value.iloc[-1] < epoch_loss.value.iloc[0]
    assert len(table[table.name == "step_loss"]) == result.steps // 4
    accuracy = table[(table.split == "validation") & (table.name == "accuracy")]
    assert len(accuracy) == 3 and accuracy.value.iloc[-1] > 0.8
    assert result.metrics["validation/accuracy"] == accuracy.value.iloc[-1]


def test_diverging_loss_stops_naming_the_step(tmp_path):
    dataset = _dataset(tmp_path / "ds")
    spec = _spec(tmp_path, dataset, loss=lambda out, y: out.sum() * float("nan"), log_every_steps=2)
    with pytest.raises(DataError, match=r"finite.*step 2"):
        run_worker(spec, WorkerEnv())


def test_batch_larger_than_rank_rows_is_a_clear_error(tmp_path):
    dataset = _dataset(tmp_path / "ds", rows=6)
    with pytest.raises(DataError, match="batch_size"):
        run_worker(_spec(tmp_path, dataset, batch_size=8), WorkerEnv())
