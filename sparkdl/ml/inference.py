"""[driver/executor] Batched inference: a DataFrame in, ``prediction`` (and ``probability``) out.

The module travels once per (model, session) as its cloudpickled bytes and is unpickled once per
Python worker (a small cache keyed by a token made on the driver): as a broadcast on a classic
session; on Spark Connect (no broadcasts) inside the UDF's pickled closure up to
:data:`INLINE_MAX_BYTES`, above that through a file in the run directory
(``RunLayout.shipped_dir``) that each Python worker reads once. Only
the feature columns go to Python, as Arrow arrays through an iterator ``arrow_udf`` (Spark ≥
4.1): scalar columns cast to float, arrays to array<float>, ML vectors through
``vector_to_array``; the other columns never leave the JVM. Each Arrow batch (``spark.sql.
execution.arrow.maxRecordsPerBatch`` rows) becomes one float32 matrix, cut into forward passes
of ``batch_size`` rows. On Spark < 4.1 the same code runs under ``mapInArrow``, which moves
every column through Python (slower for wide rows).

Device: "auto" uses the task's Spark ``gpu`` resource (``cuda:<first address>``), else the one
visible CUDA device when there is one, else the CPU with ``torch`` threads = the task's CPUs.
"""

from __future__ import annotations

import logging
import pickle
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from sparkdl.columns import quote_column
from sparkdl.data.input_specs import InputSpec
from sparkdl.data.inputs import build_inputs, call_model, id_range_error
from sparkdl.errors import ConfigError, DataError
from sparkdl.train.components import prediction_of

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

__all__ = [
    "DEVICES",
    "INLINE_MAX_BYTES",
    "ShippedModule",
    "arrays_from_pandas",
    "features_from_arrays",
    "input_names",
    "predict_arrays",
    "predict_dataframe",
    "ship_module",
]

DEVICES = ("auto", "cpu", "cuda")
USE_ARROW_UDF: bool | None = None
"""None: the iterator ``arrow_udf`` where pyspark has it (≥ 4.1), else ``mapInArrow``."""
log = logging.getLogger("sparkdl")
_CACHE: OrderedDict[tuple[str, str], Any] = OrderedDict()
_CACHE_SIZE = 4  # models per Python worker (a pipeline may hold several)


INLINE_MAX_BYTES = 4 << 20
"""On Spark Connect, modules up to this many pickled bytes travel inside the UDF (the plan the
client sends and the server hands every task); larger ones through a file, read once per Python
worker. Measured (BENCHMARKS.md, "Inference on Spark Connect"): even at 1 MiB, the file 1.2×
faster at 4 MiB and 2.8× at 16 MiB; inline plans near 100 MiB exhaust a 1 GiB server heap."""


@dataclass(frozen=True)
class ShippedModule:
    """A module on its way to the executors; ``key`` names it in the executors' cache.

    Exactly one of: ``broadcast`` (classic), ``payload`` (the bytes, inside the closure) or
    ``uri`` (a file every Python worker reads once).
    """

    key: str
    broadcast: Any = None
    payload: bytes | None = None
    uri: str | None = None

    def module_bytes(self) -> bytes:
        """(executor) The cloudpickled module."""
        if self.broadcast is not None:
            return bytes(self.broadcast.value)
        if self.payload is not None:
            return self.payload
        from sparkdl import storage

        return storage.read_file(str(self.uri))


def ship_module(spark: SparkSession, module: Any, *, spill_dir: str | None = None) -> ShippedModule:
    """(driver) Ship ``module``'s cloudpickled bytes once; executors unpickle it once each.

    Classic session: a broadcast. Spark Connect: inline up to :data:`INLINE_MAX_BYTES`, else a
    file under ``spill_dir`` (shared storage, e.g. the run directory's ``shipped/``); without
    one, inline whatever the size (logged: a plan over Connect's message limit fails).
    """
    from pyspark import cloudpickle  # handles modules defined in notebooks and __main__

    from sparkdl.session import is_connect

    key = uuid.uuid4().hex
    payload = cloudpickle.dumps(module.cpu().eval())
    if not is_connect(spark):
        return ShippedModule(key, broadcast=spark.sparkContext.broadcast(payload))
    if len(payload) <= INLINE_MAX_BYTES:
        return ShippedModule(key, payload=payload)
    if spill_dir:
        from sparkdl import storage

        uri = storage.join(spill_dir, f"{key}.pkl")
        storage.write_file(uri, payload)
        return ShippedModule(key, uri=uri)
    log.warning(
        "sparkdl: the module is %.0f MiB pickled and the model has no run directory to ship it "
        "through; it goes inside the Spark Connect plan (over the server's message limit, "
        "spark.connect.grpc.maxInboundMessageSize, the transform fails)",
        len(payload) / 2**20,
    )
    return ShippedModule(key, payload=payload)


