"""[driver] Bad input while materializing: NaN/inf rows (``on_invalid``) and unreadable sources."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sparkdl.columns import quote_column
from sparkdl.errors import ConfigError, DataError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = ["ON_INVALID", "check_on_invalid", "drop_nonfinite", "read_input"]

log = logging.getLogger("sparkdl")

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


def drop_nonfinite(converted: DataFrame, columns: list[str], kinds: list[str]) -> DataFrame:
    """Rows whose ``columns`` (of kind "scalar" or "array"/"vector", converted to float) are all
    finite; nulls are kept (and refused by materialize's scan).

    Logs how many rows were dropped (one extra count over the converted input).
    """
    from pyspark.sql import functions as F

    def finite(c: Any) -> Any:
        return F.coalesce(~F.isnan(c) & (F.abs(c) != float("inf")), F.lit(True))

    conditions = []
    for name, kind in zip(columns, kinds):
        col = F.col(quote_column(name))
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
