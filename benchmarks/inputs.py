"""``python -m benchmarks inputs``: typed named inputs, the sparkdl loader vs what a user would
write instead, over the same Parquet files, shuffling on.

Three datasets (written without Spark by ``write_dataset``, 2 shards): (a) ``ids``: 2 int64 id
columns + 16 float32 columns + an int64 label; (b) ``tokens``: variable-length int64 token
arrays (lengths uniform in 1..127, mean 64) + label; (c) ``images``: 64×64 RGB PNGs + label.
Readers, each in a fresh process (one warm-up, best of ``--repeats``), interleaved over
``--rounds``: the sparkdl loader (``feature_cols`` a dict; images decoded by
``decode_images(..., workers=2)`` in ``transform``), Ray Data ``iter_torch_batches`` with a local shuffle
buffer, Hugging Face ``datasets`` (``with_format("torch")``, shuffled by ``shuffle()`` or an
iterable dataset's shuffle buffer), and for images a torch ``DataLoader`` with PIL decode in 2
worker processes. Every reader yields the tensors a model takes (ids int64 ``[B]``, dense
float32 ``[B, 16]``, tokens padded ``[B, T]`` with lengths, images float32 ``[B, 3, 64, 64]``).
Peers need the ``bench`` extra (``pip install sparkdl-torch[bench]``); a missing one is
reported and skipped. ``--dense-baseline DIR`` also times the dense (list ``feature_cols``)
loader of the code at ``DIR`` (e.g. a checkout of the previous commit) next to this one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import DATA_DIR, OUT, REPO, load_note, machine, record

__all__ = ["DATASETS", "READERS", "add_inputs", "measure"]

FLOATS = 16
SHUFFLE_ROWS = 1 << 15  # the peers' shuffle buffer (rows)
DATASETS = {"ids": 300_000, "tokens": 100_000, "images": 10_000}


def _files(path: str) -> list[str]:
    from sparkdl.data import ShardedDataset

    ds = ShardedDataset.load(path)
    return [os.path.join(path, f.path) for f in ds.manifest.files_of("train")]


def _png(rng: np.random.Generator) -> bytes:
    from PIL import Image

    base = rng.integers(0, 255, 3)
    ramp = np.linspace(0, 60, 64, dtype=np.float32)
    pixels = base + ramp[:, None, None] + rng.normal(0, 8, (64, 64, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(out, format="PNG")
    return out.getvalue()


def build(kind: str, rows: int, root: str) -> str:
    """The ``kind`` dataset of ``rows`` rows under ``root`` (reused when it exists)."""
    import pyarrow as pa

    from sparkdl.data.manifest import MANIFEST_NAME, write_dataset

    path = os.path.join(root, f"inputs-{kind}-{rows}")
    if os.path.exists(os.path.join(path, MANIFEST_NAME)):
        return path
    rng = np.random.default_rng(0)
    label = pa.array(rng.integers(0, 2, rows), pa.int64())
    if kind == "ids":
        columns = {
            "user": pa.array(rng.integers(0, 100_000, rows)),
            "item": pa.array(rng.integers(0, 10_000, rows)),
        }
        columns.update(
            {f"f{i}": pa.array(rng.random(rows, dtype=np.float32)) for i in range(FLOATS)}
        )
        features: dict = {"user": "user", "item": "item", "dense": [f"f{i}" for i in range(FLOATS)]}
    elif kind == "tokens":
        lengths = rng.integers(1, 128, rows)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        values = pa.array(rng.integers(1, 30_000, int(offsets[-1])))
        columns = {"tokens": pa.ListArray.from_arrays(pa.array(offsets), values)}
        features = {"tokens": "tokens"}
    else:
        columns = {"image": pa.array([_png(rng) for _ in range(rows)], pa.binary())}
        features = {"image": "image"}
    table = pa.table({**columns, "label": label})
    half = rows // 2
    write_dataset(
        path,
        [table.slice(0, half), table.slice(half)],
        feature_cols=features,
        label_col="label",
        row_group_rows=max(1, half // 8),
    )
    return path


# --- readers: each returns the rows it yielded ----------------------------------------------


def _decode(batch: dict) -> dict:
    from sparkdl.data import decode_images

    return {**batch, "image": decode_images(batch["image"], workers=2)}


def _sparkdl(path: str, kind: str, batch_size: int) -> int:
    from sparkdl.data import ShardedDataset

    transform = _decode if kind == "images" else None
    threads = 2 if kind == "images" else 1  # two batches in flight: the decoders never wait
    loader = ShardedDataset.load(path).loader(
        0, 1, batch_size=batch_size, shuffle=True, transform=transform, transform_threads=threads
    )
    return sum(len(label) for _, label in loader)


def _pad(rows: list, dtype=np.int64) -> tuple:
    """Ragged rows → (int64 [B, T] zero-padded, lengths [B]), as a user's collate would."""
    import torch

    lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    out = np.zeros((len(rows), int(lengths.max()) if len(rows) else 0), dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out), torch.from_numpy(lengths)


