"""Training knobs at world size 1: validation, LR schedules, clipping, accumulation, precision,
metrics against scikit-learn, class weights, early stopping on a metric, exact resume."""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sparkdl.config import CheckpointConfig, FaultInjection, ModelSpec, OptimConfig, TrainSpec
from sparkdl.context import WorkerEnv
from sparkdl.data.manifest import write_dataset
from sparkdl.errors import ConfigError
from sparkdl.knobs import check_strategy_knobs
from sparkdl.train.scores import MetricSet
from sparkdl.train.stepping import ScheduleFactor, build_scheduler
from sparkdl.train.worker import run_worker

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "16"}, "precision must be one of"),
        ({"lr_schedule": "exp"}, "lr_schedule must be one of"),
        ({"lr_schedule": "cosine", "lr_schedule_options": {"gamma": 0.5}}, "keys among"),
        ({"lr_schedule": "cosine", "lr_schedule_options": {"min_lr_ratio": 2}}, "min_lr_ratio"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer ≥ 0"),
        ({"grad_clip_norm": -1.0}, "grad_clip_norm must be a number ≥ 0"),
        ({"accumulate_steps": 0}, "accumulate_steps must be an integer ≥ 1"),
        ({"weight_decay": -0.1}, "weight_decay must be a number ≥ 0"),
        ({"weight_decay": 0.1, "optimizer": lambda p: torch.optim.SGD(p, lr=0.1)}, "weight_decay"),
        ({"metrics": ["auroc"]}, "metrics must be one of"),
        ({"metrics": ["r2"]}, "metrics must be metrics that fit loss='cross_entropy'"),
        ({"metrics": "auc"}, "metrics must be a list"),
        ({"metrics": [object()]}, "torchmetrics.Metric"),
        ({"metrics": ["auc", "auc"]}, "distinct"),
        ({"early_stopping_metric": "f1"}, "early_stopping_metric must be one of"),
        ({"early_stopping_mode": "up"}, "early_stopping_mode must be one of"),
        ({"class_weights": [1.0]}, "class_weights must be a list of one finite weight"),
        ({"class_weights": [1.0, -2.0]}, "class_weights"),
        ({"loss": "mse", "class_weights": [1.0, 2.0]}, 'None unless loss is "cross_entropy"'),
    ],
)
def test_bad_knobs_are_refused_naming_them(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        OptimConfig(**kwargs)


def test_good_knobs_are_accepted():
    config = OptimConfig(
        precision="bf16",
        lr_schedule="step",
        lr_schedule_options={"step_size": 10, "gamma": 0.5},
        warmup_steps=3,
        grad_clip_norm=1.0,
        accumulate_steps=2,
        weight_decay=0.01,
        metrics=["auc", "f1"],
        early_stopping_metric="auc",
        class_weights=[1.0, 3.0],
    )
    assert config.metrics == ("auc", "f1") and config.class_weights == (1.0, 3.0)


def test_strategy_and_device_refusals_say_why():
    with pytest.raises(ConfigError, match="fp16.*needs CUDA"):
        check_strategy_knobs(OptimConfig(precision="fp16"), "allreduce", use_gpu=False)
    check_strategy_knobs(OptimConfig(precision="fp16"), "allreduce", use_gpu=True)
    with pytest.raises(ConfigError, match="asynchronously"):
        check_strategy_knobs(OptimConfig(lr_schedule="cosine"), "parameter_server", use_gpu=False)
    check_strategy_knobs(OptimConfig(grad_clip_norm=1.0), "parameter_server", use_gpu=False)


# ---------------------------------------------------------------------------- schedules


def test_cosine_with_warmup_follows_the_formula():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    config = OptimConfig(
        lr_schedule="cosine", warmup_steps=4, lr_schedule_options={"min_lr_ratio": 0.1}
    )
    scheduler = build_scheduler(config, optimizer, total_steps=20)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for t, lr in enumerate(seen):
        if t < 4:
            expected = 0.1 * t / 4
        else:
            cos = 0.5 * (1 + math.cos(math.pi * (t - 4) / 16))
            expected = 0.1 * (0.1 + 0.9 * cos)
        assert lr == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_linear_step_and_constant_factors():
    linear = ScheduleFactor("linear", 0, 10, {})
    assert [linear(t) for t in (0, 5, 10)] == [1.0, 0.5, 0.0]
    step = ScheduleFactor("step", 2, 11, {"step_size": 3, "gamma": 0.5})
    assert [step(t) for t in (0, 1, 2, 4, 5, 8)] == [0.0, 0.5, 1.0, 1.0, 0.5, 0.25]
    assert build_scheduler(OptimConfig(), None, 10) is None
    calls = []

    def mine(optimizer, total):
        calls.append(total)
        return torch.optim.lr_scheduler.StepLR(optimizer, 5)

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert isinstance(
        build_scheduler(OptimConfig(lr_schedule=mine), optimizer, 7),
        torch.optim.lr_scheduler.StepLR,
    )
    assert calls == [7]


# ---------------------------------------------------------------------------- metrics vs sklearn


def test_named_metrics_match_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    logits = torch.tensor(rng.normal(size=(200, 3)), dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, 3, size=200))
    scores = MetricSet(("auc", "f1", "precision", "recall"), "cross_entropy", torch.device("cpu"))
    for rows in (slice(0, 70), slice(70, 200)):  # two batches
        scores.update(logits[rows], labels[rows])
    got = scores.compute()
    probs = logits.softmax(dim=1).numpy()
    predicted = probs.argmax(axis=1)
    assert got["auc"] == pytest.approx(
        sklearn_metrics.roc_auc_score(labels.numpy(), probs, multi_class="ovr", average="macro"),
        abs=1e-6,
    )
    assert got["f1"] == pytest.approx(
        sklearn_metrics.f1_score(labels, predicted, average="macro"), abs=1e-6
    )
    assert got["precision"] == pytest.approx(
        sklearn_metrics.precision_score(labels, predicted, average="macro"), abs=1e-6
    )
    assert got["recall"] == pytest.approx(
        sklearn_metrics.recall_score(labels, predicted, average="macro"), abs=1e-6
    )

    binary = MetricSet(("auc",), "bce_with_logits", torch.device("cpu"))
    out = torch.tensor(rng.normal(size=(50, 1)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 2, size=50), dtype=torch.float32)
    binary.update(out, y)
    assert binary.compute()["auc"] == pytest.approx(
        sklearn_metrics.roc_auc_score(y, out.reshape(-1)), abs=1e-6
    )

    regression = MetricSet(("mae", "r2", "rmse"), "mse", torch.device("cpu"))
    pred = torch.tensor(rng.normal(size=(40, 1)), dtype=torch.float32)
    target = torch.tensor(rng.normal(size=40), dtype=torch.float32)
    regression.update(pred, target)
    got = regression.compute()
    assert got["mae"] == pytest.approx(
        sklearn_metrics.mean_absolute_error(target, pred[:, 0]), abs=1e-6
    )
    assert got["r2"] == pytest.approx(sklearn_metrics.r2_score(target, pred[:, 0]), abs=1e-5)
    assert got["rmse"] == pytest.approx(
        math.sqrt(sklearn_metrics.mean_squared_error(target, pred[:, 0])), abs=1e-6
    )


