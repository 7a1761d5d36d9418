"""Unit tests of the pure rendezvous mapping: task infos + resources → WorkerEnv."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from sparkdl.errors import RendezvousError
from sparkdl.launch.rendezvous import (
    LaunchOptions,
    build_local_env,
    build_worker_env,
    rendezvous,
    torch_env_vars,
)

pytestmark = pytest.mark.timeout(30)


def _env(rank, addresses, *, gpus=(), cpus=1, **options):
    opts = LaunchOptions(num_workers=len(addresses), **options)
    return build_worker_env(
        rank=rank,
        task_addresses=addresses,
        chief_port=4242,
        gpu_addresses=list(gpus),
        cpus=cpus,
        options=opts,
    )


def test_ranks_and_master_on_one_host():
    addresses = ["127.0.0.1:4001", "127.0.0.1:4002"]
    envs = [_env(r, addresses) for r in range(2)]
    assert [e.rank for e in envs] == [0, 1]
    assert [e.local_rank for e in envs] == [0, 1]
    assert {e.world_size for e in envs} == {2}
    assert {(e.master_addr, e.master_port) for e in envs} == {("127.0.0.1", 4242)}
    assert [e.is_chief for e in envs] == [True, False]
    assert all(e.device == "cpu" and e.backend == "gloo" for e in envs)
    assert envs[0].extra["local_world_size"] == 2


def test_local_ranks_on_two_hosts():
    addresses = ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.1:2", "10.0.0.2:2", "10.0.0.2:3"]
    envs = [_env(r, addresses) for r in range(5)]
    assert [e.local_rank for e in envs] == [0, 0, 1, 1, 2]
    assert [e.extra["local_world_size"] for e in envs] == [2, 3, 2, 3, 3]
    assert {e.master_addr for e in envs} == {"10.0.0.1"}


def test_ipv6_and_hostname_addresses():
    envs = [_env(r, ["[::1]:7077", "worker-a:7078"]) for r in range(2)]
    assert envs[0].master_addr == "::1"
    assert [e.local_rank for e in envs] == [0, 0]


def test_gpu_address_chooses_device_and_threads_follow_cpus():
    env = _env(1, ["h:1", "h:2"], gpus=["3", "5"], cpus=4, use_gpu=True, backend="nccl")
    assert env.device == "cuda:3"
    assert env.backend == "nccl"
    assert env.num_threads == 4


def test_gpu_requested_but_not_assigned_is_a_clear_error():
    with pytest.raises(RendezvousError, match="spark.task.resource.gpu.amount"):
        _env(0, ["h:1", "h:2"], use_gpu=True)


def test_world_of_one_has_no_port_and_options_pass_through():
    env = _env(0, ["h:1"], collective_timeout_s=7, attempt=2, run_token="t", extra={"k": 1})
    assert (env.world_size, env.master_port) == (1, 0)
    assert (env.timeout_s, env.attempt, env.run_token, env.extra["k"]) == (7, 2, "t", 1)


def test_task_count_must_match_num_workers():
    opts = LaunchOptions(num_workers=3)
    with pytest.raises(RendezvousError, match="rank must be"):
        build_worker_env(
            rank=0, task_addresses=["h:1"], chief_port=1, gpu_addresses=[], cpus=1, options=opts
        )


def test_local_env_is_on_loopback():
    env = build_local_env(1, 5555, LaunchOptions(num_workers=2), threads=3)
    assert (env.master_addr, env.master_port, env.local_rank, env.num_threads) == (
        "127.0.0.1",
        5555,
        1,
        3,
    )


class _FakeBarrierContext:
    """What rendezvous() reads from BarrierTaskContext, scripted; allGather echoes a chief."""

    def __init__(self, rank, addresses, gpus=None, cpus=2):
        self.rank, self.addresses, self.gpus, self._cpus = rank, addresses, gpus, cpus
        self.sent = None

    def partitionId(self):
        return self.rank

    def getTaskInfos(self):
        return [SimpleNamespace(address=a) for a in self.addresses]

    def resources(self):
        return {"gpu": SimpleNamespace(addresses=self.gpus)} if self.gpus else {}

    def cpus(self):
        return self._cpus

    def allGather(self, message):
        self.sent = json.loads(message)
        chief = {"rank": 0, "port": 6000, "gpus": [], "hostname": "h"}
        return [json.dumps(chief if r != self.rank else self.sent) for r in range(2)]


def test_rendezvous_reads_context_and_chief_picks_a_port():
    chief_ctx = _FakeBarrierContext(0, ["127.0.0.1:1", "127.0.0.1:2"])
    chief = rendezvous(chief_ctx, LaunchOptions(num_workers=2))
    assert chief_ctx.sent["port"] > 0 and chief.master_port == chief_ctx.sent["port"]
    ctx = _FakeBarrierContext(1, ["127.0.0.1:1", "127.0.0.1:2"], gpus=["1"], cpus=3)
    env = rendezvous(ctx, LaunchOptions(num_workers=2, use_gpu=True, backend="nccl"))
    assert ctx.sent["port"] == 0 and ctx.sent["gpus"] == ["1"]
    assert (env.rank, env.master_port, env.device, env.num_threads) == (1, 6000, "cuda:1", 3)


def test_torch_env_vars_are_set_and_restored(monkeypatch):
    monkeypatch.setenv("RANK", "keep")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    env = _env(1, ["127.0.0.1:1", "127.0.0.1:2"])
    with torch_env_vars(env):
        assert (os.environ["RANK"], os.environ["MASTER_PORT"]) == ("1", "4242")
        assert os.environ["WORLD_SIZE"] == "2"
    assert os.environ["RANK"] == "keep"
    assert "MASTER_PORT" not in os.environ
