"""[driver] Jobs' configuration: a TOML file plus ``--set section.key=value`` overrides → checked dict.

Every key is known: a misspelt key is a ConfigError naming it and the keys allowed there. The
sections: ``spark`` (local session), ``data`` (input and columns; shared by the three jobs),
``prepare`` (jobs/prepare.py), ``model`` and ``training`` (TorchEstimator; ``training`` is
derived from the estimator's Params table, ESTIMATOR_PARAMS), ``run`` (run directory, saved
model), ``predict`` (jobs/predict.py). :func:`estimator_kwargs` turns a config into the
estimator's keyword arguments.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from typing import Any

from sparkdl.errors import ConfigError
from sparkdl.ml.estimator import ESTIMATOR_PARAMS
from sparkdl.ml.model import OUTPUT_PARAMS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "DEFAULTS",
    "NOT_IN_TRAINING",
    "RUN_MODES",
    "estimator_kwargs",
    "load_config",
    "parse_args",
    "read_input",
    "run_job",
    "saved_model_path",
    "spark_session_for_job",
    "training_defaults",
]

RUN_MODES = ("error", "overwrite", "resume")
"""run.mode: refuse an existing run_dir, replace it, or continue the run in it."""

NOT_IN_TRAINING: dict[str, str] = {
    "model": "[model] factory",
    "model_kwargs": "[model] kwargs",
    "feature_cols": "[data]",
    "label_col": "[data]",
    "validation_fraction": "[data]",
    "validation_col": "[data]",
    "run_dir": "[run]",
    "overwrite": "[run] mode",
    "resume": "[run] mode",
    "fault_injection": "tests only (no TOML value)",
    **{spec.name: "[predict] (the model's output, set at prediction)" for spec in OUTPUT_PARAMS},
}
"""Estimator Params that ``[training]`` leaves out, and where a job sets them instead."""


def training_defaults() -> dict[str, Any]:
    """``[training]``: every other estimator Param with its default, from ESTIMATOR_PARAMS, so a
    new Param is settable from a job (a hand copy here once lost ``shuffle``)."""
    defaults = {
        spec.name: copy.deepcopy(spec.default)
        for spec in ESTIMATOR_PARAMS
        if spec.name not in NOT_IN_TRAINING
    }
    # An elastic range as two keys (0: unset): num_workers = [min_workers, max_workers].
    return {**defaults, "min_workers": 0, "max_workers": 0}


DEFAULTS: dict[str, dict[str, Any]] = {
    "spark": {"master": "local[2]", "app_name": "sparkdl"},
    "data": {
        "train": "",
        "test": "",
        "format": "parquet",
        "dataset": "",
        "options": {},
        "feature_cols": ["features"],
        "label_col": "label",
        "cast": {},
        "validation_fraction": 0.0,
        "validation_col": "",
    },
    "prepare": {"num_shards": 0, "mode": "error"},
    "model": {"factory": "", "kwargs": {}},
    "training": training_defaults(),
    "run": {"run_dir": "runs/run", "mode": "error", "model_path": ""},
    "predict": {
        "model": "",
        "input": "",
        "format": "",
        "output": "",
        "mode": "error",
        "keep_cols": [],
        "probability_col": "",
        "batch_size": 1024,
    },
}
# Tables whose keys are the user's own (factory kwargs, reader options, column casts).
FREE_FORM = frozenset({"kwargs", "strategy_options", "options", "cast"})
MODES: dict[str, tuple[str, ...]] = {
    "run.mode": RUN_MODES,
    "prepare.mode": ("error", "overwrite", "reuse"),
    "predict.mode": ("error", "overwrite"),
}


def _parse_value(text: str) -> Any:
    """A TOML value (3, 0.1, true, [1, 2], "x"); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _merge(base: dict[str, Any], extra: dict[str, Any], where: str) -> None:
    for key, value in extra.items():
        if key not in base:
            raise ConfigError(
                f"config key {where}{key} must be one of {sorted(base)}, got {key!r}. Fix the spelling"
            )
        if isinstance(base[key], dict) and key not in FREE_FORM:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"config key {where}{key} must be a table, got {value!r}. Use [{key}]"
                )
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value


