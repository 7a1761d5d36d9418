"""[driver] MLflow tracking of a fit: one MLflow run per ``fit``, logged by the driver only.

``mlflow=True`` or a dict (:class:`MlflowConfig`: ``tracking_uri``, ``experiment``,
``run_name``, ``log_model``) turns it on; workers never talk to MLflow.

Which run a fit logs into (the store: ``tracking_uri``, else MLflow's own, i.e.
``mlflow.set_tracking_uri`` or ``MLFLOW_TRACKING_URI``):

1. ``mlflow.pyspark.ml.autolog()`` is logging this very fit (its training session is this
   estimator's, by uid, and logs): the run autolog logs into, whether autolog opened it or the
   user did. One run, never a second; its params already logged by autolog are left alone.
2. Otherwise a run is active in the same store (``mlflow.start_run()`` in a notebook, or autolog
   logging an enclosing Pipeline / CrossValidator): a new run nested under it.
3. Otherwise a new run, in ``experiment`` (else the parent's, else MLflow's current one:
   ``mlflow.set_experiment``, ``MLFLOW_EXPERIMENT_NAME``).

What a run gets: every Param (callables by qualified name), tags (sparkdl version, strategy,
world size, run_dir; at the end status, attempts, restarts, the model's URI), the metrics of the
run directory's metrics files (the source of truth, already one row per step across restarts:
``train/step_loss`` per ``log_every_steps``, ``train/loss``, ``validation/accuracy``, ... per
epoch, each at its global step), run.json and the plots as artifacts, and the final model
(:mod:`sparkdl.ml.pyfunc`). Restarts stay inside the one run: they are one fit.

A tracking failure (server down, bad URI, a refused call) is a warning on the ``sparkdl``
logger and the fit goes on untracked; only a bad ``mlflow`` value (a ConfigError on the
driver, before anything runs) or a missing ``mlflow`` package stops a fit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparkdl import storage
from sparkdl.artifacts import read_metrics
from sparkdl.errors import ConfigError

if TYPE_CHECKING:
    from sparkdl.artifacts import RunDirectory
    from sparkdl.ml.model import TorchModel

__all__ = [
    "MLFLOW_KEYS",
    "FitTracker",
    "MlflowConfig",
    "metric_key",
    "metric_rows",
    "param_value",
    "require_mlflow",
]

log = logging.getLogger("sparkdl")

MLFLOW_KEYS = ("tracking_uri", "experiment", "run_name", "log_model")
EXTRA = "pip install 'sparkdl-torch[mlflow]'"
PROBE_TIMEOUT_S = 5.0
"""How long the driver waits for an http(s) tracking server's /health before it gives up."""
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_BATCH = 100  # params and tags per log_batch call (MLflow's limit); metrics: 1000


@dataclass(frozen=True, kw_only=True)
class MlflowConfig:
    """How a fit is tracked in MLflow (the ``mlflow`` Param as a dict; ``True`` = defaults)."""

    tracking_uri: str | None = None
    """The tracking store (``http://host:5000``, ``sqlite:///mlflow.db``, ``databricks``);
    None: MLflow's own (``mlflow.set_tracking_uri``, ``MLFLOW_TRACKING_URI``)."""
    experiment: str | None = None
    """Experiment name (created when missing); None: the parent run's, else MLflow's current."""
    run_name: str | None = None
    """The MLflow run's name; None: the run directory's name."""
    log_model: bool = True
    """Log the trained model (a pyfunc that predicts as ``transform``)."""

    def __post_init__(self) -> None:
        for name in ("tracking_uri", "experiment", "run_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(
                    f"mlflow[{name!r}] must be a non-empty string or None, got {value!r}. "
                    f"Pass e.g. mlflow={{{name!r}: 'digits'}}, or leave the key out"
                )
        if not isinstance(self.log_model, bool):
            raise ConfigError(
                f"mlflow['log_model'] must be True or False, got {self.log_model!r}. "
                "Pass e.g. mlflow={'log_model': False}"
            )

    @classmethod
    def coerce(cls, value: Any) -> MlflowConfig | None:
        """The config of an ``mlflow`` Param value: None for False/None (off), the defaults for
        True, else the dict's keys. ConfigError for an unknown key or a value of a wrong type."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, Mapping):
            unknown = sorted(str(k) for k in value if k not in MLFLOW_KEYS)
            if unknown:
                raise ConfigError(
                    f"mlflow keys must be among {list(MLFLOW_KEYS)}, got {unknown[0]!r}. Fix the "
                    "spelling, e.g. mlflow={'experiment': 'digits', 'run_name': 'lr-3e-3'}"
                )
            return cls(**dict(value))
        raise ConfigError(
            f"mlflow must be True, False or a dict with keys among {list(MLFLOW_KEYS)}, got "
            f"{value!r}. Pass e.g. mlflow=True or mlflow={{'experiment': 'digits'}}"
        )

    def describe(self) -> dict[str, Any]:
        """The config as logged: a tracking URI's credentials masked."""
        out = asdict(self)
        if self.tracking_uri:
            out["tracking_uri"] = redact(self.tracking_uri)
        return out


