"""[any] The training knobs' vocabulary and their checks: precision, LR schedules, metrics.

``OptimConfig.__post_init__`` calls :func:`check_knobs`, so a wrong value is a ConfigError on
the driver, naming the knob, before any task launches. The worker side lives in
``sparkdl.train.stepping`` (precision, accumulation, clipping, schedules) and
``sparkdl.train.scores`` (metrics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from sparkdl._checks import expect_choice, expect_int, expect_number, fail

__all__ = [
    "PRECISIONS",
    "LR_SCHEDULES",
    "LR_SCHEDULE_OPTIONS",
    "METRIC_NAMES",
    "CLASSIFICATION_METRICS",
    "REGRESSION_METRICS",
    "LOWER_IS_BETTER",
    "check_knobs",
    "check_strategy_knobs",
    "metric_label",
    "metric_labels",
    "early_stopping_mode",
]

PRECISIONS = ("32", "bf16", "fp16")
"""``"32"``: fp32; ``"bf16"``: autocast to bfloat16 (CPU and GPU); ``"fp16"``: autocast to
float16 with a gradient scaler (GPU only)."""

LR_SCHEDULES = ("constant", "cosine", "linear", "step")

LR_SCHEDULE_OPTIONS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "cosine": ("min_lr_ratio",),
    "linear": ("min_lr_ratio",),
    "step": ("step_size", "gamma"),
}
"""The keys ``lr_schedule_options`` may hold for each named schedule."""

CLASSIFICATION_METRICS = ("accuracy", "auc", "f1", "precision", "recall")
REGRESSION_METRICS = ("mse", "mae", "rmse", "r2")
METRIC_NAMES = CLASSIFICATION_METRICS + REGRESSION_METRICS
"""Metrics by name (computed with torchmetrics, synchronized across ranks)."""

LOWER_IS_BETTER = ("loss", "mse", "mae", "rmse")

_CLASSIFICATION_LOSSES = ("cross_entropy", "nll", "bce_with_logits")
_REGRESSION_LOSSES = ("mse", "l1", "smooth_l1")


def metric_label(metric: Any) -> str:
    """The name a metric is recorded under: the name itself, or a torchmetrics instance's class
    name in lower case (``BinaryAUROC()`` → ``"binaryauroc"``)."""
    return metric if isinstance(metric, str) else type(metric).__name__.lower()


def metric_labels(metrics: Sequence[Any]) -> list[str]:
    return [metric_label(m) for m in metrics]


def early_stopping_mode(metric: str, mode: str) -> str:
    """``"min"`` or ``"max"``: ``mode`` unless it is ``"auto"`` (min for losses and errors)."""
    if mode != "auto":
        return mode
    return "min" if metric in LOWER_IS_BETTER else "max"


def check_knobs(config: Any) -> None:
    """Validate an OptimConfig's knobs; ConfigError naming the first wrong one."""
    expect_choice("precision", config.precision, PRECISIONS, 'Use "32", "bf16" or "fp16"')
    _check_schedule(config)
    expect_number(
        "grad_clip_norm",
        config.grad_clip_norm,
        "Use 0 (off) or e.g. 1.0",
        at_least=0,
        below=math.inf,
    )
    expect_int("accumulate_steps", config.accumulate_steps, "Use 1 (off) or e.g. 4")
    if config.weight_decay is not None:
        expect_number(
            "weight_decay",
            config.weight_decay,
            "Use None, 0 or e.g. 0.01",
            at_least=0,
            below=math.inf,
        )
    if config.weight_decay is not None and not isinstance(config.optimizer, str):
        raise fail(
            "weight_decay",
            "None with a callable optimizer (it builds its own parameter groups)",
            config.weight_decay,
            "Pass weight_decay to your optimizer instead",
        )
    _check_metrics(config)
    _check_class_weights(config)


def check_strategy_knobs(config: Any, strategy: str, *, use_gpu: bool | None) -> None:
    """Refuse knobs a strategy or the device cannot honour, saying why (driver, and again on
    each worker for runs built without the estimator). ``use_gpu`` None: not known here."""
    if config.precision == "fp16" and use_gpu is False:
        raise fail(
            "precision",
            '"32" or "bf16" on CPU workers ("fp16" needs CUDA: its gradient scaler and '
            "float16 autocast are GPU features)",
            config.precision,
            'Use precision="bf16", or use_gpu=True',
        )
    if strategy == "pipeline":
        _check_pipeline_knobs(config)
    schedule = config.lr_schedule
    scheduled = config.warmup_steps or not (isinstance(schedule, str) and schedule == "constant")
    if strategy == "parameter_server" and scheduled:
        raise fail(
            "lr_schedule",
            '"constant" without warmup_steps under strategy="parameter_server" (the servers '
            "apply every worker's gradients asynchronously with their own optimizers, so no "
            "worker's step count defines the rate)",
            schedule if isinstance(schedule, str) else type(schedule).__name__,
            'Use lr_schedule="constant", or strategy="allreduce"',
        )