def _ray(path: str, kind: str, batch_size: int) -> int:
    import ray
    import torch

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    data = ray.data.read_parquet(_files(path))
    dense = [f"f{i}" for i in range(FLOATS)]

    def collate(batch: dict) -> dict:
        if kind == "tokens":
            tokens, lengths = _pad(list(batch["tokens"]))
            return {
                "tokens": tokens,
                "tokens_length": lengths,
                "label": torch.as_tensor(batch["label"]),
            }
        return {
            "user": torch.as_tensor(batch["user"]),
            "item": torch.as_tensor(batch["item"]),
            "dense": torch.as_tensor(np.stack([batch[c] for c in dense], axis=1)),
            "label": torch.as_tensor(batch["label"]),
        }

    rows = 0
    for batch in data.iter_torch_batches(
        batch_size=batch_size, local_shuffle_buffer_size=SHUFFLE_ROWS, collate_fn=collate
    ):
        rows += len(batch["label"])
    return rows


def _hf_batch(batch: dict, kind: str) -> int:
    import torch

    if kind == "tokens":
        torch.nn.utils.rnn.pad_sequence(list(batch["tokens"]), batch_first=True)
    else:
        torch.stack([batch[f"f{i}"] for i in range(FLOATS)], dim=1)
    return len(batch["label"])


def _hf(iterable: bool):
    def run(path: str, kind: str, batch_size: int) -> int:
        import datasets

        datasets.disable_progress_bars()
        data = datasets.Dataset.from_parquet(_files(path), cache_dir=os.path.join(path, "_hf"))
        if iterable:
            stream = data.to_iterable_dataset(num_shards=16).shuffle(
                seed=0, buffer_size=SHUFFLE_ROWS
            )
            batches = stream.with_format("torch").iter(batch_size=batch_size)
        else:
            batches = data.shuffle(seed=0).with_format("torch").iter(batch_size=batch_size)
        return sum(_hf_batch(batch, kind) for batch in batches)

    return run


class _Images:
    """A map-style dataset of PNG bytes, decoded with PIL per item (the torchvision recipe)."""

    def __init__(self, path: str) -> None:
        import pyarrow.parquet as pq

        tables = [pq.read_table(f) for f in _files(path)]
        self.images = [b for t in tables for b in t.column("image").to_pylist()]
        self.labels = [y for t in tables for y in t.column("label").to_pylist()]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        with Image.open(io.BytesIO(self.images[i])) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)
        return tensor, self.labels[i]


def _torch_images(path: str, kind: str, batch_size: int) -> int:
    import torch

    loader = torch.utils.data.DataLoader(
        _Images(path), batch_size=batch_size, shuffle=True, num_workers=2, drop_last=True
    )
    return sum(len(label) for _, label in loader)


