"""[driver] Which columns materialize stores, and as what: the layout (features, labels,
weights) from the DataFrame's schema; for named inputs, column types → input bases, the
lossless casts, and the inputs planned from the scan's row lengths.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sparkdl.data.input_specs import (
    InputSpec,
    check_feature_cols,
    is_named,
    plan_inputs,
    plan_labels,
)
from sparkdl.errors import ConfigError, DataError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = [
    "Layout",
    "column_kind",
    "plan_columns",
    "stored_labels",
    "spark_base",
    "named_bases",
    "named_inputs",
    "named_cast",
    "nonfinite_kind",
    "plan_named",
    "inference_exprs",
    "plan_label_columns",
    "label_specs",
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


def named_inputs(
    feature_cols: Any, feature_shapes: Any, max_lengths: Any, pad_values: Any
) -> dict[str, Any] | None:
    """``{"feature_cols": the checked dict, "options": {feature_shapes, max_lengths,
    pad_values}}`` for named inputs (the options also flag a list as a mistake, refused by
    :func:`plan_columns`); None for a plain list of columns."""
    if not (is_named(feature_cols) or feature_shapes or max_lengths or pad_values):
        return None
    return {
        "feature_cols": check_feature_cols(feature_cols),
        "options": {
            "feature_shapes": feature_shapes or {},
            "max_lengths": max_lengths or {},
            "pad_values": pad_values or {},
        },
    }


def named_bases(
    feature_cols: Mapping[str, Any], fields: Mapping[str, Any], shapes: Mapping[str, Any]
) -> dict[str, str]:
    """Each column's base; DataError naming the first column sparkdl cannot store or feed."""
    bases: dict[str, str] = {}
    for name, value in feature_cols.items():
        for column in [value] if isinstance(value, str) else value:
            base = spark_base(fields[column])
            bases[column] = base
            declared = base.startswith("nested_") and name in shapes
            if base in ("int", "float", "binary") or base.startswith("list_") or declared:
                continue
            plan_inputs({name: column}, bases, {})  # raises the DataError naming column and fix
            raise DataError(f"feature column {column!r} must be numeric, got {base}.")
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


