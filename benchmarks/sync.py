"""``python -m benchmarks sync``: every synchronization strategy on the same training.

Every strategy (and compression) trains the same model with 2 workers in local mode (plain
processes, gloo on 127.0.0.1, one thread each) through the real worker loop
(``sparkdl.train.worker.train``), on two workloads:

- ``digits``: the bundled 8×8 digits (1,438 train / 359 test rows), MLP 64→128→64→10 (17 k
  parameters), Adam lr 1e-3, batch 32 per worker, 15 epochs;
- ``mlp10m``: synthetic data (1,024 Gaussian features, 10 classes from a random linear teacher;
  4,096 train / 2,048 test rows), MLP 1024→2048→2048→2048→10 (10.5 M parameters), Adam lr
  1e-4, batch 64 per worker, 2 epochs.

Reported per strategy: samples/s over both workers and bytes sent per worker per step, both
from the last epoch (after PowerSGD's warm-up), the bytes as a multiple of fp32 all-reduce's,
and the final model's test accuracy (computed on the driver from the saved state dict).

The pipeline rows cut the model into 2 stages over the 2 workers (one replica, so a step
takes ``batch`` rows where all-reduce's two workers take 2 × ``batch``), 4 microbatches;
beside them: the largest stage's share of the parameters (what one rank holds) and the bubble,
the fraction of stage 0's schedule time it did not compute (measured, steps after the first).

``--only`` re-runs some strategies: the other rows are kept from the previous results (marked).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.common import OUT, REPO, load_note, machine, write_json, write_section

__all__ = ["STRATEGIES", "WORKLOADS", "add_sync", "run_sync", "sync_markdown"]

STRATEGIES: list[tuple[str, str, dict[str, Any]]] = [
    ("allreduce fp32", "allreduce", {}),
    ("allreduce fp16", "allreduce", {"compression": "fp16"}),
    ("allreduce bf16", "allreduce", {"compression": "bf16"}),
    ("allreduce PowerSGD r1", "allreduce", {"compression": "powersgd", "powersgd_rank": 1}),
    ("allreduce PowerSGD r4", "allreduce", {"compression": "powersgd", "powersgd_rank": 4}),
    ("local_sgd sync_every=8", "local_sgd", {"sync_every": 8}),
    ("parameter_server", "parameter_server", {}),
    ("fsdp", "fsdp", {}),
    ("pipeline gpipe", "pipeline", {"schedule": "gpipe"}),
    ("pipeline 1f1b", "pipeline", {"schedule": "1f1b"}),
]

WORKLOADS: dict[str, dict[str, Any]] = {
    "digits": {
        "hidden": [128, 64],
        "lr": 1e-3,
        "batch": 32,
        "epochs": 15,
    },
    "mlp10m": {
        "hidden": [2048, 2048, 2048],
        "lr": 1e-4,
        "batch": 64,
        "epochs": 2,
        "features": 1024,
        "train_rows": 4096,
        "test_rows": 2048,
    },
}


def _table(x: np.ndarray, y: np.ndarray) -> Any:
    import pyarrow as pa

    return pa.table({"features": pa.array(list(x), pa.list_(pa.float32())), "label": y})


def _digits(root: str) -> tuple[str, np.ndarray, np.ndarray, int]:
    import pyarrow.parquet as pq

    from sparkdl.data.manifest import write_dataset

    def read(split: str) -> tuple[np.ndarray, np.ndarray]:
        t = pq.read_table(os.path.join(REPO, "data", "digits", f"{split}.parquet"))
        x = np.stack(t["features"].to_numpy(zero_copy_only=False)).astype(np.float32)
        return x, t["label"].to_numpy().astype(np.int64)

    x, y = read("train")
    half = len(x) // 2
    path = os.path.join(root, "digits")
    shards = [_table(x[:half], y[:half]), _table(x[half:], y[half:])]
    write_dataset(path, shards, feature_cols=["features"], label_col="label")
    tx, ty = read("test")
    return path, tx, ty, x.shape[1]


def _synthetic(root: str, cfg: dict[str, Any]) -> tuple[str, np.ndarray, np.ndarray, int]:
    from sparkdl.data.manifest import write_dataset

    rng = np.random.default_rng(0)
    features = cfg["features"]
    teacher = rng.normal(size=(features, 10)).astype(np.float32)
    n = cfg["train_rows"] + cfg["test_rows"]
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = np.argmax(x @ teacher, axis=1).astype(np.int64)
    half = cfg["train_rows"] // 2
    path = os.path.join(root, "mlp10m")
    shards = [_table(x[:half], y[:half]), _table(x[half : 2 * half], y[half : 2 * half])]
    write_dataset(path, shards, feature_cols=["features"], label_col="label")
    return path, x[cfg["train_rows"] :], y[cfg["train_rows"] :], features


def _accuracy(run_dir: str, kwargs: dict[str, Any], x: np.ndarray, y: np.ndarray) -> float:
    import torch

    from sparkdl.models import mlp

    module = mlp(**kwargs)
    state = torch.load(os.path.join(run_dir, "model", "state_dict.pt"), weights_only=True)
    module.load_state_dict(state)
    with torch.no_grad():
        predicted = module(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((predicted == y).mean())


def _last_epoch(run_dir: str, name: str, split: str = "train") -> float:
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(run_dir, "metrics")).to_pandas()
    rows = table[(table.split == split) & (table.name == name)].sort_values("epoch")
    return float(rows.value.iloc[-1])


def run_one(
    workload: str, label: str, strategy: str, options: dict, data: tuple, root: str
) -> dict:
    """Train one (workload, strategy) with 2 local workers; its measurements."""
    import sparkdl
    from sparkdl.config import CheckpointConfig, ModelSpec, OptimConfig, SyncConfig, TrainSpec
    from sparkdl.train.worker import train

    cfg = WORKLOADS[workload]
    path, test_x, test_y, features = data
    kwargs = {"in_features": features, "out_features": 10, "hidden": cfg["hidden"]}
    run_dir = os.path.join(root, f"run-{workload}-{label.replace(' ', '_')}")
    spec = TrainSpec(
        model=ModelSpec(factory="sparkdl.models:mlp", kwargs=kwargs),
        dataset_path=path,
        run_dir=run_dir,
        optim=OptimConfig(
            learning_rate=cfg["lr"],
            batch_size=cfg["batch"],
            epochs=cfg["epochs"],
            log_every_steps=0,
        ),
        sync=SyncConfig(strategy=strategy, options=options),
        checkpoint=CheckpointConfig(every_epochs=0),  # measure training, not checkpoint writes
    )
    start = time.perf_counter()
    results = sparkdl.Distributor(2, local_mode=True, timeout_s=300).run(train, spec)
    extra = {}
    if strategy == "pipeline":
        extra = {
            "max_param_fraction": _last_epoch(run_dir, "max_stage_param_fraction", "sync"),
            "bubble_fraction": _last_epoch(run_dir, "bubble_fraction", "sync"),
        }
    return {
        **extra,
        "workload": workload,
        "strategy": label,
        "options": options,
        "params": sum(
            p.numel()
            for p in ModelSpec(factory="sparkdl.models:mlp", kwargs=kwargs).build().parameters()
        ),
        "samples_per_s": _last_epoch(run_dir, "samples_per_s"),
        "bytes_per_step": _last_epoch(run_dir, "comm_bytes_per_step"),
        "test_accuracy": _accuracy(run_dir, kwargs, test_x, test_y),
        "wall_s": time.perf_counter() - start,
        "steps": results[0].steps,
    }


def sync_markdown(rows: list[dict], load: str, machine: str) -> str:
    lines = [
        "## Synchronization strategies",
        "",
        "`python -m benchmarks sync` — 2 workers in local mode (processes, gloo on "
        "127.0.0.1, one thread each), the real worker loop. samples/s (both workers) and bytes "
        "sent per worker per step are the last epoch's (after PowerSGD's warm-up); bytes are "
        "counted at the communication hook or transport (see `sparkdl.sync.base`: ring costs, "
        "so with 2 workers an all-reduce sends its payload once). digits: MLP 64→128→64→10, "
        "17 k parameters, Adam 1e-3, batch 32/worker, 15 epochs. mlp10m: synthetic 1,024 "
        "features, 10 classes from a random linear teacher, 4,096 train rows, MLP 1024→2048×3→10, 10.5 M "
        "parameters, Adam 1e-4, batch 64/worker, 2 epochs. One run each.",
        "",
        f"Machine: {machine}.{load}",
        "",
        "| workload | strategy | samples/s | bytes/step | × fp32 | test accuracy |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for workload in dict.fromkeys(r["workload"] for r in rows):
        group = [r for r in rows if r["workload"] == workload]
        base = next(r["bytes_per_step"] for r in group if r["strategy"] == "allreduce fp32")
        for r in group:
            mark = " †" if r.get("earlier_run") else ""
            lines.append(
                f"| {workload} | {r['strategy']}{mark} | {r['samples_per_s']:,.0f} | "
                f"{_bytes(r['bytes_per_step'])} | {r['bytes_per_step'] / base:.3f}× | "
                f"{r['test_accuracy']:.3f} |"
            )
    if any(r.get("earlier_run") for r in rows):
        lines += ["", "† from the previous run (this one re-ran the other rows, `--only`)."]
    lines += ["", *_targets(rows), *_pipeline(rows)]
    return "\n".join(lines) + "\n"


def _pipeline(rows: list[dict]) -> list[str]:
    """The pipeline rows against all-reduce of the same run: speed, memory, bubble."""
    piped = [r for r in rows if "bubble_fraction" in r]
    if not piped:
        return []
    stages, microbatches = 2, 4
    ideal = (stages - 1) / (microbatches + stages - 1)
    out = [
        "",
        f"Pipeline, {stages} stages on the 2 workers (one replica: a step takes `batch` rows, "
        f"all-reduce's takes 2 × `batch`), {microbatches} microbatches. Params per rank: the "
        f"largest stage's share of the model's parameters (target ≤ 0.6×). Bubble: the "
        f"fraction of stage 0's schedule time it did not compute, measured (ideal for equal "
        f"stages, (p−1)/(m+p−1) = {ideal:.2f}); on these 2 shared cores both ranks compete "
        "for CPU, so compute and waiting overlap less cleanly than on separate devices.",
        "",
        "| workload | schedule | samples/s | × allreduce fp32 | bytes/step | params per rank "
        "| bubble |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in piped:
        base = next(
            (
                b
                for b in rows
                if b["workload"] == r["workload"] and b["strategy"] == "allreduce fp32"
            ),
            None,
        )
        speed = f"{r['samples_per_s'] / base['samples_per_s']:.2f}×" if base else "—"
        params = r["params"] * r["max_param_fraction"]
        out.append(
            f"| {r['workload']} | {r['strategy'].split()[-1]} | {r['samples_per_s']:,.0f} | "
            f"{speed} | {_bytes(r['bytes_per_step'])} | {r['max_param_fraction']:.3f}× "
            f"({_bytes(params * 4)}) | {r['bubble_fraction']:.2f} |"
        )
    return out


def _merged(previous: list[dict], fresh: list[dict]) -> list[dict]:
    """``fresh`` rows, and the ``previous`` ones they do not replace (marked earlier_run), in
    the order of WORKLOADS × STRATEGIES."""
    key = lambda r: (r["workload"], r["strategy"])  # noqa: E731
    rows = {key(r): {**r, "earlier_run": True} for r in previous}
    rows.update({key(r): r for r in fresh})
    order = [(w, label) for w in WORKLOADS for label, _, _ in STRATEGIES]
    return [rows[k] for k in order if k in rows]


def _targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked on the 10 M-parameter model."""
    group = {r["strategy"]: r["bytes_per_step"] for r in rows if r["workload"] == "mlp10m"}
    if "allreduce fp32" not in group:
        return []
    base = group["allreduce fp32"]
    checks = [
        ("allreduce fp16", "≈ 0.5×", lambda r: abs(r - 0.5) < 0.02),
        ("allreduce PowerSGD r1", "≤ 0.1×", lambda r: r <= 0.1),
        ("local_sgd sync_every=8", "≤ 0.15×", lambda r: r <= 0.15),
    ]
    out = ["Targets on mlp10m (bytes/step vs fp32 all-reduce):", ""]
    for name, target, ok in checks:
        if name in group:
            ratio = group[name] / base
            out.append(
                f"- {name}: {ratio:.3f}× (target {target}: {'met' if ok(ratio) else 'MISSED'})"
            )
    return out