READERS = {
    "sparkdl loader": (_sparkdl, ("ids", "tokens", "images")),
    "Ray Data iter_torch_batches": (_ray, ("ids", "tokens")),
    "HF datasets shuffle()": (_hf(False), ("ids", "tokens")),
    "HF datasets iterable shuffle buffer": (_hf(True), ("ids", "tokens")),
    "torch DataLoader + PIL, 2 workers": (_torch_images, ("images",)),
}


def measure(reader: str, path: str, kind: str, batch_size: int, repeats: int) -> dict:
    """(in a child process) best-of-``repeats`` rows/s of one reader on one dataset."""
    read = READERS[reader][0]
    read(path, kind, batch_size)  # warm-up: page cache, lazy imports, caches
    best, rows = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        rows = read(path, kind, batch_size)
        best = min(best, time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "reader": reader,
        "kind": kind,
        "rows": rows,
        "rows_per_s": rows / best,
        "peak_rss_mib": peak,
    }


def _in_child(args: list[str], env: dict | None = None) -> dict | None:
    cmd = [sys.executable, "-m", "benchmarks", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode:
        print(f"{' '.join(args[:3])} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _dense_rows(code: str, path: str, batch_size: int, repeats: int) -> dict | None:
    """The dense loader (a list feature_cols) of the code at ``code``, in a child process."""
    env = {**os.environ, "PYTHONPATH": code}
    script = (
        "import json, time, resource; from sparkdl.data import ShardedDataset\n"
        f"ds = ShardedDataset.load({path!r}); best = 1e9\n"
        f"for i in range({repeats} + 1):\n"
        "    t = time.perf_counter()\n"
        f"    rows = sum(len(f) for f, _ in ds.loader(0, 1, batch_size={batch_size}, shuffle=True))\n"
        "    best = min(best, time.perf_counter() - t) if i else best\n"
        "print(json.dumps({'rows_per_s': rows / best}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/"
    )
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


def inputs_markdown(results: dict[str, list[dict]], dense: list[dict], args, load: str) -> str:
    lines = [
        "## Typed inputs",
        "",
        f"`python -m benchmarks inputs` — batch {args.batch_size}, shuffling on, one reader "
        f"reading every row (world size 1); each reader in a fresh process, one warm-up then "
        f"best of {args.repeats} runs, readers interleaved over {args.rounds} rounds; files in "
        "the page cache. (a) `ids`: 2 int64 id columns + 16 float32 columns → ids int64 `[B]`, "
        "dense float32 `[B, 16]`; (b) `tokens`: variable-length int64 arrays (mean length 64) → "
        "padded `[B, T]` + lengths; (c) `images`: 64×64 RGB PNG → float32 `[B, 3, 64, 64]` "
        "(sparkdl: `decode_images(..., workers=2)` in `transform`, `transform_threads=2`). Peers over the same Parquet files: Ray Data "
        f"`iter_torch_batches(local_shuffle_buffer_size={SHUFFLE_ROWS})` with a collate that "
        'builds the same tensors; Hugging Face `datasets` with `with_format("torch")`, either '
        "`shuffle(seed)` (an index mapping) or `to_iterable_dataset().shuffle(buffer_size="
        f"{SHUFFLE_ROWS})`; for images a torch `DataLoader` (shuffle, 2 worker processes) "
        "decoding each PNG with PIL.",
        "",
        f"Machine: {machine()}.{load}",
        "",
        "| data | rows | reader | rows/s | vs best peer | peak RSS MiB |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for kind, entries in results.items():
        peers = [e["rows_per_s"] for e in entries if e["reader"] != "sparkdl loader"]
        best = max(peers) if peers else float("nan")
        for e in entries:
            lines.append(
                f"| {kind} | {e['rows']:,} | {e['reader']} | {e['rows_per_s'] / 1e3:,.1f} k | "
                f"{e['rows_per_s'] / best:.2f}× | {e['peak_rss_mib']:.0f} |"
            )
    targets = {"ids": 2.0, "tokens": 2.0, "images": 1.0}
    lines.append("")
    for kind, entries in results.items():
        speed = {e["reader"]: e["rows_per_s"] for e in entries}
        peers = {r: v for r, v in speed.items() if r != "sparkdl loader"}
        if "sparkdl loader" in speed and peers:
            fastest = max(peers, key=peers.__getitem__)
            ratio = speed["sparkdl loader"] / peers[fastest]
            met = "met" if ratio >= targets[kind] else "**missed**"
            lines.append(
                f"- {kind}: sparkdl is **{ratio:.1f}×** the best peer ({fastest}); target "
                f"≥ {targets[kind]:g}×: {met}."
            )
    if dense:
        lines += [
            "",
            "Dense path (a list `feature_cols`, 16 float32 columns, shuffled), this code vs `--dense-baseline`, interleaved in the same run:",
            "",
        ]
        lines += ["| code | rows/s (best of rounds) | vs baseline |", "|---|---:|---:|"]
        base = next((d["rows_per_s"] for d in dense if d["code"] == "baseline"), float("nan"))
        lines += [
            f"| {d['code']} | {d['rows_per_s'] / 1e6:.2f} M | {d['rows_per_s'] / base:.3f}× |"
            for d in dense
        ]
    return "\n".join(lines) + "\n"


def run_inputs(args: argparse.Namespace) -> None:
    results: dict[str, list[dict]] = {}
    loads = [os.getloadavg()[0]]
    for kind in [] if args.dense_only else args.kinds:
        rows = args.rows or DATASETS[kind]
        path = build(kind, rows, args.data_dir)
        best: dict[str, dict] = {}
        readers = [r for r, (_, kinds) in READERS.items() if kind in kinds]
        for _ in range(args.rounds):
            for reader in readers:
                entry = _in_child(
                    ["inputs-measure", reader, path, kind, str(args.batch_size), str(args.repeats)]
                )
                if entry is None:
                    continue
                print(json.dumps(entry), flush=True)
                if reader not in best or entry["rows_per_s"] > best[reader]["rows_per_s"]:
                    best[reader] = entry
        results[kind] = [best[r] for r in readers if r in best]
        loads.append(os.getloadavg()[0])
    dense = _compare_dense(args) if args.dense_baseline else []
    markdown = inputs_markdown(results, dense, args, load_note(loads))
    print(markdown)
    record("inputs", markdown, {"results": results, "dense": dense, "load": loads}, args.out)


def _compare_dense(args: argparse.Namespace) -> list[dict]:
    from benchmarks.common import build_dataset

    path = build_dataset(1_000_000, args.data_dir)
    best: dict[str, float] = {}
    for _ in range(args.dense_rounds):
        for name, code in (("this commit", REPO), ("baseline", args.dense_baseline)):
            entry = _dense_rows(code, path, args.batch_size, args.repeats)
            if entry:
                print(json.dumps({"dense": name, **entry}), flush=True)
                best[name] = max(best.get(name, 0.0), entry["rows_per_s"])
    return [{"code": name, "rows_per_s": value} for name, value in best.items()]


def add_inputs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inputs", help="typed named inputs: sparkdl vs Ray Data, HF datasets, torch")
    p.add_argument("--kinds", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--rows", type=int, default=0, help="rows per dataset (0: each kind's default)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dense-baseline", default="", help="a checkout whose dense loader to time too")
    p.add_argument("--dense-rounds", type=int, default=5, help="rounds of the dense pair")
    p.add_argument("--dense-only", action="store_true", help="only the dense comparison")
    p.add_argument("--data-dir", default=DATA_DIR)
    p.add_argument("--out", default=OUT)
    p.set_defaults(func=run_inputs)
    m = sub.add_parser("inputs-measure", help=argparse.SUPPRESS)
    for name in ("reader", "path", "kind"):
        m.add_argument(name)
    m.add_argument("batch_size", type=int)
    m.add_argument("repeats", type=int)
    m.set_defaults(
        func=lambda a: print(json.dumps(measure(a.reader, a.path, a.kind, a.batch_size, a.repeats)))
    )
