"""``python -m benchmarks train``: ``TorchEstimator.fit`` vs a hand-written DDP script.

An MLP on ``--rows`` rows of Parquet (materialized by sparkdl; 16 float features, 10 classes,
2 shards), 2 workers of one thread each: ``TorchEstimator.fit`` on the dataset against a
hand-written DDP script over the same files launched with ``torch.multiprocessing`` (each rank
reads its shard with pyarrow into memory, then permutes and slices batches), and
TorchDistributor + petastorm's ``make_torch_dataloader`` when petastorm imports (the compat
environment). End-to-end samples/s are rows trained / wall time from the call to its return;
loop samples/s are the last epoch's, timed inside the workers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import (
    DATA_DIR,
    FEATURES,
    OUT,
    build_dataset,
    environment,
    record,
    spark_session,
    stats,
)

__all__ = ["add_train", "run_train", "train_markdown"]

CLASSES = 10


def _rank_files(path: str) -> list[list[str]]:
    from sparkdl.data import ShardedDataset

    ds = ShardedDataset.load(path)
    return [[os.path.join(path, f.path) for f in s.files] for s in ds.manifest.shards_of("train")]


def ddp_worker(rank: int, world: int, port: int, files: list[list[str]], cfg: dict, out) -> None:
    """A hand-written DDP training script's body: what a user writes without a framework."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from sparkdl.models import mlp

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    table = pa.concat_tables([pq.read_table(f) for f in files[rank]])
    x = torch.from_numpy(np.stack([table.column(i).to_numpy() for i in range(FEATURES)], axis=1))
    y = torch.from_numpy(table.column("label").to_numpy())
    torch.manual_seed(0)
    model = DistributedDataParallel(mlp(FEATURES, CLASSES, hidden=cfg["hidden"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    batch, steps = cfg["batch_size"], cfg["rows_per_rank"] // cfg["batch_size"]
    seconds = 0.0
    for epoch in range(cfg["epochs"]):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch * 101 + rank))
        start = time.perf_counter()
        for step in range(steps):
            index = order[step * batch : (step + 1) * batch]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds = time.perf_counter() - start
    if rank == 0:
        out.put({"loop_samples_per_s": steps * batch * world / seconds, "steps": steps})
    dist.destroy_process_group()


def run_ddp_script(path: str, cfg: dict) -> dict[str, float]:
    import torch.multiprocessing as mp

    files = _rank_files(path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = mp.get_context("spawn").SimpleQueue()
    start = time.perf_counter()
    mp.spawn(ddp_worker, args=(2, port, files, cfg, out), nprocs=2, join=True)
    wall = time.perf_counter() - start
    result = out.get()
    samples = result["steps"] * cfg["batch_size"] * 2 * cfg["epochs"]
    return {"wall_s": wall, "samples": samples, "loop_samples_per_s": result["loop_samples_per_s"]}


def run_sparkdl_fit(path: str, cfg: dict, run_dir: str) -> dict[str, float]:
    import sparkdl

    dataset = sparkdl.ShardedDataset.load(path)
    estimator = sparkdl.TorchEstimator(
        model="sparkdl.models:mlp",
        model_kwargs={"in_features": FEATURES, "out_features": CLASSES, "hidden": cfg["hidden"]},
        feature_cols=list(dataset.manifest.feature_cols),
        label_col=dataset.manifest.label_col,
        batch_size=cfg["batch_size"],
        epochs=cfg["epochs"],
        learning_rate=cfg["lr"],
        num_workers=2,
        log_every_steps=0,
        progress=False,
        run_dir=run_dir,
        overwrite=True,
    )
    start = time.perf_counter()
    model = estimator.fit(dataset)
    wall = time.perf_counter() - start
    summary = model.summary
    return {
        "wall_s": wall,
        "samples": summary["samples"],
        "loop_samples_per_s": summary["metrics"]["train/samples_per_s"],
    }


def petastorm_worker(converter: Any, cfg: dict) -> float:
    """TorchDistributor's function: the same MLP fed by petastorm's make_torch_dataloader."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from sparkdl.models import mlp

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DistributedDataParallel(mlp(FEATURES, CLASSES, hidden=cfg["hidden"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    steps = cfg["rows_per_rank"] // cfg["batch_size"]
    for _ in range(cfg["epochs"]):
        with converter.make_torch_dataloader(
            batch_size=cfg["batch_size"], num_epochs=None, cur_shard=rank, shard_count=world
        ) as loader:
            batches = iter(loader)
            for _ in range(steps):
                batch = next(batches)
                loss = F.cross_entropy(model(batch["features"]), batch["label"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    dist.destroy_process_group()
    return steps * cfg["batch_size"] * world * cfg["epochs"]


def run_petastorm(spark: Any, path: str, cfg: dict, cache_dir: str) -> dict[str, Any]:
    """TorchDistributor + petastorm, or why it was skipped."""
    try:
        from petastorm.spark import SparkDatasetConverter, make_spark_converter
    except ImportError as exc:
        return {
            "skipped": f"petastorm does not import here ({exc}); run `python -m benchmarks train` "
            "in the petastorm compat environment to include TorchDistributor + petastorm"
        }
    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql import functions as F

    spark.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, "file://" + cache_dir)
    files = [f for rank in _rank_files(path) for f in rank]
    df = spark.read.parquet(*files).select(
        F.array(*[F.col(f"f{i}") for i in range(FEATURES)]).alias("features"), "label"
    )
    converter = make_spark_converter(df)
    try:
        start = time.perf_counter()
        samples = TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(
            petastorm_worker, converter, cfg
        )
        return {"wall_s": time.perf_counter() - start, "samples": samples}
    finally:
        converter.delete()


def run_train(args: argparse.Namespace) -> None:
    path = build_dataset(args.rows, args.data_dir)
    spark = spark_session(__name__)
    env = environment()
    files = _rank_files(path)
    rows_per_rank = min(sum(pq_rows(f) for f in rank) for rank in files)
    cfg = {
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "hidden": [args.hidden, args.hidden],
        "lr": 1e-3,
        "rows_per_rank": rows_per_rank,
    }
    sides: dict[str, Callable[[], dict[str, Any]]]
    with tempfile.TemporaryDirectory(prefix="sparkdl-bench-") as tmp:
        sides = {
            "sparkdl TorchEstimator.fit": lambda: run_sparkdl_fit(
                path, cfg, os.path.join(tmp, "run")
            ),
            "hand-written DDP, torch.multiprocessing": lambda: run_ddp_script(path, cfg),
        }
        for side in sides.values():  # warm-up: page cache, Python workers, imports
            side()
        measured: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
        for rep in range(args.repeats):
            names = list(sides) if rep % 2 == 0 else list(sides)[::-1]
            for name in names:
                measured[name].append(sides[name]())
                print(f"train {name}: {json.dumps(measured[name][-1])}", flush=True)
        petastorm = run_petastorm(spark, path, cfg, os.path.join(tmp, "petastorm"))
    env["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results = {}
    for name, runs in measured.items():
        results[name] = {
            "end_to_end_samples_per_s": stats([r["samples"] / r["wall_s"] for r in runs]),
            "wall_s": stats([r["wall_s"] for r in runs]),
            "loop_samples_per_s": stats([r["loop_samples_per_s"] for r in runs]),
        }
    data = {"env": env, "config": {**cfg, "rows": args.rows, "repeats": args.repeats}}
    data.update(results=results, petastorm=petastorm)
    markdown = train_markdown(data)
    print(markdown)
    record("train", markdown, data, args.out)


def pq_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def train_markdown(data: dict[str, Any]) -> str:
    env, cfg, results = data["env"], data["config"], data["results"]
    base = results["hand-written DDP, torch.multiprocessing"]
    lines = [
        "## Train",
        "",
        f"`python -m benchmarks train` — MLP {FEATURES}→{cfg['hidden'][0]}→"
        f"{cfg['hidden'][1]}→{CLASSES} (Adam, cross-entropy) on {cfg['rows']:,} rows of "
        f"Parquet materialized by sparkdl (2 shards), 2 workers × 1 thread, gloo, batch "
        f"{cfg['batch_size']} per worker, {cfg['epochs']} epochs. One warm-up each, then "
        f"{cfg['repeats']} alternating repetitions. End-to-end: rows trained / seconds from "
        "the call (`fit`, `mp.spawn`) to its return, process start and data reading included; "
        "loop: the last epoch, timed inside the workers. Target: sparkdl ≥ 0.9× the DDP script.",
        "",
        f"Machine: {env['machine']}, pyspark {env['pyspark']}. Measured {env['when']}; load "
        f"average {env['load_average'][0]:.1f} before, {env['load_average_after'][0]:.1f} after "
        "(shared machine).",
        "",
        "| side | end-to-end samples/s: median (min–max) | wall s | loop samples/s: median "
        "(min–max) | vs DDP end-to-end | vs DDP loop |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        e2e, wall, loop = r["end_to_end_samples_per_s"], r["wall_s"], r["loop_samples_per_s"]
        lines.append(
            f"| {name} | {e2e['median']:,.0f} ({e2e['min']:,.0f}–{e2e['max']:,.0f}) | "
            f"{wall['median']:.1f} | {loop['median']:,.0f} ({loop['min']:,.0f}–{loop['max']:,.0f}) | "
            f"{e2e['median'] / base['end_to_end_samples_per_s']['median']:.2f}× | "
            f"{loop['median'] / base['loop_samples_per_s']['median']:.2f}× |"
        )
    petastorm = data["petastorm"]
    if "skipped" in petastorm:
        lines += ["", f"TorchDistributor + petastorm: skipped — {petastorm['skipped']}."]
    else:
        rate = petastorm["samples"] / petastorm["wall_s"]
        lines.append(
            f"| TorchDistributor + petastorm | {rate:,.0f} | {petastorm['wall_s']:.1f} | | | |"
        )
    return "\n".join(lines) + "\n"


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="TorchEstimator.fit vs a hand-written DDP script")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--hidden", type=int, default=128, help="width of the MLP's two hidden layers")
    p.add_argument("--repeats", type=int, default=3, help="repetitions after the warm-up")
    p.add_argument("--data-dir", default=DATA_DIR)
    p.add_argument("--out", default=OUT)
    p.set_defaults(func=run_train)
