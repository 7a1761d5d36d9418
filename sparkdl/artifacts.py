"""[driver] The run directory and its Spark-facing artifacts: run.json, metrics DataFrame, plots.

The layout is :class:`sparkdl.rundir.RunLayout`'s; every file goes through
:mod:`sparkdl.storage`, so the run directory may be any URI every worker reaches (a shared
local mount, ``hdfs://``, ``s3://``, ...). run.json is rewritten whole at each status change; a
run whose status is not ``succeeded`` is not complete, whatever else the directory holds.
"""

from __future__ import annotations

import io
import json
import logging
import platform
import time
from typing import TYPE_CHECKING, Any

from sparkdl import storage
from sparkdl.errors import ConfigError
from sparkdl.rundir.checkpoints import list_complete
from sparkdl.rundir.layout import RunLayout
from sparkdl.rundir.model_dir import STATE_FILE

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["RunDirectory", "package_versions", "epoch_metrics", "plot_epochs"]

log = logging.getLogger("sparkdl")

PLOTTED = ("loss", "accuracy", "mse")


def package_versions() -> dict[str, str]:
    """Versions of the packages a run depends on, for run.json."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("sparkdl-torch", "torch", "pyspark", "pyarrow", "numpy", "pandas"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class RunDirectory:
    """One training run's directory, owned by the driver."""

    def __init__(self, path: str) -> None:
        self.layout = RunLayout(path)
        self.uri = path
        self.path = self.layout.root
        self._record: dict[str, Any] = {}

    def prepare(self, *, overwrite: bool, resume: bool = False) -> bool:
        """Create the directory; refuse a non-empty one unless ``overwrite`` (then clear it) or
        ``resume`` (then keep it, when it holds a sparkdl run). True when resuming a run.

        Raises ConfigError, before anything runs, when the location cannot be written (a bad
        bucket, missing credentials, an unreachable endpoint, a read-only mount)."""
        if overwrite and resume:
            raise ConfigError(
                "overwrite and resume must not both be set, got both True. Pass resume=True to "
                "continue the run in run_dir, or overwrite=True to start it again"
            )
        layout = self.layout
        try:
            present = storage.path_exists(layout.root)
            directory = present and storage.is_dir(layout.root)
            names = storage.list_dir(layout.root) if directory else []
        except ConfigError:
            raise
        except Exception as exc:  # unreachable endpoint, bad credentials, ...
            raise ConfigError(
                f"run_dir must be a location this driver can reach, got {layout.root!r} "
                f"({type(exc).__name__}: {exc}). Check the path or bucket, credentials and endpoint"
            ) from exc
        if present and not directory:
            raise ConfigError(
                f"run_dir must be a directory, got the file {self.path!r}. Pick another path"
            )
        resuming = False
        if names:
            if resume and storage.path_exists(layout.run_file):
                resuming = True
            elif resume:
                raise ConfigError(
                    f"run_dir must hold a sparkdl run (run.json) to resume, got {self.path!r} "
                    "without one. Choose the run's directory, or an empty one"
                )
            elif overwrite:
                storage.delete(layout.root)
            elif self._never_trained(names):
                log.info("sparkdl: replacing %s: the run there never trained a step", self.path)
                storage.delete(layout.root)
            elif not storage.path_exists(layout.run_file):
                raise ConfigError(
                    f"run_dir must be new, empty or a sparkdl run's directory, got {self.path!r} "
                    "holding other files. Choose another run_dir, or pass overwrite=True to "
                    "delete them"
                )
            else:
                resumable = bool(list_complete(layout.root))
                raise ConfigError(
                    f"run_dir must be new, empty or hold a run that never trained, got "
                    f"{self.path!r} with a run that trained. "
                    + ("Pass resume=True to continue it from its checkpoint, " if resumable else "")
                    + "Pass overwrite=True to replace it, or choose another run_dir"
                )
        storage.check_writable(layout.root, "run_dir")
        if resuming:
            try:
                self._record = self.summary()
            except (OSError, ValueError):
                self._record = {}
        return resuming

    def _never_trained(self, names: list[str]) -> bool:
        """A sparkdl run (run.json) with no weights, no metric rows and no checkpoint: a fit
        refused or failed before its first step. Such a directory never blocks a new run."""
        layout = self.layout
        if not names or not storage.path_exists(layout.run_file):
            return False
        return (
            not storage.list_dir(layout.metrics_dir)
            and not list_complete(layout.root)
            and not storage.path_exists(storage.join(layout.model_dir, STATE_FILE))
        )

    @property
    def next_attempt(self) -> int:
        """The attempt number a new launch gets (attempts count up across resumed fits)."""
        return len(self._record.get("attempts", []))

    def start(self, config: dict[str, Any], world_size: int) -> None:
        """Record the run as running (a resumed run keeps its earlier attempts)."""
        earlier = self._record.get("attempts", [])
        self._record = {
            "status": "running",
            "run_dir": self.path,
            "config": config,
            "versions": package_versions(),
            "world_size": world_size,
            "started_at": self._record.get("started_at", time.time()),
            "timings": {},
            "attempts": earlier,
            **(
                {"world_sizes": self._record["world_sizes"]}
                if earlier and "world_sizes" in self._record
                else {}
            ),
        }
        if earlier:
            self._record["resumed_at"] = time.time()
        self._write()

    def record_size(self, change: Any) -> None:
        """Record a launch's size (elastic runs): ``world_sizes`` gains ``{attempt, workers,
        start_step, why}`` and ``world_size`` becomes the current one."""
        entry = {
            "attempt": change.attempt,
            "workers": change.workers,
            "start_step": change.start_step,
            "why": change.why,
            "started_at": time.time(),
        }
        self._record.setdefault("world_sizes", []).append(entry)
        self._record["world_size"] = change.workers
        self._write()

    def record_attempt(self, attempt: int, error: BaseException | None) -> None:
        """Record how launch attempt ``attempt`` ended (None: it succeeded)."""
        entry: dict[str, Any] = {"attempt": attempt, "ended_at": time.time()}
        if error is not None:
            entry["error"] = {"type": type(error).__name__, "message": str(error)[:4000]}
        self._record.setdefault("attempts", []).append(entry)
        self._write()

    def finish(
        self, *, metrics: dict[str, float], timings: dict[str, float], extra: dict[str, Any]
    ) -> None:
        """Record success with final metrics and timings."""
        self._record.update(status="succeeded", metrics=metrics, finished_at=time.time(), **extra)
        self._record["timings"].update(timings)
        self._write()

    def annotate(self, **fields: Any) -> None:
        """Add (or replace) top-level fields of run.json, e.g. ``mlflow``: where a tracking
        server holds this run."""
        self._record.update(fields)
        self._write()

    def fail(self, error: BaseException, timings: dict[str, float]) -> None:
        """Record failure with the error's type and text."""
        self._record.update(
            status="failed",
            finished_at=time.time(),
            error={"type": type(error).__name__, "message": str(error)},
        )
        self._record.setdefault("timings", {}).update(timings)
        self._write()

    def _write(self) -> None:
        record = _with_utc(self._record)
        data = json.dumps(record, indent=2, sort_keys=True, default=str).encode()
        storage.write_file(self.layout.run_file, data)

    def summary(self) -> dict[str, Any]:
        """run.json as a dict."""
        return json.loads(storage.read_file(self.layout.run_file))

    def metrics_df(self, spark: SparkSession) -> DataFrame:
        """The metrics as a Spark DataFrame ordered by (epoch, step): epoch, step, split, name,
        value, wall_time (a timestamp).

        Spark reads them itself where its Hadoop filesystem knows the scheme; otherwise (say
        ``s3://`` on a Spark without the S3A jars) pyarrow reads them and hands them to Spark.
        """
        from pyspark.sql import functions as F

        uri = self.layout.metrics_dir
        if storage.is_local(uri):
            frame = spark.read.parquet(uri)
        else:
            try:
                frame = spark.read.parquet(uri)
            except Exception as exc:  # no Hadoop FileSystem for the scheme, or not configured
                log.info("sparkdl: Spark cannot read %s (%s); reading it with pyarrow", uri, exc)
                frame = spark.createDataFrame(read_metrics(uri).to_pandas())
        return frame.withColumn("wall_time", F.timestamp_seconds("wall_time")).orderBy(
            "epoch", "step", "split", "name"
        )

    def write_plots(self, best_epoch: int | None = None) -> list[str]:
        """PNG plots of the per-epoch metrics under plots/; the paths written."""
        try:
            rows = epoch_metrics(self.layout.metrics_dir)
        except (OSError, ValueError) as exc:  # no metrics written (e.g. a failed run)
            log.info("sparkdl: no plots, the metrics could not be read (%s)", exc)
            return []
        return plot_epochs(rows, self.layout.plots_dir, best_epoch=best_epoch)


