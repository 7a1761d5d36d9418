"""[driver] TorchEstimator / TorchModel: fit a DataFrame with distributed torch, transform with the model.

fit validates on the driver, materializes the DataFrame into ``run_dir/data`` (or takes a
ShardedDataset), launches one barrier stage of workers running ``sparkdl.train.worker.train``,
and writes the run directory (see :mod:`sparkdl.artifacts`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sparkdl.artifacts import RunDirectory
from sparkdl.config import (
    CheckpointConfig,
    FaultInjection,
    ModelSpec,
    OptimConfig,
    SyncConfig,
    TrainSpec,
)
from sparkdl.data import ShardedDataset, materialize
from sparkdl.data.materialize import check_on_invalid
from sparkdl.errors import ConfigError, DataError
from sparkdl.launch.launcher import job_description, spark_job_phase
from sparkdl.launch.progress import RunMonitor
from sparkdl.ml.inference import predict_dataframe
from sparkdl.train.components import is_classification
from sparkdl.train.model_io import ARCH_FILE, load_module, write_model_json

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["TorchEstimator", "TorchModel"]

log = logging.getLogger("sparkdl")


def _describe(value: Any) -> Any:
    """A JSON-friendly description of a config value (callables by name)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    return getattr(value, "__qualname__", None) or type(value).__name__


