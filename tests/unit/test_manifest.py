"""Manifest format: round trip, atomic save, validation errors, incomplete datasets."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pyarrow as pa
import pytest

from sparkdl.data import Manifest, ShardedDataset
from sparkdl.data.manifest import MANIFEST_NAME, FileEntry, ShardEntry, write_dataset
from sparkdl.errors import DataError

pytestmark = pytest.mark.timeout(60)


def _table(start: int, n: int) -> pa.Table:
    ids = list(range(start, start + n))
    return pa.table(
        {
            "x": pa.array([float(i) for i in ids], pa.float32()),
            "v": pa.array([[float(i), -float(i)] for i in ids], pa.list_(pa.float32())),
            "label": pa.array(ids, pa.int64()),
        }
    )


@pytest.fixture
def dataset_dir(tmp_path):
    root = str(tmp_path / "ds")
    write_dataset(
        root,
        [_table(0, 10), _table(10, 3), _table(13, 0)],
        feature_cols=["x", "v"],
        label_col="label",
        row_group_rows=4,
        replicas=2,
    )
    return root


def test_round_trip_keeps_every_field(dataset_dir):
    loaded = Manifest.load(dataset_dir)
    assert loaded.feature_cols == ("x", "v")
    assert loaded.feature_shapes == ((), (2,))
    assert loaded.feature_dim == 3
    assert loaded.label_type == "int64"
    assert loaded.splits == {"train": 13}
    assert [s.rows for s in loaded.shards_of("train")] == [10, 3, 0]
    first = loaded.shards_of("train")[0].files[0]
    assert first.row_groups == (4, 4, 2)
    assert first.replicas == ("_replicas/1/train/shard-00000.parquet",)
    assert len(first.sha256) == 64 and first.bytes == os.path.getsize(
        os.path.join(dataset_dir, first.path)
    )
    assert [f["name"] for f in loaded.schema] == ["x", "v", "label"]
    again = Manifest.from_json(json.loads(loaded.dumps()))
    assert again == loaded


def test_save_is_atomic_and_leaves_no_temp_files(dataset_dir):
    m = Manifest.load(dataset_dir)
    m.save(dataset_dir)
    names = os.listdir(dataset_dir)
    assert MANIFEST_NAME in names
    assert not [n for n in names if n.endswith(".tmp")]


def test_dataset_without_manifest_is_incomplete(dataset_dir):
    os.remove(os.path.join(dataset_dir, MANIFEST_NAME))
    with pytest.raises(DataError, match="never completed"):
        ShardedDataset.load(dataset_dir)


def test_malformed_manifest_is_a_data_error(dataset_dir):
    with open(os.path.join(dataset_dir, MANIFEST_NAME), "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match="valid JSON"):
        Manifest.load(dataset_dir)
    with open(os.path.join(dataset_dir, MANIFEST_NAME), "w") as f:
        json.dump({"format_version": 1}, f)
    with pytest.raises(DataError, match="required field"):
        Manifest.load(dataset_dir)


def _broken_variants(m: Manifest):
    shards = list(m.shards)
    first_file = shards[0].files[0]
    yield "splits", replace(m, splits={"train": 14})
    yield "indices", replace(m, shards=tuple(shards[:2]))
    yield (
        "sha256",
        m.with_shards(
            [replace(shards[0], files=(replace(first_file, sha256="xyz"),)), *shards[1:]]
        ),
    )
    yield (
        "relative",
        m.with_shards(
            [replace(shards[0], files=(replace(first_file, path="/abs/x.parquet"),)), *shards[1:]]
        ),
    )
    yield (
        "row_groups",
        m.with_shards(
            [replace(shards[0], files=(replace(first_file, row_groups=(4, 4)),)), *shards[1:]]
        ),
    )
    yield "label_type", replace(m, label_type="int8")
    yield "format_version", replace(m, format_version=99)
    yield "feature_shapes", replace(m, feature_shapes=((),))
    yield "splits", replace(m, splits={"test": 13})


def test_validate_rejects_each_inconsistency(dataset_dir):
    m = Manifest.load(dataset_dir)
    m.validate()
    for expected, broken in _broken_variants(m):
        with pytest.raises(DataError, match=expected):
            broken.validate()


def test_unknown_split_names_the_fix(dataset_dir):
    ds = ShardedDataset.load(dataset_dir)
    with pytest.raises(DataError, match="validation_fraction"):
        ds.steps_per_epoch(2, 4, split="validation")


def test_dataset_properties(dataset_dir):
    ds = ShardedDataset.load(dataset_dir)
    assert ds.num_rows == 13
    assert ds.num_shards == 3
    assert ds.feature_dim == 3
    assert ds.label_is_integer
    assert ds.path == dataset_dir
    assert ds.steps_per_epoch(2, 2) == 3  # floor(floor(13/2)/2)
    assert ds.steps_per_epoch(2, 2, drop_last=False) == 4  # ceil(ceil(13/2)/2)


def test_entries_from_json_defaults():
    entry = FileEntry.from_json({"path": "a.parquet", "rows": 0, "bytes": 0, "sha256": "0" * 64})
    assert entry.candidates == ("a.parquet",)
    shard = ShardEntry.from_json({"index": 0, "split": "train"})
    assert shard.rows == 0 and shard.files == ()


def test_ragged_list_column_is_rejected(tmp_path):
    table = pa.table({"v": pa.array([[1.0], [1.0, 2.0]]), "label": pa.array([0, 1])})
    with pytest.raises(DataError, match="'v'"):
        write_dataset(str(tmp_path / "r"), [table], feature_cols=["v"], label_col="label")
