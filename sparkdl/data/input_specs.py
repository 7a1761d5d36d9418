"""[any] Named model inputs: which columns feed which model argument, and as what kind of tensor.

``feature_cols`` is either a list of numeric columns (one float32 ``[B, F]`` tensor, the model
called as ``model(x)``: today's behaviour) or a dict from model argument name to a column, or to
a list of numeric columns concatenated as in the list form. With a dict the model is called as
``model(**inputs)`` and every input keeps its column's meaning (the kinds, decided on the driver
from the column's type and the lengths its rows hold, recorded in the manifest):

==========  =================================================  ============================
kind        column                                             the model receives
==========  =================================================  ============================
``dense``   a list of numeric / array / vector columns         float32 ``[B, F]``
``int``     integer (ids for ``nn.Embedding``)                 int64 ``[B]``
``float``   float, double, decimal, boolean (0/1)              float32 ``[B]``
``array``   fixed-length array<numeric> or ML vector           ``[B, L]`` (or ``[B, *shape]``
                                                               with ``feature_shapes``), int64
                                                               for integer items, else float32
``ragged``  variable-length array<int> / array<float>          ``[B, T]`` padded to the longest
                                                               row of the batch (at most
                                                               ``max_lengths[name]``) with
                                                               ``pad_values[name]`` (default 0);
                                                               ``<name>_length``: int64 ``[B]``
``binary``  binary (encoded images, any bytes)                 a list of ``bytes``
==========  =================================================  ============================

Pure Python (no pyspark, no torch, no pyarrow at import): the driver plans inputs from Spark
types, :func:`describe_arrow_type` from Arrow types, both through the neutral *bases* below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sparkdl.errors import ConfigError, DataError

__all__ = [
    "KINDS",
    "BASES",
    "InputSpec",
    "check_feature_cols",
    "input_columns",
    "is_named",
    "plan_inputs",
    "plan_labels",
    "describe_arrow_type",
    "specs_from_json",
    "specs_to_json",
]

KINDS = ("dense", "int", "float", "array", "ragged", "binary")
BASES = ("int", "float", "list_int", "list_float", "nested_int", "nested_float", "binary")
"""What a column's type means to sparkdl, whatever engine describes it: ``int`` (integer),
``float`` (floating point, decimal, boolean), ``list_int`` / ``list_float`` (an array of those,
or an ML vector: list_float), ``nested_*`` (an array of arrays), ``binary``. Other types are
described by a short string naming the type, and refused."""


@dataclass(frozen=True)
class InputSpec:
    """One model argument: its ``name``, ``columns`` and ``kind`` (see the module docstring).

    ``dtype``: "int64", "float32" or "bytes"; ``shape``: the per-row shape of an ``array``
    input (``(L,)`` or ``feature_shapes[name]``), ``()`` otherwise; ``max_length``: a
    ``ragged`` input's cap (rows beyond it are truncated; None: the batch's longest row);
    ``pad_value``: what pads a ``ragged`` input.
    """

    name: str
    columns: tuple[str, ...]
    kind: str
    dtype: str = "float32"
    shape: tuple[int, ...] = ()
    max_length: int | None = None
    pad_value: float = 0.0
    widths: tuple[int, ...] = field(default=())
    """For ``dense``: each column's width (1 for a scalar)."""

    @property
    def length_name(self) -> str:
        """The argument that receives a ``ragged`` input's per-row lengths."""
        return f"{self.name}_length"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "columns": list(self.columns),
            "kind": self.kind,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "max_length": self.max_length,
            "pad_value": self.pad_value,
            "widths": list(self.widths),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> InputSpec:
        kind = str(d["kind"])
        if kind not in KINDS:
            raise DataError(
                f"input kind must be one of {KINDS}, got {kind!r}. Re-materialize the dataset "
                "with this sparkdl version."
            )
        max_length = d.get("max_length")
        return cls(
            name=str(d["name"]),
            columns=tuple(str(c) for c in d["columns"]),
            kind=kind,
            dtype=str(d.get("dtype", "float32")),
            shape=tuple(int(x) for x in d.get("shape", ())),
            max_length=None if max_length is None else int(max_length),
            pad_value=float(d.get("pad_value", 0.0)),
            widths=tuple(int(x) for x in d.get("widths", ())),
        )


def specs_to_json(specs: Sequence[InputSpec]) -> list[dict[str, Any]]:
    return [s.to_json() for s in specs]


def specs_from_json(items: Sequence[Mapping[str, Any]] | None) -> tuple[InputSpec, ...]:
    return tuple(InputSpec.from_json(d) for d in items or ())


