"""``python -m benchmarks launch``: ``Distributor.run`` vs TorchDistributor launch time.

``Distributor.run`` of a trivial function on 2 workers against pyspark's TorchDistributor
(``local_mode=False``, ``use_gpu=False``) on the same local[2] SparkSession, plus two reference
points: sparkdl with ``channel=False`` (the workers meet through Spark's ``allGather``) and a
bare barrier stage without torch. One warm-up each, then ``--repeats`` rounds in which every
launcher runs once, the order rotating from round to round.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import OUT, environment, record, spark_session, stats

__all__ = ["add_launch", "launch_markdown", "run_launch"]


def trivial() -> int:
    """The launched function of the launch benchmark."""
    return 0


def _bare_barrier(sc: Any) -> None:
    sc.parallelize(range(2), 2).barrier().mapPartitions(lambda rows: [0]).collect()


COLD = "sparkdl, first launch after TorchDistributor (cold Python workers)"


def launchers(spark: Any) -> dict[str, Callable[[], Any]]:
    """What one round runs, in order. TorchDistributor's tasks end their Python worker processes,
    so the launch after it starts fresh interpreters and imports torch again: that launch is
    its own row (COLD), and the next ones are warm."""
    from pyspark.ml.torch.distributor import TorchDistributor

    from sparkdl import Distributor

    def sparkdl_run() -> Any:
        return Distributor(2, spark=spark).run(trivial)

    return {
        "TorchDistributor": lambda: TorchDistributor(
            num_processes=2, local_mode=False, use_gpu=False
        ).run(trivial),
        COLD: sparkdl_run,
        "sparkdl Distributor": sparkdl_run,
        "sparkdl, channel=False (Spark allGather)": lambda: Distributor(
            2, spark=spark, channel=False
        ).run(trivial),
        "bare barrier stage, no torch": lambda: _bare_barrier(spark.sparkContext),
    }


def run_launch(args: argparse.Namespace) -> None:
    spark = spark_session(__name__)
    env = environment()
    runs = launchers(spark)
    for run in runs.values():  # warm-up: Python workers, imports, Spark's code paths
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # TorchDistributor and sparkdl alternate
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
            print(f"launch {name}: {times[name][-1]:.2f}s", flush=True)
    env["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results = {name: stats(values) for name, values in times.items()}
    ratio = results["sparkdl Distributor"]["median"] / results["TorchDistributor"]["median"]
    data = {"env": env, "repeats": args.repeats, "results": results, "ratio_vs_td": ratio}
    markdown = launch_markdown(data)
    print(markdown)
    record("launch", markdown, data, args.out)


def launch_markdown(data: dict[str, Any]) -> str:
    env, results = data["env"], data["results"]
    td = results["TorchDistributor"]["median"]
    lines = [
        "## Launch",
        "",
        "`python -m benchmarks launch` — `run` of a trivial function (returns 0) with 2 "
        "workers on one Spark `local[2]` session, CPU (gloo). One warm-up each, then "
        f"{data['repeats']} rounds running each row once in table order, so TorchDistributor "
        "and sparkdl alternate. Seconds from the call to its return. TorchDistributor's tasks "
        "end their Python worker processes, so the launch right after it starts fresh "
        "interpreters and imports torch: its own row. Target: sparkdl ≤ 0.3× TorchDistributor.",
        "",
        f"Machine: {env['machine']}, pyspark {env['pyspark']}. Measured {env['when']}; load "
        f"average {env['load_average'][0]:.1f} before, {env['load_average_after'][0]:.1f} after "
        "(a machine shared with other test runs: absolute times vary, the alternation keeps the "
        "comparison fair).",
        "",
        "| launcher | median s | min s | max s | vs TorchDistributor |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in results.items():
        lines.append(
            f"| {name} | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f} | "
            f"{s['median'] / td:.3f}× |"
        )
    verdict = "meets" if data["ratio_vs_td"] <= 0.3 else "misses"
    lines += [
        "",
        f"sparkdl / TorchDistributor = **{data['ratio_vs_td']:.3f}×** ({verdict} ≤ 0.3×).",
    ]
    return "\n".join(lines) + "\n"


def add_launch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="Distributor.run vs TorchDistributor launch time")
    p.add_argument("--repeats", type=int, default=5, help="rounds after the warm-up")
    p.add_argument("--out", default=OUT)
    p.set_defaults(func=run_launch)
