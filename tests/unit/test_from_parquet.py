"""ShardedDataset.from_parquet: existing Parquet files (Spark's, petastorm's) described into a manifest."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparkdl.data import ShardedDataset
from sparkdl.data.manifest import write_dataset
from sparkdl.errors import ConfigError, DataError

pytestmark = pytest.mark.timeout(60)


def _write(path, ids, row_group_size=3):
    ids = list(ids)
    table = pa.table(
        {
            "a": pa.array([float(i) for i in ids], pa.float64()),
            "arr": pa.array([[float(i), 2.0 * i] for i in ids], pa.list_(pa.float32())),
            "label": pa.array(ids, pa.int32()),
            "name": pa.array([str(i) for i in ids]),
        }
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture
def spark_like(tmp_path):
    """A directory as Spark writes it: part files (one empty), _SUCCESS, a hidden .crc file."""
    root = tmp_path / "out"
    _write(str(root / "part-00000.parquet"), range(0, 7))
    _write(str(root / "part-00001.parquet"), [])
    _write(str(root / "part-00002.parquet"), range(7, 12))
    _write(str(root / "part-00003.parquet"), range(12, 20))
    (root / "_SUCCESS").write_text("")
    (root / ".part-00000.parquet.crc").write_text("crc")
    return str(root)


def _ids(loader):
    return [i for _, y in loader for i in y.tolist()]


def test_describes_non_empty_visible_files_into_shards(spark_like):
    ds = ShardedDataset.from_parquet(
        spark_like, feature_cols=["a", "arr"], label_col="label", num_shards=2
    )
    m = ds.manifest
    assert ds.num_rows == 20 and m.num_shards == 2 and m.feature_dim == 3
    assert m.label_type == "int64"
    assert [[f.path for f in s.files] for s in m.shards_of("train")] == [
        ["part-00000.parquet", "part-00002.parquet"],
        ["part-00003.parquet"],
    ]
    assert ShardedDataset.load(spark_like).manifest.shards == m.shards  # manifest written
    assert _ids(ds.loader(0, 1, batch_size=5, shuffle=False)) == list(range(20))
    f, y = next(iter(ds.loader(0, 1, batch_size=2, shuffle=False)))
    assert f.tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 2.0]]
    # default: one shard per non-empty file; describing again replaces the manifest
    again = ShardedDataset.from_parquet(spark_like, feature_cols=["arr"], label_col="a")
    assert again.manifest.num_shards == 3 and again.manifest.label_type == "float32"


def test_every_rank_gets_equal_batches(spark_like):
    ds = ShardedDataset.from_parquet(spark_like, feature_cols=["a"], label_col="label")
    lens = {len(list(ds.loader(r, 2, batch_size=3, seed=1))) for r in range(2)}
    assert lens == {3}


def test_bad_inputs(tmp_path, spark_like):
    with pytest.raises(DataError, match="column 'nope' must be in the Parquet files"):
        ShardedDataset.from_parquet(spark_like, feature_cols=["nope"], label_col="label")
    with pytest.raises(DataError, match="feature column 'name' must be numeric"):
        ShardedDataset.from_parquet(spark_like, feature_cols=["name"], label_col="label")
    with pytest.raises(DataError, match="label column 'name' must be numeric"):
        ShardedDataset.from_parquet(spark_like, feature_cols=["a"], label_col="name")
    with pytest.raises(ConfigError, match="num_shards"):
        ShardedDataset.from_parquet(spark_like, feature_cols=["a"], label_col="label", num_shards=0)
    with pytest.raises(DataError, match="must hold Parquet files with rows"):
        ShardedDataset.from_parquet(
            str(tmp_path / "missing"), feature_cols=["a"], label_col="label"
        )
    (tmp_path / "out" / "notes.txt").write_text("not parquet")
    with pytest.raises(DataError, match="notes.txt"):
        ShardedDataset.from_parquet(spark_like, feature_cols=["a"], label_col="label")


def test_refuses_a_materialized_sparkdl_dataset(tmp_path):
    root = str(tmp_path / "ds")
    table = pa.table({"x": pa.array([1.0, 2.0]), "label": pa.array([0, 1])})
    write_dataset(root, [table], feature_cols=["x"], label_col="label")
    with pytest.raises(ConfigError, match=r"ShardedDataset.load"):
        ShardedDataset.from_parquet(root, feature_cols=["x"], label_col="label")
