"""Distributor in local mode: spawned processes forming a gloo group on 127.0.0.1."""

from __future__ import annotations

import time

import pytest

from sparkdl.context import get_context
from sparkdl.errors import WorkerGroupError
from sparkdl.launch import Distributor

pytestmark = pytest.mark.timeout(120)


def all_reduce_rank():
    import torch
    import torch.distributed as dist

    ctx = get_context()
    t = torch.tensor([float(ctx.rank)])
    dist.all_reduce(t)
    return {"rank": ctx.rank, "world": ctx.world_size, "sum": t.item(), "chief": ctx.is_chief}


def test_two_processes_all_reduce_their_ranks():
    results = Distributor(2, local_mode=True).run(all_reduce_rank)
    assert results == [
        {"rank": 0, "world": 2, "sum": 1.0, "chief": True},
        {"rank": 1, "world": 2, "sum": 1.0, "chief": False},
    ]


def test_exception_on_rank_one_names_it_with_traceback(fail_on_rank_one):
    with pytest.raises(WorkerGroupError) as info:
        Distributor(2, local_mode=True, collective_timeout_s=30).run(fail_on_rank_one)
    error = info.value
    assert error.ranks == [1]
    assert error.failures[0].exc_type == "ValueError"
    assert "rank one has a bad batch" in error.failures[0].traceback
    assert "fail_on_rank_one" in error.failures[0].traceback


def test_rank_exiting_mid_collective_fails_the_group_quickly(exit_mid_collective):
    start = time.monotonic()
    with pytest.raises(WorkerGroupError) as info:
        Distributor(2, local_mode=True, collective_timeout_s=10).run(exit_mid_collective)
    assert 1 in info.value.ranks
    crashed = next(f for f in info.value.failures if f.rank == 1)
    assert crashed.exc_type == "ProcessExited" and "code 3" in crashed.message
    assert time.monotonic() - start < 10 + 30  # the collective timeout plus process start-up


def test_one_worker_needs_no_process_group():
    def world():
        import torch.distributed as dist

        return (get_context().world_size, dist.is_initialized())

    assert Distributor(1, local_mode=True).run(world) == [(1, False)]


def test_arguments_and_keyword_arguments_reach_every_rank():
    def scaled(x, *, factor):
        return x * factor + get_context().rank

    assert Distributor(2, local_mode=True).run(scaled, 10, factor=3) == [30, 31]


def hang_on_rank_one():
    import torch
    import torch.distributed as dist

    if get_context().rank == 1:
        time.sleep(3600)  # a stuck step: only the collective timeout can end this run
    dist.all_reduce(torch.zeros(1))


def test_hung_rank_is_torn_down_within_the_collective_timeout():
    start = time.monotonic()
    with pytest.raises(WorkerGroupError) as info:
        Distributor(2, local_mode=True, collective_timeout_s=5).run(hang_on_rank_one)
    assert info.value.ranks == [0]  # the waiting rank reports the timeout
    assert time.monotonic() - start < 5 + 30
