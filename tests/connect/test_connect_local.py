"""sparkdl from a Spark Connect session (``remote("local[2]")``): the same results as classic."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import torch

import sparkdl
from sparkdl.artifacts import RunDirectory
from sparkdl.data import ShardedDataset, materialize
from sparkdl.data.manifest import MANIFEST_NAME
from sparkdl.errors import ConfigError, RendezvousError, WorkerGroupError
from sparkdl.launch import launcher
from sparkdl.ml import inference
from sparkdl.testing import free_port

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def frame(spark_connect, fault_setup):
    return fault_setup.frame(spark_connect)


@pytest.fixture(scope="module")
def estimator(fault_setup):
    """``estimator(run_dir, **overrides)``: the fault tests' small estimator (tests/conftest.py:
    12 steps per epoch, checkpoints every 5 steps and epoch)."""
    return fault_setup.estimator


def all_reduce_rank_plus(x):
    import torch.distributed as dist

    from sparkdl.context import get_context

    t = torch.tensor([float(get_context().rank + x)])
    dist.all_reduce(t)
    return t.item()


def test_the_session_is_connect(spark_connect):
    from sparkdl.session import spark_side

    side = spark_side(spark_connect)
    assert side.kind == "connect" and side.master == "local[2]" and side.task_slots() == 2
    with pytest.raises(Exception):  # noqa: B017 - what Connect lacks, and why sparkdl avoids it
        spark_connect.sparkContext  # noqa: B018


def test_distributor_runs_and_names_a_failing_rank(spark_connect, fail_on_rank_one):
    distributor = sparkdl.Distributor(2, spark=spark_connect, timeout_s=120)
    assert distributor.run(all_reduce_rank_plus, 1) == [3.0, 3.0]
    with pytest.raises(WorkerGroupError, match="rank one has a bad batch") as err:
        distributor.run(fail_on_rank_one)
    assert [f.rank for f in err.value.failures] == [1]
    with pytest.raises(ConfigError, match="num_workers must be at most .* got 3 with 2 slot"):
        sparkdl.Distributor(3, spark=spark_connect).run(all_reduce_rank_plus, 1)


def test_start_timeout_cancels_a_stage_that_cannot_get_its_slots(spark_connect):
    """One of the two slots is busy: the barrier stage cannot start, and is cancelled."""

    def hold_a_slot(batches):
        time.sleep(120)
        yield from batches

    holder = threading.Thread(
        target=lambda: _ignore_errors(
            spark_connect.range(1, numPartitions=1).mapInArrow(hold_a_slot, "id long").collect
        ),
        daemon=True,
    )
    holder.start()
    try:
        time.sleep(3)  # the holder's task is running
        start = time.monotonic()
        with pytest.raises(RendezvousError, match="must all start within timeout_s=5"):
            sparkdl.Distributor(2, spark=spark_connect, timeout_s=5).run(all_reduce_rank_plus, 1)
        assert time.monotonic() - start < 60
    finally:
        spark_connect.interruptAll()
        holder.join(timeout=60)


def _ignore_errors(action):
    try:
        action()
    except Exception:
        pass


def test_materialize_and_reuse(spark_connect, tmp_path):
    df = spark_connect.range(0, 100, numPartitions=3).selectExpr(
        "cast(id as float) as x", "id % 2 as label"
    )
    root = str(tmp_path / "ds")
    first = materialize(df, root, feature_cols=["x"], label_col="label", num_shards=2)
    assert first.num_rows == 100 and [s.rows for s in first.manifest.shards_of("train")] == [50, 50]
    stamp = os.stat(os.path.join(root, MANIFEST_NAME)).st_mtime_ns
    reused = materialize(
        df, root, feature_cols=["x"], label_col="label", num_shards=2, mode="reuse"
    )
    assert reused.manifest == first.manifest
    assert os.stat(os.path.join(root, MANIFEST_NAME)).st_mtime_ns == stamp
    assert ShardedDataset.load(root).num_rows == 100
    with pytest.raises(ConfigError, match="mode='reuse', got a different DataFrame"):
        materialize(
            df.filter("x < 50"), root, feature_cols=["x"], label_col="label", num_shards=2,
            mode="reuse",
        )  # fmt: skip


def test_digits_estimator_end_to_end(
    spark_connect, connect_digits, digits_estimator, tmp_path, monkeypatch
):
    from pyspark.sql import functions as F

    train, test = connect_digits
    model = digits_estimator(tmp_path / "run").fit(train)
    scored = model.transform(test)
    accuracy = scored.select(F.avg((F.col("prediction") == F.col("label")).cast("double")))
    assert accuracy.first()[0] >= 0.95  # as on a classic session
    metrics = model.metrics
    assert {"epoch", "step", "split", "name", "value"} <= set(metrics.columns)
    assert metrics.filter("name = 'loss' and split = 'train'").count() == 15
    model.write().overwrite().save(str(tmp_path / "model"))
    model.write().overwrite().save(str(tmp_path / "model"))  # Connect's overwrite works too
    loaded = sparkdl.TorchModel.load(str(tmp_path / "model"))
    again = loaded.transform(test).select("prediction").toPandas()["prediction"]
    expected = scored.select("prediction").toPandas()["prediction"].tolist()
    assert again.tolist() == expected
    # a module over the inline limit travels through a file in the run directory
    monkeypatch.setattr(inference, "INLINE_MAX_BYTES", 0)
    by_file = sparkdl.TorchModel.load(str(tmp_path / "model"))
    assert (
        by_file.transform(test).select("prediction").toPandas()["prediction"].tolist() == expected
    )
    assert len(os.listdir(os.path.join(model.run_dir, "shipped"))) == 1


def test_killed_rank_restarts_and_resumes(spark_connect, frame, tmp_path, estimator):
    reference = estimator(tmp_path / "ref").fit(frame)
    fault = {"rank": 1, "step": 8, "attempt": 0, "mode": "exit"}  # mid-epoch 0, after ckpt 5
    model = estimator(tmp_path / "run", fault_injection=fault).fit(frame)
    run = RunDirectory(model.run_dir).summary()
    assert run["status"] == "succeeded" and run["resumed_from_step"] == 5
    assert [a["attempt"] for a in run["attempts"]] == [0, 1]
    expected, got = reference.module.state_dict(), model.module.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


class _UnreachableChannel(launcher.ChannelServer):
    """The driver channel as a notebook behind NAT looks to executors: a port nobody answers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.address = f"127.0.0.1:{free_port()}"


