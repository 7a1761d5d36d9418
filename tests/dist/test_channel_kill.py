"""Killing the driver channel mid-run does not fail training (2 local processes, gloo)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pyarrow as pa
import pytest

import sparkdl
from sparkdl.channel.server import ChannelServer
from sparkdl.config import ModelSpec, OptimConfig, TrainSpec
from sparkdl.data.manifest import write_dataset
from sparkdl.launch import launcher
from sparkdl.train.worker import train

pytestmark = pytest.mark.timeout(180)

ROWS_PER_SHARD, FEATURES, BATCH, EPOCHS = 64, 5, 4, 3


def _model():
    import torch

    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def test_training_survives_the_driver_channel_dying(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    shards = []
    for _ in range(2):
        x = rng.normal(size=(ROWS_PER_SHARD, FEATURES)).astype(np.float32)
        y = x.sum(axis=1).astype(np.float32)
        shards.append(pa.table({"features": pa.array(list(x), pa.list_(pa.float32())), "label": y}))
    write_dataset(str(tmp_path / "ds"), shards, feature_cols=["features"], label_col="label")
    killed = threading.Event()

    class KillingServer(ChannelServer):
        """Dies, hard, as soon as the first worker frame arrives."""

        def _enqueue(self, frame):
            super()._enqueue(frame)
            if not killed.is_set():
                killed.set()
                threading.Thread(target=self.close, kwargs={"grace_s": 0}).start()

    monkeypatch.setattr(launcher, "ChannelServer", KillingServer)
    spec = TrainSpec(
        model=ModelSpec(factory=_model),
        dataset_path=str(tmp_path / "ds"),
        run_dir=str(tmp_path / "run"),
        optim=OptimConfig(
            loss="mse",
            optimizer="sgd",
            learning_rate=0.01,
            batch_size=BATCH,
            epochs=EPOCHS,
            log_every_steps=2,
        ),
    )
    results = sparkdl.Distributor(2, local_mode=True, timeout_s=120).run(train, spec)
    assert killed.is_set()
    assert [r.rank for r in results] == [0, 1]
    assert all(r.steps == EPOCHS * ROWS_PER_SHARD // BATCH for r in results)
    assert os.path.exists(tmp_path / "run" / "model" / "state_dict.pt")
