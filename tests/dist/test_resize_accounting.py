"""A run that changes size inside an epoch (2 → 1 → 2 gloo workers, through run_worker) trains
on each row of every epoch once: the loader's exact remainder across size changes."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch

import sparkdl
from sparkdl.config import CheckpointConfig, FaultInjection, ModelSpec, OptimConfig, TrainSpec
from sparkdl.data.manifest import write_dataset
from sparkdl.errors import WorkerGroupError
from sparkdl.launch.restarts import run_with_restarts
from sparkdl.rundir import checkpoints as ckpt
from sparkdl.train.worker import train

pytestmark = pytest.mark.timeout(300)

FEATURES = 3
ROWS = 82  # 41 per rank at 2 workers: 10 batches of 4, one row of drop_last surplus each


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _dataset(path) -> str:
    rng = np.random.default_rng(5)
    tables = []
    for lo, hi in ((0, 41), (41, ROWS)):
        x = rng.normal(size=(hi - lo, FEATURES)).astype(np.float32)
        tables.append(
            pa.table(
                {
                    "features": pa.array(list(x), pa.list_(pa.float32())),
                    "id": pa.array(np.arange(lo, hi, dtype=np.float32)),  # stripped below
                    "y": (x[:, 0] > 0).astype(np.int64),
                }
            )
        )
    write_dataset(
        str(path), tables, feature_cols=["features", "id"], label_col="y", row_group_rows=10
    )
    return str(path)


class _Batch(tuple):
    ids: list[int] = []


def _recording_train(spec: TrainSpec, log_dir: str):
    """``train``, recording each training batch's row ids (the dataset's last feature column,
    stripped before the model sees it) per attempt and rank, in the order the loop got them."""
    from sparkdl.data import loader as loader_module

    ctx = sparkdl.get_context()
    cls = loader_module.ShardLoader
    finish, iterate = cls._finish, cls.__iter__

    def _finish(self, features, label):
        out = _Batch(finish(self, np.ascontiguousarray(features[:, :-1]), label))
        out.ids = features[:, -1].astype(np.int64).tolist()
        return out

    def _iter(self):
        path = os.path.join(log_dir, f"attempt{ctx.env.attempt}-rank{ctx.rank}.jsonl")
        with open(path, "a") as fh:
            for batch in iterate(self):
                if self.split == "train":
                    fh.write(json.dumps([self.epoch, batch.ids]) + "\n")
                    fh.flush()
                yield tuple(batch)

    cls._finish, cls.__iter__ = _finish, _iter
    return train(spec)


def _committed(log_dir, attempt, world, steps):
    """Per epoch, the row ids the ranks of ``attempt`` trained on in its first ``steps`` steps
    (None: all of them): the batches the next attempt did not roll back."""
    out: dict[int, list[int]] = {}
    for rank in range(world):
        with open(os.path.join(log_dir, f"attempt{attempt}-rank{rank}.jsonl")) as fh:
            rows = [json.loads(line) for line in fh]
        for epoch, ids in rows[:steps]:
            out.setdefault(epoch, []).extend(ids)
    return out


def test_two_to_one_to_two_workers_train_each_row_once_per_epoch(tmp_path):
    dataset = _dataset(tmp_path / "ds")
    log_dir = str(tmp_path / "ids")
    os.makedirs(log_dir)
    run_dir = str(tmp_path / "run")
    faults = (
        FaultInjection(rank=1, step=15, attempt=0, mode="raise"),  # epoch 1, after ckpt 12
        FaultInjection(rank=0, step=20, attempt=1, mode="raise"),  # remainder, after ckpt 18
    )
    spec = TrainSpec(
        model=ModelSpec(factory=_model),
        dataset_path=dataset,
        run_dir=run_dir,
        optim=OptimConfig(
            optimizer="sgd", learning_rate=0.05, batch_size=4, epochs=3, shuffle=True
        ),
        checkpoint=CheckpointConfig(every_epochs=1, every_steps=3, keep_last=3),
        faults=faults,
    )
    starts = []
    for attempt, world in ((0, 2), (1, 1)):
        starts.append(ckpt.latest_step(run_dir) or 0)
        with pytest.raises(WorkerGroupError, match="fault injection"):
            run_with_restarts(
                sparkdl.Distributor(world, local_mode=True, timeout_s=120),
                _recording_train,
                (spec, log_dir),
                run_dir=run_dir,
                max_restarts=0,
                first_attempt=attempt,
            )
    starts.append(ckpt.latest_step(run_dir))
    assert starts == [0, 12, 18]
    results, attempt = run_with_restarts(
        sparkdl.Distributor(2, local_mode=True, timeout_s=120),
        _recording_train,
        (spec, log_dir),
        run_dir=run_dir,
        max_restarts=0,
        first_attempt=2,
    )
    assert attempt == 2 and results[0].resumed_from_step == 18

    per_epoch: dict[int, list[int]] = {}
    for a, world, steps in ((0, 2, 12), (1, 1, 18 - 12), (2, 2, None)):
        for epoch, ids in _committed(log_dir, a, world, steps).items():
            per_epoch.setdefault(epoch, []).extend(ids)
    assert sorted(per_epoch) == [0, 1, 2]
    for epoch, ids in per_epoch.items():
        counts = Counter(ids)
        assert max(counts.values()) == 1, (epoch, [i for i, c in counts.items() if c > 1])
        assert ROWS - len(counts) < 2 * 4  # the drop_last remainder only
    # the resized epoch: 2 ranks × 2 batches, 1 rank × 6 batches, then 2 ranks × 5 batches
    assert len(per_epoch[1]) == (2 * 2 + 6 + 2 * 5) * 4
