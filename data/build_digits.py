"""Rebuild data/digits/{train,test}.parquet from scikit-learn's bundled handwritten digits.

Run: python data/build_digits.py   (needs scikit-learn; the Parquet files are committed, so
users never need to run this). The split is fixed: seeded permutation, 80% train / 20% test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SEED = 20240601
TEST_FRACTION = 0.2
OUT = Path(__file__).resolve().parent / "digits"


def build() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel intensities 0..16 scaled to [0, 1]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(SEED).permutation(len(y))
    n_test = int(round(len(y) * TEST_FRACTION))
    splits = {"test": order[:n_test], "train": order[n_test:]}
    OUT.mkdir(parents=True, exist_ok=True)
    for name, idx in splits.items():
        table = pa.table(
            {
                "features": pa.array(list(x[idx]), type=pa.list_(pa.float32())),
                "label": pa.array(y[idx], type=pa.int32()),
            }
        )
        pq.write_table(table, OUT / f"{name}.parquet", compression="zstd")
        print(f"{name}: {table.num_rows} rows -> {OUT / f'{name}.parquet'}")


if __name__ == "__main__":
    build()