def test_a_metric_instance_is_used_as_given():
    from torchmetrics.classification import MulticlassAccuracy

    scores = MetricSet(
        (MulticlassAccuracy(num_classes=2, average="micro"),), "cross_entropy", torch.device("cpu")
    )
    scores.update(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    assert scores.compute() == {"multiclassaccuracy": 0.5}


# ---------------------------------------------------------------------------- in run_worker


def _dataset(path, rows=96, classes=2):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 4)).astype(np.float32)
    y = (x.sum(axis=1) > 0).astype(np.int64) if classes == 2 else rng.integers(0, classes, rows)
    table = pa.table({"features": pa.array(list(x), pa.list_(pa.float32())), "y": y})
    write_dataset(str(path), [table], feature_cols=["features"], label_col="y")
    return str(path)


def _model():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _spec(run_dir, dataset, faults=(), checkpoint=None, **optim):
    settings = {
        "optimizer": "sgd",
        "learning_rate": 0.5,
        "batch_size": 8,
        "epochs": 2,
        "log_every_steps": 1,
        "shuffle": False,
    }
    settings.update(optim)
    return TrainSpec(
        model=ModelSpec(factory=_model),
        dataset_path=dataset,
        run_dir=str(run_dir),
        optim=OptimConfig(**settings),
        checkpoint=checkpoint or CheckpointConfig(every_epochs=0),
        faults=tuple(faults),
    )


