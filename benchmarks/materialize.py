"""``python -m benchmarks materialize``: ``sparkdl.materialize`` vs a plain Parquet write, and
the time to the first training step of the digits demo.

Three measurements, each side by side in one run:

* *steady*: on one local[2] session, ``materialize(df, path, ..., num_shards=2)`` against
  ``df.repartition(2).write.parquet(path)`` of the same ``--rows`` rows × 16 floats, once as 16
  float columns and once as one ``array<float>[16]`` column. Each frame is built once, cached and
  counted first (input generation excluded); one warm-up, then ``--rounds`` rounds alternating
  which side goes first. Target: materialize ≤ 1.25× the plain write.
* *first call*: a fresh Python process starts a local[2] session and times its first
  ``materialize`` of the bundled digits (data/digits/train.parquet), another process its first
  plain write of the same rows; ``--first-rounds`` pairs, alternating. Target ≤ 2×. The
  materialize process then asks its executor Python workers whether torch or pandas is loaded.
* *demo*: ``make demo``'s fit (jobs/configs/digits.toml) in a fresh process, timed from the
  ``fit`` call to the first progress frame (the chief sends one right after its first optimizer
  step), split at the launch (the driver monitor's start) and the first frame from a worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pyarrow.parquet as pq

from benchmarks.common import FEATURES, OUT, REPO, environment, load_note, record, stats

__all__ = ["add_materialize", "materialize_markdown", "run_materialize"]

DIGITS = os.path.join(REPO, "data", "digits", "train.parquet")
DEMO_CONFIG = os.path.join(REPO, "jobs", "configs", "digits.toml")
STEADY_TARGET = 1.25
FIRST_TARGET = 2.0
_RESULT = "RESULT "


# --- steady state: one session, cached input -------------------------------------------------


def _frames(spark: Any, rows: int) -> dict[str, tuple[Any, list[str]]]:
    """The two input layouts, cached and counted: name → (DataFrame, feature_cols)."""
    from pyspark.sql import functions as F

    names = [f"f{i}" for i in range(FEATURES)]
    cols = [F.rand(seed=i).cast("float").alias(n) for i, n in enumerate(names)]
    base = spark.range(0, rows, numPartitions=8).select(*cols, (F.col("id") % 10).alias("label"))
    frames = {
        f"{FEATURES} float columns": (base, names),
        f"array<float>[{FEATURES}]": (
            base.select(F.array(*names).alias("features"), "label"),
            ["features"],
        ),
    }
    for df, _ in frames.values():
        df.cache().count()
    return frames


def _sides(df: Any, feature_cols: list[str], root: str) -> dict[str, Callable[[], Any]]:
    from sparkdl.data import materialize

    return {
        "plain write": lambda: df.repartition(2).write.mode("overwrite").parquet(f"{root}/plain"),
        "materialize": lambda: materialize(
            df,
            f"{root}/ds",
            feature_cols=feature_cols,
            label_col="label",
            num_shards=2,
            mode="overwrite",
        ),
    }


def _steady(args: argparse.Namespace, loads: list[float]) -> dict[str, Any]:
    from sparkdl.testing import local_spark_session

    spark = local_spark_session("local[2]", app_name="sparkdl-benchmark", ui=False)
    root = tempfile.mkdtemp(prefix="sparkdl-bench-materialize-")
    results: dict[str, Any] = {}
    try:
        for layout, (df, feature_cols) in _frames(spark, args.rows).items():
            sides = _sides(df, feature_cols, root)
            for run in sides.values():  # warm-up: Python workers, code paths, JIT
                run()
            times: dict[str, list[float]] = {name: [] for name in sides}
            for r in range(args.rounds):
                for name in sorted(sides, reverse=r % 2 == 1):
                    start = time.perf_counter()
                    sides[name]()
                    times[name].append(time.perf_counter() - start)
                    loads.append(os.getloadavg()[0])
                    print(f"{layout}: {name} {times[name][-1]:.2f}s", flush=True)
            results[layout] = _compare(times)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        spark.catalog.clearCache()
    return results


def _compare(times: dict[str, list[float]]) -> dict[str, Any]:
    """Both sides' stats and materialize / plain write: best-of-N and per-round medians."""
    plain, mat = times["plain write"], times["materialize"]
    return {
        "plain write": stats(plain),
        "materialize": stats(mat),
        "ratio_best": min(mat) / min(plain),
        "ratio_median": statistics.median(m / p for m, p in zip(mat, plain)),
    }


