"""Errors survive pickling and Spark's wrapping; the jobs' config loader rejects unknown keys."""

from __future__ import annotations

import pickle

import pytest

from sparkdl.cli import load_config
from sparkdl.errors import ConfigError, RankFailure, WorkerGroupError

pytestmark = pytest.mark.timeout(30)


def _failure(rank: int) -> RankFailure:
    try:
        raise KeyError(f"boom on {rank}")
    except KeyError as exc:
        return RankFailure.from_exception(rank, exc)


def test_rank_failures_round_trip_through_wrapped_text():
    text = (
        "py4j.protocol.Py4JJavaError: An error occurred\n  org.apache.spark.SparkException: Job aborted"
        f" ... RuntimeError: {_failure(1).encode()}\n at ... {_failure(0).encode()} {_failure(1).encode()}"
    )
    failures = RankFailure.decode_all(text)
    assert [f.rank for f in failures] == [0, 1]
    assert failures[1].exc_type == "KeyError" and "boom on 1" in failures[1].message
    assert "raise KeyError" in failures[1].traceback


def test_worker_group_error_pickles_and_names_ranks():
    error = WorkerGroupError([_failure(1)])
    clone = pickle.loads(pickle.dumps(error))
    assert clone.ranks == [1]
    assert "rank 1" in str(clone) and "raise KeyError" in str(clone)


def test_the_headline_of_a_group_failure_keeps_its_reason():
    error = WorkerGroupError([_failure(1), _failure(0)])
    assert error.headline == "2 rank(s) failed; rank 1: KeyError: 'boom on 1'"
    assert WorkerGroupError([], detail="rank 0 died: lost\nmore").headline == "rank 0 died: lost"


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(
        '[training]\nepochs = 4\n[model]\nfactory = "sparkdl.models:mlp"\n[model.kwargs]\nin_features = 3\n'
    )
    config = load_config(
        str(path), ["training.batch_size=16", "data.feature_cols=['a', 'b']", "run.run_dir=out"]
    )
    assert config["training"]["epochs"] == 4
    assert config["training"]["batch_size"] == 16
    assert config["data"]["feature_cols"] == ["a", "b"]
    assert config["model"]["kwargs"] == {"in_features": 3}
    assert config["run"]["run_dir"] == "out"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["training.epoch=3"], "epoch"),
        (["nosection.x=1"], "nosection"),
        (["training.epochs"], "section.key=value"),
        (["run.mode=append"], "run.mode"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="existing file"):
        load_config("/nonexistent/job.toml")


def test_pipeline_job_sections():
    config = load_config(
        None,
        [
            "data.cast={label = 'int'}",
            "data.options={header = true}",
            "prepare.mode=reuse",
            "predict.keep_cols=['id']",
            "training.early_stopping_patience=3",
        ],
    )
    assert config["data"]["cast"] == {"label": "int"}
    assert config["data"]["options"] == {"header": True}
    assert config["prepare"]["mode"] == "reuse" and config["predict"]["keep_cols"] == ["id"]
    with pytest.raises(ConfigError, match="prepare.mode"):
        load_config(None, ["prepare.mode=append"])
    with pytest.raises(ConfigError, match="predict.mode"):
        load_config(None, ["predict.mode=reuse"])


def test_failures_reported_by_ranks_join_the_group_error():
    from sparkdl.launch.launcher import with_reported_failures

    def failure(rank, exc):
        return RankFailure.from_exception(rank, exc)

    real = failure(1, ValueError("bad batch on 1"))
    lost = failure(0, RuntimeError("Connection closed by peer [127.0.0.1]:1234"))
    other = failure(0, KeyError("bad batch on 0"))
    spark_saw = WorkerGroupError([real])
    assert with_reported_failures(spark_saw, [real, lost]).ranks == [1]  # a consequence only
    both = with_reported_failures(spark_saw, [real, other])
    assert both.ranks == [0, 1] and str(both).startswith("2 rank(s) failed:")
    first_was_lost = with_reported_failures(WorkerGroupError([lost]), [real])
    assert first_was_lost.ranks == [1, 0]  # the rank that really failed comes first
