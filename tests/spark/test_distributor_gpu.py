"""GPU mapping through a real barrier stage with fake GPUs: the device comes from Spark's address.

Spark's local[N] master never assigns task resources, so this runs a local-cluster session with
a fake discovery script in a child interpreter (one SparkContext per process); nothing touches
CUDA: the probe stops after the rendezvous, before any process group forms.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

DISCOVERY = Path(__file__).with_name("fake_gpu_discovery.sh")

PROBE = r"""
import json, sys
from functools import partial
from sparkdl.testing import local_spark_session
from sparkdl.launch.checks import check_launch
from sparkdl.session import spark_side
from sparkdl.launch.rendezvous import LaunchOptions, rendezvous

script = sys.argv[1]
spark = local_spark_session("local-cluster[1,2,1024]", conf={
    "spark.worker.resource.gpu.amount": "2",
    "spark.worker.resource.gpu.discoveryScript": script,
    "spark.executor.resource.gpu.amount": "2",
    "spark.executor.resource.gpu.discoveryScript": script,
    "spark.executor.cores": "2",
    "spark.task.resource.gpu.amount": "1",
})
sc = spark.sparkContext
options = LaunchOptions(num_workers=2, use_gpu=True, backend="nccl")
check_launch(spark_side(spark), options, timeout_s=120)

def probe(options, _rows):
    from pyspark import BarrierTaskContext
    env = rendezvous(BarrierTaskContext.get(), options)
    yield {"rank": env.rank, "device": env.device, "backend": env.backend,
           "local_rank": env.local_rank, "port": env.master_port}

rows = sc.parallelize(range(2), 2).barrier().mapPartitions(partial(probe, options)).collect()
print("PROBE " + json.dumps(rows), flush=True)
spark.stop()
"""


def test_device_comes_from_the_assigned_gpu_address():
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(DISCOVERY)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    rows = sorted(json.loads(lines[0][len("PROBE ") :]), key=lambda r: r["rank"])
    assert sorted(r["device"] for r in rows) == ["cuda:0", "cuda:1"]
    assert {r["backend"] for r in rows} == {"nccl"}
    assert [r["local_rank"] for r in rows] == [0, 1]
    assert rows[0]["port"] == rows[1]["port"] > 0