# --- fresh processes: first call of a session, demo time to first step ------------------------


def _probe_modules(batches: Any) -> Any:
    """(executor) Which heavy modules this Python worker has loaded."""
    import pyarrow as pa

    loaded = [m in sys.modules for m in ("torch", "pandas", "sparkdl.data.shard_jobs")]
    count = len(sys.modules)
    for _ in batches:
        pass
    yield pa.RecordBatch.from_arrays(  # pa.array imports pandas: after the look
        [*(pa.array([x]) for x in loaded), pa.array([count], pa.int32())],
        names=["torch", "pandas", "shard_jobs", "modules"],
    )


def _child_first_call(kind: str) -> dict[str, Any]:
    from pyspark import cloudpickle

    from sparkdl.data import materialize
    from sparkdl.testing import local_spark_session

    start = time.perf_counter()
    spark = local_spark_session("local[2]", app_name="sparkdl-benchmark", ui=False)
    out: dict[str, Any] = {"session_s": time.perf_counter() - start}
    df = spark.read.parquet(DIGITS)
    root = tempfile.mkdtemp(prefix="sparkdl-bench-first-")

    def call() -> None:
        if kind == "write":
            df.repartition(2).write.mode("overwrite").parquet(f"{root}/plain")
        else:
            materialize(
                df, f"{root}/ds", feature_cols=["features"], label_col="label", num_shards=2,
                mode="overwrite",
            )  # fmt: skip

    try:
        for key in ("first_s", "second_s"):
            start = time.perf_counter()
            call()
            out[key] = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if kind == "materialize":
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        probe = spark.range(0, 2, numPartitions=2).mapInArrow(
            _probe_modules, "torch boolean, pandas boolean, shard_jobs boolean, modules int"
        )
        out["executor_modules"] = [r.asDict() for r in probe.collect()]
    return out


def _child_demo(epochs: int) -> dict[str, Any]:
    from sparkdl import TorchEstimator
    from sparkdl.cli import estimator_kwargs, load_config, read_input, spark_session_for_job
    from sparkdl.launch.progress import RunMonitor

    marks: dict[str, float] = {}
    start_monitor, handle = RunMonitor.start, RunMonitor.handle

    def timed_start(self: RunMonitor) -> RunMonitor:
        marks.setdefault("launch", time.perf_counter())
        return start_monitor(self)

    def timed_handle(self: RunMonitor, frame: dict[str, Any]) -> None:
        now = time.perf_counter()
        marks.setdefault("first_frame", now)
        if frame.get("t") == "progress":
            marks.setdefault("first_step", now)
        handle(self, frame)

    RunMonitor.start, RunMonitor.handle = timed_start, timed_handle  # type: ignore[method-assign]
    run_dir = tempfile.mkdtemp(prefix="sparkdl-bench-demo-")
    overrides = [f"run.run_dir={run_dir}", "run.mode=overwrite", f"training.epochs={epochs}"]
    config = load_config(DEMO_CONFIG, overrides)
    begin = time.perf_counter()
    spark = spark_session_for_job(config)
    session = time.perf_counter()
    try:
        df = read_input(spark, config["data"]["train"], config["data"]["format"])
        fit = time.perf_counter()
        model = TorchEstimator(**estimator_kwargs(config)).fit(df)
        done = time.perf_counter()
        timings = model.summary["timings"]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "session_s": session - begin,
        "materialize_s": timings["materialize_s"],
        "to_launch_s": marks["launch"] - fit,
        "launch_to_first_frame_s": marks["first_frame"] - marks["launch"],
        "first_frame_to_first_step_s": marks["first_step"] - marks["first_frame"],
        "to_first_step_s": marks["first_step"] - fit,
        "fit_s": done - fit,
    }


