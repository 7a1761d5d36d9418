"""Sync strategies at world size 1 (no process group), their options, and their accounting."""

from __future__ import annotations

import functools
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from sparkdl.config import (
    STRATEGIES,
    AllReduceOptions,
    LocalSGDOptions,
    ModelSpec,
    OptimConfig,
    ParameterServerOptions,
    SyncConfig,
    TrainSpec,
)
from sparkdl.context import WorkerEnv
from sparkdl.data.manifest import write_dataset
from sparkdl.errors import ConfigError
from sparkdl.sync import make_strategy, prepare, wire_bytes
from sparkdl.sync.parameter_server import ShardServer, assign_shards
from sparkdl.train.worker import run_worker

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("strategy", "options", "match"),
    [
        ("gossip", {}, "strategy must be one of"),
        (
            "local_sgd",
            {"compression": "fp16"},
            "compression must be used with strategy='allreduce'",
        ),
        ("fsdp", {"compression": "powersgd"}, "compression must be used with strategy='allreduce'"),
        ("allreduce", {"compression": "zip"}, "compression must be None or one of"),
        ("allreduce", {"compression": "powersgd", "powersgd_rank": 0}, "powersgd_rank must be"),
        ("allreduce", {"compression": "powersgd", "powersgd_rank": 1.5}, "powersgd_rank must be"),
        ("allreduce", {"compression": "powersgd", "powersgd_warmup_steps": 1}, "warmup_steps"),
        ("allreduce", {"powersgd_rank": 2}, 'used with compression="powersgd"'),
        ("local_sgd", {"sync_every": 0}, "sync_every must be an integer ≥ 1, got 0"),
        ("local_sgd", {"warmup_steps": -1}, "warmup_steps must be an integer ≥ 0"),
        ("allreduce", {"sync_every": 4}, "sync_every must be used with strategy='local_sgd'"),
        ("parameter_server", {"max_staleness": -1}, "max_staleness must be an integer ≥ 0"),
        ("parameter_server", {"num_servers": 0}, "num_servers must be an integer ≥ 1"),
        ("fsdp", {"reshard_after_forward": "yes"}, "reshard_after_forward must be a bool"),
        ("allreduce", {"compresion": "fp16"}, "key 'compresion' must be one of"),
    ],
)
def test_bad_options_are_clear_config_errors(strategy, options, match):
    with pytest.raises(ConfigError, match=match):
        SyncConfig(strategy=strategy, options=options)


def test_world_size_checks_and_typed_options():
    with pytest.raises(ConfigError, match='num_workers must be ≥ 2 for strategy="fsdp"'):
        SyncConfig(strategy="fsdp").check_world_size(1)
    with pytest.raises(ConfigError, match="num_servers must be at most num_workers"):
        SyncConfig(strategy="parameter_server", options={"num_servers": 3}).check_world_size(2)
    SyncConfig(strategy="fsdp").check_world_size(2)
    assert SyncConfig().typed_options() == AllReduceOptions()
    opts = SyncConfig(strategy="local_sgd", options={"sync_every": 4}).typed_options()
    assert opts == LocalSGDOptions(sync_every=4, warmup_steps=0)
    assert SyncConfig(strategy="parameter_server").typed_options() == ParameterServerOptions()


def test_wire_bytes_follow_ring_costs():
    assert wire_bytes("all_reduce", 1000, 2) == 1000
    assert wire_bytes("all_reduce", 1000, 4) == 1500
    assert wire_bytes("all_gather", 1000, 4) == 750
    assert wire_bytes("reduce_scatter", 1000, 2) == 500
    assert wire_bytes("send", 1000, 8) == 1000
    assert wire_bytes("all_reduce", 1000, 1) == 0


