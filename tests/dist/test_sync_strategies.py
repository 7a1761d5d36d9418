"""Every strategy with 2 gloo workers: bytes at the hook, async staleness, sharded checkpoints."""

from __future__ import annotations

import functools
import os
import statistics
import time

import pytest
import torch

import sparkdl
from sparkdl.sync import prepare

pytestmark = pytest.mark.timeout(300)

CONFIGS = [
    ("allreduce", {}),
    ("allreduce", {"compression": "fp16"}),
    ("allreduce", {"compression": "bf16"}),
    ("allreduce", {"compression": "powersgd", "powersgd_rank": 1, "powersgd_warmup_steps": 2}),
    ("local_sgd", {"sync_every": 4, "warmup_steps": 2}),
    ("parameter_server", {}),
    ("fsdp", {"min_unit_params": 1}),  # each Linear its own unit
    ("fsdp", {}),  # small children: one root unit
]
STEPS = 10


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


def _batches(rank: int, n: int, features: int = 32, classes: int = 8) -> list:
    gen = torch.Generator().manual_seed(100 + rank)
    return [
        (torch.randn(16, features, generator=gen), torch.randint(0, classes, (16,), generator=gen))
        for _ in range(n)
    ]


def _train(sync, batches) -> list[int]:
    """Train on ``batches``; the bytes this rank sent at each step."""
    sent = []
    for x, y in batches:
        before = sync.comm_bytes
        loss = torch.nn.functional.cross_entropy(sync.module(x), y)
        sync.optimizer.zero_grad()
        loss.backward()
        sync.step()
        sent.append(sync.comm_bytes - before)
    return sent


def _every_strategy() -> dict:
    rank = sparkdl.get_context().rank
    out = {}
    for strategy, options in CONFIGS:
        torch.manual_seed(0)
        sync = prepare(
            _mlp(), strategy, optimizer=functools.partial(torch.optim.SGD, lr=0.1), **options
        )
        sent = _train(sync, _batches(rank, STEPS))
        out[f"{strategy} {options}"] = {"sent": sent, "state": sync.state_dict()}
        sync.close()
    return out


