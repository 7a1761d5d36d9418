"""[driver] Bad input while materializing: its parameters, NaN/inf rows (``on_invalid``),
unreadable sources, and a dataset ``mode="reuse"`` must not serve (stale data)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sparkdl.columns import quote_column
from sparkdl.data.dataset import ShardedDataset
from sparkdl.errors import ConfigError, DataError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = [
    "MODES",
    "ON_INVALID",
    "Params",
    "check_labels",
    "check_on_invalid",
    "check_params",
    "drop_nonfinite",
    "read_input",
    "reuse",
]

log = logging.getLogger("sparkdl")

MODES = ("error", "overwrite", "reuse")
"""mode: refuse an existing path, replace it, or reuse it when data and parameters match."""
ON_INVALID = ("error", "skip")
"""on_invalid: refuse rows with NaN/inf values, or drop them (logged with their count)."""


def check_on_invalid(on_invalid: Any) -> str:
    """``on_invalid`` validated: "error" or "skip"."""
    if on_invalid not in ON_INVALID:
        raise ConfigError(
            f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}. Use 'skip' to drop "
            "rows with NaN/inf values, 'error' to refuse them."
        )
    return str(on_invalid)


@dataclass(frozen=True)
class Params:
    """materialize's parameters, checked (see :func:`check_params`)."""

    feature_cols: tuple[str, ...]
    label_col: str
    num_shards: int
    seed: int
    mode: str
    validation_fraction: float
    replicas: int
    row_group_rows: int | None
    validation_col: str | None = None

    @property
    def has_validation(self) -> bool:
        return self.validation_fraction > 0 or self.validation_col is not None


def check_labels(label_col: Any, sample_weight_col: Any, feature_cols: Any) -> Any:
    """None for one label column without weights; else ``{"label_cols", "weight_col"}``
    checked (names, no repeats, none among the features). ConfigError."""
    if isinstance(label_col, str) and sample_weight_col is None:
        return None
    labels = [label_col] if isinstance(label_col, str) else label_col
    ok = isinstance(labels, (list, tuple)) and bool(labels)
    if not ok or not all(isinstance(c, str) and c for c in labels):
        raise ConfigError(
            f"label_col must be a column name or a non-empty list of them, got {label_col!r}. "
            "Pass e.g. 'label' or ['clicked', 'rating']."
        )
    if sample_weight_col is not None and (
        not isinstance(sample_weight_col, str) or not sample_weight_col
    ):
        raise ConfigError(
            f"sample_weight_col must be None or a column name, got {sample_weight_col!r}. "
            "Pass e.g. 'weight'."
        )
    columns = [*labels, *([sample_weight_col] if sample_weight_col else [])]
    features = feature_cols if isinstance(feature_cols, (list, tuple)) else []
    if isinstance(feature_cols, dict):
        features = [c for v in feature_cols.values() for c in ([v] if isinstance(v, str) else v)]
    clash = [c for c in columns if c in features] or [c for c in columns if columns.count(c) > 1]
    if clash:
        raise ConfigError(
            f"label and weight columns must differ from each other and from feature_cols, got "
            f"{clash[0]!r} twice. Use separate columns."
        )
    return {"label_cols": list(labels), "weight_col": sample_weight_col}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_params(
    feature_cols: Any,
    label_col: Any,
    num_shards: Any,
    seed: Any,
    mode: Any,
    validation_fraction: Any,
    replicas: Any,
    row_group_rows: Any,
    validation_col: Any = None,
) -> Params:
    if isinstance(feature_cols, str) or not isinstance(feature_cols, (list, tuple)):
        raise ConfigError(
            f"feature_cols must be a list of column names, got {feature_cols!r}. "
            'Pass e.g. feature_cols=["features"].'
        )
    if not feature_cols or not all(isinstance(c, str) and c for c in feature_cols):
        raise ConfigError(
            f"feature_cols must be a non-empty list of column names, got {feature_cols!r}. "
            "Name at least one feature column."
        )
    if len(set(feature_cols)) != len(feature_cols):
        raise ConfigError(
            f"feature_cols must not repeat a column, got {feature_cols!r}. Drop the duplicates."
        )
    if not isinstance(label_col, str) or not label_col:
        raise ConfigError(f"label_col must be a column name, got {label_col!r}. Pass e.g. 'label'.")
    if label_col in feature_cols:
        raise ConfigError(
            f"label_col must not be one of feature_cols, got {label_col!r} in both. "
            "Remove it from feature_cols."
        )
    if not _is_int(num_shards) or num_shards < 1:
        raise ConfigError(
            f"num_shards must be an integer >= 1, got {num_shards!r}. Use the number of workers."
        )
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}. Pass e.g. seed=0.")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}. Pick one of those.")
    if not isinstance(validation_fraction, (int, float)) or not 0 <= validation_fraction < 1:
        raise ConfigError(
            f"validation_fraction must be in [0, 1), got {validation_fraction!r}. "
            "Pass e.g. 0.1, or 0 for no validation split."
        )
    _check_validation_col(validation_col, validation_fraction, feature_cols, label_col)
    if not _is_int(replicas) or replicas < 1:
        raise ConfigError(f"replicas must be an integer >= 1, got {replicas!r}. Pass 1, 2 or 3.")
    if row_group_rows is not None and (not _is_int(row_group_rows) or row_group_rows < 1):
        raise ConfigError(
            f"row_group_rows must be None or an integer >= 1, got {row_group_rows!r}. "
            "Leave it None for the default."
        )
    return Params(
        tuple(feature_cols),
        label_col,
        num_shards,
        seed,
        mode,
        float(validation_fraction),
        replicas,
        row_group_rows,
        validation_col,
    )


