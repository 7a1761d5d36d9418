"""[driver] Jobs' configuration: a TOML file plus ``--set section.key=value`` overrides → checked dict.

Every key is known: a misspelt key is a ConfigError naming it and the keys allowed there.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from typing import Any

from sparkdl.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["DEFAULTS", "RUN_MODES", "load_config", "parse_args", "spark_session_for_job"]

RUN_MODES = ("error", "overwrite", "resume")
"""run.mode: refuse an existing run_dir, replace it, or continue the run in it."""

DEFAULTS: dict[str, dict[str, Any]] = {
    "spark": {"master": "local[2]", "app_name": "sparkdl"},
    "data": {
        "train": "",
        "test": "",
        "format": "parquet",
        "dataset": "",
        "feature_cols": ["features"],
        "label_col": "label",
        "validation_fraction": 0.0,
    },
    "model": {"factory": "", "kwargs": {}},
    "training": {
        "loss": "cross_entropy",
        "optimizer": "adam",
        "learning_rate": 1e-3,
        "batch_size": 64,
        "epochs": 1,
        "num_workers": 2,
        "use_gpu": False,
        "seed": 0,
        "strategy": "allreduce",
        "strategy_options": {},
        "log_every_steps": 50,
        "collective_timeout_s": 120.0,
        "reader": "pyarrow",
        "max_restarts": 3,
        "checkpoint_every_steps": 0,
        "checkpoint_every_epochs": 1,
        "keep_last": 2,
        "on_invalid": "error",
        "progress": True,
    },
    "run": {"run_dir": "runs/run", "mode": "error"},
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
        if isinstance(base[key], dict) and key != "kwargs" and key != "strategy_options":
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
    if config["run"]["mode"] not in RUN_MODES:
        raise ConfigError(
            f"run.mode must be one of {RUN_MODES}, got {config['run']['mode']!r}. Pick one"
        )
    return config


def parse_args(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    """The jobs' shared command line: ``--config FILE`` and repeated ``--set key=value``."""
    parser = argparse.ArgumentParser(description=description)
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