def test_shards_are_balanced_whole_tensors():
    owner = assign_shards([100, 10, 60, 50, 5], 2)
    loads = [sum(s for s, o in zip([100, 10, 60, 50, 5], owner) if o == k) for k in range(2)]
    assert sorted(loads) == [110, 115] and owner[0] != owner[2]
    assert assign_shards([3, 2], 1) == [0, 0]


def test_shard_server_drops_gradients_beyond_the_staleness_bound():
    params = [torch.zeros(2)]
    server = ShardServer(params, functools.partial(torch.optim.SGD, lr=1.0), max_staleness=1)
    grad = torch.ones(2)
    assert server.handle(0, grad, computed_on=0)[:2] == (1, 0)
    assert server.handle(1, grad, computed_on=0)[:2] == (2, 1)  # one update old: applied
    version, staleness, flat = server.handle(1, grad, computed_on=0)  # two updates old: dropped
    assert (version, staleness) == (2, -1)
    assert torch.equal(flat, torch.full((2,), -2.0))
    assert server.handle(0, None, computed_on=0)[:2] == (2, 2)  # a pull applies nothing
    assert server.log == [(0, 0, 0, True), (1, 0, 1, True), (1, 0, 2, False)]


def _dataset(path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    table = pa.table({"features": pa.array(list(x), pa.list_(pa.float32())), "label": y})
    write_dataset(str(path), [table], feature_cols=["features"], label_col="label")
    return str(path)


@pytest.mark.parametrize(
    ("strategy", "options"),
    [
        ("allreduce", {}),
        ("allreduce", {"compression": "fp16"}),
        ("local_sgd", {"sync_every": 2}),
        ("parameter_server", {"max_staleness": 0}),
    ],
)
def test_world_of_one_trains_with_every_strategy(tmp_path, strategy, options):
    spec = TrainSpec(
        model=ModelSpec(factory=lambda: torch.nn.Linear(4, 2)),
        dataset_path=_dataset(tmp_path / "ds"),
        run_dir=str(tmp_path / "run"),
        optim=OptimConfig(batch_size=8, epochs=3, learning_rate=0.1, log_every_steps=4),
        sync=SyncConfig(strategy=strategy, options=options),
    )
    result = run_worker(spec, WorkerEnv())
    assert result.steps == 24 and result.comm_bytes == 0
    assert result.metrics["train/loss"] < 0.6
    assert result.metrics["train/comm_bytes_per_step"] == 0
    state = torch.load(os.path.join(result.model_dir, "state_dict.pt"), weights_only=True)
    assert set(state) == {"weight", "bias"}
    if strategy == "parameter_server":
        assert result.metrics["sync/applied"] == 24 and result.metrics["sync/staleness_max"] == 0


def test_fsdp_without_a_process_group_is_a_clear_error():
    strategy = make_strategy(SyncConfig(strategy="fsdp"), WorkerEnv(world_size=2))
    with pytest.raises(ConfigError, match="must run inside a process group"):
        strategy.wrap(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match='num_workers must be ≥ 2 for strategy="fsdp"'):
        prepare(torch.nn.Linear(2, 2), "fsdp", optimizer=torch.optim.SGD)


def test_prepare_in_a_world_of_one_matches_plain_training():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    reference = torch.nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    make_sgd = functools.partial(torch.optim.SGD, lr=0.1)
    for strategy in STRATEGIES[:3]:
        model.load_state_dict(reference.state_dict())
        with prepare(model, strategy, optimizer=make_sgd) as sync:
            plain = torch.nn.Linear(3, 1)
            plain.load_state_dict(reference.state_dict())
            plain_opt = make_sgd(plain.parameters())
            for _ in range(3):
                for module, step in ((sync.module, sync.step), (plain, plain_opt.step)):
                    loss = torch.nn.functional.mse_loss(module(x), y)
                    module.zero_grad()
                    loss.backward()
                    step()
            state = sync.state_dict()
        assert state is not None and sync.steps == 3
        for name, value in plain.state_dict().items():
            torch.testing.assert_close(state[name], value, msg=strategy)