# --- executor side -----------------------------------------------------------------------------


def _device(choice: str) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            "inference_device must be 'auto' or 'cpu' on executors without CUDA, got 'cuda'. "
            "Use 'auto' to fall back to the CPU"
        )
    from pyspark import TaskContext

    context = TaskContext.get()
    gpus = context.resources().get("gpu") if context is not None else None
    if gpus is not None and gpus.addresses:
        return torch.device(f"cuda:{gpus.addresses[0]}")
    return torch.device("cuda")


def _cpu_threads() -> None:
    """Use the task's CPUs, not every core: several tasks share one executor."""
    from pyspark import TaskContext

    context = TaskContext.get()
    cpus = context.cpus() if context is not None else 0
    if cpus and torch.get_num_threads() != cpus:
        torch.set_num_threads(cpus)


def _cached_module(shipped: ShippedModule, device: Any) -> Any:
    key = (shipped.key, str(device))
    module = _CACHE.get(key)
    if module is None:
        module = pickle.loads(shipped.module_bytes()).to(device).eval()  # noqa: S301 - ours
        _CACHE[key] = module
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return module


def _is_list(column: pa.Array) -> bool:
    t = column.type
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _column_matrix(name: str, column: pa.Array, n: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise DataError(
            f"feature column {name!r} must have no nulls, got {column.null_count} in one batch. "
            "Fill or drop them before transform"
        )
    if not _is_list(column):
        return column.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, 1)
    import pyarrow.compute as pc

    bounds = pc.min_max(pc.list_value_length(column))
    low, high = bounds["min"].as_py() or 0, bounds["max"].as_py() or 0
    if low != high:
        raise DataError(
            f"feature column {name!r} must hold arrays of one length, got lengths "
            f"{low}..{high}. Pad or fix the rows"
        )
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(n, high)


def features_from_arrays(
    arrays: Sequence[pa.Array], names: Sequence[str], expected_dim: int | None
) -> np.ndarray:
    """Feature columns (numeric or fixed-length arrays) → float32 [rows, width], in order."""
    n = len(arrays[0])
    parts = [_column_matrix(name, col, n) for name, col in zip(names, arrays)]
    features = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    if expected_dim is not None and n and features.shape[1] != expected_dim:
        widths = ", ".join(f"{name!r}: {part.shape[1]}" for name, part in zip(names, parts))
        raise DataError(
            f"feature width must be {expected_dim} (what the model was trained on), got "
            f"{features.shape[1]} ({widths}). Pass the feature columns the model was trained on"
        )
    if not (features.flags.writeable and features.flags.c_contiguous):
        features = np.array(features, order="C")  # Arrow buffers are read-only; torch writes
    return features


@dataclass(frozen=True)
class _Plan:
    """What an executor needs to predict: small, pickled with the UDF."""

    shipped: ShippedModule
    names: tuple[str, ...]
    expected_dim: int | None
    classification: bool
    batch_size: int
    with_probability: bool
    device: str
    inputs: tuple[InputSpec, ...] = ()
    """Named inputs (empty: one float32 matrix of ``names``, ``model(x)``)."""
    transform: Any = None
    """Named inputs: applied to each forward pass's input dict first."""
    with_raw: bool = False
    """Also every output value of each row (array<float>), e.g. embeddings, several heads."""


