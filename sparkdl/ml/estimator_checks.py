"""[driver] The estimator's Param values checked together on the driver (construction, setters
and fit): the checks no single Param's converter can make. ConfigError naming the value."""

from __future__ import annotations

from typing import Any

from sparkdl._checks import expect_bool, expect_int, expect_name, expect_number
from sparkdl.config import FaultInjection
from sparkdl.data.bad_input import check_on_invalid
from sparkdl.data.input_specs import check_feature_cols, is_named
from sparkdl.errors import ConfigError
from sparkdl.launch.elastic import elastic_config
from sparkdl.ml.tracking import MlflowConfig

__all__ = ["check_estimator_values"]


def check_estimator_values(v: dict[str, Any]) -> None:
    feature_cols = check_feature_cols(v.get("feature_cols"))
    named_options = [k for k in ("feature_shapes", "max_lengths", "pad_values") if v.get(k)]
    if named_options and not is_named(feature_cols):
        raise ConfigError(
            f"feature_cols must be a dict of named inputs to use {named_options[0]}, got "
            f"{feature_cols!r}. Name the inputs, e.g. feature_cols={{'image': 'image'}}"
        )
    if v.get("transform_fn") is not None and not callable(v["transform_fn"]):
        raise ConfigError(
            f"transform_fn must be None or a function of the batch dict, got "
            f"{v['transform_fn']!r}. Pass e.g. transform_fn=lambda batch: batch"
        )
    expect_name("run_dir", v.get("run_dir"))
    labels = v.get("label_col")
    if isinstance(labels, list):
        if not labels or not all(isinstance(c, str) and c for c in labels):
            raise ConfigError(
                f"label_col must be a column name or a non-empty list of them, got {labels!r}. "
                "Pass e.g. 'label' or ['clicked', 'rating']"
            )
        if len(labels) > 1 and isinstance(v.get("loss"), str):
            raise ConfigError(
                f"loss must be a callable loss(outputs, labels) for several label columns "
                f"(labels is then a tuple of tensors), got loss={v['loss']!r} with label_col="
                f"{labels!r}. Pass loss=lambda out, ys: ..., or one label column"
            )
    else:
        expect_name("label_col", labels)
    if not isinstance(v.get("sample_weight_col"), str):
        raise ConfigError(
            f"sample_weight_col must be a column name or empty, got {v.get('sample_weight_col')!r}"
            ". Pass e.g. 'weight'"
        )
    elastic_config(v)
    fraction = expect_number(
        "validation_fraction", v["validation_fraction"], "Use e.g. 0.1", at_least=0, below=1
    )
    if not isinstance(v["validation_col"], str) or (fraction and v["validation_col"]):
        raise ConfigError(
            f"validation_col must be a column name used without validation_fraction, got "
            f"{v['validation_col']!r} with validation_fraction={fraction}. Use one of them"
        )
    expect_number("collective_timeout_s", v["collective_timeout_s"], "Use e.g. 120", above=0)
    for name in ("use_gpu", "overwrite", "resume", "progress", "driver_check", "allow_unencrypted"):
        expect_bool(name, v[name])
    expect_int("max_restarts", v["max_restarts"], "Use 0 to never restart", low=0)
    check_on_invalid(v["on_invalid"])
    FaultInjection.coerce(v["fault_injection"])
    MlflowConfig.coerce(v.get("mlflow"))
