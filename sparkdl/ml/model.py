"""[driver] TorchModel: a trained torch module as a Spark ML Model (transform, save, load).

``transform(df)`` appends ``prediction_col`` (class index as double for classification, the
first output for regression) and, when ``probability_col`` is set, class probabilities
(array<float>), in Arrow batches (see :mod:`sparkdl.ml.inference`). ``save(path)`` writes the
Params, the weights (``state_dict.pt``, read back with ``weights_only=True``) and how to
rebuild the architecture (see :mod:`sparkdl.ml.persistence` for when pickle is involved).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pyspark.ml.base import Model
from pyspark.ml.util import MLReadable, MLWritable

from sparkdl import storage
from sparkdl._checks import expect_choice, expect_int
from sparkdl.artifacts import RunDirectory
from sparkdl.config import ModelSpec
from sparkdl.data.input_specs import InputSpec, check_feature_cols, specs_from_json, specs_to_json
from sparkdl.errors import ConfigError
from sparkdl.ml.inference import (
    DEVICES,
    ShippedModule,
    arrays_from_pandas,
    input_names,
    predict_arrays,
    predict_dataframe,
    ship_module,
)
from sparkdl.ml.params import REQUIRED, ParamSpec, TableParams, as_list, with_params
from sparkdl.ml.persistence import ParamsPersistence, untrusted_error
from sparkdl.rundir.layout import RunLayout
from sparkdl.rundir.model_dir import META_FILE, module_from_bytes, write_model_dir
from sparkdl.session import is_connect

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = ["OUTPUT_PARAMS", "TorchModel", "check_output_params"]

MODEL_DIR = "model"
"""The model directory inside a saved TorchModel (the format of sparkdl.rundir.model_dir)."""

OUTPUT_PARAMS = (
    ParamSpec(
        "prediction_col",
        "prediction",
        "output column: the class index (double) for classification, the value for regression",
    ),
    ParamSpec(
        "probability_col",
        "",
        "output column of class probabilities (array<float>, softmax of the outputs) for "
        "classification; empty: not produced",
    ),
    ParamSpec("inference_batch_size", 1024, "rows per forward pass in transform"),
    ParamSpec(
        "inference_device",
        "auto",
        "'auto' (the task's Spark GPU, else a visible CUDA device, else the CPU), 'cpu', 'cuda'",
    ),
    ParamSpec(
        "output_col",
        "",
        "output column of the model's raw output per row, flattened (array<float>): several "
        "outputs, embeddings; empty: not produced",
    ),
    ParamSpec(
        "inference_transform_fn",
        None,
        "named inputs: transform_fn(batch: dict) -> dict applied to every batch in transform "
        "(None: the estimator's transform_fn)",
    ),
)


def check_output_params(values: dict[str, Any]) -> None:
    """ConfigError for a bad prediction_col / probability_col / inference_* value."""
    for name in ("prediction_col", "probability_col", "output_col"):
        value = values.get(name)
        if not isinstance(value, str) or (name == "prediction_col" and not value):
            raise ConfigError(
                f"{name} must be a column name, got {value!r}. Pass e.g. 'prediction'"
            )
    expect_int("inference_batch_size", values.get("inference_batch_size"), "Use e.g. 1024")
    transform = values.get("inference_transform_fn")
    if transform is not None and not callable(transform):
        raise ConfigError(
            f"inference_transform_fn must be None or a function of the batch dict, got "
            f"{transform!r}. Pass e.g. inference_transform_fn=lambda batch: batch"
        )
    expect_choice("inference_device", values.get("inference_device"), DEVICES, "Use 'auto'")


@with_params(
    (
        ParamSpec(
            "feature_cols",
            REQUIRED,
            "input columns (numeric, array<numeric> or ML vector), concatenated in order; or "
            "the dict of named inputs the model was trained on",
            convert=as_list,
        ),
        ParamSpec("label_col", "label", "the label column the model was trained on"),
        *OUTPUT_PARAMS,
    )
)
class TorchModel(TableParams, Model, ParamsPersistence, MLWritable, MLReadable["TorchModel"]):
    """A trained torch module with the columns it reads; ``transform(df)`` appends predictions.

    ``module`` is the ``nn.Module``; ``classification`` picks argmax (class index) or the raw
    output as the prediction; ``feature_dim`` (when known) is checked against the input width.
    ``run_dir`` links the model to its training run (``summary``, ``metrics``).
    """

    def __init__(
        self,
        module: Any = None,
        *,
        classification: bool = True,
        feature_dim: int | None = None,
        run_dir: str | None = None,
        model_spec: ModelSpec | None = None,
        inputs: Sequence[InputSpec] = (),
        **params: Any,
    ) -> None:
        self._init_state()
        self.inputs = tuple(inputs)
        self.module = module
        self.classification = classification
        self.feature_dim = feature_dim
        self.run_dir = run_dir
        self.model_spec = model_spec
        self._init_params(params)

    def _init_state(self) -> None:
        self._module: Any = None
        self._shipped: tuple[Any, ShippedModule] | None = None
        self.classification, self.feature_dim = True, None
        self.run_dir, self.model_spec = None, None
        self.inputs = ()

    def _validate(self) -> None:
        check_output_params(self.values())
        check_feature_cols(self.get("feature_cols"))

    @property
    def module(self) -> Any:
        """The torch module; assigning a new one re-ships it on the next transform."""
        return self._module

    @module.setter
    def module(self, module: Any) -> None:
        self._module = module.eval() if module is not None else None
        self._shipped = None

    # --- results of the training run ---------------------------------------------------------

    @property
    def summary(self) -> dict[str, Any]:
        """The run's run.json (status, config, versions, timings, final metrics)."""
        return self._run().summary()

    @property
    def metrics(self) -> DataFrame:
        """Training metrics as a Spark DataFrame (epoch, step, split, name, value, wall_time)."""
        from pyspark.sql import SparkSession

        spark = SparkSession.getActiveSession()
        if spark is None:
            raise ConfigError("metrics need an active SparkSession, got none. Create one first")
        return self._run().metrics_df(spark)

    def _run(self) -> RunDirectory:
        if not self.run_dir:
            raise ConfigError(
                "run_dir must be set for a training summary or metrics, got a model without "
                "one. Use the model returned by fit (or loaded from one)"
            )
        return RunDirectory(self.run_dir)

    # --- transform ---------------------------------------------------------------------------

    def _transform(self, dataset: DataFrame) -> DataFrame:
        if self._module is None:
            raise ConfigError("module must be set to transform, got None. Pass the torch module")
        spark = dataset.sparkSession
        # a broadcast belongs to its SparkContext; on Connect, the shipment to the session
        owner = spark if is_connect(spark) else spark.sparkContext
        if self._shipped is None or self._shipped[0] is not owner:
            spill = RunLayout(self.run_dir).shipped_dir if self.run_dir else None
            self._shipped = (owner, ship_module(spark, self._module, spill_dir=spill))
        return predict_dataframe(
            dataset,
            self._shipped[1],
            self.get("feature_cols"),
            classification=self.classification,
            expected_dim=self.feature_dim,
            batch_size=self.get("inference_batch_size"),
            output_col=self.get("prediction_col"),
            probability_col=self.get("probability_col") or None,
            device=self.get("inference_device"),
            inputs=self.inputs,
            transform=self.get("inference_transform_fn"),
            raw_col=self.get("output_col") or None,
        )

    def predict_pandas(self, frame: Any) -> Any:
        """``transform`` for a pandas DataFrame, in this process (no Spark): a pandas DataFrame
        with the same index and the columns transform appends (``prediction_col``, and
        ``probability_col`` / ``output_col`` when set, as numpy arrays per row). The MLflow
        model (``mlflow=...``) predicts with it. Raises ConfigError without a module, DataError
        for a missing column or bad values (as transform does).
        """
        import pandas as pd

        if self._module is None:
            raise ConfigError("module must be set to predict, got None. Pass the torch module")
        names = input_names(self.get("feature_cols"), self.inputs)
        probability_col, raw_col = self.get("probability_col"), self.get("output_col")
        predictions, extras = predict_arrays(
            self._module,
            arrays_from_pandas(frame, names),
            names,
            classification=self.classification,
            expected_dim=self.feature_dim,
            batch_size=self.get("inference_batch_size"),
            with_probability=bool(self.classification and probability_col),
            device=self.get("inference_device"),
            inputs=self.inputs,
            transform=self.get("inference_transform_fn"),
            with_raw=bool(raw_col),
        )
        columns = {self.get("prediction_col"): predictions.to_numpy(zero_copy_only=False)}
        extra_names = [probability_col] if self.classification and probability_col else []
        for name, values in zip(extra_names + ([raw_col] if raw_col else []), extras):
            columns[name] = list(np.asarray(v, dtype=np.float32) for v in values.to_pylist())
        return pd.DataFrame(columns, index=frame.index)

    # --- persistence -------------------------------------------------------------------------

    def _extra_metadata(self) -> dict[str, Any]:
        return {
            "classification": self.classification,
            "feature_dim": self.feature_dim,
            "run_dir": self.run_dir,
            "inputs": specs_to_json(self.inputs),
        }

    def _save_data(self, root: str) -> None:
        from pyspark import cloudpickle

        if self._module is None:
            raise ConfigError("module must be set to save a TorchModel, got None")
        spec = self.model_spec or ModelSpec(factory=self._module)
        write_model_dir(
            storage.join(root, MODEL_DIR),
            self._module.state_dict(),
            spec,
            {**self._extra_metadata(), "feature_cols": self.get("feature_cols")},
            None if spec.import_path else cloudpickle.dumps(spec),
        )

    def _load_data(self, root: str, extra: dict[str, Any], trusted: bool) -> None:
        def read(name: str) -> bytes:
            return storage.read_file(storage.join(root, MODEL_DIR, name))

        meta = json.loads(read(META_FILE))
        if not meta.get("factory") and not trusted:
            raise untrusted_error(root, "a model architecture built from a Python object")
        self.module = module_from_bytes(meta, read, trust_pickle=trusted, where=root)
        self.classification = bool(extra.get("classification", True))
        self.feature_dim = extra.get("feature_dim")
        self.run_dir = extra.get("run_dir")
        self.inputs = specs_from_json(extra.get("inputs"))
        if meta.get("factory"):
            self.model_spec = ModelSpec(factory=meta["factory"], kwargs=meta.get("kwargs", {}))
