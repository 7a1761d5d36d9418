"""Every synchronization strategy through TorchEstimator in Spark local[2]: digits accuracy
within 2 points of all-reduce, bytes and samples/s recorded, bad options refused on the driver."""

from __future__ import annotations

import functools
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import sparkdl
from sparkdl.errors import ConfigError

pytestmark = pytest.mark.timeout(600)

DIGITS = os.path.join(os.path.dirname(__file__), "..", "..", "data", "digits")
EPOCHS = 15


@pytest.fixture(scope="module")
def estimator(digits_estimator):
    """``estimator(run_dir, **overrides)``: the digits estimator (tests/conftest.py) at 1e-3."""
    return functools.partial(
        digits_estimator,
        learning_rate=1e-3,  # asynchronous SGD at 3e-3 ends noisily (±3 points)
        epochs=EPOCHS,
        log_every_steps=10,
    )


def _test_accuracy(module: torch.nn.Module) -> float:
    table = pq.read_table(os.path.join(DIGITS, "test.parquet"))
    features = torch.tensor(np.stack(table["features"].to_numpy(zero_copy_only=False)))
    labels = torch.tensor(table["label"].to_numpy())
    with torch.no_grad():
        return float((module(features).argmax(dim=1) == labels).double().mean())


@pytest.fixture(scope="module")
def digits_dataset(digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("sync") / "digits"
    return sparkdl.materialize(
        digits[0],
        str(path),
        feature_cols=["features"],
        label_col="label",
        num_shards=2,
        validation_fraction=0.1,
    )


@pytest.fixture(scope="module")
def allreduce_accuracy(digits_dataset, tmp_path_factory, estimator):
    run_dir = tmp_path_factory.mktemp("sync") / "allreduce"
    return _test_accuracy(estimator(run_dir).fit(digits_dataset).module)


@pytest.mark.parametrize(
    ("strategy", "options"),
    [("local_sgd", {}), ("parameter_server", {}), ("fsdp", {}), ("pipeline", {})],
    ids=["local_sgd", "parameter_server", "fsdp", "pipeline"],
)
def test_strategy_reaches_allreduce_accuracy(
    digits_dataset, allreduce_accuracy, tmp_path, strategy, options, estimator
):
    model = estimator(tmp_path / "run", strategy=strategy, strategy_options=options).fit(
        digits_dataset
    )
    accuracy = _test_accuracy(model.module)
    assert accuracy >= allreduce_accuracy - 0.02, (accuracy, allreduce_accuracy)
    assert allreduce_accuracy >= 0.93
    summary = model.summary
    assert summary["config"]["sync"]["strategy"] == strategy
    metrics = model.metrics.toPandas()
    train = metrics[metrics.split == "train"]
    for name in ("comm_bytes_per_step", "samples_per_s"):
        per_epoch = train[train.name == name].sort_values("epoch")
        assert list(per_epoch.epoch) == list(range(EPOCHS))
        assert (per_epoch.value > 0).all()
    assert len(metrics[(metrics.split == "validation") & (metrics.name == "accuracy")]) == EPOCHS
    if strategy == "parameter_server":
        sync = metrics[metrics.split == "sync"]
        staleness = sync[sync.name == "server_staleness_max"].value
        assert len(staleness) == EPOCHS and (staleness <= 8).all()
        assert sync[sync.name == "pushes"].value.max() == summary["steps"]  # every step pushed
    if strategy == "pipeline":  # 2 stages of one replica: each rank holds about half the model
        sync = metrics[metrics.split == "sync"]
        assert (sync[sync.name == "max_stage_param_fraction"].value <= 0.6).all()
        assert summary["samples"] == summary["steps"] * 32  # each batch counted once


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "gossip"}, "strategy must be one of"),
        (
            {"strategy": "local_sgd", "strategy_options": {"compression": "fp16"}},
            "compression must be used with strategy='allreduce'",
        ),
        ({"strategy": "local_sgd", "strategy_options": {"sync_every": 0}}, "sync_every"),
        (
            {"strategy_options": {"compression": "powersgd", "powersgd_rank": 0}},
            "powersgd_rank",
        ),
        ({"strategy": "parameter_server", "strategy_options": {"max_staleness": -2}}, "staleness"),
        ({"strategy": "fsdp", "num_workers": 1}, "process group"),
        (
            {"strategy": "pipeline", "num_workers": 3, "strategy_options": {"stages": 2}},
            r"num_workers must be a multiple of stages=2 .*got 3",
        ),
        (
            {"strategy": "pipeline", "strategy_options": {"microbatches": 5}},
            r"microbatches must be a divisor of batch_size=32 .*got 5",
        ),
        ({"strategy": "pipeline", "strategy_options": {"stages": 1}}, "stages must be"),
        (
            {"strategy": "parameter_server", "strategy_options": {"num_servers": 3}},
            "num_servers must be at most num_workers",
        ),
    ],
    ids=[
        "unknown",
        "compression-elsewhere",
        "sync_every",
        "powersgd-rank",
        "staleness",
        "fsdp-one",
        "pipeline-workers",
        "pipeline-microbatches",
        "pipeline-one-stage",
        "servers",
    ],
)
def test_bad_strategy_options_fail_on_construction(tmp_path, kwargs, match, estimator):
    with pytest.raises(ConfigError, match=match):
        estimator(tmp_path / "run", **kwargs)
