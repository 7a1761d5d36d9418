"""materialize on Spark local[2]: column kinds, equal shards, manifest, modes, bad input, skew."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sparkdl.data import ShardedDataset, materialize
from sparkdl.data.manifest import MANIFEST_NAME
from sparkdl.errors import ConfigError, DataError

pytestmark = pytest.mark.timeout(240)


def _all_rows(ds: ShardedDataset, split: str = "train"):
    """Every row of the split in file order, as (features, label) tensors."""
    rows = ds.num_rows_of(split)
    ld = ds.loader(0, 1, batch_size=max(rows, 1), shuffle=False, drop_last=False, split=split)
    return next(iter(ld))


def test_numeric_columns_equal_shards_manifest_and_spark_readable(spark_local, tmp_path):
    df = spark_local.range(0, 1500, numPartitions=3).selectExpr(
        "cast(id as int) as i", "id * 0.5 as d", "cast(id % 7 as smallint) as label"
    )
    root = str(tmp_path / "numeric")
    ds = materialize(df, root, feature_cols=["i", "d"], label_col="label", num_shards=4)
    assert os.path.exists(os.path.join(root, MANIFEST_NAME))
    assert ShardedDataset.load(root).manifest == ds.manifest
    rows = [s.rows for s in ds.manifest.shards_of("train")]
    assert sum(rows) == 1500 and max(rows) - min(rows) <= 1
    assert all(len(f.row_groups) > 1 for s in ds.manifest.shards for f in s.files)
    assert ds.feature_dim == 2 and ds.label_is_integer
    assert spark_local.read.parquet(os.path.join(root, "train")).count() == 1500
    features, label = _all_rows(ds)
    order = torch.argsort(features[:, 0])
    assert features[order, 0].tolist() == list(range(1500))
    assert torch.equal(features[order, 1], torch.arange(1500, dtype=torch.float32) * 0.5)
    assert label.dtype == torch.int64
    assert torch.equal(label[order], torch.arange(1500) % 7)
    # rank r of num_shards ranks reads shard r: global row i sits in shard i % num_shards
    first, _ = next(iter(ds.loader(1, 4, batch_size=3, shuffle=False)))
    assert first[:, 0].tolist() == [1.0, 5.0, 9.0]


def test_array_and_vector_columns(spark_local, tmp_path):
    from pyspark.ml.linalg import Vectors

    data = [
        (
            i,
            [float(i), i + 1.0, i + 2.0],
            Vectors.dense([i, -i]) if i % 2 else Vectors.sparse(2, {0: i}),
            i / 10,
        )
        for i in range(200)
    ]
    df = spark_local.createDataFrame(data, ["id", "arr", "vec", "y"]).repartition(3)
    ds = materialize(
        df, str(tmp_path / "arr"), feature_cols=["arr", "vec", "id"], label_col="y", num_shards=2
    )
    assert ds.manifest.feature_shapes == ((3,), (2,), ())
    assert ds.feature_dim == 6 and not ds.label_is_integer
    features, label = _all_rows(ds)
    assert features.dtype == torch.float32 and label.dtype == torch.float32
    by_id = {int(r[-1]): r.tolist() for r in features}
    assert by_id[5] == [5.0, 6.0, 7.0, 5.0, -5.0, 5.0]
    assert by_id[4] == [4.0, 5.0, 6.0, 4.0, 0.0, 4.0]
    assert np.allclose(label.numpy(), features[:, -1].numpy() / 10)


def test_empty_and_skewed_partitions(spark_local, tmp_path):
    seven = spark_local.range(0, 7).selectExpr("cast(id as double) as x", "id as label")
    skewed = seven.repartition(5)  # some partitions empty
    uneven = seven.union(
        spark_local.range(100, 400, numPartitions=1).selectExpr(
            "cast(id as double) as x", "id as label"
        )
    ).union(
        spark_local.range(0, 40, numPartitions=4)
        .filter("id < 3")
        .selectExpr("cast(id + 1000 as double) as x", "id as label")
    )
    for name, df, expected in (("skewed", skewed, 7), ("uneven", uneven, 310)):
        ds = materialize(
            df, str(tmp_path / name), feature_cols=["x"], label_col="label", num_shards=2
        )
        rows = [s.rows for s in ds.manifest.shards_of("train")]
        assert sum(rows) == expected and max(rows) - min(rows) <= 1
        features, _ = _all_rows(ds)
        expected_x = sorted(r.x for r in df.collect())
        assert sorted(features[:, 0].tolist()) == expected_x


def test_modes_error_overwrite_reuse(spark_local, tmp_path):
    root = str(tmp_path / "modes")
    df = spark_local.range(0, 100).selectExpr("cast(id as float) as x", "id % 2 as label")
    first = materialize(df, root, feature_cols=["x"], label_col="label", num_shards=2)
    with pytest.raises(ConfigError, match="mode='overwrite'"):
        materialize(df, root, feature_cols=["x"], label_col="label", num_shards=2)
    manifest_path = os.path.join(root, MANIFEST_NAME)
    stamp = os.stat(manifest_path).st_mtime_ns
    reused = materialize(
        df, root, feature_cols=["x"], label_col="label", num_shards=2, mode="reuse"
    )
    assert reused.manifest == first.manifest and os.stat(manifest_path).st_mtime_ns == stamp
    other = df.filter("x < 50")
    with pytest.raises(ConfigError, match="mode='reuse', got a different DataFrame: its rows"):
        materialize(other, root, feature_cols=["x"], label_col="label", num_shards=2, mode="reuse")
    with pytest.raises(ConfigError, match=r"different parameter: num_shards \(2 then, 3 now\)"):
        materialize(df, root, feature_cols=["x"], label_col="label", num_shards=3, mode="reuse")
    replaced = materialize(
        other, root, feature_cols=["x"], label_col="label", num_shards=2, mode="overwrite"
    )
    assert replaced.num_rows == 50 and ShardedDataset.load(root).num_rows == 50


def test_validation_split_and_replicas(spark_local, tmp_path):
    df = spark_local.range(0, 1000, numPartitions=2).selectExpr(
        "cast(id as float) as x", "id as label"
    )
    kwargs = dict(
        feature_cols=["x"], label_col="label", num_shards=2, validation_fraction=0.2, seed=5
    )
    ds = materialize(df, str(tmp_path / "v1"), replicas=2, **kwargs)
    again = materialize(df, str(tmp_path / "v2"), **kwargs)
    splits = ds.manifest.splits
    assert splits["train"] + splits["validation"] == 1000
    assert 120 < splits["validation"] < 280
    assert again.manifest.splits == splits
    train, _ = _all_rows(ds)
    validation, _ = _all_rows(ds, "validation")
    assert set(train[:, 0].tolist()).isdisjoint(validation[:, 0].tolist())
    for shard in ds.manifest.shards:
        for f in shard.files:
            assert f.replicas == (f"_replicas/1/{f.path}",)
            assert os.path.getsize(os.path.join(ds.path, f.replicas[0])) == f.bytes
    assert spark_local.read.parquet(ds.path + "/validation").count() == splits["validation"]


@pytest.fixture(scope="module")
def frames(spark_local):
    base = spark_local.range(0, 20).selectExpr(
        "cast(id as double) as x",
        "id as label",
        "cast(id as string) as s",
        "if(id = 3, null, cast(id as double)) as with_null",
        "if(id = 4, null, id) as label_null",
        "if(id = 5, double('NaN'), cast(id as double)) as with_nan",
        "if(id = 6, double('inf'), cast(id as double)) as with_inf",
        "if(id = 7, array(1.0), array(1.0, 2.0)) as ragged",
        "if(id = 8, double('NaN'), cast(id as double)) as label_nan",
    )
    return base


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(feature_cols=["missing"]), ConfigError, "'missing' must exist"),
        (dict(label_col="nope"), ConfigError, "'nope' must exist"),
        (dict(feature_cols=["s"]), DataError, "'s' must be numeric"),
        (dict(label_col="s"), DataError, "label column 's' must be numeric"),
        (dict(feature_cols=["with_null"]), DataError, "'with_null' must have no nulls, got 1"),
        (dict(label_col="label_null"), DataError, "'label_null' must have no nulls, got 1"),
        (dict(feature_cols=["with_nan"]), DataError, "'with_nan' must hold only finite"),
        (dict(feature_cols=["with_inf"]), DataError, "'with_inf' must hold only finite"),
        (dict(label_col="label_nan"), DataError, "'label_nan' must hold only finite"),
        (dict(feature_cols=["ragged"]), DataError, "'ragged' must have one non-zero length"),
        (dict(num_shards=0), ConfigError, "num_shards must be"),
        (dict(num_shards=21), DataError, "at least num_shards"),
        (dict(mode="append"), ConfigError, "mode must be one of"),
        (dict(feature_cols="x"), ConfigError, "list of column names"),
        (dict(validation_fraction=1.0), ConfigError, "validation_fraction"),
        (dict(replicas=0), ConfigError, "replicas"),
    ],
)
def test_bad_input_is_rejected_before_writing(frames, tmp_path, kwargs, error, pattern):
    args = {**dict(feature_cols=["x"], label_col="label", num_shards=2), **kwargs}
    root = tmp_path / "bad"
    with pytest.raises(error, match=pattern):
        materialize(frames, str(root), **args)
    assert not root.exists()


def test_empty_dataframe_is_rejected(frames, tmp_path):
    with pytest.raises(DataError, match="at least one row, got 0"):
        materialize(
            frames.filter("x < 0"),
            str(tmp_path / "e"),
            feature_cols=["x"],
            label_col="label",
            num_shards=1,
        )