def read_metrics(metrics_dir: str) -> Any:
    """The metric rows under ``metrics_dir`` (any URI) as a pyarrow Table, in write order."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(metrics_dir)
    return pq.read_table(path, filesystem=fs).sort_by("wall_time")


def epoch_metrics(metrics_dir: str) -> dict[str, dict[str, dict[int, float]]]:
    """{name: {split: {epoch: value}}} of the per-epoch metrics (the latest row wins)."""
    table = read_metrics(metrics_dir)
    out: dict[str, dict[str, dict[int, float]]] = {}
    columns = [table.column(c).to_pylist() for c in ("epoch", "split", "name", "value")]
    for epoch, split, name, value in zip(*columns):
        if name in PLOTTED:
            out.setdefault(name, {}).setdefault(split, {})[epoch] = value
    if "mse" in out and out.get("loss") == out["mse"]:  # loss="mse": one plot says it all
        del out["mse"]
    return out


def plot_epochs(
    rows: dict[str, dict[str, dict[int, float]]], plots_dir: str, best_epoch: int | None = None
) -> list[str]:
    """One PNG per metric under ``plots_dir`` (any URI): each split's value per epoch (epochs
    numbered from 1 on the axis), on a log scale when the values span more than two decades.

    matplotlib is imported only here (no pyplot, so the caller's backend is left alone).
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    except ImportError:
        log.info("sparkdl: matplotlib is not installed; skipping plots (pip install matplotlib)")
        return []
    written = []
    for name, splits in rows.items():
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for split, values in sorted(splits.items()):
            epochs = sorted(values)  # 1-based on the axis, like every epoch a user reads
            ax.plot([e + 1 for e in epochs], [values[e] for e in epochs], marker="o", label=split)
        if best_epoch is not None:
            kept = best_epoch + 1
            ax.axvline(kept, color="grey", linestyle="--", label=f"kept (epoch {kept})")
        if _spans_decades([v for values in splits.values() for v in values.values()]):
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(f"{name} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        path = storage.join(plots_dir, f"{name}.png")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        storage.write_file(path, buffer.getvalue())
        written.append(path)
    return written


def _spans_decades(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) > 1 and max(positive) > 100 * min(positive)


def _iso(seconds: float) -> str:
    """Unix seconds as an ISO 8601 UTC time, e.g. ``2026-11-30T06:12:54.120Z``."""
    import datetime

    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _with_utc(record: Any) -> Any:
    """``record`` with every ``*_at`` time (Unix seconds), at any depth, also in ISO 8601 UTC
    as ``*_at_utc`` (attempts, world_sizes ...)."""
    if isinstance(record, list):
        return [_with_utc(item) for item in record]
    if not isinstance(record, dict):
        return record
    out = {key: _with_utc(value) for key, value in record.items()}
    for key, value in record.items():
        if key.endswith("_at") and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{key}_utc"] = _iso(value)
    return out