class _Predictor:
    """(executor) One task's predictor: the cached module on its device, batch in → outputs."""

    def __init__(self, plan: _Plan, module: Any = None) -> None:
        self.plan = plan
        self.device = _device(plan.device)
        if self.device.type == "cpu":
            _cpu_threads()
        if module is not None:  # in this process (predict_arrays), not shipped
            self.module = module.to(self.device).eval()
        else:
            self.module = _cached_module(plan.shipped, self.device)

    def _outputs(self, arrays: Sequence[pa.Array]) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(first row, end row, prediction tensor) of each forward pass over ``arrays``."""
        plan = self.plan
        if plan.inputs:
            table = pa.Table.from_arrays(list(arrays), names=list(plan.names))
            for start in range(0, table.num_rows, plan.batch_size):
                chunk = table.slice(start, plan.batch_size)
                inputs = build_inputs(chunk, plan.inputs)
                if plan.transform is not None:
                    inputs = dict(plan.transform(inputs))
                inputs = {
                    k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                    for k, v in inputs.items()
                }
                try:
                    out = prediction_of(call_model(self.module, inputs))
                except IndexError as exc:
                    raise (id_range_error(exc, inputs, plan.inputs) or exc) from exc
                yield start, start + chunk.num_rows, out.float()
            return
        features = features_from_arrays(arrays, plan.names, plan.expected_dim)
        for start in range(0, len(features), plan.batch_size):
            chunk = torch.from_numpy(features[start : start + plan.batch_size])
            out = prediction_of(self.module(chunk.to(self.device, non_blocking=True)))
            yield start, start + len(chunk), out.float()

    def __call__(self, arrays: Sequence[pa.Array]) -> tuple[pa.Array, list[pa.Array]]:
        """The predictions, then the extra array columns: probabilities, raw outputs."""
        plan = self.plan
        n = len(arrays[0])
        predictions = np.empty(n, dtype=np.float64)
        probabilities: np.ndarray | None = None
        raw: np.ndarray | None = None
        with torch.inference_mode():
            for start, stop, out in self._outputs(arrays):
                if plan.with_raw:  # every output value of the row, flattened
                    values = out.reshape(stop - start, -1).cpu().numpy()
                    if raw is None:
                        raw = np.empty((n, values.shape[1]), dtype=np.float32)
                    raw[start:stop] = values
                if not plan.classification:
                    predictions[start:stop] = out.reshape(stop - start, -1)[:, 0].cpu().numpy()
                    continue
                predictions[start:stop] = out.argmax(dim=1).cpu().numpy()
                if plan.with_probability:
                    probs = torch.softmax(out, dim=1).cpu().numpy()
                    if probabilities is None:
                        probabilities = np.empty((n, probs.shape[1]), dtype=np.float32)
                    probabilities[start:stop] = probs
        extras = [
            _list_array(probabilities, n, plan.with_probability),
            _list_array(raw, n, plan.with_raw),
        ]
        return pa.array(predictions), [e for e in extras if e is not None]


def _list_array(probabilities: np.ndarray | None, n: int, wanted: bool) -> pa.Array | None:
    if not wanted:
        return None
    if probabilities is None:  # an empty batch
        return pa.array([], type=pa.list_(pa.float32()))
    width = probabilities.shape[1]
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(probabilities.reshape(-1)))


def _udf_body(plan: _Plan, outputs: list[str]):
    def predict(batches: Iterator[Any]) -> Iterator[pa.Array]:
        predictor: _Predictor | None = None
        for item in batches:
            arrays = list(item) if isinstance(item, (tuple, list)) else [item]
            predictor = predictor or _Predictor(plan)
            pred, extras = predictor(arrays)
            if not extras:
                yield pred
            else:
                yield pa.StructArray.from_arrays([pred, *extras], names=outputs)

    return predict


def _map_body(plan: _Plan, inputs: list[str], keep: int, outputs: list[str]):
    def predict(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        predictor: _Predictor | None = None
        for batch in batches:
            predictor = predictor or _Predictor(plan)
            pred, extras = predictor([batch.column(name) for name in inputs])
            columns = [batch.column(i) for i in range(keep)] + [pred, *extras]
            yield pa.RecordBatch.from_arrays(columns, names=batch.schema.names[:keep] + outputs)

    return predict


# --- driver side -------------------------------------------------------------------------------


def _input_columns(df: DataFrame, feature_cols: Sequence[str], expected_dim: int | None) -> list:
    """Checked, cast feature column expressions (float, array<float>); errors name the column."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    fields = {f.name: f.dataType for f in df.schema.fields}
    for name in feature_cols:
        if df.columns.count(name) > 1:
            raise DataError(
                f"feature column {name!r} must appear once in the DataFrame, got "
                f"{df.columns.count(name)} columns of that name (after a join?). Rename or drop "
                "the extra ones; columns the model does not read may repeat"
            )
    missing = [c for c in feature_cols if c not in fields]
    if missing:
        raise DataError(
            f"feature column {missing[0]!r} must exist in the DataFrame, got columns "
            f"{df.columns} (missing: {missing}). Select or rename the columns the model was "
            "trained on"
        )
    exprs, scalars = [], 0
    for name in feature_cols:
        dtype, col = fields[name], F.col(quote_column(name))
        if isinstance(dtype, T.NumericType):
            exprs.append(col.cast("float"))
            scalars += 1
        elif isinstance(dtype, T.ArrayType) and isinstance(dtype.elementType, T.NumericType):
            exprs.append(col.cast("array<float>"))
        elif type(dtype).__name__ == "VectorUDT":
            exprs.append(vector_to_array(col, "float32"))
        else:
            raise DataError(
                f"feature column {name!r} must be numeric, array<numeric> or an ML vector, got "
                f"{dtype.simpleString()}. Pass the columns the model was trained on"
            )
    if expected_dim is not None and scalars == len(feature_cols) != expected_dim:
        raise DataError(
            f"feature width must be {expected_dim} (what the model was trained on), got "
            f"{scalars} numeric columns {list(feature_cols)}. Pass the same feature columns"
        )
    return exprs