def require_mlflow() -> None:
    """ConfigError naming the extra to install when the ``mlflow`` package cannot be imported."""
    try:
        import mlflow  # noqa: F401
        import mlflow.pyfunc  # noqa: F401
        import mlflow.pytorch  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"mlflow must be importable to track a fit (the mlflow Param is set), got "
            f"ImportError: {exc}. Install the extra: {EXTRA} (or mlflow-skinny), or pass "
            "mlflow=False"
        ) from exc


def redact(uri: str) -> str:
    """``uri`` with any ``user:password@`` masked."""
    return re.sub(r"//[^/@]+@", "//***@", uri)


def param_value(value: Any) -> str:
    """A Param value as an MLflow param string: plain values as they read, lists and dicts as
    JSON, callables and classes by qualified name, modules by class, others by ``repr``."""
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, (bool, int, float)):
        text = str(value)
    elif isinstance(value, (list, tuple, Mapping)):
        text = json.dumps(_plain(value), sort_keys=isinstance(value, Mapping), default=str)
    else:
        text = _qualified(value) or repr(value)
    return text[:_MAX_PARAM_CHARS]


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return _qualified(value) or repr(value)


def _qualified(value: Any) -> str | None:
    """``module.qualname`` of a function or class; of an instance's class for a torch module."""
    import torch

    if isinstance(value, torch.nn.Module):
        target: Any = type(value)
    elif callable(value) and hasattr(value, "__qualname__"):
        target = value
    else:
        return None
    module = getattr(target, "__module__", None)
    return f"{module}.{target.__qualname__}" if module else str(target.__qualname__)


def metric_key(split: str, name: str) -> str:
    """The MLflow key of a metric row: ``split/name`` in the characters MLflow accepts."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", f"{split}/{name}")


def metric_rows(metrics_dir: str) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp in ms, step) of every metric row under ``metrics_dir``, one per
    key and step (the latest written wins), ordered by step; [] when there are none yet."""
    try:
        table = read_metrics(metrics_dir)
    except (OSError, ValueError) as exc:  # no metric files (a fit that failed early)
        log.info("sparkdl: no metrics to send to MLflow (%s)", exc)
        return []
    latest: dict[tuple[str, int], tuple[float, int]] = {}
    columns = [table.column(c).to_pylist() for c in ("split", "name", "step", "value", "wall_time")]
    for split, name, step, value, wall in zip(*columns):  # wall_time order: later rows win
        latest[(metric_key(split, name), int(step))] = (float(value), int(wall * 1000))
    rows = [(key, value, ms, step) for (key, step), (value, ms) in latest.items()]
    return sorted(rows, key=lambda row: (row[3], row[0]))


