"""Runs whose run directory is on S3 (a moto server on loopback): training end to end, exact
resume after a killed rank, retention, TorchModel save/load in a fresh process, every sync
strategy's checkpoints, and a bad URI refused on the driver before anything runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pyarrow as pa
import pytest
import torch
from pyspark.sql import functions as F

import sparkdl
from sparkdl import storage
from sparkdl.artifacts import RunDirectory
from sparkdl.errors import ConfigError
from sparkdl.rundir import RunLayout
from sparkdl.rundir import checkpoints as ckpt
from sparkdl.rundir.model_dir import load_module
from sparkdl.testing import free_port

pytestmark = pytest.mark.timeout(600)

pytest.importorskip("moto", reason="the s3 tier needs moto[server] (the dev extra)")
if int(pa.__version__.split(".")[0]) < 15:
    pytest.skip(
        "the s3 tier needs pyarrow >= 15 (AWS_ENDPOINT_URL support); the compat env has 14",
        allow_module_level=True,
    )

DIGITS = os.path.join(os.path.dirname(__file__), "..", "..", "data", "digits")


@pytest.fixture(scope="module")
def frame(spark_s3, fault_setup):
    return fault_setup.frame(spark_s3)


@pytest.fixture(scope="module")
def estimator(fault_setup):
    """``estimator(run_dir, dataset_dir, **overrides)``: the fault tests' small estimator
    (tests/conftest.py), its dataset on local disk.

    192 rows / 2 workers / batch 8 = 12 steps per epoch; checkpoints every 5 steps and epoch.
    """

    def build(run_dir, dataset_dir, **overrides):
        return fault_setup.estimator(run_dir, dataset_dir=str(dataset_dir), **overrides)

    return build


@pytest.fixture(scope="module")
def digits_on_s3(spark_s3, s3_module_root, tmp_path_factory, digits_estimator):
    train = spark_s3.read.parquet(os.path.join(DIGITS, "train.parquet"))
    test = spark_s3.read.parquet(os.path.join(DIGITS, "test.parquet"))
    model = digits_estimator(
        f"{s3_module_root}/digits",
        dataset_dir=str(tmp_path_factory.mktemp("digits") / "data"),
        log_every_steps=10,
        keep_last=2,
    ).fit(train)
    return model, test


def test_digits_trains_with_the_run_directory_on_s3(digits_on_s3, spark_s3, tmp_path):
    model, test = digits_on_s3
    assert model.run_dir.startswith("s3://")
    scored = model.transform(test)
    accuracy = scored.select(F.avg((F.col("prediction") == F.col("label")).cast("double")))
    assert accuracy.first()[0] >= 0.95
    layout = RunLayout(model.run_dir)
    run = RunDirectory(model.run_dir).summary()
    assert run["status"] == "succeeded" and run["world_size"] == 2
    # the model directory on S3 rebuilds the module (import path: no pickle)
    module = load_module(layout.model_dir)
    expected = model.module.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in module.state_dict().items())
    # metrics come back through pyarrow (this Spark has no S3A), as a Spark DataFrame
    metrics = model.metrics
    losses = metrics.filter("split = 'train' and name = 'loss'").orderBy("epoch").collect()
    assert len(losses) == 15 and losses[-1].value < losses[0].value
    # retention on S3: 15 epoch checkpoints taken, the newest two kept, older ones gone whole
    steps = [info.step for info in ckpt.list_complete(model.run_dir)]
    assert len(steps) == 2 and steps[-1] == run["steps"]
    names = storage.list_dir(layout.checkpoints_dir)
    assert sorted(n for n in names if n.startswith("step-")) == [f"step-{s:012d}" for s in steps]
    assert "logs" in storage.list_dir(layout.root)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert "loss.png" in storage.list_dir(layout.plots_dir)


def test_nothing_lands_in_a_local_folder_named_after_the_uri(digits_on_s3):
    for where in (os.getcwd(), os.path.dirname(sparkdl.__file__)):
        assert not os.path.exists(os.path.join(where, "s3:")), where


def test_torch_model_saved_to_s3_loads_in_a_fresh_process(digits_on_s3, s3_root, s3_server):
    model, _ = digits_on_s3
    path = f"{s3_root}/saved"
    model.write().save(path)
    with pytest.raises(ConfigError, match="must not exist"):
        model.write().save(path)
    model.write().overwrite().save(path)
    x = torch.linspace(-1, 1, 64 * 3).reshape(3, 64)
    with torch.no_grad():
        expected = model.module(x)
    code = (
        "import sys, torch, sparkdl\n"
        "m = sparkdl.TorchModel.load(sys.argv[1])\n"
        "x = torch.linspace(-1, 1, 64 * 3).reshape(3, 64)\n"
        "with torch.no_grad():\n"
        "    out = m.module(x)\n"
        "print(','.join(repr(v) for v in out.flatten().tolist()))\n"
        "print(m.run_dir, m.get('feature_cols'))\n"
    )
    env = {**os.environ, **s3_server[1]}
    done = subprocess.run(
        [sys.executable, "-c", code, path],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    values, described = done.stdout.strip().splitlines()[-2:]
    got = torch.tensor([float(v) for v in values.split(",")]).reshape(3, 10)
    assert torch.equal(got, expected)
    assert described == f"{model.run_dir} ['features']"


def test_killed_rank_resumes_exactly_from_s3_checkpoints(frame, s3_root, tmp_path, estimator):
    reference = estimator(f"{s3_root}/ref", tmp_path / "ref-data").fit(frame)
    fault = {"rank": 1, "step": 8, "attempt": 0, "mode": "exit"}  # mid-epoch 0, after ckpt 5
    run_dir = f"{s3_root}/faulty"
    model = estimator(run_dir, tmp_path / "data", fault_injection=fault).fit(frame)
    run = RunDirectory(run_dir).summary()
    assert run["status"] == "succeeded" and run["resumed_from_step"] == 5
    assert [a["attempt"] for a in run["attempts"]] == [0, 1]
    expected, got = reference.module.state_dict(), model.module.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    rows = model.metrics.toPandas()
    assert not rows.duplicated(["epoch", "step", "split", "name"]).any()
    assert sorted(rows[rows.name == "step_loss"].step) == list(range(2, 25, 2))


@pytest.mark.parametrize(
    "strategy, options",
    [("fsdp", {"min_unit_params": 0}), ("parameter_server", {}), ("local_sgd", {"sync_every": 2})],
)
def test_sync_strategies_checkpoint_and_resume_on_s3(
    frame, s3_root, tmp_path, strategy, options, estimator, fault_setup
):
    fault = {"rank": 0, "step": 8, "attempt": 0, "mode": "exit"}
    run_dir = f"{s3_root}/{strategy}"
    model = estimator(
        run_dir,
        tmp_path / "data",
        strategy=strategy,
        strategy_options=options,
        fault_injection=fault,
        validation_fraction=0.25,
        early_stopping_patience=5,
    ).fit(frame)
    run = RunDirectory(run_dir).summary()
    assert run["status"] == "succeeded" and run["resumed_from_step"] == 5
    assert ckpt.latest_step(run_dir) == run["steps"]
    reloaded = load_module(RunLayout(run_dir).model_dir, model=fault_setup.model)
    expected = model.module.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in reloaded.state_dict().items())


def test_a_missing_bucket_is_refused_on_the_driver_before_anything_runs(frame, tmp_path, estimator):
    start = time.monotonic()
    with pytest.raises(ConfigError, match="s3://no-such-bucket-sparkdl/run") as info:
        estimator("s3://no-such-bucket-sparkdl/run", tmp_path / "data").fit(frame)
    assert "run_dir" in str(info.value)
    assert time.monotonic() - start < 60
    assert not os.path.exists(tmp_path / "data")  # refused before materialize's Spark jobs


def test_an_unreachable_endpoint_is_refused_on_the_driver(frame, tmp_path, monkeypatch, estimator):
    port = free_port()  # only probed: nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(ConfigError, match="run_dir"):
        estimator("s3://sparkdl-tests/unreachable", tmp_path / "data").fit(frame)
    assert time.monotonic() - start < 120
    assert not os.path.exists(tmp_path / "data")


def test_jobs_train_and_predict_with_the_run_directory_on_s3(spark_s3, s3_root, tmp_path, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "jobs"))
    import predict
    import prepare
    import train

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    digits = os.path.join(root, "data", "digits")
    common = ["--config", os.path.join(root, "jobs", "configs", "digits_pipeline.toml")]
    for key, value in {
        "data.train": os.path.join(digits, "train.parquet"),
        "data.test": os.path.join(digits, "test.parquet"),
        "data.dataset": tmp_path / "ds",
        "run.run_dir": f"{s3_root}/run",
        "run.model_path": f"{s3_root}/model",
        "predict.output": tmp_path / "pred",
        "training.epochs": 3,
    }.items():
        common += ["--set", f"{key}={value}"]
    assert prepare.main(common) == 0
    assert train.main(common) == 0
    out = capsys.readouterr().out
    assert f"model: {s3_root}/model" in out and f"run directory: {s3_root}/run" in out
    assert float(out.split("test accuracy:")[1].split()[0]) > 0.8
    assert "metadata" in storage.list_dir(f"{s3_root}/model")
    assert predict.main(common) == 0  # loads the model from S3
    assert "predictions: 359 rows" in capsys.readouterr().out


def test_pipeline_with_its_run_on_s3_and_resume_after_a_failed_fit(
    frame, s3_root, tmp_path, estimator
):
    from pyspark.ml import Pipeline, PipelineModel

    from sparkdl.errors import WorkerGroupError
    from sparkdl.ml import trust_pickle

    run_dir = f"{s3_root}/pipe"
    fault = {"rank": 1, "step": 17, "attempt": 0, "mode": "raise"}  # epoch 1; ckpt at 15
    failing = estimator(run_dir, tmp_path / "data", fault_injection=fault, max_restarts=0)
    with pytest.raises(WorkerGroupError):
        Pipeline(stages=[failing]).fit(frame)
    assert RunDirectory(run_dir).summary()["status"] == "failed"
    assert ckpt.latest_step(run_dir) == 15
    # resume=True picks the S3 run up where it stopped (same local dataset, reused)
    resumed = estimator(run_dir, tmp_path / "data", resume=True)
    fitted = Pipeline(stages=[resumed]).fit(frame)
    run = RunDirectory(run_dir).summary()
    assert run["status"] == "succeeded" and run["resumed_from_step"] == 15
    # the PipelineModel itself saves where Spark writes (local here); its stage points at S3
    fitted.write().save(str(tmp_path / "pipeline"))
    with trust_pickle():  # the model is a function from this module, stored pickled
        loaded = PipelineModel.load(str(tmp_path / "pipeline"))
    stage = loaded.stages[0]
    assert stage.run_dir == run_dir and stage.summary["status"] == "succeeded"
    before = fitted.transform(frame).select("prediction").collect()
    assert loaded.transform(frame).select("prediction").collect() == before
