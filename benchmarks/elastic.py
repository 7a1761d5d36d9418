"""``python -m benchmarks elastic``: how fast an elastic run shrinks and grows on local-cluster.

A digits fit with ``num_workers=(1, 2)`` on ``local-cluster[2,1,1024]`` (two executor JVMs);
after the first checkpoint one executor JVM is killed by PID. The run relaunches with the one
slot left (``elastic_wait_s=0``); local-cluster's worker starts a replacement executor, and the
run grows back to 2 at its next checkpoint (``elastic_grow_interval_s=0``). Reported, from
run.json's ``world_sizes`` and the per-step metrics (``log_every_steps=1``):

- lost → training: from the kill to the first step recorded at the smaller size;
- slots → training: from the replacement executor's slot showing in Spark to the first step at
  the larger size (this includes waiting for the next checkpoint boundary).

Target (issue 18): each at most one checkpoint interval + 15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from typing import Any

from benchmarks.common import OUT, environment, record

__all__ = ["add_elastic", "run_elastic"]

DIGITS = os.path.join(os.path.dirname(__file__), "..", "data", "digits")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
        except FileNotFoundError:
            pass
    return out


def _executor_pids() -> list[int]:
    """Executor JVMs under this process (python → driver JVM → executors), found by PID."""
    found, todo = [], _children(os.getpid())
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
        except FileNotFoundError:
            continue
        if b"CoarseGrainedExecutorBackend" in cmd:
            found.append(pid)
        todo.extend(_children(pid))
    return sorted(found)


def _first_step_after(metrics: Any, step: int, at: float) -> float:
    rows = metrics[
        (metrics.name == "step_loss") & (metrics.step > step) & (metrics.wall_time >= at)
    ]
    return float(rows.wall_time.min())


def run_elastic(args: argparse.Namespace) -> dict[str, Any]:
    import sparkdl
    from sparkdl.session import spark_side
    from sparkdl.testing import local_spark_session

    spark = local_spark_session("local-cluster[2,1,1024]", app_name="sparkdl-bench-elastic")
    train = spark.read.parquet(os.path.join(DIGITS, "train.parquet"))
    run_dir = os.path.join(tempfile.mkdtemp(prefix="sparkdl-elastic-"), "run")
    every = args.checkpoint_every_steps
    est = sparkdl.TorchEstimator(
        model="sparkdl.models:mlp",
        model_kwargs={"in_features": 64, "out_features": 10},
        feature_cols=["features"],
        label_col="label",
        batch_size=16,
        epochs=args.epochs,
        num_workers=(1, 2),
        elastic_wait_s=0.0,
        elastic_grow_interval_s=0.0,
        checkpoint_every_steps=every,
        log_every_steps=1,
        collective_timeout_s=30,
        run_dir=run_dir,
        progress=False,
    )
    side = spark_side(spark)
    marks: dict[str, float] = {}

    def chaos() -> None:
        ckpts = os.path.join(run_dir, "checkpoints")
        while not (os.path.isdir(ckpts) and any(n.startswith("step-") for n in os.listdir(ckpts))):
            time.sleep(0.05)
        os.kill(_executor_pids()[-1], signal.SIGKILL)
        marks["killed"] = time.time()
        while (side.task_slots() or 0) >= 2:  # the loss shows first
            time.sleep(0.05)
        while (side.task_slots() or 0) < 2:  # then the replacement executor
            time.sleep(0.05)
        marks["slots_back"] = time.time()

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    est.fit(train)
    thread.join(timeout=60)
    with open(os.path.join(run_dir, "run.json")) as fh:
        sizes = json.load(fh)["world_sizes"]
    import pyarrow.parquet as pq

    metrics = pq.read_table(os.path.join(run_dir, "metrics")).to_pandas()  # wall_time: epoch s
    shrink = next(s for s in sizes if s["workers"] == 1)
    grow = next(s for s in sizes if s["why"] == "grow")
    lost_to_training = (
        _first_step_after(metrics, shrink["start_step"], shrink["started_at"]) - marks["killed"]
    )
    slots_to_training = (
        _first_step_after(metrics, grow["start_step"], grow["started_at"]) - marks["slots_back"]
    )
    step_s = float(metrics[metrics.name == "step_loss"].wall_time.diff().median())
    result = {
        "environment": environment(),
        "world_sizes": [(s["workers"], s["why"], s["start_step"]) for s in sizes],
        "lost_to_training_s": round(lost_to_training, 2),
        "slots_to_training_s": round(slots_to_training, 2),
        "checkpoint_every_steps": every,
        "median_step_s": round(step_s, 3),
        "target_s": round(every * step_s + 15, 1),
    }
    spark.stop()
    print(json.dumps(result, indent=2), flush=True)
    record("## Elastic training", _markdown(result), result, args.out)
    return result


def _markdown(r: dict[str, Any]) -> str:
    env = r["environment"]
    return (
        "## Elastic training\n\n"
        "`python -m benchmarks elastic`: a digits fit with `num_workers=(1, 2)` on "
        "`local-cluster[2,1,1024]`; one executor JVM is killed by PID after the first "
        "checkpoint, local-cluster starts a replacement, the run shrinks to 1 and grows back "
        f"(`elastic_wait_s=0`, `elastic_grow_interval_s=0`, checkpoints every "
        f"{r['checkpoint_every_steps']} steps). Sizes: {r['world_sizes']}.\n\n"
        "| from | to training again at the new size | target (1 checkpoint interval + 15 s) |\n"
        "|---|---|---|\n"
        f"| executor lost | {r['lost_to_training_s']:.1f} s at 1 worker | ≤ {r['target_s']:.1f} s |\n"
        f"| replacement slot visible | {r['slots_to_training_s']:.1f} s at 2 workers | "
        f"≤ {r['target_s']:.1f} s |\n\n"
        f"Median step {r['median_step_s'] * 1000:.0f} ms. {env['machine']}; pyspark "
        f"{env['pyspark']}; load average {env['load_average']} at {env['when']}.\n"
    )


def add_elastic(sub: Any) -> None:
    parser = sub.add_parser("elastic", help=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--checkpoint-every-steps", type=int, default=10)
    parser.add_argument("--out", default=OUT)
    parser.set_defaults(func=run_elastic)
