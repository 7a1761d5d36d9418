"""What the benchmarks share: the synthetic dataset, the machine line, result files, Spark.

Results go to BENCHMARKS.md (one ``## Section`` per benchmark, replaced in place) and, for the
benchmarks with structured numbers, BENCHMARKS.json (one key per benchmark), both at the
repository root by default.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any

__all__ = [
    "DATA_DIR",
    "FEATURES",
    "OUT",
    "REPO",
    "build_dataset",
    "environment",
    "load_note",
    "machine",
    "record",
    "spark_session",
    "stats",
    "write_json",
    "write_section",
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(REPO, "runs", "benchmark-data")
"""Default --data-dir: datasets built once and reused by later runs."""
OUT = os.path.join(REPO, "BENCHMARKS.md")
"""Default --out; the JSON results go beside it (BENCHMARKS.json)."""
FEATURES = 16
"""Float features of the synthetic dataset (plus an int label in 10 classes)."""


def build_dataset(rows: int, root: str) -> str:
    """Materialize ``rows`` synthetic rows at ``root/rows_<n>`` once; later runs reuse it."""
    from sparkdl.data import ShardedDataset, materialize
    from sparkdl.errors import DataError
    from sparkdl.testing import local_spark_session

    path = os.path.join(root, f"rows_{rows}")
    try:
        ShardedDataset.load(path)
        return path
    except DataError:
        pass
    from pyspark.sql import functions as F

    spark = local_spark_session("local[2]", app_name="sparkdl-benchmark", ui=False)
    cols = [F.rand(seed=i).cast("float").alias(f"f{i}") for i in range(FEATURES)]
    df = spark.range(0, rows, numPartitions=8).select(*cols, (F.col("id") % 10).alias("label"))
    start = time.perf_counter()
    materialize(
        df,
        path,
        feature_cols=[f"f{i}" for i in range(FEATURES)],
        label_col="label",
        num_shards=2,
        mode="overwrite",
    )
    print(f"materialized {rows:,} rows in {time.perf_counter() - start:.1f}s", flush=True)
    return path


def spark_session(module: str) -> Any:
    """The local[2] session of the Spark benchmarks; ``module``'s functions travel by value,
    since executors do not import the benchmarks package."""
    from pyspark import cloudpickle

    from sparkdl.testing import local_spark_session

    cloudpickle.register_pickle_by_value(sys.modules[module])
    return local_spark_session("local[2]", app_name="sparkdl-benchmark", ui=False)


def machine() -> str:
    import pyarrow
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    with open("/proc/meminfo") as f:
        mem_gib = int(f.readline().split()[1]) / 2**20
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"pyarrow {pyarrow.__version__}"
    )


def environment() -> dict[str, Any]:
    """Machine, versions and load, for the record."""
    import pyspark

    return {
        "machine": machine(),
        "pyspark": pyspark.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }


def load_note(loads: list[float]) -> str:
    """The sentence on the 1-minute load averages sampled during a run."""
    return (
        f" Load average during the run (other jobs share these cores): "
        f"{min(loads):.1f}–{max(loads):.1f}."
    )


def stats(values: list[float]) -> dict[str, Any]:
    """Median and spread of repeated measurements."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": [round(v, 4) for v in values],
    }


def write_section(markdown: str, path: str) -> None:
    """Replace (or append) the section starting with the markdown's first heading."""
    heading = markdown.splitlines()[0]
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + markdown
    else:
        end = text.find("\n## ", start + len(heading))
        rest = text[end + 1 :] if end >= 0 else ""
        text = text[:start] + markdown.rstrip("\n") + "\n" + ("\n" + rest if rest else "")
    with open(path, "w") as f:
        f.write(text)


def write_json(section: str, data: dict[str, Any], path: str) -> None:
    """Merge ``{section: data}`` into the JSON results file."""
    results: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as fh:
            results = json.load(fh)
    results[section] = data
    with open(path, "w") as fh:
        json.dump(results, fh, indent=2, sort_keys=True)
        fh.write("\n")


def record(section: str, markdown: str, data: dict[str, Any], out: str) -> None:
    """The markdown section into ``out`` and ``{section: data}`` into the JSON beside it
    (nothing when ``out`` is empty)."""
    if out:
        write_section(markdown, out)
        write_json(section, data, os.path.splitext(out)[0] + ".json")
