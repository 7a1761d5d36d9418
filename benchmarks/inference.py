"""``python -m benchmarks inference``: ``TorchModel.transform`` vs a hand-written pandas_udf.

TorchModel.transform on 1 M rows vs a hand-written pandas_udf with the same forward pass (and
the other ways to run it: mapInArrow, ``predict_batch_udf``); writes the "Inference" section.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from benchmarks.common import DATA_DIR, OUT, load_note, machine, write_section

__all__ = ["INFERENCE_METHODS", "add_inference", "inference_markdown", "run_inference"]

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
        f"`python -m benchmarks inference` — {rows:,} rows of `features array<float>"
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

    spark = local_spark_session(args.master, app_name="sparkdl-benchmark-inference", ui=False)
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
    markdown = inference_markdown(rows, args, best, load_note(loads))
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
    p.add_argument("--data-dir", default=DATA_DIR)
    p.add_argument("--out", default=OUT)
    p.set_defaults(func=run_inference)