def is_named(feature_cols: Any) -> bool:
    """Whether ``feature_cols`` names model arguments (a dict) rather than listing columns."""
    return isinstance(feature_cols, Mapping)


def input_columns(feature_cols: Any) -> list[str]:
    """Every column ``feature_cols`` reads, in order, each once."""
    if not is_named(feature_cols):
        return list(feature_cols)
    out: list[str] = []
    for value in feature_cols.values():
        for column in [value] if isinstance(value, str) else value:
            if column not in out:
                out.append(column)
    return out


def _is_column_list(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(c, str) and c for c in value)
    )


def check_feature_cols(feature_cols: Any) -> Any:
    """``feature_cols`` checked: a non-empty list of column names, or a non-empty dict from
    argument names (identifiers) to a column name or a non-empty list of them. ConfigError."""
    example = 'Pass e.g. ["features"] or {"user_id": "user_id", "dense": ["age", "price"]}'
    if is_named(feature_cols):
        if not feature_cols:
            raise ConfigError(f"feature_cols must not be an empty dict, got {{}}. {example}.")
        for name, value in feature_cols.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ConfigError(
                    f"feature_cols keys must be Python identifiers (the model's argument "
                    f"names), got {name!r}. Name the argument, e.g. {{'tokens': 'text_ids'}}."
                )
            if not (isinstance(value, str) and value) and not _is_column_list(value):
                raise ConfigError(
                    f"feature_cols[{name!r}] must be a column name or a non-empty list of "
                    f"numeric columns, got {value!r}. {example}."
                )
        return dict(feature_cols)
    if not _is_column_list(feature_cols):
        raise ConfigError(
            f"feature_cols must be a non-empty list of column names or a dict of model "
            f"arguments, got {feature_cols!r}. {example}."
        )
    return list(feature_cols)


