"""Checkpoints at world size 1: atomic commit, discovery, retention, corrupt ones, exact resume."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sparkdl.config import CheckpointConfig, FaultInjection, ModelSpec, OptimConfig, TrainSpec
from sparkdl.context import WorkerEnv
from sparkdl.data.manifest import write_dataset
from sparkdl.errors import CheckpointError, ConfigError
from sparkdl.rundir import checkpoints as ckpt
from sparkdl.train.checkpoint import Checkpointer, restore_rng, rng_snapshot
from sparkdl.train.worker import run_worker

pytestmark = pytest.mark.timeout(120)


def _write(run_dir, step, value=0.0):
    state = {"model": {"w": torch.full((3,), float(value))}}
    return ckpt.write_checkpoint(str(run_dir), step=step, epoch=0, state=state, meta={"x": step})


def test_commit_discovery_and_retention(tmp_path):
    for step in (5, 10, 15):
        _write(tmp_path, step, value=step)
    assert [i.step for i in ckpt.list_complete(str(tmp_path))] == [5, 10, 15]
    loaded = ckpt.load_latest(str(tmp_path))
    assert loaded.info.step == 15 and torch.equal(
        loaded.state["model"]["w"], torch.full((3,), 15.0)
    )
    assert loaded.info.meta["x"] == 15
    ckpt.apply_retention(str(tmp_path), keep_last=2)
    assert [i.step for i in ckpt.list_complete(str(tmp_path))] == [10, 15]
    assert ckpt.latest_step(str(tmp_path)) == 15


def test_checkpoint_without_marker_is_ignored(tmp_path):
    _write(tmp_path, 5)
    info = _write(tmp_path, 10)
    os.remove(os.path.join(info.path, ckpt.MARKER_FILE))  # as if the chief died before the commit
    assert ckpt.load_latest(str(tmp_path)).info.step == 5


def test_truncated_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    _write(tmp_path, 5, value=5)
    info = _write(tmp_path, 10, value=10)
    state_file = os.path.join(info.path, ckpt.STATE_FILE)
    with open(state_file, "r+b") as fh:
        fh.truncate(os.path.getsize(state_file) // 2)
    with caplog.at_level(logging.WARNING, logger="sparkdl"):
        loaded = ckpt.load_latest(str(tmp_path))
    assert loaded.info.step == 5 and float(loaded.state["model"]["w"][0]) == 5.0
    assert "skipping checkpoint at step 10" in caplog.text and "truncated" in caplog.text
    with pytest.raises(CheckpointError, match="sha256"):
        ckpt.load_checkpoint(info)


def test_checkpoint_files_load_with_weights_only(tmp_path):
    info = _write(tmp_path, 3)
    state = torch.load(os.path.join(info.path, ckpt.STATE_FILE), weights_only=True)
    assert state["format"] == ckpt.FORMAT
    with open(os.path.join(info.path, ckpt.MARKER_FILE)) as fh:
        assert json.load(fh)["step"] == 3


def test_rng_snapshot_round_trip():
    import random

    snap = rng_snapshot("cpu")
    expected = (torch.rand(3), np.random.rand(2), random.random())
    restore_rng(snap, "cpu")
    again = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_bad_checkpoint_and_fault_values():
    with pytest.raises(ConfigError, match="checkpoint_every_steps"):
        CheckpointConfig(every_steps=-1)
    with pytest.raises(ConfigError, match="mode"):
        FaultInjection(mode="explode")
    with pytest.raises(ConfigError, match="fault_injection"):
        FaultInjection.coerce({"rank": 0, "when": 3})
    assert FaultInjection.coerce({"rank": 1, "step": 4}) == (FaultInjection(rank=1, step=4),)


# ---------------------------------------------------------------- resume inside run_worker


def _dataset(path, rows=96):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 4)).astype(np.float32)
    y = (x.sum(axis=1) > 0).astype(np.int64)
    table = pa.table({"features": pa.array(list(x), pa.list_(pa.float32())), "y": y})
    write_dataset(str(path), [table], feature_cols=["features"], label_col="y")
    return str(path)


def _model():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2))


def _spec(run_dir, dataset, faults=(), optimizer="adam"):
    return TrainSpec(
        model=ModelSpec(factory=_model),
        dataset_path=dataset,
        run_dir=str(run_dir),
        optim=OptimConfig(
            optimizer=optimizer, learning_rate=0.05, batch_size=8, epochs=3, log_every_steps=3
        ),
        checkpoint=CheckpointConfig(every_epochs=1, every_steps=5, keep_last=2),
        faults=tuple(faults),
    )


def _weights(run_dir):
    return torch.load(os.path.join(run_dir, "model", "state_dict.pt"), weights_only=True)


def test_resume_after_a_failure_mid_epoch_matches_an_uninterrupted_run(tmp_path):
    dataset = _dataset(tmp_path / "ds")
    reference = run_worker(_spec(tmp_path / "ref", dataset), WorkerEnv())
    fault = FaultInjection(rank=0, step=19, attempt=0, mode="raise")  # epoch 1, after ckpt 15
    spec = _spec(tmp_path / "run", dataset, faults=[fault])
    with pytest.raises(RuntimeError, match="fault injection"):
        run_worker(spec, WorkerEnv(attempt=0))
    assert ckpt.latest_step(str(tmp_path / "run")) == 15
    resumed = run_worker(spec, WorkerEnv(attempt=1))
    assert resumed.resumed_from_step == 15
    assert resumed.steps == reference.steps == 36 and resumed.samples == reference.samples
    expected, got = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert all(torch.equal(expected[k], got[k]) for k in expected)

    ref_rows = pq.read_table(tmp_path / "ref" / "metrics").to_pandas()
    rows = pq.read_table(tmp_path / "run" / "metrics").to_pandas()
    key = ["epoch", "step", "split", "name"]
    assert not rows.duplicated(key).any()
    assert sorted(map(tuple, rows[key].values)) == sorted(map(tuple, ref_rows[key].values))
    merged = rows.merge(ref_rows, on=key)
    losses = merged[merged.name.isin(["loss", "step_loss"])]
    np.testing.assert_allclose(losses.value_x, losses.value_y, rtol=1e-9)
    assert len(ckpt.list_complete(str(tmp_path / "run"))) == 2  # keep_last


def test_resume_of_a_finished_run_does_no_more_steps(tmp_path):
    dataset = _dataset(tmp_path / "ds")
    spec = _spec(tmp_path / "run", dataset, optimizer="sgd")
    first = run_worker(spec, WorkerEnv())
    again = run_worker(spec, WorkerEnv(attempt=1))
    assert again.resumed_from_step == first.steps == again.steps
    assert again.samples == first.samples


def test_resume_skips_a_truncated_latest_checkpoint(tmp_path, caplog):
    dataset = _dataset(tmp_path / "ds")
    fault = FaultInjection(rank=0, step=19, attempt=0, mode="raise")
    spec = _spec(tmp_path / "run", dataset, faults=[fault], optimizer="sgd")
    with pytest.raises(RuntimeError, match="fault injection"):
        run_worker(spec, WorkerEnv(attempt=0))
    latest = ckpt.list_complete(str(tmp_path / "run"))[-1]  # step 15; 12 before it
    state_file = os.path.join(latest.path, ckpt.STATE_FILE)
    with open(state_file, "r+b") as fh:
        fh.truncate(os.path.getsize(state_file) // 3)
    with caplog.at_level(logging.WARNING, logger="sparkdl"):
        resumed = run_worker(spec, WorkerEnv(attempt=1))
    assert resumed.resumed_from_step == 12 and resumed.steps == 36
    assert "skipping checkpoint at step 15" in caplog.text
    rows = pq.read_table(tmp_path / "run" / "metrics").to_pandas()
    assert not rows.duplicated(["epoch", "step", "split", "name"]).any()


def test_a_replaced_attempt_is_fenced_off(tmp_path):
    config = CheckpointConfig()
    old = Checkpointer(str(tmp_path), config, WorkerEnv(attempt=0))
    new = Checkpointer(str(tmp_path), config, WorkerEnv(attempt=1))
    old.claim()
    old.check_current()
    new.claim()
    assert ckpt.claimed_attempt(str(tmp_path)) == 1
    new.check_current()
    with pytest.raises(CheckpointError, match="replaced"):
        old.check_current()
    with pytest.raises(CheckpointError, match="replaced"):
        old.save(step=3, epoch=0, position={}, totals={}, modules={})
    assert ckpt.list_complete(str(tmp_path)) == []
