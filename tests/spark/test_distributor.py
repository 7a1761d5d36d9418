"""Distributor on Spark local[2]: one barrier stage, gloo on 127.0.0.1, failures per rank."""

from __future__ import annotations

import sys

import pytest
from pyspark import cloudpickle

from sparkdl.context import get_context
from sparkdl.errors import ConfigError, WorkerGroupError
from sparkdl.launch import Distributor

pytestmark = pytest.mark.timeout(180)

# Spark's Python workers cannot import this test module; ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def all_reduce_rank(offset):
    import torch
    import torch.distributed as dist

    ctx = get_context()
    t = torch.tensor([float(ctx.rank + offset)])
    dist.all_reduce(t)
    return (ctx.rank, ctx.world_size, ctx.local_rank, str(ctx.device), t.item())


def _jobs_submitted(sc) -> int:
    """Jobs the DAGScheduler has ever been given (synchronous, unlike the status store)."""
    value = sc._jsc.sc().dagScheduler().nextJobId()
    return value if isinstance(value, int) else value.get()


def test_all_reduce_results_in_rank_order(spark_local):
    results = Distributor(2, spark=spark_local).run(all_reduce_rank, 0)
    assert results == [(0, 2, 0, "cpu", 1.0), (1, 2, 1, "cpu", 1.0)]


def test_each_rank_returns_its_own_value(spark_local):
    def per_rank(base, *, scale):
        import os

        ctx = get_context()
        return {"rank": ctx.rank, "value": base * scale + ctx.rank, "env_rank": os.environ["RANK"]}

    results = Distributor(2, spark=spark_local).run(per_rank, 5, scale=10)
    assert results == [
        {"rank": 0, "value": 50, "env_rank": "0"},
        {"rank": 1, "value": 51, "env_rank": "1"},
    ]


def test_exception_on_rank_one_reaches_driver_with_traceback(spark_local, fail_on_rank_one):
    with pytest.raises(WorkerGroupError) as info:
        Distributor(2, spark=spark_local, collective_timeout_s=30).run(fail_on_rank_one)
    error = info.value
    assert error.ranks == [1]
    assert error.failures[0].exc_type == "ValueError"
    assert "rank one has a bad batch" in error.failures[0].traceback
    assert "fail_on_rank_one" in error.failures[0].traceback
    # the session stays usable after a failed run
    assert Distributor(2, spark=spark_local).run(all_reduce_rank, 1)[0][-1] == 3.0


def test_more_workers_than_slots_fails_before_any_job(spark_local):
    sc = spark_local.sparkContext
    before = _jobs_submitted(sc)
    with pytest.raises(ConfigError, match="got 3 with 2 slot"):
        Distributor(3, spark=spark_local).run(all_reduce_rank, 0)
    assert _jobs_submitted(sc) == before


def test_dynamic_allocation_fails_before_any_job(spark_local, monkeypatch):
    from sparkdl.launch import launcher

    sc = spark_local.sparkContext
    conf = {"spark.dynamicAllocation.enabled": "true"}
    monkeypatch.setattr(type(sc), "getConf", lambda self: conf)
    before = _jobs_submitted(sc)
    with pytest.raises(ConfigError, match="dynamicAllocation"):
        launcher.Distributor(2, spark=spark_local).run(all_reduce_rank, 0)
    assert _jobs_submitted(sc) == before


def test_use_gpu_on_local_master_fails_before_any_job(spark_local):
    sc = spark_local.sparkContext
    before = _jobs_submitted(sc)
    with pytest.raises(ConfigError, match="spark.task.resource.gpu.amount"):
        Distributor(2, use_gpu=True, spark=spark_local).run(all_reduce_rank, 0)
    assert _jobs_submitted(sc) == before


def test_one_worker(spark_local):
    def world():
        import torch.distributed as dist

        return (get_context().world_size, get_context().is_chief, dist.is_initialized())

    assert Distributor(1, spark=spark_local).run(world) == [(1, True, False)]


def test_job_group_names_the_run_and_is_restored(spark_local):
    def named_run():
        return get_context().rank

    sc = spark_local.sparkContext
    sc.setJobGroup("outer", "user's group")
    try:
        assert Distributor(1, spark=spark_local).run(named_run) == [0]
        assert sc.getLocalProperty("spark.jobGroup.id") == "outer"
        assert sc.statusTracker().getJobIdsForGroup("outer") == []
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
        sc.setLocalProperty("spark.job.description", None)
    jvm_sc = sc._jsc.sc()
    jvm_sc.listenerBus().waitUntilEmpty()
    jobs = jvm_sc.statusStore().jobsList(None)
    described = [jobs.apply(i).description() for i in range(jobs.size())]
    names = [d.get() for d in described if d.isDefined()]
    assert "sparkdl: named_run (1 worker)" in names


def test_rank_dying_mid_collective_fails_the_run_quickly(spark_local, exit_mid_collective):
    with pytest.raises(WorkerGroupError) as info:
        Distributor(2, spark=spark_local, collective_timeout_s=10).run(exit_mid_collective)
    assert "rank 1" in str(info.value)
    assert Distributor(2, spark=spark_local).run(all_reduce_rank, 0)[1][-1] == 1.0


def test_tasks_that_cannot_start_are_cancelled_after_timeout(spark_local):
    import threading
    import time

    from sparkdl.errors import RendezvousError

    sc = spark_local.sparkContext

    def occupy_slots():
        sc.setJobGroup("occupier", "holds both slots", interruptOnCancel=True)
        try:
            sc.parallelize(range(2), 2).foreach(lambda _: __import__("time").sleep(60))
        except Exception:
            pass  # cancelled below

    blocker = threading.Thread(target=occupy_slots, daemon=True)
    blocker.start()
    try:
        while not sc.statusTracker().getJobIdsForGroup("occupier"):
            time.sleep(0.05)
        start = time.monotonic()
        with pytest.raises(RendezvousError, match="timeout_s=3"):
            Distributor(2, spark=spark_local, timeout_s=3).run(all_reduce_rank, 0)
        assert time.monotonic() - start < 20
    finally:
        sc.cancelJobGroup("occupier")
        blocker.join(timeout=30)