def _run_child(kind: str, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks", "materialize", "--child", kind, *extra]
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable)
    env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT)]
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len(_RESULT) :])


def _first_calls(args: argparse.Namespace, loads: list[float]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"write": [], "materialize": []}
    for r in range(args.first_rounds):
        for kind in sorted(runs, reverse=r % 2 == 1):
            runs[kind].append(_run_child(kind))
            loads.append(os.getloadavg()[0])
            print(f"first call, fresh session: {kind} {runs[kind][-1]['first_s']:.2f}s", flush=True)
    times = {
        "plain write": [x["first_s"] for x in runs["write"]],
        "materialize": [x["first_s"] for x in runs["materialize"]],
    }
    result = _compare(times)
    result["second call"] = {
        "plain write": stats([x["second_s"] for x in runs["write"]]),
        "materialize": stats([x["second_s"] for x in runs["materialize"]]),
    }
    result["session_s"] = stats([x["session_s"] for v in runs.values() for x in v])
    result["executor_modules"] = runs["materialize"][-1]["executor_modules"]
    return result


def _demo(args: argparse.Namespace, loads: list[float]) -> dict[str, Any]:
    runs = []
    for _ in range(args.demo_rounds):
        runs.append(_run_child("demo", "--demo-epochs", str(args.demo_epochs)))
        loads.append(os.getloadavg()[0])
        print(f"demo: first step {runs[-1]['to_first_step_s']:.2f}s after fit()", flush=True)
    return {key: stats([r[key] for r in runs]) for key in runs[0]}


# --- the command --------------------------------------------------------------------------------


def run_materialize(args: argparse.Namespace) -> None:
    if args.child:
        if args.child == "demo":
            result = _child_demo(args.demo_epochs)
        else:
            result = _child_first_call(args.child)
        print(_RESULT + json.dumps(result), flush=True)
        return
    env = environment()
    loads = [os.getloadavg()[0]]
    data: dict[str, Any] = {"env": env, "rows": args.rows, "rounds": args.rounds}
    data["first_rounds"], data["demo_rounds"] = args.first_rounds, args.demo_rounds
    data["demo_epochs"] = args.demo_epochs
    data["digits_rows"] = pq.read_metadata(DIGITS).num_rows
    if args.rounds:
        data["steady"] = _steady(args, loads)
    if args.first_rounds:
        data["first_call"] = _first_calls(args, loads)
    if args.demo_rounds:
        data["demo"] = _demo(args, loads)
    data["loads"] = [round(x, 2) for x in loads]
    markdown = materialize_markdown(data)
    print(markdown)
    if args.rounds and args.first_rounds and args.demo_rounds:
        record("materialize", markdown, data, args.out)


def _verdict(ratio: float, target: float) -> str:
    return f"**{ratio:.2f}×** ({'meets' if ratio <= target else 'misses'} ≤ {target:g}×)"


