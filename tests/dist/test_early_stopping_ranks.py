"""Early stopping over 2 gloo ranks with different validation rows: every rank stops together."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import sparkdl
from sparkdl.config import ModelSpec, OptimConfig, SyncConfig, TrainSpec
from sparkdl.data.manifest import write_dataset
from sparkdl.train.worker import train

pytestmark = pytest.mark.timeout(180)


def _table(rng, n, flip):
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x.sum(axis=1) > 0).astype(np.int64)
    return pa.table({"f": pa.array(list(x), pa.list_(pa.float32())), "y": (1 - y) if flip else y})


@pytest.mark.parametrize("strategy", ["allreduce", "fsdp"])  # fsdp: snapshots are collectives
def test_ranks_stop_at_the_same_epoch(tmp_path, strategy):
    rng = np.random.default_rng(3)
    # Rank 0 validates on flipped labels (loss rises), rank 1 on true ones (loss falls): alone
    # they would disagree; on the all-reduced loss they cannot.
    write_dataset(
        str(tmp_path / "ds"),
        [_table(rng, 64, False), _table(rng, 64, False)],
        feature_cols=["f"],
        label_col="y",
        validation_shards=[_table(rng, 48, True), _table(rng, 16, False)],
    )
    spec = TrainSpec(
        model=ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 3, "out_features": 2}),
        dataset_path=str(tmp_path / "ds"),
        run_dir=str(tmp_path / "run"),
        optim=OptimConfig(
            batch_size=16,
            epochs=20,
            learning_rate=0.1,
            log_every_steps=0,
            early_stopping_patience=2,
        ),
        sync=SyncConfig(strategy=strategy),
    )
    results = sparkdl.Distributor(2, local_mode=True, timeout_s=120).run(train, spec)
    assert results[0].epochs == results[1].epochs < 20
    assert results[0].best_epoch == results[1].best_epoch == results[0].epochs - 3