class TorchEstimator:
    """Trains a torch model on a Spark DataFrame with ``num_workers`` barrier-mode workers.

    ``model`` is an ``nn.Module``, a zero-argument callable returning one, or an import path
    ``"package.module:factory"`` (called with ``model_kwargs``). ``loss`` and ``optimizer``
    take a name (see ``sparkdl.config.LOSSES`` / ``OPTIMIZERS``) or a callable.
    ``strategy`` picks how workers synchronize ("allreduce", "local_sgd", "parameter_server",
    "fsdp") and ``strategy_options`` its options (``sparkdl.config.STRATEGY_OPTIONS``), e.g.
    ``strategy_options={"compression": "fp16"}``; both are validated here, on the driver.
    """

    def __init__(
        self,
        *,
        model: Any,
        feature_cols: Sequence[str],
        label_col: str,
        run_dir: str,
        loss: str | Callable[..., Any] = "cross_entropy",
        optimizer: str | Callable[..., Any] = "adam",
        learning_rate: float = 1e-3,
        batch_size: int = 64,
        epochs: int = 1,
        num_workers: int = 2,
        use_gpu: bool = False,
        seed: int = 0,
        model_kwargs: dict[str, Any] | None = None,
        strategy: str = "allreduce",
        strategy_options: dict[str, Any] | None = None,
        validation_fraction: float = 0.0,
        shuffle: bool = True,
        log_every_steps: int = 50,
        overwrite: bool = False,
        collective_timeout_s: float = 120.0,
        reader: str = "pyarrow",
        max_restarts: int = 3,
        resume: bool = False,
        checkpoint_every_steps: int = 0,
        checkpoint_every_epochs: int = 1,
        keep_last: int = 2,
        on_invalid: str = "error",
        fault_injection: Any = None,
        progress: bool = True,
    ) -> None:
        if isinstance(feature_cols, str) or not feature_cols:
            raise ConfigError(
                f"feature_cols must be a non-empty list of column names, got {feature_cols!r}. "
                'Pass e.g. feature_cols=["features"]'
            )
        if not isinstance(label_col, str) or not label_col:
            raise ConfigError(
                f"label_col must be a column name, got {label_col!r}. Pass e.g. label_col='label'"
            )
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ConfigError(
                f"num_workers must be an integer ≥ 1, got {num_workers!r}. Use e.g. num_workers=2"
            )
        if not 0.0 <= validation_fraction < 1.0:
            raise ConfigError(
                f"validation_fraction must be in [0, 1), got {validation_fraction!r}. Use e.g. 0.1"
            )
        self.model_spec = ModelSpec(factory=model, kwargs=model_kwargs or {})
        self.optim = OptimConfig(
            loss=loss,
            optimizer=optimizer,
            learning_rate=learning_rate,
            batch_size=batch_size,
            epochs=epochs,
            seed=seed,
            shuffle=shuffle,
            log_every_steps=log_every_steps,
            reader=reader,
        )
        self.sync = SyncConfig(strategy=strategy, options=strategy_options or {})
        self.sync.check_world_size(num_workers)
        # Reliability (checkpoints, restarts, bad rows, test faults): see README "Reliability".
        self.checkpoint = CheckpointConfig(
            every_epochs=checkpoint_every_epochs,
            every_steps=checkpoint_every_steps,
            keep_last=keep_last,
        )
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ConfigError(
                f"max_restarts must be an integer ≥ 0, got {max_restarts!r}. Use 0 to never restart"
            )
        self.max_restarts = max_restarts
        self.resume = bool(resume)
        self.on_invalid = check_on_invalid(on_invalid)
        self.faults = FaultInjection.coerce(fault_injection)
        self.feature_cols = list(feature_cols)
        self.label_col = label_col
        self.run_dir = run_dir
        self.num_workers = num_workers
        self.use_gpu = use_gpu
        self.validation_fraction = validation_fraction
        self.overwrite = overwrite
        self.collective_timeout_s = collective_timeout_s
        self.progress = progress

    def describe(self) -> dict[str, Any]:
        """The estimator's settings as JSON-friendly data (recorded in run.json)."""
        return {
            "model": _describe(self.model_spec.factory),
            "model_kwargs": _describe(dict(self.model_spec.kwargs)),
            "feature_cols": self.feature_cols,
            "label_col": self.label_col,
            "num_workers": self.num_workers,
            "use_gpu": self.use_gpu,
            "validation_fraction": self.validation_fraction,
            "optim": {k: _describe(v) for k, v in vars(self.optim).items()},
            "sync": {"strategy": self.sync.strategy, "options": _describe(dict(self.sync.options))},
            "checkpoint": vars(self.checkpoint),
            "max_restarts": self.max_restarts,
            "on_invalid": self.on_invalid,
        }

    def _distributor(self, spark: SparkSession) -> Any:
        from sparkdl.launch import Distributor

        return Distributor(
            self.num_workers,
            use_gpu=self.use_gpu,
            spark=spark,
            collective_timeout_s=self.collective_timeout_s,
        )

    def _dataset(
        self, data: DataFrame | ShardedDataset, run: RunDirectory, resuming: bool = False
    ) -> ShardedDataset:
        if isinstance(data, ShardedDataset):
            manifest = data.manifest
            if (
                list(manifest.feature_cols) != self.feature_cols
                or manifest.label_col != self.label_col
            ):
                raise ConfigError(
                    f"feature_cols/label_col must match the dataset's, got {self.feature_cols}/"
                    f"{self.label_col!r} vs {list(manifest.feature_cols)}/{manifest.label_col!r}. "
                    "Use the columns the dataset was materialized with"
                )
            return data
        num_shards, mode = self.num_workers, "overwrite"
        if resuming and os.path.exists(run.sub("data/_sparkdl_manifest.json")):
            # Resume on the same rows in the same order (whatever num_workers is now); "reuse"
            # refuses a DataFrame whose content or parameters differ from the run's.
            num_shards, mode = ShardedDataset.load(run.sub("data")).num_shards, "reuse"
        return materialize(
            data,
            run.sub("data"),
            feature_cols=self.feature_cols,
            label_col=self.label_col,
            num_shards=num_shards,
            seed=self.optim.seed,
            validation_fraction=self.validation_fraction,
            mode=mode,
            on_invalid=self.on_invalid,
        )

    def fit(self, data: DataFrame | ShardedDataset) -> TorchModel:
        """Train on ``data`` (a DataFrame, or a ShardedDataset already materialized)."""
        from pyspark.sql import SparkSession

        from sparkdl.launch.restarts import run_with_restarts
        from sparkdl.train.worker import train

        spark = (
            SparkSession.getActiveSession()
            if isinstance(data, ShardedDataset)
            else data.sparkSession
        )
        if spark is None:
            raise ConfigError(
                "a SparkSession must be active to fit. Create one with SparkSession.builder"
            )
        distributor = self._distributor(spark)
        distributor.check()  # slots, dynamic allocation, GPUs: before anything is written
        timings: dict[str, float] = {}
        start = time.perf_counter()
        run = RunDirectory(self.run_dir)
        resuming = run.prepare(overwrite=self.overwrite, resume=self.resume)
        run.start(self.describe(), world_size=self.num_workers)
        run_name = os.path.basename(run.path.rstrip(os.sep)) or "run"
        try:
            with spark_job_phase(spark.sparkContext, job_description(run_name, "materialize")):
                dataset = self._dataset(data, run, resuming)
            timings["materialize_s"] = time.perf_counter() - start
            if dataset.num_rows < self.num_workers:
                raise DataError(
                    f"training rows must be at least num_workers, got {dataset.num_rows} rows for "
                    f"{self.num_workers} workers. Use fewer workers or more data"
                )
            spec = TrainSpec(
                model=self.model_spec,
                dataset_path=dataset.path,
                run_dir=run.path,
                optim=self.optim,
                sync=self.sync,
                checkpoint=self.checkpoint,
                faults=self.faults,
            )
            self._write_architecture(run, dataset)
            launched = time.perf_counter()
            # Workers' log lines and progress come to the driver: shown live, kept in logs/.
            results, attempt = run_with_restarts(
                distributor,
                train,
                (spec,),
                run_dir=run.path,
                max_restarts=self.max_restarts,
                first_attempt=run.next_attempt,
                on_failure=run.record_attempt,
                name=job_description(run_name, "train", f"{self.num_workers} workers"),
                make_monitor=lambda: RunMonitor(
                    log_dir=run.sub("logs"), progress=self.progress, name=run_name
                ),
            )
            run.record_attempt(attempt, None)
            timings["train_s"] = time.perf_counter() - launched
        except BaseException as exc:
            timings["total_s"] = time.perf_counter() - start
            run.fail(exc, timings)
            raise
        timings["total_s"] = time.perf_counter() - start
        chief = results[0]
        run.finish(
            metrics=chief.metrics,
            timings=timings,
            extra={
                "steps": chief.steps,
                "samples": sum(r.samples for r in results),
                "dataset": dataset.path,
                "resumed_from_step": chief.resumed_from_step,
            },
        )
        module = load_module(run.sub("model"), model=self._rebuild_hint())
        return TorchModel(
            module,
            feature_cols=self.feature_cols,
            label_col=self.label_col,
            classification=is_classification(self.optim),
            feature_dim=dataset.feature_dim,
            run_dir=run.path,
        )

    def _rebuild_hint(self) -> Any:
        """What rebuilds the architecture on the driver without unpickling from disk."""
        return None if self.model_spec.import_path else self.model_spec.factory

    def _write_architecture(self, run: RunDirectory, dataset: ShardedDataset) -> None:
        from pyspark import cloudpickle

        model_dir = run.sub("model")
        os.makedirs(model_dir, exist_ok=True)
        if self.model_spec.import_path is None:
            with open(os.path.join(model_dir, ARCH_FILE), "wb") as fh:
                cloudpickle.dump(self.model_spec, fh)
        write_model_json(
            model_dir,
            self.model_spec,
            {
                "feature_cols": self.feature_cols,
                "label_col": self.label_col,
                "feature_dim": dataset.feature_dim,
                "classification": is_classification(self.optim),
            },
        )