def _arrow_udf(body: Any, kind: str) -> Any:
    import warnings

    from pyspark.sql.functions import ArrowUDFType, arrow_udf

    with warnings.catch_warnings():  # "prefer type hints": the body takes 1..n columns
        warnings.simplefilter("ignore", UserWarning)
        return arrow_udf(body, kind, ArrowUDFType.SCALAR_ITER)


def _with_arrow_udf(df: DataFrame, exprs: list[Column], plan: _Plan, outputs: list[str]):
    from pyspark.sql import functions as F

    prediction = outputs[0]
    if len(outputs) == 1:
        udf = _arrow_udf(_udf_body(plan, outputs), "double")
        return df.withColumn(prediction, udf(*exprs))
    extra = "".join(f", {quote_column(name)}: array<float>" for name in outputs[1:])
    udf = _arrow_udf(_udf_body(plan, outputs), f"struct<{quote_column(prediction)}: double{extra}>")
    # Appended by withColumn and dropped by name: every other column stays as it is, whatever
    # its name (duplicates after a join, dots, spaces), and is never resolved.
    out = _unused_name(df.columns, "__sparkdl_prediction__")
    scored = df.withColumn(out, udf(*exprs))
    for name in outputs:
        scored = scored.withColumn(name, F.col(quote_column(out)).getField(name))
    return scored.drop(out)


def _unused_name(columns: Sequence[str], base: str) -> str:
    """``base``, or ``base`` with a numeric suffix, that no column of the DataFrame has."""
    name, n = base, 0
    while name in columns:
        n += 1
        name = f"{base}{n}"
    return name


def _with_map_in_arrow(df: DataFrame, exprs: list[Column], plan: _Plan, outputs: list[str]):
    from pyspark.sql.types import ArrayType, DoubleType, FloatType, StructField, StructType

    # mapInArrow resolves every input column by name, which fails for duplicate names (after a
    # join) or names with dots: it runs on positional names, and the real ones come back after.
    keep = len(df.columns)
    inputs = [f"_in{i}" for i in range(len(exprs))]
    positional = [f"_c{i}" for i in range(keep)] + inputs
    prepared = df.select("*", *exprs).toDF(*positional)
    fields = [StructField(name, f.dataType, f.nullable) for name, f in zip(positional, df.schema)]
    fields.append(StructField("_out0", DoubleType(), False))
    for i in range(1, len(outputs)):
        fields.append(StructField(f"_out{i}", ArrayType(FloatType(), False), False))
    body = _map_body(plan, inputs, keep, [f.name for f in fields[keep:]])
    scored = prepared.mapInArrow(body, StructType(fields))
    return scored.toDF(*df.columns, *outputs)


