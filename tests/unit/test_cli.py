"""The jobs' [training] section is the estimator's Params table: same keys, same defaults."""

from __future__ import annotations

import pytest

import sparkdl
from sparkdl.cli import DEFAULTS, NOT_IN_TRAINING, estimator_kwargs, load_config
from sparkdl.ml.estimator import ESTIMATOR_PARAMS
from sparkdl.ml.model import OUTPUT_PARAMS

pytestmark = pytest.mark.timeout(60)

JOB = [
    "model.factory=sparkdl.models:mlp",
    "model.kwargs={in_features = 4, out_features = 3}",
    "data.feature_cols=['a', 'b']",
    "run.run_dir=/tmp/unused",
]


def test_every_settable_param_has_its_default_in_training():
    params = {spec.name: spec.default for spec in ESTIMATOR_PARAMS}
    settable = {name: default for name, default in params.items() if name not in NOT_IN_TRAINING}
    assert "shuffle" in settable
    assert DEFAULTS["training"] == {**settable, "min_workers": 0, "max_workers": 0}
    assert set(NOT_IN_TRAINING) <= set(params), "NOT_IN_TRAINING names a Param that is gone"


def test_estimator_kwargs_set_every_param_from_the_config():
    kwargs = estimator_kwargs(load_config(None, JOB))
    names = {spec.name for spec in ESTIMATOR_PARAMS}
    assert set(kwargs) <= names
    # a train job leaves out only tests' fault injection and the model's output columns
    assert names - set(kwargs) == {"fault_injection"} | {spec.name for spec in OUTPUT_PARAMS}


@pytest.mark.parametrize(("value", "expected"), [("false", False), ("true", True)])
def test_training_shuffle_reaches_the_estimator(value, expected):
    config = load_config(None, [*JOB, f"training.shuffle={value}", "run.mode=resume"])
    estimator = sparkdl.TorchEstimator(**estimator_kwargs(config))
    assert estimator.getShuffle() is expected
    assert estimator.getResume() is True and estimator.getOverwrite() is False
    assert estimator.getFeatureCols() == ["a", "b"]


def test_a_job_s_bad_input_prints_one_message_naming_the_job_switch(capsys):
    from sparkdl.cli import run_job
    from sparkdl.errors import ConfigError

    def main(argv):
        raise ConfigError("run_dir must be new, got 'x'. Pass resume=True or overwrite=True")

    assert run_job(main) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: run_dir must be new, got 'x'. Pass --set run.mode=resume or "
        "--set run.mode=overwrite\n"
    )
    assert run_job(lambda argv: 0) == 0


def test_min_and_max_workers_make_a_range():
    from sparkdl.errors import ConfigError

    config = load_config(None, [*JOB, "training.min_workers=1", "training.max_workers=3"])
    assert estimator_kwargs(config)["num_workers"] == [1, 3]
    with pytest.raises(ConfigError, match="set together"):
        estimator_kwargs(load_config(None, [*JOB, "training.min_workers=1"]))
