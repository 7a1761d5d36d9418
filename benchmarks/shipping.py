"""``python -m benchmarks shipping``: how ``TorchModel.transform`` ships the module on Spark
Connect, inside the UDF's pickled closure or through a file, by module size.

On a ``remote("local[2]")`` session, a module whose pickled size is dominated by an unused
parameter (so the forward pass costs nothing) predicts ``--rows`` rows of 16 floats in 2
partitions to a ``noop`` write. Each measured call ships the module afresh (a new cache key:
every Python worker unpickles it once), inline (``INLINE_MAX_BYTES`` raised) or through a file in
a run directory (``INLINE_MAX_BYTES`` = 0); one warm-up, then ``--rounds`` rounds alternating the
order, best kept. Inline, the server holds the plan and a copy per task in its heap; around 100 MiB the
local server (1 GiB driver heap) runs out of memory, which is why large modules go by file.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

from benchmarks.common import OUT, environment, record, stats

__all__ = ["add_shipping", "run_shipping"]

SIZES_MIB = (1, 4, 16, 64)


def _module(mib: int) -> Any:
    import torch

    class Padded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(16, 2)
            self.pad = torch.nn.Parameter(torch.zeros(mib * (1 << 20) // 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

    return Padded()


def _time_transform(spark: Any, df: Any, module: Any, mode: str, run_dir: str) -> float | None:
    import sparkdl
    from sparkdl.ml import inference

    saved = inference.INLINE_MAX_BYTES
    inference.INLINE_MAX_BYTES = 1 << 40 if mode == "inline" else 0
    try:
        model = sparkdl.TorchModel(
            module, feature_cols=["features"], classification=True, run_dir=run_dir
        )
        start = time.perf_counter()
        model.transform(df).write.format("noop").mode("overwrite").save()
        return time.perf_counter() - start
    except Exception as exc:  # over the message limit
        print(f"{mode}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
        return None
    finally:
        inference.INLINE_MAX_BYTES = saved


def run_shipping(args: argparse.Namespace) -> None:
    from sparkdl.testing import connect_spark_session

    spark = connect_spark_session("local[2]", app_name="sparkdl-bench-shipping")
    df = spark.range(0, args.rows, numPartitions=2).selectExpr(
        "array_repeat(cast(rand() as float), 16) as features"
    )
    df = df.localCheckpoint() if hasattr(df, "localCheckpoint") else df
    run_dir = tempfile.mkdtemp(prefix="sparkdl-bench-shipping-")
    results: dict[str, Any] = {}
    for mib in args.sizes:
        module = _module(mib)
        _time_transform(spark, df, module, "file", run_dir)  # warm-up
        times: dict[str, list[float]] = {"inline": [], "file": []}
        for r in range(args.rounds):
            for mode in ("inline", "file") if r % 2 == 0 else ("file", "inline"):
                took = _time_transform(spark, df, module, mode, run_dir)
                if took is not None:
                    times[mode].append(took)
                    print(f"{mib} MiB {mode}: {took:.2f}s", flush=True)
        results[str(mib)] = {mode: stats(v) if v else None for mode, v in times.items()}
    spark.stop()
    data = {"env": environment(), "rows": args.rows, "rounds": args.rounds, "results": results}
    lines = [
        "## Inference on Spark Connect: shipping the module",
        "",
        f"`python -m benchmarks shipping` — {__doc__.split(chr(10), 3)[3].strip()}",
        "",
        f"{args.rows:,} rows; seconds for `transform(df)` → noop write, best of {args.rounds}.",
        "",
        "| module (pickled) | inline s | file s | file / inline |",
        "|---:|---:|---:|---:|",
    ]
    for mib, row in results.items():
        inline = row["inline"]["min"] if row["inline"] else None
        file = row["file"]["min"] if row["file"] else None
        ratio = f"{file / inline:.2f}×" if inline and file else "—"
        lines.append(
            f"| {mib} MiB | {f'{inline:.2f}' if inline else 'fails'} | "
            f"{f'{file:.2f}' if file else 'fails'} | {ratio} |"
        )
    record("shipping", "\n".join(lines) + "\n", data, args.out)


def add_shipping(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shipping", help="transform on Spark Connect: module inline vs a file")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES_MIB), help="MiB")
    p.add_argument("--out", default=OUT, help="BENCHMARKS.md to update ('' for none)")
    p.set_defaults(func=run_shipping)