def _metrics(run_dir):
    return pq.read_table(os.path.join(run_dir, "metrics")).to_pandas()


def _weights(run_dir):
    return torch.load(os.path.join(run_dir, "model", "state_dict.pt"), weights_only=True)


def test_recorded_lr_follows_the_cosine_schedule(tmp_path):
    dataset = _dataset(tmp_path / "ds")
    run = tmp_path / "run"
    result = run_worker(_spec(run, dataset, lr_schedule="cosine", warmup_steps=3), WorkerEnv())
    total = result.steps
    assert total == 24
    lrs = _metrics(run).query("name == 'lr'").drop_duplicates("step").set_index("step")["value"]
    assert list(lrs.index) == list(range(1, total + 1))
    for step, lr in lrs.items():
        t = step - 1  # the rate optimizer step `step` used
        factor = t / 3 if t < 3 else 0.5 * (1 + math.cos(math.pi * (t - 3) / (total - 3)))
        assert lr == pytest.approx(0.5 * factor, abs=1e-12)


def test_clipping_bounds_each_applied_update_and_records_the_norm(tmp_path):
    dataset = _dataset(tmp_path / "ds")
    run = tmp_path / "run"
    clip, lr = 0.01, 0.5
    spec = _spec(run, dataset, grad_clip_norm=clip, learning_rate=lr, epochs=1)
    before = _model_params(spec)
    result = run_worker(spec, WorkerEnv())
    after = torch.cat([v.reshape(-1) for v in _weights(run).values()])
    # SGD without momentum: each step moves the parameters by lr × the clipped gradient.
    assert float((after - before).norm()) <= result.steps * lr * clip * (1 + 1e-5)
    norms = _metrics(run).query("name == 'step_grad_norm'")["value"]
    assert len(norms) == result.steps and (norms > clip).all()  # it did clip every step
    unclipped = tmp_path / "free"
    run_worker(_spec(unclipped, dataset, learning_rate=lr, epochs=1), WorkerEnv())
    free = torch.cat([v.reshape(-1) for v in _weights(unclipped).values()])
    assert float((free - before).norm()) > 2 * result.steps * lr * clip


def _model_params(spec):
    torch.manual_seed(spec.optim.seed)
    return torch.cat([p.detach().reshape(-1) for p in spec.model.build().state_dict().values()])


def test_two_accumulated_batches_equal_one_double_batch(tmp_path):
    dataset = _dataset(tmp_path / "ds")
    run_worker(_spec(tmp_path / "acc", dataset, batch_size=4, accumulate_steps=2), WorkerEnv())
    run_worker(_spec(tmp_path / "big", dataset, batch_size=8), WorkerEnv())
    acc, big = _weights(tmp_path / "acc"), _weights(tmp_path / "big")
    for name in big:
        torch.testing.assert_close(acc[name], big[name], atol=1e-5, rtol=0)
    steps = _metrics(tmp_path / "acc").query("name == 'step_loss'")["step"]
    assert steps.max() == 24  # optimizer steps, not batches


def test_bf16_autocast_trains_and_keeps_fp32_weights(tmp_path):
    dataset = _dataset(tmp_path / "ds")
    run = tmp_path / "run"
    run_worker(_spec(run, dataset, precision="bf16", epochs=4, metrics=["auc"]), WorkerEnv())
    assert all(v.dtype == torch.float32 for v in _weights(run).values())
    rows = _metrics(run)
    losses = rows.query("name == 'loss' and split == 'train'")["value"].tolist()
    assert losses[-1] < losses[0] * 0.7
    assert rows.query("name == 'auc'")["value"].iloc[-1] > 0.9


def test_fp16_on_cpu_is_refused_on_the_worker(tmp_path):
    dataset = _dataset(tmp_path / "ds")
    with pytest.raises(ConfigError, match="fp16.*GPU"):
        run_worker(_spec(tmp_path / "run", dataset, precision="fp16"), WorkerEnv())


