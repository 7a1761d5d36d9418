"""Benchmarks, one subcommand each: ``python jobs/benchmark.py [loader|launch|train|sync|inference|all]``.

``loader``: builds N rows × 16 float features + int label with Spark, materializes them, then
times (each in a fresh process, so peak RSS is that reader's alone) the sparkdl loader shuffled
and unshuffled, pyarrow ``read_table`` of the same files and pyarrow ``iter_batches`` → torch,
and writes the "Loader" section of BENCHMARKS.md. ``loader --with-petastorm``, run in
``.venv-compat``, adds petastorm's torch loaders on the same files and writes the "Loader vs
petastorm (compat environment)" section instead. ``inference``: TorchModel.transform on 1 M
rows vs a hand-written pandas_udf with the same forward pass (and the other ways to run it);
writes the "Inference" section. ``all`` runs every benchmark.
Add a benchmark: write ``add_xxx(subparsers)`` that registers a subcommand with ``func=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench_driver import add_launch, add_train  # noqa: E402  (jobs/ is the script's directory)
from bench_sync import add_sync  # noqa: E402

FEATURES = 16


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

    spark = local_spark_session("local[2]", app_name="sparkdl-benchmark")
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


def _files(path: str) -> list[str]:
    from sparkdl.data import ShardedDataset

    ds = ShardedDataset.load(path)
    return [os.path.join(path, f.path) for f in ds.manifest.files_of("train")]


def _read_table(path: str, batch_size: int) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_table(f).num_rows for f in _files(path))


def _read_table_torch(path: str, batch_size: int) -> int:
    """read_table, then the row-major float32 [N, F] tensor a model needs (no shuffle)."""
    import pyarrow.parquet as pq
    import torch

    rows = 0
    for f in _files(path):
        table = pq.read_table(f)
        cols = [table.column(i).to_numpy() for i in range(FEATURES)]
        features = torch.from_numpy(np.ascontiguousarray(np.vstack(cols).T))
        label = torch.from_numpy(table.column(FEATURES).to_numpy())
        rows += len(features) + 0 * len(label)
    return rows


def _iter_batches(path: str, batch_size: int) -> int:
    import pyarrow.parquet as pq
    import torch

    rows = 0
    for f in _files(path):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
            cols = [batch.column(i).to_numpy() for i in range(FEATURES)]
            features = torch.from_numpy(np.stack(cols, axis=1))
            label = torch.from_numpy(batch.column(FEATURES).to_numpy())
            rows += len(features) + 0 * len(label)
    return rows


def _sparkdl(shuffle: bool, checksums: bool = False):
    def run(path: str, batch_size: int) -> int:
        from sparkdl.data import ShardedDataset

        ds = ShardedDataset.load(path)
        loader = ds.loader(0, 1, batch_size=batch_size, shuffle=shuffle, verify_checksums=checksums)
        return sum(len(features) for features, _ in loader)

    return run


READERS = {
    "sparkdl shuffled": _sparkdl(True),
    "sparkdl unshuffled": _sparkdl(False),
    "sparkdl shuffled, first open (sha256 verify)": _sparkdl(True, checksums=True),
    "pyarrow read_table": _read_table,
    "pyarrow read_table→torch [N, F]": _read_table_torch,
    "pyarrow iter_batches→torch": _iter_batches,
}


def _petastorm(batched: bool, shuffle_rows: int = 0, shuffle_batches: int = 0):
    """petastorm's ``make_torch_dataloader`` on the same files (a converter over them, as
    ``make_spark_converter`` returns), its defaults otherwise (4 reader threads, row groups in
    shuffled order); ``batched``: ``data_loader_fn=BatchedDataLoader``; shuffling queue of
    ``shuffle_rows`` rows or ``shuffle_batches`` batches. Columns → [B, F]."""

    def run(path: str, batch_size: int) -> int:
        import torch
        from petastorm.pytorch import BatchedDataLoader
        from petastorm.spark.spark_dataset_converter import SparkDatasetConverter

        from sparkdl.data import ShardedDataset
        from sparkdl.data.petastorm import file_urls

        ds = ShardedDataset.load(path)
        converter = SparkDatasetConverter(path, file_urls(ds), ds.num_rows)
        rows = 0
        with converter.make_torch_dataloader(
            batch_size=batch_size,
            num_epochs=1,
            shuffling_queue_capacity=shuffle_rows or shuffle_batches * batch_size,
            data_loader_fn=BatchedDataLoader if batched else None,
        ) as loader:
            for batch in loader:
                features = torch.stack([batch[f"f{i}"] for i in range(FEATURES)], dim=1)
                rows += len(features) + 0 * len(batch["label"])
        return rows

    return run


def _sparkdl_petastorm(path: str, batch_size: int) -> int:
    from sparkdl.data import ShardedDataset

    loader = ShardedDataset.load(path).loader(0, 1, batch_size=batch_size, reader="petastorm")
    return sum(len(features) for features, _ in loader)


PETASTORM_SHUFFLE_ROWS = 1 << 17  # the sparkdl loader's shuffle buffer for 17 float32 columns
PETASTORM_READERS = {
    "petastorm make_torch_dataloader (default)": _petastorm(False),
    "petastorm BatchedDataLoader": _petastorm(True),
    "petastorm make_torch_dataloader shuffled": _petastorm(False, PETASTORM_SHUFFLE_ROWS),
    "petastorm BatchedDataLoader shuffled": _petastorm(True, PETASTORM_SHUFFLE_ROWS),
    "petastorm BatchedDataLoader shuffled, 2-batch queue": _petastorm(True, shuffle_batches=2),
    "sparkdl reader='petastorm' shuffled": _sparkdl_petastorm,
}


def measure(reader: str, path: str, batch_size: int, repeats: int) -> dict:
    """(in a child process) best-of-``repeats`` rows/s of one reader, and the process's peak RSS."""
    import pyarrow.parquet  # noqa: F401  (imports stay out of the timings)
    import torch  # noqa: F401

    import sparkdl.data  # noqa: F401

    read = {**READERS, **PETASTORM_READERS}[reader]
    read(path, batch_size)  # warm-up: page cache, allocator, lazy imports
    best = float("inf")
    rows = 0
    for _ in range(repeats):
        start = time.perf_counter()
        rows = read(path, batch_size)
        best = min(best, time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "reader": reader,
        "rows": rows,
        "seconds": best,
        "rows_per_s": rows / best,
        "peak_rss_mib": peak_kib / 1024,
    }


