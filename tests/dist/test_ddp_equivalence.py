"""DDP over 2 gloo processes equals one process with the doubled batch on the same rows."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import torch

import sparkdl
from sparkdl.config import ModelSpec, OptimConfig, TrainSpec
from sparkdl.data.manifest import write_dataset
from sparkdl.train.worker import train

pytestmark = pytest.mark.timeout(180)

ROWS_PER_SHARD, FEATURES, BATCH = 32, 5, 4


def _shards(rng: np.random.Generator) -> list[pa.Table]:
    tables = []
    for _ in range(2):
        x = rng.normal(size=(ROWS_PER_SHARD, FEATURES)).astype(np.float32)
        y = (x @ np.arange(1, FEATURES + 1, dtype=np.float32) + 0.5).astype(np.float32)
        tables.append(pa.table({"features": pa.array(list(x), pa.list_(pa.float32())), "label": pa.array(y)}))
    return tables


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _reference(shards: list[pa.Table], spec: TrainSpec) -> dict[str, torch.Tensor]:
    torch.manual_seed(spec.optim.seed)
    model = spec.model.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.optim.learning_rate)
    xs = [torch.tensor(np.stack(t["features"].to_numpy(zero_copy_only=False))) for t in shards]
    ys = [torch.tensor(t["label"].to_numpy()) for t in shards]
    for step in range(ROWS_PER_SHARD // BATCH):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        x = torch.cat([xs[0][rows], xs[1][rows]])
        y = torch.cat([ys[0][rows], ys[1][rows]])
        loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


def test_two_workers_match_one_process_with_double_batch(tmp_path):
    shards = _shards(np.random.default_rng(7))
    write_dataset(str(tmp_path / "ds"), shards, feature_cols=["features"], label_col="label")
    spec = TrainSpec(
        model=ModelSpec(factory=_model),
        dataset_path=str(tmp_path / "ds"),
        run_dir=str(tmp_path / "run"),
        optim=OptimConfig(loss="mse", optimizer="sgd", learning_rate=0.05, batch_size=BATCH,
                          epochs=1, shuffle=False, log_every_steps=0),
    )
    results = sparkdl.Distributor(2, local_mode=True, timeout_s=120).run(train, spec)
    assert [r.rank for r in results] == [0, 1]
    assert all(r.steps == ROWS_PER_SHARD // BATCH for r in results)
    trained = torch.load(os.path.join(tmp_path, "run", "model", "state_dict.pt"), weights_only=True)
    expected = _reference(shards, spec)
    assert set(trained) == set(expected)
    for name, value in expected.items():
        assert not torch.equal(value, _model().state_dict()[name])  # training moved it
        torch.testing.assert_close(trained[name], value, atol=1e-5, rtol=0)
