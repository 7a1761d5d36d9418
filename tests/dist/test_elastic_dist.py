"""Elastic runs over local gloo processes, the slots played by a fake session: the stop request
is seen by every rank at the same checkpoint, and a 2 → 1 → 2 run (a rank lost, then slots
back) finishes with each step recorded once."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import sparkdl
from sparkdl.config import (
    CheckpointConfig,
    ElasticConfig,
    FaultInjection,
    ModelSpec,
    OptimConfig,
    TrainSpec,
)
from sparkdl.data.manifest import write_dataset
from sparkdl.launch.elastic import ElasticSizer
from sparkdl.launch.restarts import run_with_restarts
from sparkdl.rundir.layout import RunLayout
from sparkdl.train.worker import train

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]


class FakeSide:
    def __init__(self, slots):
        self.slots = slots

    def task_slots(self):
        return self.slots


def _spec(tmp_path, elastic, faults=(), epochs=3):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4)).astype(np.float32)
    table = pa.table(
        {
            "features": pa.array(list(x), pa.list_(pa.float32())),
            "y": (x.sum(1) > 0).astype(np.int64),
        }
    )
    if not (tmp_path / "ds").exists():
        write_dataset(
            str(tmp_path / "ds"),
            [table.slice(0, 48), table.slice(48)],
            feature_cols=["features"],
            label_col="y",
        )
    return TrainSpec(
        model=ModelSpec(
            factory=lambda: torch.nn.Sequential(
                torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
            )
        ),
        dataset_path=str(tmp_path / "ds"),
        run_dir=str(tmp_path / "run"),
        optim=OptimConfig(
            optimizer="sgd", learning_rate=0.1, batch_size=4, epochs=epochs, log_every_steps=1
        ),
        checkpoint=CheckpointConfig(every_steps=3, keep_last=2),
        elastic=elastic,
        faults=tuple(faults),
    )


def test_every_rank_stops_at_the_same_checkpoint_when_asked(tmp_path):
    elastic = ElasticConfig(min_workers=1, max_workers=2)
    spec = _spec(tmp_path, elastic)
    path = RunLayout(spec.run_dir).resize_request
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as fh:
        json.dump({"attempt": 0, "workers": 3}, fh)  # read by the chief only, then broadcast
    results = sparkdl.Distributor(2, local_mode=True, timeout_s=120).run(train, spec)
    assert [r.stopped_for_resize for r in results] == [True, True]
    assert [r.steps for r in results] == [3, 3]  # the first checkpoint


def test_a_run_shrinks_after_a_loss_and_grows_back(tmp_path):
    elastic = ElasticConfig(min_workers=1, max_workers=2, wait_s=0.5, grow_interval_s=2.0)
    # rank 1 dies inside step 5 of the first attempt: the checkpoint at step 3 survives
    spec = _spec(tmp_path, elastic, faults=[FaultInjection(rank=1, step=5, attempt=0, mode="exit")])
    side = FakeSide(2)
    sizer = ElasticSizer(side, elastic, [1, 2], timeout_s=60)
    changes = []

    def on_size(change):
        changes.append(change)
        if change.why == "shrink":  # the lost slot comes back a moment later
            threading.Timer(1.0, lambda: setattr(side, "slots", 2)).start()

    def lose_a_slot(attempt, error):
        side.slots = 1

    results, attempt = run_with_restarts(
        sparkdl.Distributor(2, local_mode=True, timeout_s=120),
        train,
        (spec,),
        run_dir=spec.run_dir,
        max_restarts=2,
        on_failure=lose_a_slot,
        sizer=sizer,
        on_size=on_size,
    )
    assert [(c.workers, c.why) for c in changes] == [(2, "start"), (1, "shrink"), (2, "grow")]
    assert changes[1].start_step == 3 and changes[2].start_step > 3
    assert len(results) == 2 and not any(r.stopped_for_resize for r in results)
    rows = pq.read_table(os.path.join(spec.run_dir, "metrics")).to_pandas()
    key = ["epoch", "step", "split", "name"]
    assert not rows.duplicated(key).any()
    steps = sorted(rows[rows.name == "step_loss"]["step"])
    assert steps == sorted(set(steps)) and steps[:3] == [1, 2, 3]
    sizes = rows[rows.name == "world_size"]["value"].tolist()
    assert set(sizes) <= {1.0, 2.0} and sizes[-1] == 2.0
    assert os.path.exists(os.path.join(spec.run_dir, "model", "state_dict.pt"))
    assert not os.path.exists(RunLayout(spec.run_dir).resize_request)
