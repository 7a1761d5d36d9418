"""[driver/executor] Batched inference over Arrow batches: a DataFrame in, predictions appended.

The module travels once per job as a broadcast of its pickled bytes and is unpickled once per
Python worker (cached by broadcast id); each Arrow batch is one (or a few) forward passes.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from sparkdl.errors import DataError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = ["features_from_arrow", "predict_dataframe"]

_MODULE_CACHE: dict[int, Any] = {}


def features_from_arrow(
    batch: pa.RecordBatch, cols: Sequence[str], expected_dim: int | None
) -> np.ndarray:
    """Columns (numeric or fixed-length arrays) of ``batch`` → float32 [rows, features], column-wise."""
    n = batch.num_rows
    parts = []
    for name in cols:
        column = batch.column(batch.schema.get_field_index(name))
        if (
            pa.types.is_list(column.type)
            or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)
        ):
            if column.null_count:
                raise DataError(
                    f"feature column {name!r} must have no nulls, got {column.null_count}. Fill or drop them"
                )
            values = column.flatten().to_numpy(zero_copy_only=False)
            if n and values.size % n:
                raise DataError(
                    f"feature column {name!r} must hold arrays of one length, got ragged arrays. Pad or fix the rows"
                )
            parts.append(values.reshape(n, -1).astype(np.float32, copy=False))
        else:
            if column.null_count:
                raise DataError(
                    f"feature column {name!r} must have no nulls, got {column.null_count}. Fill or drop them"
                )
            parts.append(
                column.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, 1)
            )
    features = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    if not features.flags.writeable:  # Arrow buffers are read-only; torch wants writable memory
        features = features.copy()
    if expected_dim is not None and n and features.shape[1] != expected_dim:
        raise DataError(
            f"feature width must be {expected_dim} (what the model was trained on), got "
            f"{features.shape[1]} from columns {list(cols)}. Pass the same feature columns as in training"
        )
    return features


def _predict_batches(
    batches: Iterator[pa.RecordBatch],
    module_bc: Any,
    cols: Sequence[str],
    expected_dim: int | None,
    classification: bool,
    batch_size: int,
    output_col: str,
    probability_col: str | None,
) -> Iterator[pa.RecordBatch]:
    import torch

    key = module_bc.id if hasattr(module_bc, "id") else id(module_bc)
    module = _MODULE_CACHE.get(key)
    if module is None:
        module = _MODULE_CACHE[key] = pickle.loads(module_bc.value).eval()
    for batch in batches:
        features = features_from_arrow(batch, cols, expected_dim)
        outputs = []
        with torch.inference_mode():
            for start in range(0, max(len(features), 1), batch_size):
                chunk = torch.from_numpy(features[start : start + batch_size])
                if len(chunk):
                    outputs.append(module(chunk).float())
        out = torch.cat(outputs) if outputs else torch.zeros((0, 1))
        arrays = dict(zip(batch.schema.names, batch.columns))
        if classification:
            arrays[output_col] = pa.array(out.argmax(dim=1).double().numpy())
            if probability_col:
                probs = torch.softmax(out, dim=1).numpy().astype(np.float32)
                arrays[probability_col] = pa.FixedSizeListArray.from_arrays(
                    pa.array(probs.reshape(-1)), probs.shape[1] if probs.ndim == 2 else 1
                ).cast(pa.list_(pa.float32()))
        else:
            arrays[output_col] = pa.array(out.reshape(len(features), -1)[:, 0].double().numpy())
        yield pa.RecordBatch.from_pydict(arrays)


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
) -> DataFrame:
    """``df`` with ``output_col`` (and ``probability_col``) appended, computed in Arrow batches."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.types import ArrayType, DoubleType, FloatType, StructField, StructType

    missing = [c for c in feature_cols if c not in df.columns]
    if missing:
        raise DataError(
            f"feature columns must exist in the DataFrame, got missing {missing} "
            f"(columns: {df.columns}). Select or rename the columns the model was trained on"
        )
    prepared = df
    for field in df.schema.fields:
        if field.name in feature_cols and isinstance(field.dataType, VectorUDT):
            prepared = prepared.withColumn(field.name, vector_to_array(field.name, "float32"))
    fields = list(prepared.schema.fields) + [StructField(output_col, DoubleType(), False)]
    if classification and probability_col:
        fields.append(StructField(probability_col, ArrayType(FloatType(), False), False))
    spark = df.sparkSession
    from pyspark import cloudpickle  # handles modules defined in notebooks and __main__

    module_bc = spark.sparkContext.broadcast(cloudpickle.dumps(module.cpu().eval()))
    cols = list(feature_cols)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        return _predict_batches(
            batches,
            module_bc,
            cols,
            expected_dim,
            classification,
            batch_size,
            output_col,
            probability_col,
        )

    return prepared.mapInArrow(run, StructType(fields))
