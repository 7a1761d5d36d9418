"""[driver/executor] The MLflow model a fit logs: torch's flavor, and a pyfunc that predicts as
``transform``.

Layout of the logged model (one MLflow model, two flavors)::

    MLmodel          flavors: pytorch (written by mlflow.pytorch.save_model) and
                     python_function (loader: this module, data: sparkdl_model)
    data/            the pytorch flavor: ``mlflow.pytorch.load_model(uri)`` gives the nn.Module
                     (pickled, so MLflow asks for MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true)
    sparkdl_model/   the TorchModel, as ``TorchModel.save`` writes it (weights read with
                     weights_only, model.json, the Params)
    input_example.json, serving_input_example.json, requirements ...

``mlflow.pyfunc.load_model(uri)`` imports this module and calls :func:`_load_pyfunc` on
``sparkdl_model/``; ``predict(pandas_df)`` (the training columns; arrays and ML vectors as
arrays per row) is :meth:`TorchModel.predict_pandas`, the same arithmetic as ``transform``'s
executors, so it gives the same predictions. Loading unpickles nothing when the model was given
as an import path (``"package.module:factory"``) and has no callable Params; otherwise it
unpickles only where MLflow allows it (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true) or inside
``with sparkdl.ml.trust_pickle():``.

The model is logged with ``mlflow.models.Model.log`` (what ``mlflow.pytorch.log_model`` calls)
and a flavor that runs ``mlflow.pytorch.save_model`` and then points the pyfunc at this module.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparkdl.ml.model import TorchModel

__all__ = ["PYFUNC_DATA", "TorchPyfunc", "log_torch_model", "requirements"]

PYFUNC_DATA = "sparkdl_model"
"""The TorchModel's directory inside the MLflow model (the pyfunc flavor's ``data``)."""


class TorchPyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(pandas_df)`` → ``transform``'s columns."""

    def __init__(self, model: TorchModel) -> None:
        self.model = model

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """A pandas DataFrame of the prediction (and probability / output) columns, with
        ``data``'s index. Raises DataError for missing columns or bad values."""
        import pandas as pd

        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
        return self.model.predict_pandas(frame)

    def get_raw_model(self) -> Any:
        """The torch module."""
        return self.model.module


def _load_pyfunc(path: str, model_config: Any = None) -> TorchPyfunc:
    """(MLflow's pyfunc loader) The TorchModel saved at ``path``, wrapped."""
    from sparkdl.ml.model import TorchModel

    return TorchPyfunc(TorchModel.load(path, trust_pickle=_mlflow_allows_pickle()))


def _mlflow_allows_pickle() -> bool:
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION
    except ImportError:  # an MLflow before the switch unpickled freely
        return True
    return bool(MLFLOW_ALLOW_PICKLE_DESERIALIZATION.get())


class _Flavor:
    """The ``flavor`` ``Model.log`` saves with: mlflow.pytorch's, plus the TorchModel and a
    python_function flavor that loads it through this module."""

    __name__ = "mlflow.pytorch"  # the logged model's flavor, as Model.log records it

    def __init__(self, model: TorchModel) -> None:
        self.model = model

    def save_model(self, path: str, mlflow_model: Any, **kwargs: Any) -> None:
        import mlflow.pyfunc
        import mlflow.pytorch

        mlflow.pytorch.save_model(
            self.model.module,
            path,
            mlflow_model=mlflow_model,
            serialization_format="pickle",  # "pt2" traces forward(): not every model exports
            **kwargs,
        )
        self.model.save(os.path.join(path, PYFUNC_DATA))
        conf = mlflow_model.flavors[mlflow.pyfunc.FLAVOR_NAME]
        conf[mlflow.pyfunc.MAIN] = _load_pyfunc.__module__
        conf[mlflow.pyfunc.DATA] = PYFUNC_DATA
        mlflow_model.save(os.path.join(path, "MLmodel"))


def requirements() -> list[str]:
    """pip requirements of the logged model (given, so MLflow does not load the model in a
    subprocess to infer them)."""
    from importlib import metadata

    import torch

    out = [f"torch=={torch.__version__.split('+')[0]}"]
    for name in ("sparkdl-torch", "pyspark", "pyarrow", "pandas"):
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return out


def _widened(example: Any) -> Any:
    """``example`` with float32 numbers (scalars and array cells) as float64: the signature then
    says double, which takes float32 and float64 input alike (predict casts to float32 itself),
    and the JSON of a serving request, whose numbers read back as float64, passes it."""
    import numpy as np

    out = example.copy()
    for name in out.columns:
        column = out[name]
        if column.dtype == np.float32:
            out[name] = column.astype(np.float64)
        elif column.dtype == object:
            out[name] = [
                v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype == np.float32 else v
                for v in column
            ]
    return out


def log_torch_model(model: TorchModel, *, run_id: str, example: Any, step: int = 0) -> Any:
    """Log ``model`` to the MLflow run ``run_id`` as ``model`` (see the module docstring), with
    ``example`` (a pandas DataFrame of training rows, or None) as its input example and the
    signature of example → predictions. Returns MLflow's ModelInfo (``model_uri``)."""
    from mlflow.models import Model, infer_signature

    from sparkdl.ml.persistence import trust_pickle

    signature = None
    if example is not None and len(example):
        example = _widened(example)
        signature = infer_signature(example, model.predict_pandas(example))
    with trust_pickle():  # MLflow loads what it just saved (ours) to check the input example
        return Model.log(
            artifact_path=None,
            name="model",
            flavor=_Flavor(model),
            run_id=run_id,
            step=step,
            signature=signature,
            input_example=example,
            pip_requirements=requirements(),
        )
