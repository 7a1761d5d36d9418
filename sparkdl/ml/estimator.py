"""[driver] TorchEstimator: fit a DataFrame with distributed torch → TorchModel.

fit validates on the driver, materializes the DataFrame into ``run_dir/data`` (or takes a
ShardedDataset), launches one barrier stage of workers running ``sparkdl.train.worker.train``,
and writes the run directory (see :mod:`sparkdl.artifacts`), plots included.

Parameters are Spark ML Params declared once in ``ESTIMATOR_PARAMS``: a row there gives the
constructor keyword, ``getXxx``/``setXxx``, ``explainParams()``, persistence and run.json's
config. A row with a ``section`` feeds that config object's field (``"optim"`` →
``OptimConfig``, ``"sync"`` → ``SyncConfig``, ``"checkpoint"`` → ``CheckpointConfig``, ``"model"``
→ ``ModelSpec``), which also validates it; a row without one is read in ``_fit`` with
``self.get(name)``. Spark Params stop here: workers get the config objects only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyspark.ml.base import Estimator
from pyspark.ml.util import MLReadable, MLWritable

from sparkdl import storage
from sparkdl.artifacts import RunDirectory
from sparkdl.columns import quote_column
from sparkdl.config import (
    CheckpointConfig,
    FaultInjection,
    ModelSpec,
    OptimConfig,
    SyncConfig,
    TrainSpec,
)
from sparkdl.data import ShardedDataset, materialize
from sparkdl.data.bad_input import read_input
from sparkdl.data.input_specs import input_columns, is_named, specs_to_json
from sparkdl.data.manifest import MANIFEST_NAME
from sparkdl.errors import ConfigError, DataError
from sparkdl.knobs import check_strategy_knobs
from sparkdl.launch.elastic import elastic_config, launch_sizes, make_sizer
from sparkdl.launch.launcher import job_description
from sparkdl.launch.progress import RunMonitor, SparkPhaseProgress
from sparkdl.ml.driver_check import check_model_on_driver
from sparkdl.ml.estimator_checks import check_estimator_values
from sparkdl.ml.model import OUTPUT_PARAMS, TorchModel, check_output_params
from sparkdl.ml.params import REQUIRED, ParamSpec, TableParams, as_dict, as_list, with_params
from sparkdl.ml.persistence import ParamsPersistence
from sparkdl.ml.tracking import FitTracker, MlflowConfig, require_mlflow
from sparkdl.rundir.model_dir import load_module, write_model_json
from sparkdl.session import spark_side
from sparkdl.train.components import is_classification

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["ESTIMATOR_PARAMS", "TorchEstimator", "TorchModel"]

log = logging.getLogger("sparkdl")

P = ParamSpec
# fmt: off
ESTIMATOR_PARAMS: tuple[ParamSpec, ...] = (
    P("model", REQUIRED, "nn.Module, zero-arg callable returning one, or 'pkg.mod:factory'",
      "model", "factory"),
    P("model_kwargs", {}, "keyword arguments for a model factory", "model", "kwargs", as_dict),
    P("feature_cols", REQUIRED, "feature columns: a list of numeric, array<numeric> or ML vector "
      "columns (one float32 [B, F] tensor, model(x)), or a dict of named inputs: model "
      "argument -> column or list of numeric columns (model(**inputs); README, Inputs)",
      convert=as_list),
    P("feature_shapes", {}, "named inputs: per-row shape of an array input, e.g. "
      "{'image': [1, 28, 28]}", convert=as_dict),
    P("max_lengths", {}, "named inputs: longest row of a variable-length array input "
      "(longer rows are truncated), e.g. {'tokens': 256}", convert=as_dict),
    P("pad_values", {}, "named inputs: what pads a variable-length array input (default 0)",
      convert=as_dict),
    P("transform_fn", None, "transform_fn(batch: dict) -> dict, run in the loader thread on "
      "every batch before the model (decoding, normalisation, augmentation); also at inference "
      "unless inference_transform_fn is set"),
    P("label_col", REQUIRED, "label column: class index (integer) or value (regression), an "
      "array<numeric> (multi-label, float32 [B, K]), or a list of columns (multi-task: a "
      "callable loss gets a tuple)", convert=as_list),
    P("sample_weight_col", "", "numeric column weighting each row's loss (named losses: "
      "normalised by the global batch's weight sum); empty: none"),
    P("run_dir", REQUIRED, "run directory on storage every executor reaches: a path (a shared "
      "mount) or a URI (hdfs://, s3://, ...)"),
    P("dataset_dir", "", "where fit materializes a DataFrame (a path or URI Spark's own "
      "filesystem can write); empty: run_dir/data"),
    P("loss", "cross_entropy", "a name in sparkdl.config.LOSSES or loss(outputs, labels)",
      "optim"),
    P("optimizer", "adam", "a name in sparkdl.config.OPTIMIZERS or optimizer(params)", "optim"),
    P("learning_rate", 1e-3, "learning rate of a named optimizer", "optim"),
    P("batch_size", 64, "rows per worker per step (global batch: × num_workers)", "optim"),
    P("epochs", 1, "passes over the training rows (fewer with early stopping)", "optim"),
    P("num_workers", 2, "barrier tasks = torch ranks: an int, or a range (min_workers, "
      "max_workers) that follows the cluster's task slots (README, Elastic training)",
      convert=as_list),
    P("elastic_wait_s", 30.0, "num_workers range: after a lost worker, seconds to wait for its "
      "slot before relaunching smaller"),
    P("elastic_grow_interval_s", 300.0, "num_workers range: least seconds between size changes "
      "before growing"),
    P("elastic_batch", "per_worker", "num_workers range: 'per_worker' (batch_size rows per "
      "worker) or 'global' (the global batch stays batch_size x max_workers)"),
    P("use_gpu", False, "one GPU per task from the task's Spark 'gpu' resources; nccl"),
    P("seed", 0, "model initialisation, validation split and per-epoch shuffle", "optim"),
    P("strategy", "allreduce", "how workers synchronize: allreduce, local_sgd, "
      "parameter_server, fsdp, pipeline", "sync"),
    P("strategy_options", {}, "the strategy's options (sparkdl.config.STRATEGY_OPTIONS)",
      "sync", "options", as_dict),
    P("validation_fraction", 0.0, "seeded fraction of rows held out for validation"),
    P("validation_col", "", "boolean column: true rows are the validation split (instead of "
      "validation_fraction); empty: none"),
    P("early_stopping_patience", 0, "stop after this many epochs without an improvement of "
      "early_stopping_metric and keep the best epoch's weights; 0: off (train every epoch, "
      "keep the last)", "optim"),
    P("early_stopping_metric", "loss", "the validation value early stopping watches: 'loss', "
      "the built-in metric (accuracy or mse) or a name in metrics", "optim"),
    P("early_stopping_mode", "auto", "min or max; auto: min for loss and errors (mse, mae, "
      "rmse), max otherwise", "optim"),
    # Training knobs: README "Training knobs".
    P("precision", "32", "'32', 'bf16' (autocast to bfloat16, CPU and GPU) or 'fp16' (autocast "
      "and a gradient scaler; GPU only); parameters and the saved model stay fp32", "optim"),
    P("lr_schedule", "constant", "constant, cosine, linear, step, or schedule(optimizer, "
      "total_steps) -> LRScheduler; stepped per optimizer step", "optim"),
    P("lr_schedule_options", {}, "cosine/linear: min_lr_ratio; step: step_size (optimizer "
      "steps), gamma", "optim", convert=as_dict),
    P("warmup_steps", 0, "optimizer steps of linear warmup from 0 to learning_rate", "optim"),
    P("grad_clip_norm", 0.0, "clip the global gradient L2 norm to this (0: off); the pre-clip "
      "norm is recorded as grad_norm", "optim"),
    P("accumulate_steps", 1, "batches whose gradients add up before one optimizer step "
      "(allreduce: no communication on the others)", "optim"),
    P("weight_decay", None, "weight decay of a named optimizer (None: its default, AdamW "
      "0.01, else 0)", "optim"),
    P("metrics", [], "extra per-epoch train/validation metrics, computed across ranks with "
      "torchmetrics: names (accuracy, auc, f1, precision, recall, mse, mae, rmse, r2) or "
      "torchmetrics.Metric instances", "optim", convert=as_list),
    P("class_weights", None, "cross_entropy/nll: one weight per class", "optim"),
    P("shuffle", True, "seeded shuffle every epoch", "optim"),
    P("log_every_steps", 50, "record the cross-rank mean loss every N steps (0: per epoch)",
      "optim"),
    P("overwrite", False, "replace an existing non-empty run_dir"),
    P("collective_timeout_s", 120.0, "process-group timeout: a dead rank fails the group"),
    P("reader", "pyarrow", "how workers read the shards: pyarrow, or petastorm", "optim"),
    # Reliability (checkpoints, restarts, bad rows, test faults): see README "Reliability".
    P("max_restarts", 3, "relaunches of the worker group after a failure (0: never)"),
    P("resume", False, "continue the run in run_dir from its latest complete checkpoint"),
    P("checkpoint_every_steps", 0, "checkpoint every N global steps (0: never by step)",
      "checkpoint", "every_steps"),
    P("checkpoint_every_epochs", 1, "checkpoint every N epochs (0: never by epoch)",
      "checkpoint", "every_epochs"),
    P("keep_last", 2, "complete checkpoints kept", "checkpoint"),
    P("on_invalid", "error", "rows with NaN/inf: 'error' refuses them, 'skip' drops them"),
    P("fault_injection", None, "deliberate failures for tests (sparkdl.config.FaultInjection)"),
    P("progress", True, "live progress bar and worker logs on the driver"),
    P("allow_unencrypted", False, "train even when the cluster enables Spark's encryption or "
      "authentication settings, although sparkdl's own traffic is not encrypted (README, "
      "Security); same as the Spark conf spark.sparkdl.allowUnencrypted=true"),
    P("driver_check", True, "before launch, build the model on the driver and run one forward "
      "and loss pass on a few training rows (CPU): shape, dtype, label and output mistakes "
      "become a ConfigError in seconds; False for models too large to build on the driver"),
    P("mlflow", False, "track the fit in MLflow (the driver logs one run: Params, metrics, "
      "run.json, plots, the model): True, or a dict with tracking_uri, experiment, run_name, "
      "log_model (README, Tracking with MLflow); needs the mlflow extra"),
    *OUTPUT_PARAMS,
)
# fmt: on


@dataclass(frozen=True)
class _Configs:
    """The config objects the Params build: what crosses to the workers."""

    model: ModelSpec
    optim: OptimConfig
    sync: SyncConfig
    checkpoint: CheckpointConfig


@with_params(ESTIMATOR_PARAMS)
class TorchEstimator(
    TableParams, Estimator[TorchModel], ParamsPersistence, MLWritable, MLReadable["TorchEstimator"]
):
    """Trains a torch model on a Spark DataFrame with ``num_workers`` barrier-mode workers.

    Keyword arguments are the Params in ``ESTIMATOR_PARAMS`` (see ``explainParams()``).
    ``model`` is an ``nn.Module``, a zero-argument callable returning one, or an import path
    ``"package.module:factory"`` (called with ``model_kwargs``). ``loss`` and ``optimizer``
    take a name (see ``sparkdl.config.LOSSES`` / ``OPTIMIZERS``) or a callable.
    ``strategy`` picks how workers synchronize ("allreduce", "local_sgd", "parameter_server",
    "fsdp", "pipeline") and ``strategy_options`` its options (``sparkdl.config.STRATEGY_OPTIONS``), e.g.
    ``strategy_options={"compression": "fp16"}``; both are validated here, on the driver.
    """

    _describe_sections = ("optim", "sync", "checkpoint")  # run.json: config.optim.loss ...

    def __init__(self, **params: Any) -> None:
        self._init_params(params)

    def _validate(self) -> None:
        values = self.values()
        check_estimator_values(values)
        check_output_params(values)
        configs = self._configs()
        sync = configs.sync
        elastic = elastic_config(values)
        if elastic is None:
            sync.check_world_size(values["num_workers"], batch_size=values["batch_size"])
        else:
            launch_sizes(elastic, sync, values["batch_size"])
        check_strategy_knobs(configs.optim, sync.strategy, use_gpu=values["use_gpu"])
        if sync.strategy == "pipeline" and values.get("sample_weight_col"):
            raise ConfigError(
                "sample_weight_col must be empty with strategy='pipeline' (its loss runs per "
                f"microbatch on the last stage), got {values['sample_weight_col']!r}. Drop the "
                "weights or use another strategy"
            )

    def _configs(self) -> _Configs:
        return _Configs(
            model=self.config("model", ModelSpec),
            optim=self.config("optim", OptimConfig),
            sync=self.config("sync", SyncConfig),
            checkpoint=self.config("checkpoint", CheckpointConfig),
        )

    # The config objects, read-only (built from the Params each time).
    model_spec = property(lambda self: self._configs().model)
    optim = property(lambda self: self._configs().optim)
    sync = property(lambda self: self._configs().sync)
    checkpoint = property(lambda self: self._configs().checkpoint)

    def copy(self, extra: dict | None = None) -> TorchEstimator:
        """A copy with ``extra`` (a param map) applied, as Spark ML's ``fit(df, params)``,
        ``fitMultiple``, ``TrainValidationSplit`` and ``CrossValidator`` make one per fit.

        When ``extra`` sets any of this estimator's params but not ``run_dir``, the copy's
        ``run_dir`` is a new subdirectory of this one named for those values
        (``<run_dir>/fit-learning_rate=0.001-<random>``): every fit keeps its own artifacts (a
        cross-validation fold and the refit of the best point too) and its TorchModel
        describes the run that produced it; ``overwrite`` never reaches a sibling's run.
        """
        that: TorchEstimator = super().copy(extra)
        own = {p.name: v for p, v in (extra or {}).items() if p.parent == self.uid}
        if own and "run_dir" not in own:
            that._assign({"run_dir": storage.join(self.get("run_dir"), fit_dir_name(own))})
        return that

    def _max_workers(self) -> int:
        """The fixed worker count, or the top of a range."""
        elastic = elastic_config(self.values())
        return elastic.max_workers if elastic else int(self.get("num_workers"))

    def _sizer(self, spark: Any, distributor: Any, elastic: Any, configs: _Configs) -> Any:
        """The elastic sizer of a ``num_workers=(min, max)`` fit, else None."""
        if elastic is None:
            return None
        side = None if distributor.local_mode else spark_side(spark)
        return make_sizer(
            side,
            elastic,
            configs.sync,
            configs.checkpoint,
            self.get("batch_size"),
            timeout_s=distributor.timeout_s,
        )

    def _distributor(self, spark: SparkSession) -> Any:
        from sparkdl.launch import Distributor

        elastic = elastic_config(self.values())
        return Distributor(
            elastic.min_workers if elastic else self.get("num_workers"),
            use_gpu=self.get("use_gpu"),
            spark=spark,
            collective_timeout_s=self.get("collective_timeout_s"),
            allow_unencrypted=self.get("allow_unencrypted"),
        )

    def _dataset(
        self, data: DataFrame | ShardedDataset, run: RunDirectory, resuming: bool = False
    ) -> ShardedDataset:
        feature_cols, label_col = self.get("feature_cols"), self.get("label_col")
        if isinstance(data, ShardedDataset):
            manifest = data.manifest
            names = [i.name for i in manifest.inputs] if manifest.inputs else None
            wanted = list(feature_cols) if is_named(feature_cols) else None
            same = names == wanted and list(manifest.feature_cols) == input_columns(feature_cols)
            labels = [label_col] if isinstance(label_col, str) else label_col
            if not same or list(manifest.label_cols) != labels:
                raise ConfigError(
                    f"feature_cols/label_col must match the dataset's, got {feature_cols}/"
                    f"{label_col!r} vs {list(manifest.feature_cols)}/{manifest.label_col!r}. "
                    "Use the columns the dataset was materialized with"
                )
            return data
        num_shards, mode = self._max_workers(), "overwrite"
        target = self.get("dataset_dir") or run.layout.data_dir
        if resuming and storage.path_exists(storage.join(target, MANIFEST_NAME)):
            # Resume on the same rows in the same order (whatever num_workers is now); "reuse"
            # refuses a DataFrame whose content or parameters differ from the run's.
            num_shards, mode = ShardedDataset.load(target).num_shards, "reuse"
        return materialize(
            data,
            target,
            feature_cols=feature_cols,
            label_col=label_col,
            num_shards=num_shards,
            seed=self.get("seed"),
            validation_fraction=self.get("validation_fraction"),
            validation_col=self.get("validation_col") or None,
            mode=mode,
            on_invalid=self.get("on_invalid"),
            sample_weight_col=self.get("sample_weight_col") or None,
            **self._named_options(),
        )

    def _named_options(self) -> dict[str, Any]:
        """feature_shapes, max_lengths, pad_values: only those set (a list of columns has none)."""
        names = ("feature_shapes", "max_lengths", "pad_values")
        return {name: self.get(name) for name in names if self.get(name)}

    def _check_validation(self, data: DataFrame | ShardedDataset) -> None:
        """Early stopping needs a validation split: say so before anything runs."""
        patience = self.get("early_stopping_patience")
        if not patience:
            return
        if isinstance(data, ShardedDataset):
            has_split = data.manifest.splits.get("validation", 0) > 0
        else:
            has_split = bool(self.get("validation_fraction") or self.get("validation_col"))
        if not has_split:
            raise ConfigError(
                f"early_stopping_patience needs a validation split, got {patience} without one. "
                "Set validation_fraction or validation_col (or materialize with one)"
            )

    def _check_split_sizes(
        self, dataset: ShardedDataset, num_workers: int, elastic: Any = None
    ) -> None:
        """Right after the dataset is written, before any worker starts: every worker must get
        at least one full training batch per epoch, and early stopping needs validation rows.
        (A validation split smaller than num_workers or than one batch is fine: ranks without
        rows add nothing to its sums.)"""
        rows, batch = dataset.num_rows, self.get("batch_size")
        if elastic is not None:
            batch = elastic.per_worker_batch(batch, num_workers)
        if rows < num_workers:
            raise DataError(
                f"training rows must be at least num_workers, got {rows} rows for "
                f"{num_workers} workers. Use fewer workers or more data"
            )
        if dataset.steps_per_epoch(num_workers, batch) == 0:
            per_worker = rows // num_workers
            raise DataError(
                f"batch_size must be at most the training rows each worker gets ({rows} rows / "
                f"{num_workers} workers = {per_worker}), got {batch}: no worker would get one "
                f"full batch. Use batch_size={max(1, per_worker)} or fewer workers"
            )
        if self.get("early_stopping_patience") and not dataset.num_rows_of("validation"):
            raise DataError(
                "the validation split must have rows for early stopping, got 0 rows. Raise "
                "validation_fraction, or mark more rows in validation_col"
            )

    def _check_labels(self, data: DataFrame | ShardedDataset) -> None:
        """Class-index losses need whole, non-negative labels: refuse others before launch.

        A double label column (what ``StringIndexer`` makes) with whole values trains as int64
        class indices; a fractional or negative value is a DataError naming the column and an
        example, found with one small Spark job (or, for a ShardedDataset, a pyarrow scan of its
        label column).
        """
        if not is_classification(self._configs().optim):
            return
        label = self.get("label_col")
        loss = self.get("loss")
        if isinstance(label, list):
            if len(label) > 1:
                return  # a callable loss (checked in _validate): its labels are its own
            label = label[0]
        if isinstance(data, ShardedDataset):
            bad = _bad_class_label_in_dataset(data)
        else:
            bad = _bad_class_label_in_frame(data, label)
        if bad is not None:
            raise DataError(
                f"label column {label!r} must hold class indices (whole numbers ≥ 0) for "
                f"loss={loss!r}, got the value {bad!r}. Index the classes first (e.g. "
                "pyspark.ml.feature.StringIndexer), or use a regression loss such as 'mse'"
            )

    def _fit(self, dataset: DataFrame | ShardedDataset) -> TorchModel:
        """Train on ``dataset`` (a DataFrame, or a ShardedDataset already materialized)."""
        from pyspark.sql import SparkSession

        from sparkdl.launch.restarts import run_with_restarts
        from sparkdl.train.worker import train

        data = dataset
        self._validate()  # fit(df, params) fits a copy whose extra params were not checked
        if MlflowConfig.coerce(self.get("mlflow")) is not None:
            require_mlflow()
        configs = self._configs()
        self._check_validation(data)
        self._check_labels(data)
        spark = (
            SparkSession.getActiveSession()
            if isinstance(data, ShardedDataset)
            else data.sparkSession
        )
        if spark is None:
            raise ConfigError(
                "a SparkSession must be active to fit. Create one with SparkSession.builder"
            )
        elastic = elastic_config(self.values())
        num_workers = self._max_workers()
        distributor = self._distributor(spark)
        distributor.check()  # slots, dynamic allocation, GPUs: before anything is written
        sizer = self._sizer(spark, distributor, elastic, configs)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        run = RunDirectory(self.get("run_dir"))
        resuming = run.prepare(overwrite=self.get("overwrite"), resume=self.get("resume"))
        run.start(self.describe(), world_size=num_workers)
        tracker = FitTracker.start(self.get("mlflow"), estimator=self, run=run)
        run_name = run.layout.name
        try:
            phase = job_description(run_name, "materialize")
            side = spark_side(spark)
            with (
                side.job_phase(phase) as group,
                SparkPhaseProgress(
                    side,
                    group,
                    f"{run_name}: materialize",
                    enabled=self.get("progress"),
                ),
            ):
                dataset = self._dataset(data, run, resuming)
            timings["materialize_s"] = time.perf_counter() - start
            self._check_split_sizes(dataset, num_workers, elastic)
            if self.get("driver_check"):
                check_model_on_driver(
                    configs,
                    dataset,
                    self.get("feature_cols"),
                    self.get("transform_fn"),
                    num_workers=elastic.min_workers if elastic else num_workers,
                )
            spec = TrainSpec(
                model=configs.model,
                dataset_path=dataset.path,
                run_dir=run.path,
                optim=configs.optim,
                sync=configs.sync,
                checkpoint=configs.checkpoint,
                elastic=elastic,
                faults=FaultInjection.coerce(self.get("fault_injection")),
                transform_fn=self.get("transform_fn"),
                inference_transform_fn=self.get("inference_transform_fn"),
            )
            self._write_architecture(run, dataset, configs)
            launched = time.perf_counter()
            # Workers' log lines and progress come to the driver: shown live, kept in logs/.
            results, attempt = run_with_restarts(
                distributor,
                train,
                (spec,),
                run_dir=run.path,
                max_restarts=self.get("max_restarts"),
                first_attempt=run.next_attempt,
                on_failure=run.record_attempt,
                name=job_description(run_name, "train", f"{num_workers} workers"),
                make_monitor=lambda size: RunMonitor(
                    log_dir=run.layout.logs_dir,
                    progress=self.get("progress"),
                    name=f"{run_name} ({size} workers)" if elastic else run_name,
                ),
                feed_dir=run.layout.feed_dir,
                sizer=sizer,
                on_size=run.record_size if elastic else None,
            )
            run.record_attempt(attempt, None)
            timings["train_s"] = time.perf_counter() - launched
        except BaseException as exc:
            timings["total_s"] = time.perf_counter() - start
            run.fail(exc, timings)
            tracker.fail(run, exc)
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
                "epochs_run": chief.epochs,
                "best_epoch": chief.best_epoch,
                "last_epoch_metrics": chief.last_metrics,
            },
        )
        run.write_plots(best_epoch=chief.best_epoch)
        model = self._model(run, dataset, configs)
        tracker.finish(run, model, data, step=chief.steps)
        return model

    def _model(self, run: RunDirectory, dataset: ShardedDataset, configs: _Configs) -> TorchModel:
        hint = None if configs.model.import_path else configs.model.factory
        module = load_module(run.layout.model_dir, model=hint)
        outputs = {spec.name: self.get(spec.name) for spec in OUTPUT_PARAMS}
        outputs["inference_transform_fn"] = outputs["inference_transform_fn"] or self.get(
            "transform_fn"
        )
        named = bool(dataset.manifest.inputs)
        return TorchModel(
            module,
            classification=is_classification(configs.optim),
            feature_dim=None if named else dataset.feature_dim,
            inputs=dataset.manifest.inputs,
            run_dir=run.path,
            model_spec=configs.model,
            feature_cols=self.get("feature_cols"),
            label_col=dataset.manifest.label_col,
            **outputs,
        )

    def _write_architecture(
        self, run: RunDirectory, dataset: ShardedDataset, configs: _Configs
    ) -> None:
        from pyspark import cloudpickle

        architecture = None if configs.model.import_path else cloudpickle.dumps(configs.model)
        write_model_json(
            run.layout.model_dir,
            configs.model,
            {
                "feature_cols": self.get("feature_cols"),
                "label_col": self.get("label_col"),
                "feature_dim": dataset.feature_dim,
                "classification": is_classification(configs.optim),
                "inputs": specs_to_json(dataset.manifest.inputs),
            },
            architecture,
        )


def _bad_class_label_in_frame(df: DataFrame, label: str) -> Any:
    """A finite label value of ``df`` that is no class index (fractional, negative), or None.

    NaN/inf and a missing or non-numeric column are left to materialize, which refuses them
    (or drops them with ``on_invalid="skip"``) with its own messages.
    """
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    if label not in df.columns:
        return None
    column = F.col(quote_column(label))
    kind = df.schema[label].dataType
    if isinstance(kind, T.IntegralType):
        bad = column < 0
    elif isinstance(kind, T.FractionalType):
        finite = ~F.isnan(column) & (F.abs(column) != float("inf"))
        bad = finite & ((column < 0) | (column % 1 != 0))  # % not floor: no overflow
    else:
        return None
    row = read_input(lambda: df.filter(bad).select(column).limit(1).collect())
    return row[0][0] if row else None


def _bad_class_label_in_dataset(dataset: ShardedDataset) -> Any:
    """A finite label value of the dataset's train split that is no class index, or None."""
    import numpy as np
    import pyarrow.parquet as pq

    manifest = dataset.manifest
    fs, root = storage.resolve(dataset.path)
    for entry in manifest.files_of("train"):
        values = pq.read_table(
            storage.join(root, entry.path), columns=[manifest.label_col], filesystem=fs
        ).column(0)
        array = values.to_numpy(zero_copy_only=False).astype(np.float64)
        with np.errstate(invalid="ignore"):  # NaN/inf: left to materialize, as above
            bad = np.isfinite(array) & ((array < 0) | (array % 1 != 0))
        if bad.any():
            return float(array[bad][0])
    return None


def fit_dir_name(params: dict[str, Any]) -> str:
    """A new subdirectory name for one fit with ``params`` (a tuning grid point): the values that
    read well, then a random suffix, since a tuner fits the same point again (cross-validation
    folds, the refit of the best point) and every fit keeps its own run."""
    import re
    import uuid

    items = sorted(params.items())
    shown = "_".join(f"{k}={v}" for k, v in items if isinstance(v, (int, float, str, bool)))
    shown = re.sub(r"[^A-Za-z0-9._=+-]+", "-", shown)[:80].strip("-_")
    suffix = uuid.uuid4().hex[:8]
    return f"fit-{shown}-{suffix}" if shown else f"fit-{suffix}"