def materialize_markdown(data: dict[str, Any]) -> str:
    env = data["env"]
    lines = [
        "## Materialize",
        "",
        "`python -m benchmarks materialize` — `sparkdl.materialize(df, path, feature_cols=..., "
        "label_col='label', num_shards=2)` against `df.repartition(2).write.parquet(path)` of "
        "the same rows, side by side in one run; ratios are materialize / plain write "
        "(best-of-N; the median of the per-round ratios beside it).",
        "",
        f"Machine: {env['machine']}, pyspark {env['pyspark']}. Measured {env['when']}."
        + load_note(data["loads"]),
    ]
    if "steady" in data:
        lines += [
            "",
            f"**Steady state** — one local[2] session, {data['rows']:,} rows × {FEATURES} floats "
            "+ an int label, 8 input partitions, the input cached and counted first; one "
            f"warm-up, then {data['rounds']} rounds alternating which side goes first. "
            f"Target ≤ {STEADY_TARGET:g}×.",
            "",
            "| input | plain write s: best (median) | materialize s: best (median) | ratio "
            "best | ratio median |",
            "|---|---:|---:|---:|---:|",
        ]
        for layout, r in data["steady"].items():
            lines.append(_row(layout, r, STEADY_TARGET))
    if "first_call" in data:
        r = data["first_call"]
        mods = [m for m in r["executor_modules"] if m["shard_jobs"]] or r["executor_modules"]
        torch_loaded = any(m["torch"] for m in mods)
        lines += [
            "",
            "**First call of a session** — a fresh process starts a local[2] session and times "
            "its first call on the bundled digits ("
            f"`data/digits/train.parquet`: {data['digits_rows']:,} rows, `array<float>[64]` + "
            "label); materialize and the plain write each in their own "
            f"process, {data['first_rounds']} pairs alternating. Target ≤ {FIRST_TARGET:g}×.",
            "",
            "| call | plain write s: best (median) | materialize s: best (median) | ratio best "
            "| ratio median |",
            "|---|---:|---:|---:|---:|",
            _row("first call of the session", r, FIRST_TARGET),
            _row("second call, same session", _ratios(r["second call"]), None),
            "",
            f"Session start (not in the ratio): median {r['session_s']['median']:.2f} s. After "
            f"materialize, the executor Python workers that ran it have torch loaded: "
            f"{'yes' if torch_loaded else 'no'} (pandas: "
            f"{'yes' if any(m['pandas'] for m in mods) else 'no'}; "
            f"{max(m['modules'] for m in mods)} modules).",
        ]
    if "demo" in data:
        lines += _demo_lines(data)
    return "\n".join(lines) + "\n"


def _ratios(pair: dict[str, Any]) -> dict[str, Any]:
    plain, mat = pair["plain write"], pair["materialize"]
    ratio_median = statistics.median(m / p for m, p in zip(mat["values"], plain["values"]))
    return {**pair, "ratio_best": mat["min"] / plain["min"], "ratio_median": ratio_median}


def _row(name: str, r: dict[str, Any], target: float | None) -> str:
    plain, mat = r["plain write"], r["materialize"]
    best = _verdict(r["ratio_best"], target) if target else f"{r['ratio_best']:.2f}×"
    return (
        f"| {name} | {plain['min']:.2f} ({plain['median']:.2f}) | {mat['min']:.2f} "
        f"({mat['median']:.2f}) | {best} | {r['ratio_median']:.2f}× |"
    )


def _demo_lines(data: dict[str, Any]) -> list[str]:
    d = data["demo"]
    rows = [
        ("fit() → first optimizer step", "to_first_step_s"),
        ("… of which materialize (run.json `timings.materialize_s`)", "materialize_s"),
        ("… fit() → launch (run directory, materialize, driver checks)", "to_launch_s"),
        ("… launch → first frame from a worker (barrier stage, rendezvous)", "launch_to_first_frame_s"),
        ("… first worker frame → first step (model, loader, step 1)", "first_frame_to_first_step_s"),
        (f"whole fit ({data['demo_epochs']} epochs)", "fit_s"),
        ("session start (before fit, not included)", "session_s"),
    ]  # fmt: skip
    lines = [
        "",
        "**Time to the first step of `make demo`** — the demo's fit (jobs/configs/digits.toml, "
        f"MLP on the digits, 2 workers; {data['demo_epochs']} epoch(s) instead of 15) in a "
        f"fresh process, {data['demo_rounds']} runs; the first progress frame is sent right "
        "after the chief's first optimizer step.",
        "",
        "| phase | median s | min s | max s |",
        "|---|---:|---:|---:|",
    ]
    for name, key in rows:
        s = d[key]
        lines.append(f"| {name} | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f} |")
    return lines


def add_materialize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("materialize", help="materialize vs a plain Parquet write; demo first step")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the steady-state input")
    p.add_argument("--rounds", type=int, default=5, help="steady-state rounds after the warm-up")
    p.add_argument("--first-rounds", type=int, default=5, help="fresh-process pairs (digits)")
    p.add_argument("--demo-rounds", type=int, default=2, help="fresh-process demo fits")
    p.add_argument("--demo-epochs", type=int, default=1, help="epochs of each demo fit")
    p.add_argument("--child", choices=("write", "materialize", "demo"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=OUT, help="BENCHMARKS.md to update ('' for none)")
    p.set_defaults(func=run_materialize)