def plan_label_columns(
    label_cols: list[str], weight_col: str | None, fields: Mapping[str, Any]
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(the first label's stored base, (column, stored base) of every other label and the
    weight): integer labels int64, floating point float32, arrays array<float> (multi-label),
    the weight float32. DataError naming a column of another type."""
    stored: dict[str, str] = {}
    for column in [*label_cols, *([weight_col] if weight_col else [])]:
        if column not in fields:
            raise DataError(
                f"column {column!r} must exist in the DataFrame, got columns {sorted(fields)}. "
                "Fix label_col/sample_weight_col or add the column."
            )
        base = spark_base(fields[column])
        if column == weight_col and base in ("int", "float"):
            stored[column] = "float"
        elif column != weight_col and base in ("int", "float", "list_int", "list_float"):
            stored[column] = "list_float" if base.startswith("list_") else base
        else:
            what = "sample_weight_col" if column == weight_col else "label column"
            raise DataError(
                f"{what} {column!r} must be numeric"
                f"{'' if column == weight_col else ' or an array of numbers'}, got "
                f"{fields[column].simpleString()}. Index string labels with StringIndexer, or "
                "cast the column to a number first."
            )
    first = label_cols[0]
    return stored[first], tuple((c, b) for c, b in stored.items() if c != first)


def label_specs(
    label_cols: list[str], bases: Mapping[str, str], stats: Mapping[str, Mapping[str, Any]]
) -> tuple[InputSpec, ...]:
    """The labels' specs from the scan (fixed-length arrays checked); () for one numeric label."""
    if len(label_cols) == 1 and bases[label_cols[0]] in ("int", "float"):
        return ()
    lengths = {}
    for column in label_cols:
        seen = stats[column]["lengths"]
        lengths[column] = (min(seen), max(seen)) if seen else (0, 0)
    return plan_labels(label_cols, bases, lengths)


@dataclass(frozen=True)
class Layout:
    """Feature columns with their kind ("scalar" | "array" | "vector") and the label's type;
    with named inputs, each column's base (``named_columns``) and the inputs' options."""

    features: tuple[tuple[str, str], ...]
    label_col: str
    label_type: str
    bases: tuple[tuple[str, str], ...] = ()
    named: Any = None
    extras: tuple[tuple[str, str], ...] = ()
    """Other label columns and the sample weight, with their stored base."""
    labels: Any = None
    """With several labels, an array label or weights: {"label_cols", "weight_col", "base"}."""

    @property
    def columns(self) -> list[str]:
        extra = [name for name, _ in self.extras]
        return [name for name, _ in self.features] + extra + [self.label_col]

    @property
    def positional(self) -> list[str]:
        """What the converted DataFrame calls ``columns``: ``_c0``, ``_c1``, ... Spark's jobs
        never resolve a user's column name (``mapInArrow`` resolves every column by name, which
        fails for names with dots or duplicates, and a user column may be named like sparkdl's
        internal ones); the executors put the real names back before anything is written."""
        return [f"_c{i}" for i in range(len(self.columns))]


def column_kind(name: str, dtype: Any) -> str | None:
    from pyspark.sql import types as T

    if isinstance(dtype, T.NumericType):
        return "scalar"
    if isinstance(dtype, T.ArrayType) and isinstance(dtype.elementType, T.NumericType):
        return "array"
    if type(dtype).__name__ == "VectorUDT":
        return "vector"
    return None


def plan_columns(df: DataFrame, params: Any, named: Any = None, labels: Any = None) -> Layout:
    from pyspark.sql import types as T

    fields = {f.name: f.dataType for f in df.schema.fields}
    extra = (params.validation_col,) if params.validation_col else ()
    for col in (*params.feature_cols, params.label_col, *extra):
        if col not in fields:
            raise ConfigError(
                f"column {col!r} must exist in the DataFrame, got columns {sorted(fields)}. "
                "Fix feature_cols/label_col or add the column."
            )
    if params.validation_col and not isinstance(fields[params.validation_col], T.BooleanType):
        raise DataError(
            f"validation_col {params.validation_col!r} must be boolean, got "
            f"{fields[params.validation_col].simpleString()}. Derive it, e.g. "
            "F.col('split') == 'validation'."
        )
    features = []
    bases: dict[str, str] = {}
    if named is not None:
        if not is_named(named["feature_cols"]):
            raise ConfigError(
                f"feature_cols must be a dict of named inputs to use feature_shapes, "
                f"max_lengths or pad_values, got {named['feature_cols']!r}. Name the inputs: "
                'feature_cols={"image": "image", ...}.'
            )
        options = named["options"]
        bases = named_bases(named["feature_cols"], fields, options["feature_shapes"])
    for col in params.feature_cols:
        if col in bases:
            features.append((col, "scalar" if bases[col] in ("int", "float") else "array"))
            continue
        kind = column_kind(col, fields[col])
        if kind is None:
            raise DataError(
                f"feature column {col!r} must be numeric, array<numeric> or an ML vector, got "
                f"{fields[col].simpleString()}. Encode it as numbers (e.g. StringIndexer) first."
            )
        features.append((col, kind))
    if labels is None and isinstance(fields[params.label_col], T.ArrayType):
        labels = {"label_cols": [params.label_col], "weight_col": None}  # multi-label
    if labels is not None:
        base, extras = plan_label_columns(labels["label_cols"], labels["weight_col"], fields)
        label = "int64" if base == "int" else "float32"
        labels = {**labels, "base": base}
        bases_items = tuple(bases.items())
        return Layout(tuple(features), params.label_col, label, bases_items, named, extras, labels)
    label_type = fields[params.label_col]
    if isinstance(label_type, T.IntegralType):
        label = "int64"
    elif isinstance(label_type, (T.FractionalType)):
        label = "float32"
    else:
        raise DataError(
            f"label column {params.label_col!r} must be numeric, got "
            f"{label_type.simpleString()}. Index string labels with StringIndexer first."
        )
    return Layout(tuple(features), params.label_col, label, tuple(bases.items()), named)


def stored_labels(layout: Layout, scan: Any) -> tuple[Any, ...]:
    """The labels' specs (several, an array label, or with weights; else ())."""
    if layout.labels is None:
        return ()
    bases = {layout.label_col: layout.labels["base"], **dict(layout.extras)}
    return label_specs(layout.labels["label_cols"], bases, scan.stats)