class TorchModel:
    """A trained torch module with the columns it reads; ``transform(df)`` appends predictions."""

    def __init__(
        self,
        module: Any,
        *,
        feature_cols: Sequence[str],
        label_col: str | None = None,
        classification: bool = True,
        feature_dim: int | None = None,
        run_dir: str | None = None,
    ) -> None:
        self.module = module.eval()
        self.feature_cols = list(feature_cols)
        self.label_col = label_col
        self.classification = classification
        self.feature_dim = feature_dim
        self.run_dir = run_dir

    @property
    def summary(self) -> dict[str, Any]:
        """The run's run.json (status, config, versions, timings, final metrics)."""
        if self.run_dir is None:
            raise ConfigError(
                "summary needs a run_dir, got a model without one. Fit the model first"
            )
        return RunDirectory(self.run_dir).summary()

    @property
    def metrics(self) -> DataFrame:
        """Training metrics as a Spark DataFrame (epoch, step, split, name, value, wall_time)."""
        from pyspark.sql import SparkSession

        if self.run_dir is None:
            raise ConfigError(
                "metrics need a run_dir, got a model without one. Fit the model first"
            )
        spark = SparkSession.getActiveSession()
        if spark is None:
            raise ConfigError("metrics need an active SparkSession. Create one first")
        return RunDirectory(self.run_dir).metrics_df(spark)

    def transform(
        self,
        df: DataFrame,
        *,
        batch_size: int = 1024,
        output_col: str = "prediction",
        probability_col: str | None = None,
    ) -> DataFrame:
        """``df`` with ``prediction`` (class index or value) and optionally class probabilities."""
        return predict_dataframe(
            df,
            self.module,
            self.feature_cols,
            classification=self.classification,
            expected_dim=self.feature_dim,
            batch_size=batch_size,
            output_col=output_col,
            probability_col=probability_col,
        )