def _per_input(option: str, values: Any, names: Sequence[str]) -> dict[str, Any]:
    """``values`` (a dict keyed like feature_cols, or None) checked for unknown keys."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"{option} must be a dict keyed like feature_cols, got {values!r}. "
            f"Pass e.g. {{{names[0]!r}: ...}}."
        )
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ConfigError(
            f"{option} keys must be feature_cols keys {list(names)}, got {unknown}. "
            "Fix the names (feature_cols must be a dict to use this option)."
        )
    return dict(values)


def plan_inputs(
    feature_cols: Mapping[str, Any],
    bases: Mapping[str, str],
    lengths: Mapping[str, tuple[int, int]],
    *,
    feature_shapes: Mapping[str, Any] | None = None,
    max_lengths: Mapping[str, Any] | None = None,
    pad_values: Mapping[str, Any] | None = None,
) -> tuple[InputSpec, ...]:
    """The inputs of a dict ``feature_cols``, from each column's base (see BASES) and the
    ``(shortest, longest)`` row lengths of its list columns (``nested_*`` columns: of the
    flattened rows). Raises DataError naming the column for a type or length sparkdl cannot
    make a tensor of, ConfigError for bad options."""
    names = list(feature_cols)
    shapes = _per_input("feature_shapes", feature_shapes, names)
    caps = _per_input("max_lengths", max_lengths, names)
    pads = _per_input("pad_values", pad_values, names)
    specs = []
    for name, value in feature_cols.items():
        if not isinstance(value, str):
            if name in shapes or name in caps:
                raise ConfigError(
                    f"feature_shapes/max_lengths[{name!r}] must name a single-column input, got "
                    f"the column list {value!r}. Give that column its own input."
                )
            specs.append(_dense(name, list(value), bases, lengths))
            continue
        specs.append(
            _single(name, value, bases[value], lengths.get(value), shapes, caps, pads.get(name))
        )
    return tuple(specs)


def _refuse(column: str, base: str) -> DataError:
    if base == "string":
        fix = (
            "Tokenize it in Spark first (e.g. pyspark.ml.feature.Tokenizer + a vocabulary "
            "lookup, or StringIndexer for categories) into integer ids"
        )
    elif base in ("nested_int", "nested_float"):
        fix = "Declare its shape with feature_shapes (e.g. {'image': [1, 28, 28]})"
    else:
        fix = "Convert it into numbers, an array of numbers or binary first"
    return DataError(
        f"feature column {column!r} must be a type sparkdl can feed, got {base}. {fix}."
    )


def _dense(
    name: str, columns: list[str], bases: Mapping[str, str], lengths: Mapping[str, Any]
) -> InputSpec:
    widths = []
    for column in columns:
        base = bases[column]
        if base in ("int", "float"):
            widths.append(1)
            continue
        if base not in ("list_int", "list_float"):
            raise DataError(
                f"feature column {column!r} of input {name!r} must be numeric, array<numeric> or "
                f"an ML vector to be concatenated, got {base}. Give it its own input: "
                f"feature_cols={{{column!r}: {column!r}, ...}}."
            )
        low, high = lengths[column]
        if low != high or high == 0:
            raise DataError(
                f"array column {column!r} of input {name!r} must have one non-zero length in "
                f"every row to be concatenated, got lengths {low}..{high}. Give it its own "
                "input (padded per batch) or pad it to a fixed length first."
            )
        widths.append(high)
    return InputSpec(name, tuple(columns), "dense", "float32", widths=tuple(widths))


def _single(
    name: str,
    column: str,
    base: str,
    length: tuple[int, int] | None,
    shapes: Mapping[str, Any],
    caps: Mapping[str, Any],
    pad: Any,
) -> InputSpec:
    if base not in BASES:
        raise _refuse(column, base)
    if base == "binary":
        return InputSpec(name, (column,), "binary", "bytes")
    if base in ("int", "float"):
        return InputSpec(name, (column,), base, "int64" if base == "int" else "float32")
    dtype = "int64" if base.endswith("_int") else "float32"
    low, high = length if length is not None else (0, 0)
    if name in shapes:
        shape = _checked_shape(name, column, shapes[name], low, high)
        return InputSpec(name, (column,), "array", dtype, shape)
    if base.startswith("nested"):
        raise _refuse(column, base)
    cap = caps.get(name)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigError(
            f"max_lengths[{name!r}] must be an integer ≥ 1, got {cap!r}. Pass e.g. 256."
        )
    pad_value = 0.0 if pad is None else pad
    if isinstance(pad_value, bool) or not isinstance(pad_value, (int, float)):
        raise ConfigError(f"pad_values[{name!r}] must be a number, got {pad!r}. Pass e.g. 0.")
    if dtype == "int64" and float(pad_value) != int(pad_value):
        raise ConfigError(
            f"pad_values[{name!r}] must be a whole number for the integer column {column!r}, "
            f"got {pad!r}. Pass e.g. 0."
        )
    if low == high and high > 0 and cap is None and pad is None:
        return InputSpec(name, (column,), "array", dtype, (high,))
    return InputSpec(name, (column,), "ragged", dtype, (), cap, float(pad_value))


def _checked_shape(name: str, column: str, shape: Any, low: int, high: int) -> tuple[int, ...]:
    ok = isinstance(shape, (list, tuple)) and bool(shape)
    ok = ok and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    if not ok:
        raise ConfigError(
            f"feature_shapes[{name!r}] must be a non-empty list of positive integers, got "
            f"{shape!r}. Pass e.g. [1, 28, 28]."
        )
    size = math.prod(shape)
    if low != high or high != size:
        got = f"{low}" if low == high else f"{low}..{high}"
        raise DataError(
            f"feature_shapes[{name!r}] must match the values per row of column {column!r}, got "
            f"shape {list(shape)} ({size} values) for rows of {got} values. Fix the shape or "
            "the column."
        )
    return tuple(shape)


def describe_arrow_type(arrow_type: Any) -> str:
    """An Arrow type's base (see BASES), or a short name of a type sparkdl refuses."""
    import pyarrow as pa

    t = arrow_type
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t):
        return "float"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        item = describe_arrow_type(t.value_type)
        if item in ("int", "float"):
            return f"list_{item}"
        if item.startswith("list_"):
            return f"nested_{item[5:]}"
        return f"array<{item}>"
    return str(t)


def plan_labels(
    label_cols: Sequence[str], bases: Mapping[str, str], lengths: Mapping[str, tuple[int, int]]
) -> tuple[InputSpec, ...]:
    """The labels of a list ``label_col`` (or one array label): integer → int64 ``[B]``,
    floating point → float32 ``[B]``, fixed-length array<numeric> → float32 ``[B, K]``
    (multi-label). DataError naming a column of another type or a ragged one."""
    specs = []
    for column in label_cols:
        base = bases[column]
        if base in ("int", "float"):
            specs.append(
                InputSpec(column, (column,), base, "int64" if base == "int" else "float32")
            )
            continue
        low, high = lengths.get(column, (0, 0))
        if base not in ("list_int", "list_float") or low != high or high == 0:
            got = base if base not in ("list_int", "list_float") else f"lengths {low}..{high}"
            raise DataError(
                f"label column {column!r} must be numeric or a fixed-length array of numbers, "
                f"got {got}. Index string labels (StringIndexer) or pad multi-label arrays first."
            )
        specs.append(InputSpec(column, (column,), "array", "float32", (high,)))
    return tuple(specs)