def test_progress_comes_through_the_run_directory_when_the_channel_is_unreachable(
    spark_connect, frame, tmp_path, estimator, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="sparkdl")
    monkeypatch.setattr(launcher, "ChannelServer", _UnreachableChannel)
    model = estimator(tmp_path / "run", progress=True).fit(frame)
    messages = [r.getMessage() for r in caplog.records]
    assert any("reports through the run directory" in m for m in messages), messages
    assert any("epoch 2/2 | step 24/24" in m for m in messages), messages  # the last line
    logs = os.path.join(model.run_dir, "logs")
    assert sorted(os.listdir(os.path.join(logs, "feed", "attempt-0"))) == [
        "rank-0.json",
        "rank-1.json",
    ]
    rank_log = open(os.path.join(logs, "rank-1.log")).read()
    assert "cannot be reached" in rank_log  # each rank says once why it switched


def test_pipeline_fits_transforms_saves_and_loads(spark_connect, tmp_path):
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.feature import VectorAssembler

    df = spark_connect.range(0, 256, numPartitions=2).selectExpr(
        "cast(rand(1) as float) as a", "cast(rand(2) as float) as b"
    )
    df = df.selectExpr("a", "b", "cast(a > b as int) as label")
    stages = [
        VectorAssembler(inputCols=["a", "b"], outputCol="features"),
        sparkdl.TorchEstimator(
            model="sparkdl.models:mlp",
            model_kwargs={"in_features": 2, "out_features": 2},
            feature_cols=["features"],
            label_col="label",
            batch_size=16,
            epochs=2,
            num_workers=2,
            run_dir=str(tmp_path / "run"),
        ),
    ]
    fitted = Pipeline(stages=stages).fit(df)
    first = fitted.transform(df).select("prediction").toPandas()["prediction"].tolist()
    fitted.write().overwrite().save(str(tmp_path / "pipeline"))
    loaded = PipelineModel.load(str(tmp_path / "pipeline"))
    again = loaded.transform(df).select("prediction").toPandas()["prediction"].tolist()
    assert len(first) == 256 and again == first


@pytest.mark.parametrize(
    ("strategy", "options"),
    [
        ("allreduce", {"compression": "fp16"}),
        ("local_sgd", {}),
        ("parameter_server", {}),
        ("fsdp", {}),
    ],
    ids=["allreduce-fp16", "local_sgd", "parameter_server", "fsdp"],
)
def test_every_sync_strategy_trains_and_resumes(
    spark_connect, frame, tmp_path, estimator, strategy, options
):
    """One epoch, then one more resumed from its checkpoint (each strategy's own format)."""
    run_dir = tmp_path / "run"
    first = estimator(run_dir, strategy=strategy, strategy_options=options, epochs=1).fit(frame)
    assert RunDirectory(first.run_dir).summary()["status"] == "succeeded"
    resumed = estimator(
        run_dir, strategy=strategy, strategy_options=options, epochs=2, resume=True
    ).fit(frame)
    summary = RunDirectory(resumed.run_dir).summary()
    assert summary["status"] == "succeeded" and summary["resumed_from_step"] == 12
    assert summary["config"]["sync"]["strategy"] == strategy
