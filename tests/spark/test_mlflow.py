"""MLflow tracking through TorchEstimator.fit on Spark local[2], against real tracking stores: a
``sqlite:///`` store in a temp dir, and ``mlflow server`` started on 127.0.0.1 (stopped by PID).

One run per fit (nested under an active run; autolog's run reused, never a second), its Params,
tags, metrics (one value per step, also after a restart) and artifacts; the logged model's pyfunc
predicts as transform; a dead server is a warning, a bad key a ConfigError before launch.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

mlflow = pytest.importorskip(
    "mlflow", reason="the mlflow extra (or mlflow-skinny) is not installed"
)

from sparkdl.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh sqlite tracking store in ``tmp_path`` (artifacts under it too), as MLflow's global
    tracking URI for the test; autolog and any run left active are cleaned up afterwards."""
    monkeypatch.chdir(tmp_path)  # a sqlite store's default artifact root is ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def frame(spark_local, fault_setup):
    return fault_setup.frame(spark_local)


def _runs(uri, experiment="Default"):
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_fit_logs_one_run_with_params_metrics_tags_artifacts_and_a_model(
    digits, digits_estimator, store, tmp_path
):
    train, test = digits
    est = digits_estimator(
        tmp_path / "digits-run",
        epochs=2,
        log_every_steps=5,
        validation_fraction=0.2,
        probability_col="probability",
        mlflow={"experiment": "digits", "run_name": "two-epochs"},
    )
    model = est.fit(train)
    (run,) = _runs(store, "digits")
    client = mlflow.MlflowClient(store)
    assert run.info.run_name == "two-epochs" and run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["learning_rate"] == "0.003" and params["model"] == "sparkdl.models:mlp"
    assert params["feature_cols"] == '["features"]' and params["epochs"] == "2"
    assert tags["sparkdl.strategy"] == "allreduce" and tags["sparkdl.world_size"] == "2"
    assert tags["sparkdl.run_dir"] == model.run_dir and tags["sparkdl.status"] == "succeeded"
    assert tags["sparkdl.attempts"] == "1" and tags["sparkdl.restarts"] == "0"
    assert tags["sparkdl.version"] and "mlflow.parentRunId" not in tags
    rows = model.metrics.toPandas()
    for (split, name), expected in rows.groupby(["split", "name"]):
        got = _history(client, run.info.run_id, f"{split}/{name}")
        assert got == sorted(zip(expected.step, expected.value)), (split, name)
    assert len(_history(client, run.info.run_id, "validation/accuracy")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"run.json", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/loss.png" in plots

    # The logged model: pyfunc predict(pandas) == transform on the same rows.
    rows = test.limit(40).toPandas()
    tracked = model.summary["mlflow"]  # run.json names the MLflow run and model
    assert tracked == {
        "tracking_uri": store,
        "run_id": run.info.run_id,
        "model_uri": tags["sparkdl.model_uri"],
    }
    loaded = mlflow.pyfunc.load_model(tracked["model_uri"])
    assert [c.name for c in loaded.metadata.get_input_schema().inputs] == ["features"]
    got = loaded.predict(rows[["features"]])
    expected = model.transform(test.limit(40)).toPandas()
    assert np.array_equal(got["prediction"].to_numpy(), expected["prediction"].to_numpy())
    assert np.allclose(np.stack(got["probability"]), np.stack(expected["probability"]), atol=1e-6)
    assert (expected["prediction"] == expected["label"]).mean() > 0.5  # it learnt something
    # the pytorch flavor is there too (pickled: MLflow wants the switch to load it)
    assert "pytorch" in loaded.metadata.flavors


def test_active_run_becomes_the_parent_of_a_nested_run(frame, fault_setup, store, tmp_path):
    with mlflow.start_run(run_name="notebook") as parent:
        fault_setup.estimator(tmp_path / "run", epochs=1, mlflow={"log_model": False}).fit(frame)
        assert mlflow.active_run().info.run_id == parent.info.run_id  # left as it was
    runs = {r.info.run_name: r for r in _runs(store)}
    assert set(runs) == {"notebook", "run"}
    child = runs["run"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.status == "FINISHED" and "sparkdl.model_uri" not in child.data.tags
    assert "train/loss" in child.data.metrics and not runs["notebook"].data.metrics


def test_autolog_run_is_reused_not_a_second_one(frame, fault_setup, store, tmp_path, caplog):
    import mlflow.pyspark.ml

    mlflow.pyspark.ml.autolog(log_models=False, log_datasets=False, silent=True)
    try:
        model = fault_setup.estimator(tmp_path / "run", epochs=1, mlflow=True).fit(frame)
    finally:
        mlflow.pyspark.ml.autolog(disable=True)
    (run,) = _runs(store)
    tags = run.data.tags
    assert tags["mlflow.autologging"] == "pyspark.ml"  # autolog's run ...
    assert tags["sparkdl.status"] == "succeeded" and "train/loss" in run.data.metrics  # ... ours
    assert run.info.status == "FINISHED" and "sparkdl.model_uri" in tags
    assert run.data.params["epochs"] == "1"
    assert model.run_dir == tags["sparkdl.run_dir"]


def test_restart_keeps_one_run_and_one_value_per_step(frame, fault_setup, store, tmp_path):
    fault = {"rank": 1, "step": 8, "attempt": 0, "mode": "exit"}  # after the checkpoint at 5
    model = fault_setup.estimator(
        tmp_path / "run", fault_injection=fault, mlflow={"log_model": False}
    ).fit(frame)
    (run,) = _runs(store)
    tags = run.data.tags
    assert tags["sparkdl.attempts"] == "2" and tags["sparkdl.restarts"] == "1"
    client = mlflow.MlflowClient(store)
    steps = [s for s, _ in _history(client, run.info.run_id, "train/step_loss")]
    assert steps == list(range(2, 25, 2))  # no duplicate from the failed attempt
    rows = model.metrics.toPandas()
    expected = rows[rows.name == "step_loss"].sort_values("step")
    got = _history(client, run.info.run_id, "train/step_loss")
    assert [v for _, v in got] == list(expected.value)


def test_failed_fit_ends_its_run_failed_with_what_it_recorded(frame, fault_setup, store, tmp_path):
    from sparkdl.errors import WorkerGroupError

    fault = {"rank": 1, "step": 7, "attempt": 0, "mode": "raise"}  # after the checkpoint at 5
    est = fault_setup.estimator(
        tmp_path / "run", fault_injection=fault, max_restarts=0, mlflow=True
    )
    with pytest.raises(WorkerGroupError):
        est.fit(frame)
    (run,) = _runs(store)
    tags = run.data.tags
    assert run.info.status == "FAILED" and tags["sparkdl.status"] == "failed"
    assert tags["sparkdl.error"] == "WorkerGroupError" and tags["sparkdl.attempts"] == "1"
    assert "sparkdl.model_uri" not in tags and "train/step_loss" in run.data.metrics
    client = mlflow.MlflowClient(store)
    assert "run.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_unreachable_server_is_a_warning_and_the_fit_succeeds(
    frame, fault_setup, store, tmp_path, caplog
):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    est = fault_setup.estimator(tmp_path / "run", epochs=1, mlflow={"tracking_uri": uri})
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="sparkdl"):
        model = est.fit(frame)
    assert model.summary["status"] == "succeeded"
    assert time.monotonic() - start < 120  # no minutes of MLflow's client retries
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("MLflow tracking could not start the run" in w and uri in w for w in warnings)
    assert mlflow.get_tracking_uri() == store  # the global URI is left alone