def _check_pipeline_knobs(config: Any) -> None:
    """What the pipeline strategy cannot honour, and why."""
    if config.accumulate_steps != 1:
        raise fail(
            "accumulate_steps",
            '1 under strategy="pipeline" (its schedule already accumulates gradients over '
            "microbatches before each optimizer step)",
            config.accumulate_steps,
            "Raise batch_size and strategy_options microbatches instead",
        )
    if config.precision != "32":
        raise fail(
            "precision",
            '"32" under strategy="pipeline" (the stages exchange activations of the dtype fixed '
            "when the pipeline is built; autocast would change it between microbatches)",
            config.precision,
            'Use precision="32" with the pipeline, or another strategy',
        )
    if config.metrics:
        raise fail(
            "metrics",
            'empty under strategy="pipeline" (only the last stage sees the outputs; the built-in '
            "accuracy/mse and the loss are reported)",
            list(metric_labels(config.metrics)),
            "Drop metrics, or use another strategy",
        )


def _check_schedule(config: Any) -> None:
    schedule = config.lr_schedule
    if not isinstance(schedule, str):
        if not callable(schedule):
            raise fail(
                "lr_schedule",
                f"one of {LR_SCHEDULES} or a callable (optimizer, total_steps) -> LRScheduler",
                schedule,
                'Use e.g. lr_schedule="cosine"',
            )
    else:
        expect_choice("lr_schedule", schedule, LR_SCHEDULES, 'Use e.g. lr_schedule="cosine"')
    expect_int("warmup_steps", config.warmup_steps, "Use 0 (off) or e.g. 100", low=0)
    options = config.lr_schedule_options
    if not isinstance(options, Mapping):
        raise fail("lr_schedule_options", "a dict", options, 'Use e.g. {"min_lr_ratio": 0.1}')
    allowed = LR_SCHEDULE_OPTIONS.get(schedule, ()) if isinstance(schedule, str) else ()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise fail(
            "lr_schedule_options",
            f"keys among {allowed} for lr_schedule={schedule!r}",
            dict(options),
            f"Remove {unknown}",
        )
    if "min_lr_ratio" in options:
        ratio = expect_number("min_lr_ratio", options["min_lr_ratio"], "Use e.g. 0.1", at_least=0)
        if ratio > 1:
            raise fail("min_lr_ratio", "a number in [0, 1]", ratio, "Use e.g. 0.1")
    if "step_size" in options:
        expect_int("step_size", options["step_size"], "Use e.g. 1000 (optimizer steps)")
    if "gamma" in options:
        expect_number("gamma", options["gamma"], "Use e.g. 0.1", above=0, below=math.inf)


def _check_metrics(config: Any) -> None:
    metrics = config.metrics
    if isinstance(metrics, (str, bytes)) or not isinstance(metrics, Sequence):
        raise fail("metrics", "a list of names or torchmetrics.Metric", metrics, 'Use ["auc"]')
    loss = config.loss if isinstance(config.loss, str) else None
    for metric in metrics:
        if isinstance(metric, str):
            expect_choice("metrics", metric, METRIC_NAMES, "Pick listed names")
            kind_ok = (
                loss is None
                or (metric in CLASSIFICATION_METRICS and loss in _CLASSIFICATION_LOSSES)
                or (metric in REGRESSION_METRICS and loss in _REGRESSION_LOSSES)
            )
            if not kind_ok:
                raise fail(
                    "metrics",
                    f"metrics that fit loss={loss!r}",
                    metric,
                    f"Classification metrics {CLASSIFICATION_METRICS} need a classification "
                    f"loss, regression metrics {REGRESSION_METRICS} a regression loss",
                )
        elif not all(callable(getattr(metric, a, None)) for a in ("update", "compute", "reset")):
            raise fail(
                "metrics",
                "names or torchmetrics.Metric instances",
                type(metric).__name__,
                'Use e.g. ["auc", torchmetrics.classification.BinaryF1Score()]',
            )
    labels = metric_labels(metrics)
    if len(set(labels)) != len(labels):
        raise fail("metrics", "distinct names", labels, "List each metric once")
    watched = config.early_stopping_metric
    builtin = {"cross_entropy": "accuracy", "nll": "accuracy"}.get(loss or "", "")
    builtin = builtin or ("mse" if loss in _REGRESSION_LOSSES else "")
    known = ["loss", *([builtin] if builtin else []), *labels]
    expect_choice("early_stopping_metric", watched, known, "Add it to metrics, or use 'loss'")
    expect_choice(
        "early_stopping_mode",
        config.early_stopping_mode,
        ("auto", "min", "max"),
        'Use "min", "max" or "auto" (min for loss and errors)',
    )


def _check_class_weights(config: Any) -> None:
    weights = config.class_weights
    if weights is None:
        return
    if config.loss not in ("cross_entropy", "nll"):
        raise fail(
            "class_weights",
            'None unless loss is "cross_entropy" or "nll"',
            list(weights) if isinstance(weights, Sequence) else weights,
            "Remove class_weights, or use loss='cross_entropy'",
        )
    ok = (
        isinstance(weights, Sequence)
        and not isinstance(weights, str)
        and len(weights) >= 2
        and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
            for w in weights
        )
    )
    if not ok:
        raise fail(
            "class_weights",
            "a list of one finite weight ≥ 0 per class (at least 2)",
            weights,
            "Use e.g. [1.0, 5.0] for a rare class 1",
        )
