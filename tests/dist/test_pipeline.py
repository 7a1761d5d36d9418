"""The pipeline strategy on gloo ranks: the same model as one process, bytes, exact resume."""

from __future__ import annotations

import functools
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

import sparkdl
from sparkdl.sync import prepare

pytestmark = pytest.mark.timeout(300)

STEPS, ROWS, FEATURES, HIDDEN, CLASSES = 4, 16, 12, 24, 5


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN),
        torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )


def _batches(replica: int) -> list:
    gen = torch.Generator().manual_seed(10 + replica)
    return [
        (
            torch.randn(ROWS, FEATURES, generator=gen),
            torch.randint(0, CLASSES, (ROWS,), generator=gen),
        )
        for _ in range(STEPS)
    ]


def _one_process(replicas: int) -> dict:
    """Plain SGD on the replicas' batches side by side (the global batch)."""
    torch.manual_seed(0)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [_batches(r) for r in range(replicas)]
    for step in range(STEPS):
        x = torch.cat([data[r][step][0] for r in range(replicas)])
        y = torch.cat([data[r][step][1] for r in range(replicas)])
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


class _WithExtraState(torch.nn.Module):
    """One child (an nn.Sequential, cut inside) and a non-tensor state entry on the root."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()
        self.vocab = {"version": 3}

    def forward(self, x):
        return self.net(x)

    def get_extra_state(self):
        return self.vocab

    def set_extra_state(self, state):
        self.vocab = state


def _pipelined(schedules: list[str]) -> dict:
    sync = prepare(
        _WithExtraState(), "pipeline", optimizer=torch.optim.SGD, stages=2, split_points=["net.4"]
    )
    out: dict = {
        "extra_state": sync.state_dict(),
        "extra_params": len(list(sync.module.parameters())),
    }
    sync.close()
    for schedule in schedules:
        torch.manual_seed(0)
        sync = prepare(
            _mlp(),
            "pipeline",
            optimizer=functools.partial(torch.optim.SGD, lr=0.1),
            stages=2,
            microbatches=4,
            schedule=schedule,
        )
        replica, replicas = sync.data_shard
        sent, losses = [], []
        for x, y in _batches(replica):
            before = sync.comm_bytes
            sync.optimizer.zero_grad()
            loss, _ = sync.train_step(x, y, torch.nn.functional.cross_entropy)
            sync.step()
            sent.append(sync.comm_bytes - before)
            losses.append(float(loss))
        with torch.no_grad():
            eval_loss, correct = sync.eval_step(
                x[:5],
                y[:5],
                torch.nn.functional.cross_entropy,
                lambda out, labels: (out.argmax(1) == labels).sum(),
            )
        out[schedule] = {
            "state": sync.state_dict(),
            "sent": sent,
            "losses": losses,
            "eval": (float(eval_loss), float(correct)),
            "stats": sync.stats(),
            "shard": (replica, replicas),
            "params": sum(p.numel() for p in sync.module.parameters()),
        }
        sync.close()
    return out


def _check_same_model(state: dict, expected: dict) -> None:
    assert set(state) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, atol=1e-5, rtol=0, msg=name)


def test_two_stages_on_two_ranks_match_one_process_for_both_schedules():
    results = sparkdl.Distributor(2, local_mode=True, timeout_s=120).run(
        _pipelined, ["gpipe", "1f1b"]
    )
    expected = _one_process(1)
    total = sum(p.numel() for p in _mlp().parameters())
    extra = results[0]["extra_state"]  # cut before net.4: 2 Linear layers on each rank
    assert extra["_extra_state"] == {"version": 3} and results[1]["extra_state"] is None
    _WithExtraState().load_state_dict(extra)
    assert [r["extra_params"] for r in results] == [4, 4]
    for schedule in ("gpipe", "1f1b"):
        chief, last = results[0][schedule], results[1][schedule]
        assert last["state"] is None
        _check_same_model(chief["state"], expected)
        assert chief["losses"] == last["losses"]  # the last stage's loss, on every stage
        assert chief["eval"] == last["eval"]
        assert chief["shard"] == last["shard"] == (0, 1)  # one replica: both read every row
        # Activations forward (stage 0) and their gradients back (stage 1): ROWS × HIDDEN fp32.
        assert chief["sent"] == last["sent"] == [ROWS * HIDDEN * 4] * STEPS
        # Each rank holds its stage only: the automatic split balances the parameters.
        assert chief["params"] + last["params"] == total
        assert max(chief["params"], last["params"]) <= 0.6 * total
        assert 0 <= chief["stats"]["bubble_fraction"] < 1


def test_two_stages_times_two_replicas_match_one_process_with_the_global_batch():
    results = sparkdl.Distributor(4, local_mode=True, timeout_s=180).run(_pipelined, ["1f1b"])
    _check_same_model(results[0]["1f1b"]["state"], _one_process(2))
    assert [r["1f1b"]["shard"] for r in results] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    for r in results:  # + the stage's gradients all-reduced over 2 replicas (sent once)
        stage = r["1f1b"]
        assert stage["sent"] == [ROWS * HIDDEN * 4 + stage["params"] * 4] * STEPS
    assert all(r["1f1b"]["state"] is None for r in results[1:])


def _dataset(path: str) -> None:
    from sparkdl.data.manifest import write_dataset

    rng = np.random.default_rng(3)
    tables = []
    for _ in range(2):
        x = rng.normal(size=(40, FEATURES)).astype(np.float32)
        y = x[:, :CLASSES].argmax(axis=1).astype(np.int64)
        tables.append(pa.table({"features": pa.array(list(x), pa.list_(pa.float32())), "y": y}))
    write_dataset(path, tables, feature_cols=["features"], label_col="y")


def _loop_runs(root: str) -> dict:
    """Through run_worker: an uninterrupted run; one that fails mid-epoch and resumes; SGD
    without shuffling (to compare against one process)."""
    from sparkdl.config import (
        CheckpointConfig,
        FaultInjection,
        ModelSpec,
        OptimConfig,
        SyncConfig,
        TrainSpec,
    )
    from sparkdl.train.worker import run_worker

    env = sparkdl.get_context().env

    def spec(name: str, optimizer: str = "adam", faults: tuple = (), shuffle: bool = True):
        return TrainSpec(
            model=ModelSpec(factory=_mlp),
            dataset_path=os.path.join(root, "ds"),
            run_dir=os.path.join(root, name),
            optim=OptimConfig(
                optimizer=optimizer,
                learning_rate=0.05,
                batch_size=8,
                epochs=2,
                shuffle=shuffle,
                log_every_steps=3,
            ),
            sync=SyncConfig(strategy="pipeline", options={"schedule": "gpipe"}),
            checkpoint=CheckpointConfig(every_epochs=0, every_steps=4, keep_last=3),
            faults=faults,
        )

    reference = run_worker(spec("reference"), env)
    # Every rank fails inside step 14 (mid-epoch 2: 10 steps per epoch); the rerun resumes
    # from step 12's checkpoint.
    faults = tuple(FaultInjection(rank=r, step=14, mode="raise") for r in range(2))
    try:
        run_worker(spec("resumed", faults=faults), env)
    except RuntimeError as exc:
        assert "fault injection" in str(exc)
    resumed = run_worker(spec("resumed"), env)
    plain = run_worker(spec("plain", optimizer="sgd", shuffle=False), env)
    return {"reference": reference, "resumed": resumed, "plain": plain}


def _plain_reference(root: str) -> dict:
    """One process, SGD over the same 8-row batches in the dataset's order, 2 epochs."""
    import pyarrow.parquet as pq

    from sparkdl.data.dataset import ShardedDataset

    dataset = ShardedDataset.load(os.path.join(root, "ds"))
    loader = dataset.loader(0, 1, batch_size=8, shuffle=False, prefetch_batches=0)
    batches = [(b[0].clone(), b[1].clone()) for b in loader]
    del pq
    torch.manual_seed(0)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.state_dict()


def test_training_loop_matches_one_process_and_resumes_mid_epoch_bit_identically(tmp_path):
    _dataset(str(tmp_path / "ds"))
    results = sparkdl.Distributor(2, local_mode=True, timeout_s=180).run(_loop_runs, str(tmp_path))
    chief = results[0]
    assert chief["reference"].steps == chief["resumed"].steps == 20
    assert chief["resumed"].resumed_from_step == 12
    assert chief["reference"].samples == 2 * 80  # each row once per epoch, counted once

    def final(name: str) -> dict:
        return torch.load(tmp_path / name / "model" / "state_dict.pt", weights_only=True)

    reference, resumed = final("reference"), final("resumed")
    assert set(reference) == set(_mlp().state_dict())
    for name, value in reference.items():
        assert torch.equal(resumed[name], value), name
    _check_same_model(final("plain"), _plain_reference(str(tmp_path)))
    # Metrics: the last stage's loss reached the chief; validation needs no split here.
    assert chief["reference"].metrics["train/loss"] > 0