def test_unknown_key_is_a_config_error_before_launch(frame, fault_setup, store, tmp_path):
    with pytest.raises(ConfigError, match=r"mlflow keys must be among .*'experiments'"):
        fault_setup.estimator(tmp_path / "run", mlflow={"experiments": "x"})
    est = fault_setup.estimator(tmp_path / "run")
    with pytest.raises(ConfigError, match="mlflow must be True, False or a dict"):
        est.setMlflow("yes")
    assert not (tmp_path / "run").exists() and not _runs(store)


# --- a real `mlflow server` ----------------------------------------------------------------------


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1 (sqlite backend, artifacts in tmp_path); its URL. Stopped
    by its PID (the process group it leads) at the end."""
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "artifacts"),
    ]
    log_file = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mlflow server did not start: {(tmp_path / 'server.log').read_text()}"
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=20)
        log_file.close()


def test_fit_logs_to_a_tracking_server(
    frame, fault_setup, mlflow_server, store, tmp_path, monkeypatch
):
    est = fault_setup.estimator(
        tmp_path / "run",
        epochs=1,
        mlflow={"tracking_uri": mlflow_server, "experiment": "served"},
    )
    model = est.fit(frame)
    assert mlflow.get_tracking_uri() == store  # the model went to the server, the URI stayed
    (run,) = _runs(mlflow_server, "served")
    assert run.info.status == "FINISHED" and "train/loss" in run.data.metrics
    uri = run.data.tags["sparkdl.model_uri"]
    mlflow.set_tracking_uri(mlflow_server)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # a pickled architecture
    rows = frame.limit(20).toPandas()
    got = mlflow.pyfunc.load_model(uri).predict(rows[["features"]])
    expected = model.transform(frame.limit(20)).toPandas()
    assert np.array_equal(got["prediction"].to_numpy(), expected["prediction"].to_numpy())
