"""A standalone cluster (master + 2 workers from spark-class): training runs there, and killing
one executor JVM mid-training ends in a completed run (new executor, restart, resume)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

from sparkdl.rundir import checkpoints as ckpt
from sparkdl.testing import classification_frame

pytestmark = pytest.mark.timeout(900)

FEATURES, ROWS = 4, 128


class SlowNet(torch.nn.Module):
    """A linear model whose forward pass sleeps, so training lasts long enough to be interrupted."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(FEATURES, 2)

    def forward(self, x):
        time.sleep(0.15)
        return self.linear(x)


def _kill_an_executor_after_a_checkpoint(cluster, run_dir, killed, stop):
    """Wait for the first committed checkpoint, then SIGKILL worker 1's executor JVM by PID."""
    while not stop.is_set():
        if ckpt.latest_step(run_dir) is not None:
            pids = cluster.executor_pids(1)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
        time.sleep(0.1)


def test_executor_killed_mid_training_restarts_and_resumes(
    spark_standalone_cluster, tmp_path, small_estimator
):
    cluster = spark_standalone_cluster
    df = classification_frame(cluster.spark, rows=ROWS, features=FEATURES, seed=2)
    run_dir = str(tmp_path / "run")
    # 128 rows / 2 workers / batch 8 = 8 steps an epoch, 24 in all; checkpoints every 3 steps
    est = small_estimator(
        run_dir,
        model=SlowNet,
        epochs=3,
        log_every_steps=1,
        checkpoint_every_steps=3,
        max_restarts=3,
    )
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(
        target=_kill_an_executor_after_a_checkpoint,
        args=(cluster, run_dir, killed, stop),
        daemon=True,
    )
    killer.start()
    try:
        model = est.fit(df)
    finally:
        stop.set()
        killer.join(timeout=10)
    assert killed, "the executor was not killed: training ended before the first checkpoint"
    with open(os.path.join(run_dir, "run.json")) as fh:
        run = json.load(fh)
    assert run["status"] == "succeeded" and run["steps"] == 24
    assert len(run["attempts"]) >= 2 and "error" in run["attempts"][0]
    assert run["resumed_from_step"] is not None and run["resumed_from_step"] >= 3
    assert killed[0] not in cluster.executor_pids(1)  # a new executor took its place
    metrics = model.metrics.toPandas()
    step_losses = metrics[metrics.name == "step_loss"].step
    assert sorted(step_losses) == list(range(1, 25))  # every step once, none twice
    assert isinstance(model.module, SlowNet)