class FitTracker:
    """One fit's MLflow run; with no config (``mlflow=False``) every method does nothing.

    No method raises: a failure to reach or write the tracking store is a warning, and the fit
    carries on (untracked from there when the run could not even start).
    """

    def __init__(self, config: MlflowConfig | None) -> None:
        self.config = config
        self.uri: str | None = None
        self.run_id: str | None = None
        self.owned = False
        """True: this fit opened the run and ends it; False: autolog's (or the user's) run."""
        self.model_uri: str | None = None
        self._client: Any = None
        self._estimator_uid: str | None = None

    @classmethod
    def start(cls, value: Any, *, estimator: Any, run: RunDirectory) -> FitTracker:
        """Open (or join, see the module docstring) the fit's MLflow run and log the Params."""
        tracker = cls(MlflowConfig.coerce(value))
        tracker._estimator_uid = getattr(estimator, "uid", None)
        if tracker.config is not None and not tracker._guard("start the run", tracker._open, run):
            tracker.config = None
        if tracker.config is not None:
            tracker._guard("record the run in run.json", tracker._annotate, run)
            tracker._guard("log the params", tracker._log_params, estimator)
            tracker._guard("log the tags", tracker._log_tags, _start_tags(estimator, run))
        return tracker

    @property
    def active(self) -> bool:
        return self.config is not None and self.run_id is not None

    def finish(self, run: RunDirectory, model: TorchModel, data: Any, *, step: int) -> None:
        """After a successful fit: metrics, artifacts, end tags, the model; end an owned run."""
        if not self.active or not self._guard("reach the tracking store", self._probe):
            return
        self._log_outcome(run, "succeeded")
        assert self.config is not None
        if self.config.log_model and self._guard(
            "log the model", self._log_model, model, data, step
        ):
            self._guard("record the model in run.json", self._annotate, run)
        if self.owned:
            self._guard("end the run", self._client.set_terminated, self.run_id, "FINISHED")

    def fail(self, run: RunDirectory, error: BaseException) -> None:
        """After a failed fit: what the run directory holds, and an owned run ends FAILED."""
        if not self.active or not self._guard("reach the tracking store", self._probe):
            return
        self._guard("log the error", self._log_tags, {"sparkdl.error": type(error).__name__})
        self._log_outcome(run, "failed")
        if self.owned:
            self._guard("end the run", self._client.set_terminated, self.run_id, "FAILED")

    # --- the steps, each guarded --------------------------------------------------------------

    def _guard(self, what: str, step: Any, *args: Any) -> bool:
        """Run ``step(*args)``; on any error warn (naming ``what``) and return False."""
        try:
            step(*args)
        except Exception as exc:
            where = redact(self.uri or "MLflow's tracking URI")
            log.warning(
                "sparkdl: MLflow tracking could not %s at %s (%s: %s); the fit goes on, but "
                "this is missing from MLflow",
                what,
                where,
                type(exc).__name__,
                str(exc)[:500],
            )
            return False
        return True

    def _probe(self) -> None:
        """An http(s) store must answer within PROBE_TIMEOUT_S: MLflow's own client retries a
        dead server for minutes, which would hold up the end of a fit."""
        uri = str(self.uri)
        if not uri.startswith(("http://", "https://")):
            return
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            return  # it answered (a server without /health, or behind authentication)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConnectionError(f"no answer from {redact(uri)} ({reason})") from exc

    def _open(self, run: RunDirectory) -> None:
        import mlflow
        from mlflow import MlflowClient

        assert self.config is not None
        self.uri = self.config.tracking_uri or mlflow.get_tracking_uri()
        self._probe()
        self._client = MlflowClient(tracking_uri=self.uri)
        same_store = self.uri == mlflow.get_tracking_uri()
        active = mlflow.active_run() if same_store else None
        if active is not None and _autolog_is_logging(self._estimator_uid, active):
            self.run_id, self.owned = active.info.run_id, False
            log.info("sparkdl: logging to MLflow run %s (autolog's run for this fit)", self.run_id)
            return
        tags: dict[str, str] = {}
        if active is not None:
            tags["mlflow.parentRunId"] = active.info.run_id
        experiment_id = self._experiment_id(active, same_store)
        name = self.config.run_name or run.layout.name
        created = self._client.create_run(experiment_id, tags=_context_tags(tags), run_name=name)
        self.run_id, self.owned = created.info.run_id, True
        log.info("sparkdl: logging to MLflow run %s (%s)", self.run_id, name)

    def _annotate(self, run: RunDirectory) -> None:
        """run.json's ``mlflow``: the store, the run and (once logged) the model's URI."""
        record = {"tracking_uri": redact(str(self.uri)), "run_id": self.run_id}
        if self.model_uri:
            record["model_uri"] = self.model_uri
        run.annotate(mlflow=record)

    def _experiment_id(self, parent: Any, same_store: bool) -> str:
        assert self.config is not None
        client = self._client
        if self.config.experiment:
            found = client.get_experiment_by_name(self.config.experiment)
            if found is not None:
                return str(found.experiment_id)
            return str(client.create_experiment(self.config.experiment))
        if parent is not None:
            return str(parent.info.experiment_id)
        if same_store:
            from mlflow.tracking.fluent import _get_experiment_id

            return str(_get_experiment_id() or "0")  # mlflow.set_experiment, MLFLOW_EXPERIMENT_*
        return "0"  # MLflow's default experiment

    def _log_params(self, estimator: Any) -> None:
        from mlflow.entities import Param

        values = estimator.values()
        config = MlflowConfig.coerce(values.get("mlflow"))
        values["mlflow"] = config.describe() if config else False
        existing = {} if self.owned else self._client.get_run(self.run_id).data.params
        params = [Param(k, param_value(v)) for k, v in values.items() if k not in existing]
        for i in range(0, len(params), _BATCH):
            self._client.log_batch(self.run_id, params=params[i : i + _BATCH])

    def _log_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), _BATCH):
            self._client.log_batch(self.run_id, tags=items[i : i + _BATCH])

    def _log_outcome(self, run: RunDirectory, status: str) -> None:
        """Metrics, run.json and plots, and the end tags: what any fit leaves."""
        self._guard("log the metrics", self._log_metrics, run)
        self._guard("log run.json and the plots", self._log_artifacts, run)
        self._guard("log the tags", self._log_tags, _end_tags(run, status))

    def _log_metrics(self, run: RunDirectory) -> None:
        from mlflow.entities import Metric

        rows = [Metric(k, v, ms, step) for k, v, ms, step in metric_rows(run.layout.metrics_dir)]
        for i in range(0, len(rows), 1000):
            self._client.log_batch(self.run_id, metrics=rows[i : i + 1000])

    def _log_artifacts(self, run: RunDirectory) -> None:
        layout = run.layout
        with tempfile.TemporaryDirectory(prefix="sparkdl-mlflow-") as tmp:
            local = Path(tmp, "run.json")
            local.write_bytes(storage.read_file(layout.run_file))
            self._client.log_artifact(self.run_id, str(local))
            if not storage.path_exists(layout.plots_dir):
                return
            plots = Path(tmp, "plots")
            plots.mkdir()
            for name in storage.list_dir(layout.plots_dir):
                if name.endswith(".png"):
                    data = storage.read_file(storage.join(layout.plots_dir, name))
                    (plots / name).write_bytes(data)
            if any(plots.iterdir()):
                self._client.log_artifacts(self.run_id, str(plots), "plots")

    def _log_model(self, model: TorchModel, data: Any, step: int) -> None:
        from sparkdl.ml.pyfunc import log_torch_model

        example = None
        try:
            example = input_example(model, data)
        except Exception as exc:  # the model still goes, without an example or a signature
            log.info("sparkdl: no input example for the MLflow model (%s)", exc)
        with _global_tracking_uri(str(self.uri)):
            info = log_torch_model(model, run_id=str(self.run_id), example=example, step=step)
        self.model_uri = info.model_uri
        self._log_tags({"sparkdl.model_uri": info.model_uri})


