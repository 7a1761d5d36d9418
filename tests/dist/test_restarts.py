"""Restarts over 2 gloo processes: a killed rank resumes exactly; raising and hanging ranks fail
the group quickly with a clear error."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
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

FEATURES = 5


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds") / "ds"
    rng = np.random.default_rng(3)
    tables = []
    for _ in range(2):
        x = rng.normal(size=(40, FEATURES)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)
        tables.append(pa.table({"features": pa.array(list(x), pa.list_(pa.float32())), "y": y}))
    write_dataset(str(path), tables, feature_cols=["features"], label_col="y", row_group_rows=10)
    return str(path)


def _spec(run_dir, dataset, *, optimizer, faults=(), epochs=3):
    return TrainSpec(
        model=ModelSpec(factory=_model),
        dataset_path=dataset,
        run_dir=str(run_dir),
        optim=OptimConfig(
            optimizer=optimizer,
            learning_rate=0.05,
            batch_size=4,
            epochs=epochs,
            shuffle=True,
            log_every_steps=2,
        ),
        checkpoint=CheckpointConfig(every_epochs=1, every_steps=3, keep_last=2),
        faults=tuple(faults),
    )


def _distributor(timeout=30):
    return sparkdl.Distributor(2, local_mode=True, timeout_s=120, collective_timeout_s=timeout)


def _weights(run_dir):
    return torch.load(os.path.join(run_dir, "model", "state_dict.pt"), weights_only=True)


# SGD with a Python worker exiting is covered through fit in tests/spark/test_reliability.py
@pytest.mark.parametrize(("optimizer", "mode"), [("adam", "sigkill")])
def test_killed_rank_resumes_to_identical_parameters(tmp_path, dataset, optimizer, mode):
    reference, _ = run_with_restarts(
        _distributor(), train, (_spec(tmp_path / "ref", dataset, optimizer=optimizer),),
        run_dir=str(tmp_path / "ref"), max_restarts=0,
    )
    # 10 steps per epoch; step 15 is mid-epoch 1, after the step-12 checkpoint
    fault = FaultInjection(rank=1, step=15, attempt=0, mode=mode)
    spec = _spec(tmp_path / "run", dataset, optimizer=optimizer, faults=[fault])
    failures = []
    results, attempt = run_with_restarts(
        _distributor(), train, (spec,), run_dir=str(tmp_path / "run"), max_restarts=2,
        on_failure=lambda a, e: failures.append((a, e)),
    )
    assert attempt == 1 and [a for a, _ in failures] == [0]
    assert "rank 1" in str(failures[0][1])
    assert results[0].resumed_from_step == 12
    assert results[0].steps == reference[0].steps == 30
    assert sum(r.samples for r in results) == sum(r.samples for r in reference)
    expected, got = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert all(torch.equal(expected[k], got[k]) for k in expected)

    rows = pq.read_table(tmp_path / "run" / "metrics").to_pandas()
    ref_rows = pq.read_table(tmp_path / "ref" / "metrics").to_pandas()
    key = ["epoch", "step", "split", "name"]
    assert not rows.duplicated(key).any()
    step_losses = rows[rows.name == "step_loss"].step.tolist()
    assert sorted(step_losses) == list(range(2, 31, 2))  # each logged step exactly once
    assert sorted(map(tuple, rows[key].values)) == sorted(map(tuple, ref_rows[key].values))


def test_rank_raising_is_reported_with_its_traceback(tmp_path, dataset):
    fault = FaultInjection(rank=1, step=2, attempt=0, mode="raise")
    spec = _spec(tmp_path / "run", dataset, optimizer="sgd", faults=[fault])
    with pytest.raises(WorkerGroupError) as info:
        run_with_restarts(_distributor(), train, (spec,), run_dir=spec.run_dir, max_restarts=0)
    error = info.value
    assert error.ranks[0] == 1 and error.failures[0].exc_type == "RuntimeError"
    assert "fault injection: rank 1 at step 2" in error.failures[0].traceback
    assert "in inject" in error.failures[0].traceback  # the original frames, not a summary
    assert "gave up after 1 attempt" in str(error)


def test_hanging_rank_is_torn_down_within_the_collective_timeout(tmp_path, dataset):
    fault = FaultInjection(rank=1, step=4, attempt=0, mode="hang")
    spec = _spec(tmp_path / "run", dataset, optimizer="sgd", faults=[fault])
    start = time.monotonic()
    with pytest.raises(WorkerGroupError) as info:
        run_with_restarts(
            _distributor(timeout=5), train, (spec,), run_dir=spec.run_dir, max_restarts=0
        )
    elapsed = time.monotonic() - start
    error = info.value
    assert error.failures[0].exc_type == "PeerLostError"
    assert "collective_timeout_s=5" in str(error) and "step 3" in str(error)
    assert elapsed < 5 + 90  # the timeout plus generous start-up slack on a loaded machine


def _broken_loss(outputs, labels):
    raise ValueError("the loss has a bug")


def test_identical_failure_without_progress_is_not_retried_forever(tmp_path, dataset):
    spec = _spec(tmp_path / "run", dataset, optimizer="sgd")
    spec = TrainSpec(**{**vars(spec), "optim": OptimConfig(loss=_broken_loss, batch_size=4)})
    attempts = []
    with pytest.raises(WorkerGroupError, match="same failure twice"):
        run_with_restarts(
            _distributor(), train, (spec,), run_dir=spec.run_dir, max_restarts=3,
            on_failure=lambda a, e: attempts.append(a),
        )
    assert attempts == [0, 1]
    assert ckpt.latest_step(spec.run_dir) is None