def load_config(path: str | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """DEFAULTS ← the TOML file ← each ``section.key=value`` override, in that order."""
    config = copy.deepcopy(DEFAULTS)
    if path:
        try:
            with open(path, "rb") as fh:
                _merge(config, tomllib.load(fh), "")
        except FileNotFoundError as exc:
            raise ConfigError(
                f"--config must name an existing file, got {path!r}. Check the path"
            ) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                f"--config must be valid TOML, got {path!r}: {exc}. Fix the file"
            ) from exc
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(
                f"--set must look like section.key=value, got {item!r}. e.g. --set training.epochs=3"
            )
        nested: dict[str, Any] = {}
        cursor = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            cursor = cursor.setdefault(part, {})
        cursor[leaf] = _parse_value(text.strip())
        _merge(config, nested, "")
    for key, allowed in MODES.items():
        section, name = key.split(".")
        if config[section][name] not in allowed:
            raise ConfigError(
                f"{key} must be one of {allowed}, got {config[section][name]!r}. Pick one"
            )
    return config


def estimator_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """TorchEstimator's keyword arguments from a loaded config: ``[training]`` as is, the rest
    from ``[model]``, ``[data]`` and ``[run]`` (see NOT_IN_TRAINING)."""
    data, run = config["data"], config["run"]
    training = dict(config["training"])
    low, high = training.pop("min_workers", 0), training.pop("max_workers", 0)
    if low or high:
        if not (low and high):
            raise ConfigError(
                f"training.min_workers and training.max_workers must be set together, got "
                f"{low} and {high}. Set both (or neither, and num_workers)"
            )
        training["num_workers"] = [low, high]
    return {
        "model": config["model"]["factory"],
        "model_kwargs": config["model"]["kwargs"],
        "feature_cols": data["feature_cols"],
        "label_col": data["label_col"],
        "validation_fraction": data["validation_fraction"],
        "validation_col": data["validation_col"],
        "run_dir": run["run_dir"],
        "overwrite": run["mode"] == "overwrite",
        "resume": run["mode"] == "resume",
        **training,
    }


def read_input(spark: Any, path: str, fmt: str, options: dict[str, Any] | None = None) -> Any:
    """A DataFrame from ``path``: any ``spark.read`` format with ``options``, or a table."""
    if not path:
        raise ConfigError("the input path must be set, got ''. Set data.train or predict.input")
    if fmt == "table":
        return spark.table(path)
    reader = spark.read.format(fmt)
    for key, value in (options or {}).items():
        reader = reader.option(key, str(value).lower() if isinstance(value, bool) else value)
    return reader.load(path)


def saved_model_path(config: dict[str, Any]) -> str:
    """Where jobs/train.py saves the TorchModel (run.model_path, else <run_dir>/spark_model)."""
    from sparkdl.rundir import RunLayout

    return config["run"]["model_path"] or RunLayout(config["run"]["run_dir"]).spark_model_dir


def config_keys_help() -> str:
    """Every config key with its default, one line each, by section (for ``--help``)."""
    lines = ["config keys (TOML sections, or --set section.key=value), with their defaults:"]
    for section, keys in DEFAULTS.items():
        lines.append(f"  [{section}]")
        for key, value in keys.items():
            shown = json.dumps(value) if isinstance(value, (bool, str, list)) else repr(value)
            lines.append(f"    {key} = {shown}")
    lines.append("see README.md, 'Job configuration keys', for what each one means")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    """The jobs' shared command line: ``--config FILE`` and repeated ``--set key=value``."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog=config_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. training.epochs=3 (repeatable)",
    )
    return parser.parse_args(argv)


def spark_session_for_job(config: dict[str, Any]) -> Any:
    """The spark-submit session when launched by spark-submit, else a local one from [spark]."""
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:  # a notebook's or a caller's session
        return active
    if SparkConf().contains("spark.master"):  # spark-submit chose the cluster
        return SparkSession.builder.appName(config["spark"]["app_name"]).getOrCreate()
    from sparkdl.testing import local_spark_session

    return local_spark_session(config["spark"]["master"], app_name=config["spark"]["app_name"])


_JOB_SWITCHES = (
    ("overwrite=True", "--set run.mode=overwrite"),
    ("resume=True", "--set run.mode=resume"),
)


def run_job(main: Any, argv: Sequence[str] | None = None) -> int:
    """Run a job's ``main``; a ConfigError or DataError (bad input: the user's to fix) prints as
    one message naming the job's own switches instead of a traceback, with exit status 2."""
    from sparkdl.errors import DataError

    try:
        return int(main(argv))
    except (ConfigError, DataError) as exc:
        message = str(exc)
        for keyword, switch in _JOB_SWITCHES:
            message = message.replace(keyword, switch)
        sys.stderr.write(f"error: {message}\n")
        return 2