def test_each_strategy_counts_the_bytes_it_hands_the_transport():
    results = sparkdl.Distributor(2, local_mode=True, timeout_s=120).run(_every_strategy)
    payload = sum(p.numel() * 4 for p in _mlp().parameters())  # fp32 bytes of all parameters
    chief = results[0]
    sent = {key: value["sent"] for key, value in chief.items()}
    names = [f"{s} {o}" for s, o in CONFIGS]
    assert sent[names[0]] == [payload] * STEPS  # two workers: a ring all-reduce sends it once
    assert sent[names[1]] == [payload // 2] * STEPS  # fp16
    assert sent[names[2]] == [payload // 2] * STEPS  # bf16
    powersgd = sent[names[3]]
    assert powersgd[:2] == [payload] * 2 and all(0 < b <= 0.1 * payload for b in powersgd[2:])
    local_sgd = sent[names[4]]  # 2 warm-up all-reduces, then parameters averaged every 4 steps
    assert local_sgd == [payload, payload, 0, 0, 0, payload, 0, 0, 0, payload]
    worker = results[1][names[5]]["sent"]  # a worker pushes its gradient (+ a 16-byte header)
    assert worker == [payload + 16] * STEPS
    fsdp = sent[names[6]]  # all-gather in forward and backward, reduce-scatter: 3 × half
    assert all(1.4 * payload <= b <= 1.6 * payload for b in fsdp)
    root_only = sent[names[7]]  # the root keeps its gathered parameters for backward: 2 × half
    assert all(0.9 * payload <= b <= 1.1 * payload for b in root_only)
    # FSDP's reduce-scatter averages gradients as DDP's all-reduce does: same trained model.
    ddp_state = chief[names[0]]["state"]
    for fsdp_name in names[6:]:
        assert results[1][fsdp_name]["state"] is None
        for name, value in ddp_state.items():
            torch.testing.assert_close(chief[fsdp_name]["state"][name], value, atol=1e-5, rtol=1e-5)


def _async_run(slow_rank: int, slow_sleep: float, slow_steps: int, fast_steps: int) -> dict:
    """Parameter-server training where ``slow_rank`` sleeps ``slow_sleep`` before each step."""
    rank = sparkdl.get_context().rank
    torch.manual_seed(0)
    sync = prepare(
        torch.nn.Linear(16, 4),
        "parameter_server",
        optimizer=functools.partial(torch.optim.SGD, lr=0.01),
        max_staleness=4,
    )
    sync.synchronize()  # start together: the first optimizer imports torch._dynamo (seconds)
    slow = rank == slow_rank
    times = []
    for x, y in _batches(rank, slow_steps if slow else fast_steps, features=16, classes=4):
        time.sleep(slow_sleep if slow else 0.02)
        loss = torch.nn.functional.cross_entropy(sync.module(x), y)
        sync.optimizer.zero_grad()
        loss.backward()
        sync.step()
        times.append(time.perf_counter())
    sync.synchronize()  # every push is in
    log, stats = sync.strategy.update_log(), sync.stats()
    sync.close()
    return {"times": times, "log": log, "stats": stats}


def _median_interval(times: list[float]) -> float:
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def test_parameter_server_bounds_staleness_and_never_waits_for_a_slow_worker():
    distributor = sparkdl.Distributor(2, local_mode=True, timeout_s=120)
    even = distributor.run(_async_run, -1, 0.0, 24, 24)
    skewed = distributor.run(_async_run, 0, 1.5, 3, 24)  # rank 0 (also the server) is slow
    for run in (even, skewed):
        log = run[0]["log"]  # the server's record: (worker, computed on, on arrival, applied)
        assert len(log) == len(run[0]["times"]) + len(run[1]["times"])
        assert all(arrived - computed <= 4 for _, computed, arrived, applied in log if applied)
        assert all(arrived - computed > 4 for _, computed, arrived, applied in log if not applied)
        assert run[0]["stats"]["server_staleness_max"] <= 4
    # Counts, not clocks: all 24 fast steps reached the server before the slow worker's second.
    order = [worker for worker, *_ in skewed[0]["log"]]
    second_slow = [i for i, w in enumerate(order) if w == 0][1]
    assert order[:second_slow].count(1) == 24
    # The slow worker's gradients were far too stale, so the bound dropped them.
    assert skewed[1]["stats"]["applied"] == 24
    assert any(not applied for worker, *_, applied in skewed[0]["log"] if worker == 0)
    # And its pace: the fast worker's median step interval stayed within 20 % of the even run's.
    assert _median_interval(skewed[1]["times"]) <= 1.25 * _median_interval(even[1]["times"])


def _server_state(sync) -> dict | None:
    server = getattr(sync.strategy, "server", None)
    return None if server is None else server.state()


def _checkpoint_round_trips(directory: str) -> dict:
    rank = sparkdl.get_context().rank
    make_adam = functools.partial(torch.optim.Adam, lr=1e-2)
    probe = torch.randn(5, 32, generator=torch.Generator().manual_seed(7))
    batches = _batches(rank, 5)
    out: dict = {}
    for strategy in ("fsdp", "parameter_server"):
        path = os.path.join(directory, strategy)
        torch.manual_seed(0)
        sync = prepare(_mlp(), strategy, optimizer=make_adam)
        _train(sync, batches[:3])
        sync.save_checkpoint(path)
        saved_server = _server_state(sync)
        with torch.no_grad():
            at_checkpoint = sync.module(probe)
        _train(sync, batches[3:])
        sync.synchronize()
        with torch.no_grad():
            trained = sync.module(probe)
        state = sync.state_dict()
        sync.close()
        torch.manual_seed(1)  # a different start: everything must come from the checkpoint
        resumed = prepare(_mlp(), strategy, optimizer=make_adam)
        resumed.load_checkpoint(path)
        with torch.no_grad():
            after_load = resumed.module(probe)
        loaded_server = _server_state(resumed)
        _train(resumed, batches[3:])
        resumed_state = resumed.state_dict()
        resumed.close()
        out[strategy] = {
            "files": sorted(os.listdir(path)),
            "at_checkpoint": at_checkpoint,
            "after_load": after_load,
            "trained": trained,
            "state": state,
            "resumed_state": resumed_state,
            "servers": (saved_server, loaded_server),
        }
    return out


def _both_checkpoint_checks(directory: str, dataset: str) -> dict:
    """One launch for both checkpoint tests (each launch costs seconds of process start)."""
    return {
        "round_trips": _checkpoint_round_trips(os.path.join(directory, "prepared")),
        "in_the_loop": _resume_in_the_loop(dataset, directory),
    }


@pytest.fixture(scope="module")
def checkpoint_runs(tmp_path_factory):
    import numpy as np
    import pyarrow as pa

    from sparkdl.data.manifest import write_dataset

    root = tmp_path_factory.mktemp("checkpoints")
    rng = np.random.default_rng(0)
    tables = []
    for _ in range(2):
        x = rng.normal(size=(48, 32)).astype(np.float32)
        y = (x[:, :8].argmax(axis=1)).astype(np.int64)
        tables.append(pa.table({"features": pa.array(list(x), pa.list_(pa.float32())), "y": y}))
    write_dataset(str(root / "ds"), tables, feature_cols=["features"], label_col="y")
    results = sparkdl.Distributor(2, local_mode=True, timeout_s=120).run(
        _both_checkpoint_checks, str(root), str(root / "ds")
    )
    return root, results


def test_sharded_checkpoints_round_trip_and_final_model_loads_unwrapped(checkpoint_runs):
    _, results = checkpoint_runs
    results = [r["round_trips"] for r in results]
    chief = results[0]
    fsdp = chief["fsdp"]
    assert sum(f.endswith(".distcp") for f in fsdp["files"]) == 2  # one shard file per rank
    assert chief["parameter_server"]["files"] == ["ps-shard-0000.pt"]
    for name, value in fsdp["state"].items():  # same optimizer state: the same next steps
        torch.testing.assert_close(fsdp["resumed_state"][name], value)
    saved, loaded = chief["parameter_server"]["servers"]  # asynchronous: compare the server
    assert loaded["version"] == saved["version"] == 6  # 3 steps × 2 workers
    torch.testing.assert_close(loaded["optimizer"], saved["optimizer"])
    torch.testing.assert_close(loaded["params"], saved["params"])
    for strategy, run in chief.items():
        torch.testing.assert_close(run["after_load"], run["at_checkpoint"], msg=strategy)
        plain = _mlp()  # the final model is a plain state dict for the unwrapped module
        plain.load_state_dict(run["state"])
        with torch.no_grad():
            torch.testing.assert_close(plain(torch.randn(0, 32)), torch.zeros(0, 8))
            probe = torch.randn(5, 32, generator=torch.Generator().manual_seed(7))
            torch.testing.assert_close(plain(probe), run["trained"], msg=strategy)
    torch.testing.assert_close(results[1]["fsdp"]["trained"], fsdp["trained"])


def _resume_in_the_loop(dataset: str, root: str) -> dict:
    """For each sharding strategy: train 1 epoch, then 2 on the same run_dir (which resumes at
    the epoch-1 checkpoint); fsdp also runs 2 epochs uninterrupted for reference."""
    from sparkdl.config import CheckpointConfig, ModelSpec, OptimConfig, SyncConfig, TrainSpec
    from sparkdl.train.worker import run_worker

    env = sparkdl.get_context().env

    def spec(run_dir: str, strategy: str, epochs: int) -> TrainSpec:
        return TrainSpec(
            model=ModelSpec(factory=_mlp),
            dataset_path=dataset,
            run_dir=os.path.join(root, run_dir),
            optim=OptimConfig(batch_size=8, epochs=epochs, learning_rate=1e-2, log_every_steps=0),
            sync=SyncConfig(strategy=strategy),
            checkpoint=CheckpointConfig(every_epochs=1, keep_last=5),
        )

    out = {}
    for strategy in ("fsdp", "parameter_server"):
        first = run_worker(spec(strategy, strategy, 1), env)
        resumed = run_worker(spec(strategy, strategy, 2), env)
        out[strategy] = {"first": first.steps, "resumed_from": resumed.resumed_from_step}
    run_worker(spec("fsdp-reference", "fsdp", 2), env)
    return out


def test_sharding_strategies_checkpoint_and_resume_in_the_training_loop(checkpoint_runs):
    from sparkdl.rundir import checkpoints as ckpt

    tmp_path, results = checkpoint_runs
    for strategy, run in results[0]["in_the_loop"].items():
        assert run == {"first": 6, "resumed_from": 6}, strategy
        infos = ckpt.list_complete(str(tmp_path / strategy))
        assert [i.step for i in infos] == [6, 12]
        state = ckpt.load_checkpoint(infos[-1]).state
        assert state["model"] is None and state["optimizer"] is None  # in sharded/ instead
        files = os.listdir(os.path.join(infos[-1].path, ckpt.SHARDED_DIR))
        if strategy == "fsdp":
            assert sum(f.endswith(".distcp") for f in files) == 2
        else:
            assert files == ["ps-shard-0000.pt"]
        final = torch.load(tmp_path / strategy / "model" / "state_dict.pt", weights_only=True)
        _mlp().load_state_dict(final)  # a plain state dict for the unwrapped module
    # FSDP is deterministic: the resumed run ends where the uninterrupted one does.
    resumed = torch.load(tmp_path / "fsdp" / "model" / "state_dict.pt", weights_only=True)
    reference = torch.load(
        tmp_path / "fsdp-reference" / "model" / "state_dict.pt", weights_only=True
    )
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=1e-6)


def _powersgd_many_buckets() -> dict:
    """PowerSGD over a model DDP splits into several buckets (its first bucket holds 1 MiB)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 8),
    )
    options = {"compression": "powersgd", "powersgd_rank": 2, "powersgd_warmup_steps": 2}
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    sync = prepare(model, "allreduce", optimizer=sgd, **options)
    sent = _train(sync, _batches(sparkdl.get_context().rank, 12, features=256))
    state = sync.state_dict()
    sync.close()
    return {"sent": sent, "state": state}


def test_powersgd_with_several_buckets_keeps_ranks_in_step():
    """gloo finishes collectives on its own threads: without ordering, PowerSGD's chained P/Q
    all-reduces of different buckets could reach the ranks in different orders and abort."""
    results = sparkdl.Distributor(2, local_mode=True, timeout_s=240).run(_powersgd_many_buckets)
    full = 4 * sum(v.numel() for v in results[0]["state"].values())
    assert full > 2 << 20  # DDP's first bucket holds 1 MiB: several buckets
    for r in results:
        assert r["sent"][0] == full  # warm-up steps: plain fp32 all-reduce
        assert 0 < r["sent"][-1] < full // 10  # compressed: rank-2 factors
    assert results[1]["state"] is None


class _WithExtraState(torch.nn.Module):
    """A module whose state dict holds a non-tensor entry (get_extra_state)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()
        self.vocab = {"tokens": ["<pad>", "a"], "version": 3}

    def forward(self, x):
        return self.net(x)

    def get_extra_state(self):
        return self.vocab

    def set_extra_state(self, state):
        self.vocab = state


def _final_states_with_extra_state() -> dict:
    rank = sparkdl.get_context().rank
    out = {}
    for strategy, options in CONFIGS:
        torch.manual_seed(0)
        sync = prepare(
            _WithExtraState(),
            strategy,
            optimizer=functools.partial(torch.optim.SGD, lr=0.1),
            **options,
        )
        _train(sync, _batches(rank, 3))
        out[f"{strategy} {options}"] = sync.state_dict()
        sync.close()
    return out


def test_every_strategy_s_final_state_keeps_non_tensor_entries():
    results = sparkdl.Distributor(2, local_mode=True, timeout_s=120).run(
        _final_states_with_extra_state
    )
    for name, state in results[0].items():
        assert state["_extra_state"] == {"tokens": ["<pad>", "a"], "version": 3}, name
        module = _WithExtraState()
        module.vocab = {}
        module.load_state_dict(state)  # loads into the unwrapped module, extra state included
        assert module.vocab["version"] == 3, name
    assert all(state is None for state in results[1].values())