def test_class_weights_change_the_loss_and_a_wrong_count_is_named(tmp_path):
    dataset = _dataset(tmp_path / "ds")
    run_worker(_spec(tmp_path / "plain", dataset, epochs=1), WorkerEnv())
    run_worker(
        _spec(tmp_path / "weighted", dataset, epochs=1, class_weights=[1.0, 4.0]), WorkerEnv()
    )
    plain, weighted = _weights(tmp_path / "plain"), _weights(tmp_path / "weighted")
    assert any(not torch.equal(plain[k], weighted[k]) for k in plain)
    with pytest.raises(ConfigError, match="class_weights must hold one weight per class, got 3"):
        run_worker(_spec(tmp_path / "bad", dataset, class_weights=[1.0, 1.0, 1.0]), WorkerEnv())


def test_weight_decay_reaches_the_named_optimizer(tmp_path):
    from sparkdl.train.components import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    assert (
        build_optimizer(OptimConfig(optimizer="sgd", weight_decay=0.1), params).defaults[
            "weight_decay"
        ]
        == 0.1
    )
    assert build_optimizer(OptimConfig(optimizer="adamw"), params).defaults["weight_decay"] == 0.01


def test_resume_is_exact_with_a_scheduler_and_accumulation(tmp_path):
    dataset = _dataset(tmp_path / "ds")
    knobs = {
        "optimizer": "adam",
        "learning_rate": 0.05,
        "lr_schedule": "cosine",
        "warmup_steps": 2,
        "accumulate_steps": 2,
        "batch_size": 4,
        "grad_clip_norm": 1.0,
        "epochs": 3,
        "metrics": ["f1"],
    }
    every = CheckpointConfig(every_epochs=1, every_steps=5, keep_last=2)
    reference = run_worker(_spec(tmp_path / "ref", dataset, checkpoint=every, **knobs), WorkerEnv())
    fault = FaultInjection(rank=0, step=19, attempt=0, mode="raise")
    spec = _spec(tmp_path / "run", dataset, faults=[fault], checkpoint=every, **knobs)
    with pytest.raises(RuntimeError, match="fault injection"):
        run_worker(spec, WorkerEnv(attempt=0))
    resumed = run_worker(spec, WorkerEnv(attempt=1))
    assert resumed.resumed_from_step == 15 and resumed.steps == reference.steps == 36
    expected, got = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    ref_lr = _metrics(tmp_path / "ref").query("name == 'lr'").set_index(["step"])["value"]
    run_lr = _metrics(tmp_path / "run").query("name == 'lr'").set_index(["step"])["value"]
    assert ref_lr.equals(run_lr)


def test_early_stopping_watches_a_named_metric(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    y = (x.sum(axis=1) > 0).astype(np.int64)
    table = pa.table({"features": pa.array(list(x), pa.list_(pa.float32())), "y": y})
    write_dataset(
        str(tmp_path / "ds"),
        [table.slice(0, 90)],
        feature_cols=["features"],
        label_col="y",
        validation_shards=[table.slice(90)],
    )
    run = tmp_path / "run"
    result = run_worker(
        _spec(
            run,
            str(tmp_path / "ds"),
            epochs=6,
            early_stopping_patience=1,
            early_stopping_metric="auc",
            metrics=["auc"],
        ),
        WorkerEnv(),
    )
    aucs = _metrics(run).query("split == 'validation' and name == 'auc'")["value"].tolist()
    assert result.best_epoch == int(np.argmax(aucs))
    assert result.metrics["validation/auc"] == pytest.approx(max(aucs))


@pytest.mark.parametrize(
    ("knob", "message"),
    [
        ({"accumulate_steps": 2}, "already accumulates"),
        ({"precision": "bf16"}, "activations of the dtype"),
        ({"metrics": ["auc"]}, "only the last stage"),
    ],
)
def test_the_pipeline_refuses_what_it_cannot_honour(knob, message):
    with pytest.raises(ConfigError, match=message):
        check_strategy_knobs(OptimConfig(**knob), "pipeline", use_gpu=False)
    check_strategy_knobs(
        OptimConfig(grad_clip_norm=1.0, lr_schedule="cosine"), "pipeline", use_gpu=False
    )