def _bytes(n: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def run_sync(args: argparse.Namespace) -> None:
    root = args.work_dir or tempfile.mkdtemp(prefix="sparkdl-bench-sync-")
    os.makedirs(root, exist_ok=True)
    loads = [os.getloadavg()[0]]
    rows = []
    try:
        for workload in args.workloads:
            if workload == "digits":
                data = _digits(root)
            else:
                data = _synthetic(root, WORKLOADS[workload])
            for label, strategy, options in STRATEGIES:
                if args.only and not any(o in label for o in args.only):
                    continue
                row = run_one(workload, label, strategy, options, data, root)
                print(row, flush=True)
                rows.append(row)
                loads.append(os.getloadavg()[0])
    finally:
        if not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)
    json_path = os.path.splitext(args.out)[0] + ".json" if args.out else ""
    if args.only and json_path and os.path.exists(json_path):
        import json

        with open(json_path) as fh:
            rows = _merged(json.load(fh).get("sync", {}).get("rows", []), rows)
    markdown = sync_markdown(rows, load_note(loads), machine())
    print(markdown)
    if args.out:
        write_section(markdown, args.out)
        write_json("sync", {"rows": rows}, json_path)


def add_sync(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sync", help="strategy × (samples/s, bytes/step, test accuracy)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--only", nargs="*", help="strategies whose label contains one of these")
    p.add_argument(
        "--work-dir", default="", help="keep datasets and runs here (default: a temp dir)"
    )
    p.add_argument("--out", default=OUT)
    p.set_defaults(func=run_sync)
