"""Training knobs over 2 gloo ranks: accumulation equals a double batch and halves the bytes
per row; AUC over ranks equals scikit-learn's on all predictions; every strategy takes
clipping, accumulation, bf16 and a schedule."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import sparkdl
from sparkdl.config import ModelSpec, OptimConfig, SyncConfig, TrainSpec
from sparkdl.data.manifest import write_dataset
from sparkdl.train.worker import train

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

ROWS_PER_SHARD, FEATURES = 32, 5


def _dataset(path) -> str:
    rng = np.random.default_rng(7)
    shards = []
    for _ in range(2):
        x = rng.normal(size=(ROWS_PER_SHARD, FEATURES)).astype(np.float32)
        y = (x @ np.arange(1, FEATURES + 1, dtype=np.float32) > 0).astype(np.int64)
        shards.append(pa.table({"features": pa.array(list(x), pa.list_(pa.float32())), "label": y}))
    write_dataset(str(path), shards, feature_cols=["features"], label_col="label")
    return str(path)


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _spec(dataset, run_dir, strategy="allreduce", options=None, **optim) -> TrainSpec:
    settings = {
        "optimizer": "sgd",
        "learning_rate": 0.1,
        "batch_size": 4,
        "epochs": 1,
        "shuffle": False,
        "log_every_steps": 0,
    }
    settings.update(optim)
    return TrainSpec(
        model=ModelSpec(factory=_model),
        dataset_path=dataset,
        run_dir=str(run_dir),
        optim=OptimConfig(**settings),
        sync=SyncConfig(strategy=strategy, options=options or {}),
    )


def _run(spec):
    return sparkdl.Distributor(2, local_mode=True, timeout_s=120).run(train, spec)


def _metric(run_dir, name):
    rows = pq.read_table(os.path.join(run_dir, "metrics")).to_pandas()
    return rows[rows.name == name]["value"].tolist()


def _weights(run_dir):
    return torch.load(os.path.join(run_dir, "model", "state_dict.pt"), weights_only=True)


def test_two_accumulated_batches_equal_one_double_batch_and_halve_bytes_per_row(tmp_path):
    dataset = _dataset(tmp_path / "ds")
    _run(_spec(dataset, tmp_path / "acc", batch_size=4, accumulate_steps=2))
    _run(_spec(dataset, tmp_path / "big", batch_size=8))
    acc, big = _weights(tmp_path / "acc"), _weights(tmp_path / "big")
    for name in big:
        torch.testing.assert_close(acc[name], big[name], atol=1e-5, rtol=0)
    _run(_spec(dataset, tmp_path / "plain", batch_size=4))
    per_row = {run: _metric(tmp_path / run, "comm_bytes_per_sample")[0] for run in ("acc", "plain")}
    per_step = {run: _metric(tmp_path / run, "comm_bytes_per_step")[0] for run in ("acc", "plain")}
    assert per_row["plain"] > 0 and per_row["acc"] == pytest.approx(per_row["plain"] / 2)
    assert per_step["acc"] == pytest.approx(per_step["plain"])  # one all-reduce per step


def _auc_on_two_ranks():
    from sparkdl.train.scores import MetricSet

    rank = sparkdl.get_context().rank
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(301, 2, generator=gen)  # uneven: 151 rows on rank 0, 150 on rank 1
    labels = torch.randint(0, 2, (301,), generator=gen)
    mine = slice(0, 151) if rank == 0 else slice(151, 301)
    scores = MetricSet(("auc",), "cross_entropy", torch.device("cpu"))
    scores.update(logits[mine], labels[mine])
    return scores.compute()["auc"], logits.softmax(dim=1)[:, 1].numpy(), labels.numpy()


def test_auc_over_two_ranks_equals_scikit_learn_on_all_predictions():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    (auc0, probs, labels), (auc1, _, _) = sparkdl.Distributor(
        2, local_mode=True, timeout_s=120
    ).run(_auc_on_two_ranks)
    expected = sklearn_metrics.roc_auc_score(labels, probs)
    assert auc0 == pytest.approx(expected, abs=1e-6) and auc1 == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("strategy", "options"),
    [
        ("allreduce", {}),
        ("allreduce", {"compression": "powersgd", "powersgd_warmup_steps": 2}),
        ("local_sgd", {"sync_every": 2}),
        ("parameter_server", {}),
        ("fsdp", {"min_unit_params": 1}),
    ],
)
def test_every_strategy_takes_the_knobs(tmp_path, strategy, options):
    dataset = _dataset(tmp_path / "ds")
    schedule = (
        {} if strategy == "parameter_server" else {"lr_schedule": "cosine", "warmup_steps": 3}
    )
    spec = _spec(
        dataset,
        tmp_path / "run",
        strategy,
        options,
        grad_clip_norm=0.5,
        accumulate_steps=2,
        precision="bf16",
        metrics=["auc", "f1"],
        epochs=2,
        log_every_steps=2,
        **schedule,
    )
    results = _run(spec)
    assert [r.steps for r in results] == [8, 8]  # 8 batches per epoch → 4 steps
    norms = _metric(tmp_path / "run", "grad_norm")
    assert len(norms) == 2 and all(n > 0 for n in norms)
    assert len(_metric(tmp_path / "run", "auc")) == 2
    lrs = _metric(tmp_path / "run", "lr")
    assert lrs and (strategy == "parameter_server" or lrs[0] < lrs[1])  # warming up
    assert all(v.dtype == torch.float32 for v in _weights(tmp_path / "run").values())


def test_fsdp_clips_by_the_same_global_norm_as_ddp(tmp_path):
    dataset = _dataset(tmp_path / "ds")
    norms = {}
    for strategy, options in (("allreduce", {}), ("fsdp", {"min_unit_params": 1})):
        run = tmp_path / strategy
        _run(_spec(dataset, run, strategy, options, grad_clip_norm=0.05, log_every_steps=1))
        norms[strategy] = _metric(run, "step_grad_norm")
    assert len(norms["fsdp"]) == 8
    np.testing.assert_allclose(norms["fsdp"], norms["allreduce"], rtol=1e-5)
    assert _weights(tmp_path / "fsdp").keys() == _weights(tmp_path / "allreduce").keys()
    for name, value in _weights(tmp_path / "allreduce").items():
        torch.testing.assert_close(_weights(tmp_path / "fsdp")[name], value, atol=1e-5, rtol=0)


def test_pipeline_clips_by_the_whole_models_norm(tmp_path):
    from sparkdl.context import WorkerEnv
    from sparkdl.train.worker import run_worker

    dataset = _dataset(tmp_path / "ds")
    knobs = {"batch_size": 8, "grad_clip_norm": 0.05, "log_every_steps": 1, "lr_schedule": "cosine"}
    _run(_spec(dataset, tmp_path / "pipe", "pipeline", {"stages": 2}, **knobs))
    run_worker(_spec(dataset, tmp_path / "one", **knobs), WorkerEnv())  # one process, same rows
    norms = _metric(tmp_path / "pipe", "step_grad_norm")
    assert len(norms) == 8 and all(n > 0.05 for n in norms)
    np.testing.assert_allclose(norms, _metric(tmp_path / "one", "step_grad_norm"), rtol=1e-5)
    for name, value in _weights(tmp_path / "one").items():
        torch.testing.assert_close(_weights(tmp_path / "pipe")[name], value, atol=1e-5, rtol=0)