def predict_dataframe(
    df: DataFrame,
    module: Any,
    feature_cols: Sequence[str],
    *,
    classification: bool,
    expected_dim: int | None = None,
    batch_size: int = 1024,
    output_col: str = "prediction",
    probability_col: str | None = None,
    device: str = "auto",
    inputs: Sequence[InputSpec] = (),
    transform: Any = None,
    raw_col: str | None = None,
) -> DataFrame:
    """``df`` with ``output_col`` (and ``probability_col``) appended, computed in Arrow batches.

    ``raw_col``: also the model's output per row, flattened, as array<float> (the prediction
    tensor of :func:`prediction_of`: several heads, embeddings). ``module`` is an
    ``nn.Module`` or a :class:`ShippedModule` (broadcast already). With
    ``inputs`` (named inputs, :mod:`sparkdl.data.input_specs`) the model gets
    ``model(**inputs)`` built as in training (``transform`` applied first) from the columns
    the inputs name, each cast as training stored it; ``feature_cols`` is then unused. Bad
    input raises ``DataError`` naming the column: here for a missing or non-numeric column,
    on the executors (at the first action) for nulls, ragged arrays or a wrong width.
    """
    from pyspark.sql import functions as F

    for name in (output_col, probability_col, raw_col):
        if name and name in df.columns:
            raise DataError(
                f"output column {name!r} must not exist in the DataFrame, got it among "
                f"{df.columns}. Drop or rename it, or set prediction_col/probability_col"
            )
    if inputs:
        from sparkdl.data.named_columns import inference_exprs

        names = input_names(feature_cols, inputs)
        exprs = inference_exprs({f.name: f.dataType for f in df.schema.fields}, tuple(inputs))
    else:
        names = tuple(feature_cols)
        exprs = _input_columns(df, feature_cols, expected_dim)
    shipped = module if isinstance(module, ShippedModule) else ship_module(df.sparkSession, module)
    with_probability = bool(classification and probability_col)
    plan = _Plan(
        shipped,
        names,
        expected_dim,
        classification,
        batch_size,
        with_probability,
        device,
        tuple(inputs),
        transform if inputs else None,
        bool(raw_col),
    )
    outputs = [output_col] + ([probability_col] if with_probability and probability_col else [])
    outputs += [raw_col] if raw_col else []
    use_arrow_udf = hasattr(F, "arrow_udf") if USE_ARROW_UDF is None else USE_ARROW_UDF
    if use_arrow_udf:
        return _with_arrow_udf(df, exprs, plan, outputs)
    return _with_map_in_arrow(df, exprs, plan, outputs)


def input_names(feature_cols: Sequence[str], inputs: Sequence[InputSpec] = ()) -> tuple[str, ...]:
    """The columns prediction reads, in order: every column the named ``inputs`` name (each
    once), else ``feature_cols``."""
    if inputs:
        return tuple(dict.fromkeys(c for spec in inputs for c in spec.columns))
    return tuple(feature_cols)


# --- in this process (the MLflow pyfunc model) ---------------------------------------------------


def arrays_from_pandas(frame: Any, names: Sequence[str]) -> list[pa.Array]:
    """Arrow arrays of ``frame``'s (a pandas DataFrame) columns ``names``, as transform's UDF
    gets them: numbers as they are, arrays (lists, numpy arrays, ML vectors) as Arrow lists.

    Raises DataError naming a missing column.
    """
    missing = [name for name in names if name not in frame.columns]
    if missing:
        raise DataError(
            f"feature column {missing[0]!r} must exist in the input, got columns "
            f"{list(frame.columns)} (missing: {missing}). Pass the columns the model was "
            "trained on"
        )
    arrays = []
    for name in names:
        values = frame[name]
        if values.dtype != object:
            arrays.append(pa.array(values.to_numpy()))
            continue
        cells = [v.toArray() if hasattr(v, "toArray") else v for v in values]  # ML vectors
        arrays.append(pa.array([np.asarray(c) if isinstance(c, list) else c for c in cells]))
    return arrays


def predict_arrays(
    module: Any,
    arrays: Sequence[pa.Array],
    names: Sequence[str],
    *,
    classification: bool,
    expected_dim: int | None = None,
    batch_size: int = 1024,
    with_probability: bool = False,
    device: str = "auto",
    inputs: Sequence[InputSpec] = (),
    transform: Any = None,
    with_raw: bool = False,
) -> tuple[pa.Array, list[pa.Array]]:
    """(any process) What :func:`predict_dataframe`'s executors compute for one Arrow batch,
    here, with ``module`` itself: the predictions (double), then the probabilities and the raw
    outputs (array<float>) when asked for. ``arrays`` are the columns ``names`` (see
    :func:`input_names`). Raises DataError for bad input, as transform does."""
    plan = _Plan(
        ShippedModule("local"),
        tuple(names),
        expected_dim,
        classification,
        batch_size,
        with_probability,
        device,
        tuple(inputs),
        transform if inputs else None,
        with_raw,
    )
    return _Predictor(plan, module)(arrays)
