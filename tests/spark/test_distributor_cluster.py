"""Distributor on local-cluster[2,1,1024]: two executor JVMs, one rank in each."""

from __future__ import annotations

import sys

import pytest
from pyspark import cloudpickle

from sparkdl.context import get_context
from sparkdl.launch import Distributor

pytestmark = pytest.mark.timeout(300)

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def all_reduce_rank():
    import os

    import torch
    import torch.distributed as dist

    ctx = get_context()
    t = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(t)
    return {"rank": ctx.rank, "local_rank": ctx.local_rank, "sum": t.item(), "pid": os.getpid()}


def test_two_executors_all_reduce(spark_local_cluster):
    results = Distributor(2, spark=spark_local_cluster, timeout_s=120).run(all_reduce_rank)
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["sum"] for r in results] == [3.0, 3.0]
    # both executors run on 127.0.0.1, so local ranks count 0, 1 on that host
    assert sorted(r["local_rank"] for r in results) == [0, 1]
    assert results[0]["pid"] != results[1]["pid"]
