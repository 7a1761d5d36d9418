"""Training knobs through TorchEstimator in Spark local[2]: bf16 against fp32 on digits, and a
run with a schedule, clipping, accumulation, torchmetrics metrics and early stopping on AUC."""

from __future__ import annotations

import json
import os

import pytest
from pyspark.sql import functions as F

import sparkdl
from sparkdl.errors import ConfigError

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]


def _accuracy(model, test):
    scored = model.transform(test)
    return scored.select(F.avg((F.col("prediction") == F.col("label")).cast("double"))).first()[0]


def test_bf16_trains_digits_within_a_point_of_fp32(digits, tmp_path, digits_estimator):
    train, test = digits
    fp32 = _accuracy(digits_estimator(tmp_path / "fp32").fit(train), test)
    bf16 = _accuracy(digits_estimator(tmp_path / "bf16", precision="bf16").fit(train), test)
    assert fp32 >= 0.95 and abs(bf16 - fp32) <= 0.01, (fp32, bf16)


def test_knobs_are_params_recorded_and_reach_the_metrics(digits, tmp_path, digits_estimator):
    train, _ = digits
    estimator = digits_estimator(
        tmp_path / "run",
        epochs=6,
        validation_fraction=0.2,
        lr_schedule="cosine",
        warmup_steps=5,
        grad_clip_norm=1.0,
        accumulate_steps=2,
        weight_decay=1e-4,
        metrics=["auc", "f1"],
        early_stopping_patience=2,
        early_stopping_metric="auc",
        class_weights=[1.0] * 10,
        log_every_steps=5,
    )
    assert estimator.getMetrics() == ["auc", "f1"] and estimator.getAccumulateSteps() == 2
    model = estimator.fit(train)
    rows = model.metrics.toPandas()
    names = set(rows.name)
    assert {"lr", "grad_norm", "step_grad_norm", "auc", "f1", "comm_bytes_per_sample"} <= names
    validation_auc = rows[(rows.split == "validation") & (rows.name == "auc")]["value"]
    assert len(validation_auc) >= 3 and validation_auc.max() > 0.95
    lrs = rows[rows.name == "lr"].sort_values("step")["value"].tolist()
    assert lrs[0] < lrs[1] and lrs[-1] < max(lrs)  # warmup, then decay
    with open(os.path.join(tmp_path, "run", "run.json")) as fh:
        config = json.load(fh)["config"]["optim"]
    assert config["lr_schedule"] == "cosine" and config["metrics"] == ["auc", "f1"]
    estimator.write().overwrite().save(str(tmp_path / "saved"))
    loaded = sparkdl.TorchEstimator.load(str(tmp_path / "saved"))
    assert loaded.getLrSchedule() == "cosine" and loaded.getClassWeights() == [1.0] * 10


def test_fp16_on_cpu_workers_is_refused_before_launch(digits, tmp_path, digits_estimator):
    with pytest.raises(ConfigError, match='precision must be "32" or "bf16" on CPU workers'):
        digits_estimator(tmp_path / "run", precision="fp16").fit(digits[0])
    assert not os.path.exists(tmp_path / "run" / "data")
