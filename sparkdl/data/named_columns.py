"""[driver] Named inputs in Spark: column types → input bases, the lossless casts materialize
stores, and the inputs planned from the scan's row lengths.

A dict ``feature_cols`` (see :mod:`sparkdl.data.input_specs`) keeps each column's meaning on
disk: integers as int64, floating point / decimal / boolean as float32, arrays of integers as
array<bigint> and of other numbers as array<float> (ML vectors through ``vector_to_array``),
arrays of arrays flattened (their shape comes from ``feature_shapes``), binary as binary;
variable-length arrays stay ragged (no padding on disk). Types sparkdl cannot feed — strings,
structs, maps, arrays of those, an array of arrays without a declared shape — are refused here,
before any Spark job, naming the column. pyspark is imported inside functions only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sparkdl.data.input_specs import InputSpec, plan_inputs
from sparkdl.errors import DataError

__all__ = [
    "spark_base",
    "named_bases",
    "named_cast",
    "nonfinite_kind",
    "plan_named",
    "inference_exprs",
]


def spark_base(dtype: Any) -> str:
    """A Spark type's base (see ``input_specs.BASES``), or its simple string when refused."""
    from pyspark.sql import types as T

    if isinstance(dtype, T.IntegralType):
        return "int"
    if isinstance(dtype, (T.FractionalType, T.BooleanType)):
        return "float"
    if isinstance(dtype, T.BinaryType):
        return "binary"
    if type(dtype).__name__ == "VectorUDT":
        return "list_float"
    if isinstance(dtype, T.StringType):
        return "string"
    if isinstance(dtype, T.ArrayType):
        item = spark_base(dtype.elementType)
        if item in ("int", "float"):
            return f"list_{item}"
        if item in ("list_int", "list_float") and type(dtype.elementType).__name__ != "VectorUDT":
            return f"nested_{item[5:]}"
    return str(dtype.simpleString())


def named_bases(
    feature_cols: Mapping[str, Any], fields: Mapping[str, Any], shapes: Mapping[str, Any]
) -> dict[str, str]:
    """Each column's base; DataError naming the first column sparkdl cannot store or feed."""
    bases: dict[str, str] = {}
    for name, value in feature_cols.items():
        for column in [value] if isinstance(value, str) else value:
            base = spark_base(fields[column])
            bases[column] = base
            nested = base.startswith("nested_")
            if base.startswith(("int", "float", "list_", "binary")) or (nested and name in shapes):
                continue
            plan_inputs({name: column}, bases, {})  # raises DataError with the fix
            raise DataError(  # pragma: no cover - plan_inputs raises for every refused base
                f"feature column {column!r} must be a type sparkdl can feed, got {base}."
            )
    return bases


def named_cast(column: Any, base: str, dtype: Any) -> Any:
    """The stored form of a column of ``base`` (Spark type ``dtype``): lossless for ids,
    bytes and ragged arrays."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    if base == "int":
        return column.cast(T.LongType())
    if base == "float":
        return column.cast(T.FloatType())
    if base == "binary":
        return column
    if type(dtype).__name__ == "VectorUDT":
        from pyspark.ml.functions import vector_to_array  # pyspark.ml: only when needed

        return vector_to_array(column, "float32")
    if base.startswith("nested_"):
        column = F.flatten(column)
    item = T.LongType() if base.endswith("_int") else T.FloatType()
    return column.cast(T.ArrayType(item))


def nonfinite_kind(base: str) -> str:
    """How ``on_invalid='skip'`` checks a column of ``base``: "scalar", "array" or "none"
    (integers and bytes are always finite)."""
    if base == "float":
        return "scalar"
    if base in ("list_float", "nested_float"):
        return "array"
    return "none"


def plan_named(
    feature_cols: Mapping[str, Any],
    bases: Mapping[str, str],
    stats: Mapping[str, Mapping[str, Any]],
    options: Mapping[str, Any],
) -> tuple[tuple[tuple[int, ...], ...], tuple[InputSpec, ...]]:
    """(the stored columns' shapes, the inputs) from the scan's per-column statistics."""
    lengths: dict[str, tuple[int, int]] = {}
    for column, base in bases.items():
        seen = stats[column]["lengths"]
        if base.startswith(("list_", "nested_")):
            lengths[column] = (min(seen), max(seen)) if seen else (0, 0)
    # a declared shape turns an array of arrays into a list of its values (flattened on disk)
    planned = {c: "list_" + b[7:] if b.startswith("nested_") else b for c, b in bases.items()}
    inputs = plan_inputs(feature_cols, planned, lengths, **options)
    shapes = tuple((max(1, lengths[c][1]),) if c in lengths else () for c in bases)
    return shapes, inputs


def _expected(spec: InputSpec, column: str) -> tuple[str, ...]:
    """The bases a column of ``spec`` may have at inference (what training stored, or what
    casts to it without losing meaning)."""
    if spec.kind == "binary":
        return ("binary",)
    if spec.kind in ("int", "float"):
        return ("int", "float") if spec.kind == "float" else ("int",)
    if spec.kind == "dense":
        return ("int", "float", "list_int", "list_float")
    if spec.kind == "array" and len(spec.shape) > 1:
        return ("list_int", "list_float", "nested_int", "nested_float")
    return ("list_int",) if spec.dtype == "int64" else ("list_int", "list_float")


def inference_exprs(fields: Mapping[str, Any], inputs: tuple[InputSpec, ...]) -> list[Any]:
    """One expression per column the inputs read (in order, each once), cast as training
    stored it; DataError naming a column that is missing or of another kind."""
    from pyspark.sql import functions as F

    from sparkdl.columns import quote_column

    exprs: list[Any] = []
    seen: set[str] = set()
    for spec in inputs:
        for column in spec.columns:
            if column in seen:
                continue
            seen.add(column)
            if column not in fields:
                raise DataError(
                    f"feature column {column!r} (input {spec.name!r}) must exist in the "
                    f"DataFrame, got columns {sorted(fields)}. Select or rename the columns the "
                    "model was trained on."
                )
            base = spark_base(fields[column])
            if base not in _expected(spec, column):
                raise DataError(
                    f"feature column {column!r} (input {spec.name!r}, trained as {spec.kind} "
                    f"{spec.dtype}) must have a type of the same kind, got "
                    f"{fields[column].simpleString()}. Pass the column the model was trained on."
                )
            stored = spec.kind if spec.kind in ("int", "float", "binary") else base
            if spec.kind == "dense":
                stored = "float" if base in ("int", "float") else "list_float"
            elif spec.kind in ("array", "ragged"):
                kind = "int" if spec.dtype == "int64" else "float"
                stored = ("nested_" if base.startswith("nested_") else "list_") + kind
            col = F.col(quote_column(column))
            exprs.append(named_cast(col, stored, fields[column]))
    return exprs
