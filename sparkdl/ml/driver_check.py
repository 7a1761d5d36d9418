"""[driver] The pre-launch check: the model built on the driver and run on a few training rows.

``TorchEstimator.fit`` calls :func:`check_model_on_driver` (unless ``driver_check=False``) after
the dataset is written and before any worker starts, so a width, dtype, label or output
mistake is a ``ConfigError`` in seconds that names the batch it was found on.
"""

from __future__ import annotations

from typing import Any

from sparkdl.data.dataset import ShardedDataset
from sparkdl.errors import ConfigError

__all__ = ["check_model_on_driver"]


def check_model_on_driver(
    configs: Any,
    dataset: ShardedDataset,
    feature_cols: Any,
    transform_fn: Any = None,
    *,
    num_workers: int = 1,
) -> None:
    """Build the model on the driver's CPU and run one forward and loss pass on a few rows of
    the training split, as a worker's first step would (no process group, no optimizer step).

    Raises ConfigError naming the batch (shapes, dtypes, columns) and the model's complaint, so
    a width, dtype, label or output-type mistake surfaces before any task launches.
    ``configs`` holds the run's ``model`` (ModelSpec) and ``optim`` (OptimConfig), and
    ``sync`` (SyncConfig): with strategy="pipeline" the model is also cut into its stages
    (for ``num_workers``), which run in order must give the model's own output.
    """
    import torch

    from sparkdl.data.inputs import call_model, split_batch
    from sparkdl.train.components import build_loss, build_row_loss, metric_name, metric_sum
    from sparkdl.train.scores import MetricSet

    rows = min(4, dataset.num_rows)
    loader = dataset.loader(
        0, 1, batch_size=rows, shuffle=False, prefetch_batches=0, transform=transform_fn
    )
    features, labels, weights = split_batch(next(iter(loader)))
    batch = (
        f"a batch of {rows} rows: features {_describe(features)} from "
        f"{feature_cols!r}, labels {_describe(labels)}"
    )
    try:
        module = configs.model.build()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"the model must build on the driver for the pre-launch check, got "
            f"{type(exc).__name__}: {exc}. Fix the factory, or pass driver_check=False if it "
            "cannot build here (e.g. too large)"
        ) from exc
    module.eval()  # one small batch: no dropout, batch norm on its running statistics
    try:
        with torch.no_grad():
            outputs = call_model(module, features)
            if weights is None:
                build_loss(configs.optim)(outputs, labels)
            else:
                build_row_loss(configs.optim)(outputs, labels, weights)
            if not isinstance(labels, tuple):
                metric_sum(metric_name(configs.optim), outputs, labels)
                MetricSet(configs.optim.metrics, configs.optim.loss, torch.device("cpu")).update(
                    outputs, labels
                )
    except ConfigError as exc:
        raise ConfigError(f"{exc} (found on {batch}, before launch)") from exc
    except Exception as exc:
        raise ConfigError(
            f"the model and loss must accept the training batches, got {type(exc).__name__}: "
            f"{str(exc).strip()[:500]} on {batch} (checked on the driver before launch). Match "
            "the model's input width and output to the data and the loss; driver_check=False "
            "skips this check"
        ) from exc
    sync = getattr(configs, "sync", None)
    if sync is not None and sync.strategy == "pipeline":
        _check_pipeline(module, sync, num_workers, features, outputs, weights, labels)


def _check_pipeline(
    module: Any,
    sync: Any,
    num_workers: int,
    features: Any,
    outputs: Any,
    weights: Any,
    labels: Any,
) -> None:
    """The model cut into the pipeline's stages, run in order on the check batch."""
    import torch

    if isinstance(labels, tuple):
        raise ConfigError(
            f"label_col must be one column with strategy='pipeline' (the last stage's loss "
            f"takes the labels by microbatch), got {len(labels)} label columns. Use one label "
            "column or another strategy"
        )
    from sparkdl.sync.pipeline_split import check_split_on_batch, leftover_state, split_model

    if weights is not None:
        raise ConfigError(
            "sample_weight_col must be empty with strategy='pipeline' (its loss runs per "
            "microbatch on the last stage), got a weight column. Drop the weights or use "
            "another strategy"
        )
    options = sync.typed_options()
    stages, _ = options.resolved(num_workers)
    parts = split_model(module, stages, options.split_points)
    leftover_state(module, parts)
    with torch.no_grad():
        check_split_on_batch(module, parts, features, outputs)


def _describe(features: Any) -> str:
    """A batch's features in words: shape and dtype of each tensor (lists: their length)."""
    if isinstance(features, tuple):
        return "(" + ", ".join(_describe(f) for f in features) + ")"
    if not isinstance(features, dict):
        return f"{tuple(features.shape)} {features.dtype}"
    parts = [
        f"{k}: {tuple(v.shape)} {v.dtype}" if hasattr(v, "shape") else f"{k}: {len(v)} values"
        for k, v in features.items()
    ]
    return "{" + ", ".join(parts) + "}"