def _start_tags(estimator: Any, run: RunDirectory) -> dict[str, Any]:
    from sparkdl.data.manifest import package_version

    return {
        "sparkdl.version": package_version(),
        "sparkdl.strategy": estimator.get("strategy"),
        "sparkdl.world_size": estimator.get("num_workers"),
        "sparkdl.run_dir": run.path,
        "sparkdl.resumed": bool(run.next_attempt) or None,
    }


def _end_tags(run: RunDirectory, status: str) -> dict[str, Any]:
    """status, and the launch attempts run.json records (a restart is one more attempt)."""
    try:
        summary = run.summary()
    except (OSError, ValueError):
        summary = {}
    attempts = summary.get("attempts", [])
    return {
        "sparkdl.status": status,
        "sparkdl.attempts": len(attempts),
        "sparkdl.restarts": sum(1 for a in attempts if a.get("error")),
        "sparkdl.resumed_from_step": summary.get("resumed_from_step"),
    }


def _context_tags(tags: dict[str, str]) -> dict[str, str]:
    """MLflow's context tags (user, source, git commit, notebook) under ``tags``, as
    ``mlflow.start_run`` adds them."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return dict(resolve_tags(tags))
    except Exception:  # a context provider failing costs the tags, not the run
        return tags


def _autolog_is_logging(estimator_uid: str | None, active: Any) -> bool:
    """True when ``mlflow.pyspark.ml.autolog()`` logs this very fit into the ``active`` run:
    autolog's innermost training session is this estimator's (fit(df, params) fits a copy with
    the same uid) and logs (a stage of an autologged Pipeline does not: its run is the
    Pipeline's). Without that (private) session API: the run carries autolog's tag."""
    try:
        from mlflow.pyspark.ml import _SparkTrainingSession

        session = _SparkTrainingSession.get_current_session()
    except (ImportError, AttributeError):
        return active.data.tags.get("mlflow.autologging") == "pyspark.ml"
    if session is None:
        return False
    uid = getattr(session.estimator, "uid", None)
    return uid is not None and uid == estimator_uid and bool(session.should_log())


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow logs a model through its global tracking URI: point it at ``uri`` for the call,
    then put back the URI and the ``MLFLOW_TRACKING_URI`` that ``set_tracking_uri`` rewrites."""
    import mlflow

    if mlflow.get_tracking_uri() == uri:
        yield
        return
    from mlflow.environment_variables import MLFLOW_TRACKING_URI
    from mlflow.tracking._tracking_service import utils

    before, variable = utils._tracking_uri, MLFLOW_TRACKING_URI.get()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # type: ignore[arg-type]  # None: back to the default
        if variable is not None:
            MLFLOW_TRACKING_URI.set(variable)


def input_example(model: TorchModel, data: Any, rows: int = 5) -> Any:
    """A pandas DataFrame of the first ``rows`` training rows' input columns, as the user's
    DataFrame has them (ML vectors as arrays); from a ShardedDataset, its stored columns (None
    when they differ from the model's)."""
    from sparkdl.data import ShardedDataset
    from sparkdl.ml.inference import input_names

    names = list(input_names(model.get("feature_cols"), model.inputs))
    if isinstance(data, ShardedDataset):
        entry = data.manifest.files_of("train")[0]
        parquet = data.open_file(entry, verify=False)
        if not set(names) <= set(parquet.schema_arrow.names):
            return None
        return parquet.read_row_group(0, columns=names).slice(0, rows).to_pandas()
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    from sparkdl.columns import quote_column

    fields = {f.name: f.dataType for f in data.schema.fields}
    columns = []
    for name in names:
        column = F.col(quote_column(name))
        if type(fields.get(name)).__name__ == "VectorUDT":
            column = vector_to_array(column, "float64")
        columns.append(column.alias(name))
    return data.select(*columns).limit(rows).toPandas()
