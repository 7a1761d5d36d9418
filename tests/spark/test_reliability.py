"""Reliability through TorchEstimator.fit on Spark local[2]: a killed Python worker restarts and
resumes to the parameters of an uninterrupted run; raising and hanging ranks fail fast with
clear errors; resume=True continues an interrupted run (with another worker count too)."""

from __future__ import annotations

import os
import time

import pytest
import torch

import sparkdl
from sparkdl.artifacts import RunDirectory
from sparkdl.errors import WorkerGroupError
from sparkdl.rundir import checkpoints as ckpt

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def frame(spark_local, fault_setup):
    return fault_setup.frame(spark_local)


@pytest.fixture(scope="module")
def estimator(fault_setup):
    """``estimator(run_dir, **overrides)``: the fault tests' small estimator (tests/conftest.py:
    12 steps per epoch, checkpoints every 5 steps and epoch)."""
    return fault_setup.estimator


def _run_json(run_dir):
    return RunDirectory(str(run_dir)).summary()


@pytest.fixture(scope="module")
def reference(frame, tmp_path_factory, estimator):
    return estimator(tmp_path_factory.mktemp("ref") / "run").fit(frame)


def test_killed_worker_restarts_and_matches_an_uninterrupted_run(
    frame, reference, tmp_path, estimator
):
    fault = {"rank": 1, "step": 8, "attempt": 0, "mode": "exit"}  # mid-epoch 0, after ckpt 5
    model = estimator(tmp_path / "run", fault_injection=fault).fit(frame)
    run = _run_json(model.run_dir)
    assert run["status"] == "succeeded" and run["resumed_from_step"] == 5
    assert [a["attempt"] for a in run["attempts"]] == [0, 1]
    assert "error" in run["attempts"][0] and "error" not in run["attempts"][1]
    expected, got = reference.module.state_dict(), model.module.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    rows = model.metrics.toPandas()
    key = ["epoch", "step", "split", "name"]
    assert not rows.duplicated(key).any()
    assert sorted(rows[rows.name == "step_loss"].step) == list(range(2, 25, 2))
    assert len(rows[rows.name == "loss"]) == 2


def test_rank_raising_fails_fast_then_resume_continues_with_one_worker(frame, tmp_path, estimator):
    run_dir = tmp_path / "run"
    fault = {"rank": 1, "step": 17, "attempt": 0, "mode": "raise"}  # epoch 1, batch 5; ckpt 15
    start = time.monotonic()
    with pytest.raises(WorkerGroupError) as info:
        estimator(run_dir, fault_injection=fault, max_restarts=0).fit(frame)
    assert time.monotonic() - start < 300  # no hang: well under Spark's own waits
    error = info.value
    assert error.ranks[0] == 1 and "fault injection: rank 1 at step 17" in error.failures[0].message
    assert "Traceback" in error.failures[0].traceback and "in inject" in error.failures[0].traceback
    assert _run_json(run_dir)["status"] == "failed"
    assert not os.path.exists(run_dir / "model" / "state_dict.pt")
    assert ckpt.latest_step(str(run_dir)) == 15

    # resume=True continues the interrupted run; with one worker the rows are resharded
    model = estimator(run_dir, resume=True, num_workers=1).fit(frame)
    run = _run_json(run_dir)
    assert run["status"] == "succeeded" and run["resumed_from_step"] == 15
    assert [a["attempt"] for a in run["attempts"]] == [0, 1]
    # Epoch 1 was 3 of 12 steps in (2 ranks x 8 rows a step = 48 rows); at world 1 that is
    # 6 of 24 steps, so 18 steps remain: the position maps by rows consumed.
    assert run["steps"] == 15 + 18
    rows = model.metrics.toPandas()
    assert not rows.duplicated(["epoch", "step", "split", "name"]).any()
    assert len(rows[rows.name == "loss"]) == 2


def one_per_rank():
    return sparkdl.get_context().rank


def test_hanging_rank_is_torn_down_with_a_clear_error(frame, tmp_path, spark_local, estimator):
    fault = {"rank": 0, "step": 3, "attempt": 0, "mode": "hang"}
    start = time.monotonic()
    with pytest.raises(WorkerGroupError) as info:
        estimator(
            tmp_path / "run", fault_injection=fault, max_restarts=0, collective_timeout_s=10
        ).fit(frame)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "PeerLostError" in message and "collective_timeout_s=10" in message
    assert "rank 1 of 2" in message
    assert elapsed < 10 + 180  # the timeout plus launch and teardown on a loaded machine
    assert _run_json(tmp_path / "run")["status"] == "failed"
    # the hung task was torn down: both slots are free again
    distributor = sparkdl.Distributor(2, spark=spark_local, timeout_s=60)
    assert distributor.run(one_per_rank) == [0, 1]
