"""Elastic training on a standalone cluster: with num_workers=(1, 2), killing one worker JVM
for good shrinks the run to 1 worker without waiting out the launch timeout, and starting a new
worker JVM grows it back to 2 at a checkpoint; the run succeeds, each step is recorded once,
and digits accuracy stays within 2 points of an uninterrupted run."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch
from pyspark.sql import functions as F

import sparkdl

pytestmark = pytest.mark.timeout(900)

DIGITS = os.path.join(os.path.dirname(__file__), "..", "..", "data", "digits")


class SlowMLP(torch.nn.Module):
    """The digits MLP, sleeping in each training forward so the run lasts long enough to resize."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
        )

    def forward(self, x):
        if self.training:
            time.sleep(0.08)
        return self.net(x)


def _estimator(run_dir, **overrides):
    kwargs = dict(
        model=SlowMLP,
        feature_cols=["features"],
        label_col="label",
        learning_rate=3e-3,
        batch_size=32,
        epochs=12,
        num_workers=2,
        run_dir=str(run_dir),
        log_every_steps=5,
        checkpoint_every_steps=5,
        collective_timeout_s=30,
        max_restarts=3,
    )
    kwargs.update(overrides)
    return sparkdl.TorchEstimator(**kwargs)


def _accuracy(model, frame):
    scored = model.transform(frame)
    return scored.select(F.avg((F.col("prediction") == F.col("label")).cast("double"))).first()[0]


def _run_json(run_dir):
    try:
        with open(os.path.join(run_dir, "run.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _resize_the_cluster(cluster, run_dir, events, stop):
    """After the first checkpoint kill worker 1 (JVM and executor) for good; once the run has
    shrunk, start a new worker JVM."""
    while not stop.is_set() and not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        time.sleep(0.2)
    while not stop.is_set():
        if any(
            name.startswith("step-") for name in os.listdir(os.path.join(run_dir, "checkpoints"))
        ):
            break
        time.sleep(0.2)
    if stop.is_set():
        return
    cluster.kill_worker(1)
    events.append(("killed", time.monotonic()))
    while not stop.is_set():
        sizes = _run_json(run_dir).get("world_sizes", [])
        if any(s["why"] == "shrink" for s in sizes):
            events.append(("shrunk", time.monotonic()))
            cluster.add_worker()
            events.append(("added", time.monotonic()))
            return
        time.sleep(0.2)


def test_a_run_shrinks_on_a_lost_worker_and_grows_when_one_joins(
    spark_standalone_cluster, tmp_path
):
    cluster = spark_standalone_cluster
    train = cluster.spark.read.parquet(os.path.join(DIGITS, "train.parquet"))
    test = cluster.spark.read.parquet(os.path.join(DIGITS, "test.parquet"))
    reference = _accuracy(_estimator(tmp_path / "ref").fit(train), test)

    run_dir = str(tmp_path / "elastic")
    estimator = _estimator(
        run_dir, num_workers=(1, 2), elastic_wait_s=3.0, elastic_grow_interval_s=5.0
    )
    events: list = []
    stop = threading.Event()
    resizer = threading.Thread(
        target=_resize_the_cluster, args=(cluster, run_dir, events, stop), daemon=True
    )
    resizer.start()
    started = time.monotonic()
    try:
        model = estimator.fit(train)
    finally:
        stop.set()
        resizer.join(timeout=30)
    run = _run_json(run_dir)
    assert run["status"] == "succeeded"
    sizes = [(s["workers"], s["why"]) for s in run["world_sizes"]]
    assert sizes[0] == (2, "start") and (1, "shrink") in sizes and sizes[-1] == (2, "grow"), sizes
    shrink_at = dict(events)["shrunk"] - dict(events)["killed"]
    assert shrink_at < 120, f"shrinking took {shrink_at:.0f} s: it waited out the launch timeout"
    metrics = model.metrics.toPandas()
    key = ["epoch", "step", "split", "name"]
    assert not metrics.duplicated(key).any()
    steps = metrics[metrics.name == "step_loss"].step
    assert list(steps.sort_values()) == sorted(set(steps))
    assert set(metrics[metrics.name == "world_size"].value) == {1.0, 2.0}
    accuracy = _accuracy(model, test)
    assert abs(accuracy - reference) <= 0.02, (accuracy, reference)
    print(f"elastic run: {time.monotonic() - started:.0f} s, sizes {sizes}, events {events}")
