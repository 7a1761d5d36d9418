"""[any] RunLayout: the one owner of a run directory's sub-paths.

A run directory (a local path or any URI :mod:`sparkdl.storage` reaches)::

    run.json            status (running → succeeded | failed), config, versions, timings,
                        metrics, attempts (one entry per launch attempt, with its error)
    data/               the materialized ShardedDataset (when fit materialized the DataFrame)
    model/              state_dict.pt (weights_only), model.json, architecture.pkl (when
                        pickled): see sparkdl.rundir.model_dir
    metrics/            Parquet rows (epoch, step, split, name, value, wall_time)
    checkpoints/        ATTEMPT (the fence) and step-<N>/{state.pt, sharded/, checkpoint.json}:
                        see sparkdl.rundir.checkpoints
    logs/               rank-<r>.log: the workers' log lines, as the driver received them
    plots/              <metric>.png per epoch (when matplotlib is installed)
    spark_model/        the TorchModel saved by jobs/train.py (Spark ML format)

The driver builds one from ``run_dir`` (normalised: a local path made absolute); workers
rebuild it from ``TrainSpec.run_dir``. Every path a run reads or writes comes from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparkdl import storage

__all__ = ["RunLayout"]


@dataclass(frozen=True)
class RunLayout:
    """Every sub-path of the run directory ``root`` (all URIs, POSIX-joined)."""

    root: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", storage.normalize_uri(self.root))

    def _sub(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def name(self) -> str:
        """The run's name: the last component of its root."""
        return self.root.rstrip("/").rsplit("/", 1)[-1] or "run"

    @property
    def run_file(self) -> str:
        return self._sub("run.json")

    @property
    def data_dir(self) -> str:
        return self._sub("data")

    @property
    def resize_request(self) -> str:
        """The driver's request that the running group stop at its next checkpoint (elastic
        grow): JSON ``{"attempt": N, "workers": M}``, read by the chief at each checkpoint."""
        return self._sub("control", "resize.json")

    @property
    def model_dir(self) -> str:
        return self._sub("model")

    @property
    def metrics_dir(self) -> str:
        return self._sub("metrics")

    @property
    def checkpoints_dir(self) -> str:
        return self._sub("checkpoints")

    @property
    def fence_file(self) -> str:
        """The attempt fence: the number of the attempt that last claimed the run."""
        return self._sub("checkpoints", "ATTEMPT")

    def checkpoint_dir(self, step: int) -> str:
        return self._sub("checkpoints", checkpoint_name(step))

    @property
    def logs_dir(self) -> str:
        return self._sub("logs")

    @property
    def feed_dir(self) -> str:
        """Workers' progress and log frames when they cannot reach the driver channel
        (``attempt-N/rank-M.json``; see :mod:`sparkdl.channel.feed`)."""
        return self._sub("logs", "feed")

    @property
    def shipped_dir(self) -> str:
        """Modules too large to travel inside a Spark Connect plan, for ``transform``."""
        return self._sub("shipped")

    @property
    def plots_dir(self) -> str:
        return self._sub("plots")

    @property
    def spark_model_dir(self) -> str:
        """Where jobs/train.py saves the TorchModel (Spark ML format) by default."""
        return self._sub("spark_model")


def checkpoint_name(step: int) -> str:
    """A checkpoint directory's name: ``step-`` and the step, zero-padded to 12 digits."""
    return f"step-{step:012d}"