def _in_child(reader: str, path: str, batch_size: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "loader-measure", reader, path, str(batch_size), str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


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


def loader_markdown(
    results: dict[int, list[dict]],
    batch_size: int,
    load: str = "",
    petastorm: bool = False,
    repeats: int = 3,
    rounds: int = 3,
) -> str:
    lines = [
        "## Loader vs petastorm (compat environment)" if petastorm else "## Loader",
        "",
        f"`python jobs/benchmark.py loader` — {FEATURES} float32 features + int64 label, "
        f"2 shards, batch {batch_size}, one reader reading every row (world size 1); each reader "
        "in a fresh process (peak RSS is that process's: torch alone is ~300 MiB), one warm-up "
        f"then best of {repeats} runs, readers interleaved over {rounds} rounds; files in the "
        "page cache. "
        "sparkdl rows are `steps × batch` (drop_last). The sha256 line is a fresh dataset "
        "object each run, so every file is verified on first open.",
        *(_PETASTORM_INTRO if petastorm else []),
        "",
        f"Machine: {machine()}.{load}",
        "",
        "| rows | reader | rows/s | vs read_table | peak RSS MiB |",
        "|---:|---|---:|---:|---:|",
    ]
    for rows, entries in results.items():
        base = next(e["rows_per_s"] for e in entries if e["reader"] == "pyarrow read_table")
        for e in entries:
            lines.append(
                f"| {rows:,} | {e['reader']} | {e['rows_per_s'] / 1e6:.2f} M | "
                f"{e['rows_per_s'] / base:.2f}× | {e['peak_rss_mib']:.0f} |"
            )
    if petastorm:
        lines += ["", *(_petastorm_ratio(rows, entries) for rows, entries in results.items())]
    return "\n".join(lines) + "\n"


_PETASTORM_INTRO = [
    "",
    "`--with-petastorm`, run in `.venv-compat` (Spark 3.5, pyarrow 14.0.2, petastorm 0.12.1): "
    "petastorm's `make_torch_dataloader` over the same files (its defaults: 4 reader threads, "
    "row groups in shuffled order), with `data_loader_fn=BatchedDataLoader`, and both with "
    f"`shuffling_queue_capacity={PETASTORM_SHUFFLE_ROWS}` (the sparkdl loader's shuffle buffer "
    "here), and the batched loader with a queue of only 2 batches (faster, barely shuffled); "
    "petastorm's per-column batches are stacked into the same `[B, F]` tensor. "
    "`sparkdl reader='petastorm'` is sparkdl's petastorm backend (1 reader thread, seeded).",
]


def _petastorm_ratio(rows: int, entries: list[dict]) -> str:
    speed = {e["reader"]: e["rows_per_s"] for e in entries}
    shuffled = [r for r in speed if r.startswith("petastorm") and "shuffled" in r]
    fastest = max(shuffled, key=speed.__getitem__)
    ratio = speed["sparkdl shuffled"] / speed[fastest]
    return (
        f"- {rows:,} rows: sparkdl shuffled is **{ratio:.1f}×** petastorm's fastest shuffled "
        f"configuration ({fastest})."
    )


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


def run_loader(args: argparse.Namespace) -> None:
    """Readers interleaved over ``--rounds`` rounds, best kept: other load on a shared machine
    then hits every reader alike instead of whichever ran at the wrong moment."""
    results: dict[int, list[dict]] = {}
    loads = [os.getloadavg()[0]]
    for rows in args.rows:
        path = build_dataset(rows, args.data_dir)
        best: dict[str, dict] = {}
        readers = [*READERS, *(PETASTORM_READERS if args.with_petastorm else ())]
        for _ in range(args.rounds):
            for reader in readers:
                entry = _in_child(reader, path, args.batch_size, args.repeats)
                print(json.dumps({"rows": rows, **entry}), flush=True)
                if reader not in best or entry["rows_per_s"] > best[reader]["rows_per_s"]:
                    best[reader] = entry
        results[rows] = [best[r] for r in readers]
        loads.append(os.getloadavg()[0])
    load = f" Load average during the run (other jobs share these cores): {min(loads):.1f}–{max(loads):.1f}."
    markdown = loader_markdown(
        results, args.batch_size, load, args.with_petastorm, args.repeats, args.rounds
    )
    print(markdown)
    if args.out:
        write_section(markdown, args.out)


def add_loader(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loader", help="sparkdl loader vs pyarrow readers")
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per process, after a warm-up")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the readers")
    p.add_argument("--data-dir", default=os.path.join(REPO, "runs", "benchmark-data"))
    p.add_argument("--out", default=os.path.join(REPO, "BENCHMARKS.md"))
    p.add_argument(
        "--with-petastorm",
        action="store_true",
        help="also petastorm's torch loaders (run in .venv-compat: make venv-compat)",
    )
    p.set_defaults(func=run_loader)
    m = sub.add_parser("loader-measure", help=argparse.SUPPRESS)
    m.add_argument("reader")
    m.add_argument("path")
    m.add_argument("batch_size", type=int)
    m.add_argument("repeats", type=int)
    m.set_defaults(
        func=lambda a: print(json.dumps(measure(a.reader, a.path, a.batch_size, a.repeats)))
    )


# --- inference: TorchModel.transform vs a hand-written pandas_udf -------------------------------

INFERENCE_METHODS = (
    "read only (floor)",
    "pandas_udf (hand-written)",
    "sparkdl transform (arrow_udf)",
    "sparkdl transform (mapInArrow, Spark < 4.1)",
    "predict_batch_udf",
)


def _inference_data(spark, rows: int, features: int, root: str):
    """``rows`` × (id, features array<float>[F]) as Parquet, written once and reused."""
    from pyspark.sql import functions as F

    path = os.path.join(root, f"inference_rows_{rows}_f{features}.parquet")
    if not os.path.exists(os.path.join(path, "_SUCCESS")):
        cols = [F.rand(seed=i).cast("float") for i in range(features)]
        df = spark.range(0, rows, numPartitions=8).select("id", F.array(*cols).alias("features"))
        df.write.mode("overwrite").parquet(path)
    return spark.read.parquet(path)


def _pandas_udf_baseline(spark, module):
    """The documented idiom: broadcast once, load once per task (iterator UDF), task threads."""
    from collections.abc import Iterator

    import pandas as pd
    import torch
    from pyspark import TaskContext, cloudpickle
    from pyspark.sql.functions import pandas_udf

    payload = spark.sparkContext.broadcast(cloudpickle.dumps(module))

    def predict(batches):
        import pickle

        model = pickle.loads(payload.value).eval()
        torch.set_num_threads(TaskContext.get().cpus())
        for series in batches:
            x = torch.from_numpy(np.stack(series.to_numpy()).astype(np.float32))
            with torch.inference_mode():
                yield pd.Series(model(x).argmax(dim=1).double().numpy())

    # Real objects, not strings: this module's annotations are postponed.
    predict.__annotations__ = {"batches": Iterator[pd.Series], "return": Iterator[pd.Series]}
    return pandas_udf(predict, "double")


def _predict_batch_udf(spark, module, batch_size: int, features: int):
    import torch
    from pyspark import cloudpickle
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.types import DoubleType

    payload = spark.sparkContext.broadcast(cloudpickle.dumps(module))

    def make_predict():
        import pickle

        m = pickle.loads(payload.value).eval()

        def predict(x):
            with torch.inference_mode():
                return m(torch.from_numpy(x.astype(np.float32))).argmax(dim=1).double().numpy()

        return predict

    return predict_batch_udf(
        make_predict,
        return_type=DoubleType(),
        batch_size=batch_size,
        input_tensor_shapes=[[features]],
    )


def _inference_plans(spark, df, args):
    import torch

    import sparkdl
    from sparkdl.ml import inference
    from sparkdl.models import mlp

    torch.manual_seed(0)
    module = mlp(args.features, args.classes, hidden=[args.hidden]).eval()
    model = sparkdl.TorchModel(
        module,
        feature_cols=["features"],
        feature_dim=args.features,
        inference_batch_size=args.batch_size,
    )
    baseline = _pandas_udf_baseline(spark, module)
    batch_udf = _predict_batch_udf(spark, module, args.batch_size, args.features)

    def map_in_arrow():
        inference.USE_ARROW_UDF = False
        try:
            return model.transform(df)
        finally:
            inference.USE_ARROW_UDF = None

    return {
        INFERENCE_METHODS[0]: lambda: df,
        INFERENCE_METHODS[1]: lambda: df.withColumn("prediction", baseline("features")),
        INFERENCE_METHODS[2]: lambda: model.transform(df),
        INFERENCE_METHODS[3]: map_in_arrow,
        INFERENCE_METHODS[4]: lambda: df.withColumn("prediction", batch_udf("features")),
    }


INFERENCE_NOTE = """
Why the arrow_udf: only the (cast) feature columns travel to Python and only the prediction
comes back, as Arrow arrays turned into one float32 matrix without pandas; `mapInArrow` moves
every column through Python both ways, `pandas_udf`/`predict_batch_udf` convert each array
cell to a NumPy object first. On this shared 2-core machine the absolute numbers are held
down by other jobs (and reading `array<float>` columns from Parquet is itself slow, see the
floor); the ratios between methods measured in the same rounds are the result.
"""


def inference_markdown(rows: int, args, best: dict[str, float], load: str) -> str:
    base = best[INFERENCE_METHODS[1]]
    lines = [
        "## Inference",
        "",
        f"`python jobs/benchmark.py inference` — {rows:,} rows of `features array<float>"
        f"[{args.features}]` (+ `id`) from Parquet, MLP {args.features}→{args.hidden}→"
        f"{args.classes} (ReLU), class index out; Spark `{args.master}`, Arrow batches of "
        "10,000 rows, forward passes of "
        f"{args.batch_size:,} rows (sparkdl, predict_batch_udf; the pandas_udf does a whole "
        "Arrow batch at once); every plan runs to a `noop` write (all columns "
        "materialized); methods interleaved over "
        f"{args.rounds} rounds, best kept (the first round warms the Python workers). The "
        "pandas_udf baseline is the documented iterator idiom: the module broadcast once, "
        "unpickled once per task, torch threads = the task's CPUs (as sparkdl sets them).",
        "",
        f"Machine: {machine()}.{load}",
        "",
        "| method | rows/s | vs pandas_udf |",
        "|---|---:|---:|",
    ]
    for method in INFERENCE_METHODS:
        lines.append(f"| {method} | {best[method] / 1e6:.3f} M | {best[method] / base:.2f}× |")
    return "\n".join(lines) + "\n" + INFERENCE_NOTE


def run_inference(args: argparse.Namespace) -> None:
    from sparkdl.testing import local_spark_session

    spark = local_spark_session(args.master, app_name="sparkdl-benchmark-inference")
    os.makedirs(args.data_dir, exist_ok=True)
    df = _inference_data(spark, args.rows, args.features, args.data_dir)
    rows = df.count()
    plans = _inference_plans(spark, df, args)
    best: dict[str, float] = {}
    loads = [os.getloadavg()[0]]
    for round_ in range(args.rounds):
        for method, plan in plans.items():
            start = time.perf_counter()
            plan().write.format("noop").mode("overwrite").save()
            rate = rows / (time.perf_counter() - start)
            print(json.dumps({"round": round_, "method": method, "rows_per_s": rate}), flush=True)
            best[method] = max(best.get(method, 0.0), rate)
        loads.append(os.getloadavg()[0])
    load = (
        f" Load average during the run (other jobs share these cores): "
        f"{min(loads):.1f}–{max(loads):.1f}."
    )
    markdown = inference_markdown(rows, args, best, load)
    print(markdown)
    if args.out:
        write_section(markdown, args.out)


def add_inference(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inference", help="TorchModel.transform vs a hand-written pandas_udf")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=1024, help="rows per forward pass")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the methods")
    p.add_argument("--master", default="local[2]")
    p.add_argument("--data-dir", default=os.path.join(REPO, "runs", "benchmark-data"))
    p.add_argument("--out", default=os.path.join(REPO, "BENCHMARKS.md"))
    p.set_defaults(func=run_inference)


BENCHMARKS = [add_loader, add_launch, add_train, add_sync, add_inference]
ALL = ("loader", "launch", "train", "sync", "inference")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in BENCHMARKS:
        add(sub)
    sub.add_parser("all", help="run every benchmark with its defaults")
    args = parser.parse_args(argv)
    if args.command == "all":
        failed = []
        for name in (n for n in ALL if n in sub.choices):
            try:
                main([name])
            except Exception as exc:  # one broken benchmark does not hide the others' numbers
                print(f"benchmark {name} failed: {type(exc).__name__}: {exc}", flush=True)
                failed.append(name)
        if failed:
            sys.exit(f"failed benchmarks: {', '.join(failed)}")
        return
    args.func(args)


if __name__ == "__main__":
    main()
