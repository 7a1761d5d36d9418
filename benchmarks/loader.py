"""``python -m benchmarks loader``: the sparkdl loader vs pyarrow readers (and petastorm).

Builds N rows × 16 float features + int label with Spark, materializes them, then times (each
in a fresh process, so peak RSS is that reader's alone) the sparkdl loader shuffled and
unshuffled, pyarrow ``read_table`` of the same files and pyarrow ``iter_batches`` → torch, and
writes the "Loader" section of BENCHMARKS.md. ``loader --with-petastorm``, run in
``.venv-compat``, adds petastorm's torch loaders on the same files and writes the "Loader vs
petastorm (compat environment)" section instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import (
    DATA_DIR,
    FEATURES,
    OUT,
    REPO,
    build_dataset,
    load_note,
    machine,
    write_section,
)

__all__ = ["PETASTORM_READERS", "READERS", "add_loader", "loader_markdown", "measure"]


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
    cmd = [sys.executable, "-m", "benchmarks", "loader-measure", reader, path]
    cmd += [str(batch_size), str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


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
        f"`python -m benchmarks loader` — {FEATURES} float32 features + int64 label, "
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
    markdown = loader_markdown(
        results, args.batch_size, load_note(loads), args.with_petastorm, args.repeats, args.rounds
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
    p.add_argument("--data-dir", default=DATA_DIR)
    p.add_argument("--out", default=OUT)
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
