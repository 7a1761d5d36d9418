"""Progress and log lines of both ranks reach the driver on local-cluster[2,1,1024]."""

from __future__ import annotations

import logging
import os

import pytest

import sparkdl

pytestmark = pytest.mark.timeout(300)

DIGITS = os.path.join(os.path.dirname(__file__), "..", "..", "data", "digits")


def _job_groups_and_descriptions(sc):
    jvm_sc = sc._jsc.sc()
    jvm_sc.listenerBus().waitUntilEmpty()
    jobs = jvm_sc.statusStore().jobsList(None)
    out = []
    for i in range(jobs.size()):
        job = jobs.apply(i)
        group, description = job.jobGroup(), job.description()
        out.append(
            (
                group.get() if group.isDefined() else None,
                description.get() if description.isDefined() else None,
            )
        )
    return out


def test_progress_and_logs_of_both_ranks_reach_the_driver(spark_local_cluster, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="sparkdl")  # worker INFO lines: DEBUG here
    train = spark_local_cluster.read.parquet(os.path.join(DIGITS, "train.parquet"))
    run_dir = tmp_path / "digits-live"
    sparkdl.TorchEstimator(
        model="sparkdl.models:mlp",
        model_kwargs={"in_features": 64, "out_features": 10},
        feature_cols=["features"],
        label_col="label",
        batch_size=64,
        epochs=2,
        num_workers=2,
        log_every_steps=5,
        run_dir=str(run_dir),
    ).fit(train)

    worker_lines = [r.getMessage() for r in caplog.records if r.name == "sparkdl.workers"]
    for rank in (0, 1):
        assert any(
            line.startswith(f"[rank {rank}] rank {rank} of 2 on cpu") for line in worker_lines
        )
        assert any(line.startswith(f"[rank {rank}] epoch 2 done") for line in worker_lines)
        kept = (run_dir / "logs" / f"rank-{rank}.log").read_text()
        assert "epoch 1 done" in kept and "epoch 2 done" in kept  # 1-based, like the bar
    assert any("loss" in line for line in worker_lines if line.startswith("[rank 0] epoch 1 step"))
    # pytest is not a terminal: progress comes as log lines, one at least per epoch end
    progress = [r.getMessage() for r in caplog.records if r.name == "sparkdl.progress"]
    assert any(line.startswith("digits-live: epoch 1/2 | step") for line in progress)
    last = progress[-1]
    assert last.startswith("digits-live: epoch 2/2 | step") and "(100%)" in last
    assert "samples/s" in last and "loss" in last

    # the Spark UI names the run and its phases
    jobs = _job_groups_and_descriptions(spark_local_cluster.sparkContext)
    assert ("sparkdl digits-live: train (2 workers)") in [d for _, d in jobs]
    assert any(g and g.startswith("sparkdl-digits-live-materialize-") for g, _ in jobs)