def _check_validation_col(
    validation_col: Any, validation_fraction: Any, feature_cols: Any, label_col: Any
) -> None:
    if validation_col is None:
        return
    if not isinstance(validation_col, str) or not validation_col:
        raise ConfigError(
            f"validation_col must be None or a column name, got {validation_col!r}. "
            "Pass e.g. validation_col='is_validation'."
        )
    if validation_fraction:
        raise ConfigError(
            f"validation_fraction must be 0 when validation_col is set, got "
            f"{validation_fraction!r} with validation_col={validation_col!r}. Use one of them."
        )
    if validation_col in feature_cols or validation_col == label_col:
        raise ConfigError(
            f"validation_col must not be a feature or label column, got {validation_col!r}. "
            "Use a separate boolean column."
        )


def drop_nonfinite(converted: DataFrame, columns: list[str], kinds: list[str]) -> DataFrame:
    """Rows whose ``columns`` (of kind "scalar" or "array"/"vector", converted to float; "none"
    is not checked) are all finite; nulls are kept (and refused by materialize's scan).

    Logs how many rows were dropped (one extra count over the converted input).
    """
    from pyspark.sql import functions as F

    def finite(c: Any) -> Any:
        return F.coalesce(~F.isnan(c) & (F.abs(c) != float("inf")), F.lit(True))

    conditions = []
    for name, kind in zip(columns, kinds):
        col = F.col(quote_column(name))
        if kind != "none":  # "none": integers, bytes: always finite
            conditions.append(finite(col) if kind == "scalar" else F.forall(col, finite))
    valid = conditions[0]
    for condition in conditions[1:]:
        valid = valid & F.coalesce(condition, F.lit(True))
    flag = "_valid"
    while flag in converted.columns:
        flag = "_" + flag
    flagged = converted.withColumn(flag, F.coalesce(valid, F.lit(True)))
    dropped = read_input(lambda: flagged.filter(~F.col(flag)).count())
    if dropped:
        log.warning("sparkdl: on_invalid='skip' dropped %d row(s) with NaN/inf values", dropped)
    return flagged.filter(F.col(flag)).drop(flag)


def read_input(job: Any) -> Any:
    """Run a Spark job over the input; a failure to read it (a corrupt or vanished file) becomes
    a DataError naming the cause instead of a JVM stack trace."""
    try:
        return job()
    except Exception as exc:
        if type(exc).__module__.startswith("sparkdl"):
            raise
        text = str(exc)
        causes = [
            line.strip()
            for line in text.splitlines()
            if any(k in line for k in ("Parquet", "parquet", "corrupt", "FileNotFound", "EOF"))
        ]
        if not causes:
            raise
        raise DataError(
            "the input DataFrame must be readable, got a failure while scanning it: "
            f"{causes[0][:500]}. Remove or rewrite the corrupt file (or set "
            "spark.sql.files.ignoreCorruptFiles=true to skip such files)."
        ) from None


def reuse(uri: str, plan_hash: str, params: Params) -> ShardedDataset:
    """The dataset at ``uri`` when ``plan_hash`` (data + parameters) matches its manifest's;
    else ConfigError saying what changed."""
    try:
        dataset = ShardedDataset.load(uri)
    except DataError as e:
        raise ConfigError(
            f"path must hold a complete sparkdl dataset for mode='reuse', got {uri!r} ({e}). "
            "Pass mode='overwrite' to rebuild it."
        ) from e
    if dataset.manifest.plan_hash != plan_hash:
        raise ConfigError(
            f"dataset at {uri!r} must match this DataFrame and these parameters for "
            f"mode='reuse', got a different {_what_changed(dataset.manifest, params)}. "
            "Pass mode='overwrite' to rebuild it, or choose another path."
        )
    log.info("sparkdl: reusing dataset at %s (plan hash %s)", uri, plan_hash[:12])
    return dataset


def _what_changed(manifest: Any, params: Params) -> str:
    """Which materialize input differs from the one that wrote ``manifest``."""
    was = {
        "feature_cols": list(manifest.feature_cols),
        "label_col": manifest.label_col,
        "num_shards": manifest.num_shards,
        "seed": manifest.seed,
        "validation_fraction": manifest.validation_fraction,
        "replicas": manifest.replicas,
    }
    now = {
        "feature_cols": list(params.feature_cols),
        "label_col": params.label_col,
        "num_shards": params.num_shards,
        "seed": params.seed,
        "validation_fraction": params.validation_fraction,
        "replicas": params.replicas,
    }
    changed = [f"{k} ({was[k]!r} then, {now[k]!r} now)" for k in was if was[k] != now[k]]
    if changed:
        return "parameter: " + ", ".join(changed)
    return (
        "DataFrame: its rows, values, column types or validation_col flags changed since the "
        "dataset was written"
    )
