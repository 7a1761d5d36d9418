"""reader="petastorm": same contract as the pyarrow reader where petastorm allows; clear errors elsewhere.

The reader tests run in the compat environment (``make test-compat``); in the main
environment (pyarrow >= 15) they are skipped and the error test runs instead.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from sparkdl.config import OptimConfig
from sparkdl.data import ShardedDataset
from sparkdl.data.manifest import write_dataset
from sparkdl.errors import ConfigError, DataError

pytestmark = pytest.mark.timeout(120)


def _petastorm_problem() -> str | None:
    from sparkdl.data.petastorm import require_petastorm

    try:
        require_petastorm()
    except ConfigError as e:
        return str(e)
    return None


PROBLEM = _petastorm_problem()
needs_petastorm = pytest.mark.skipif(
    PROBLEM is not None, reason="petastorm runs in the compat environment only (make test-compat)"
)


def _table(ids) -> pa.Table:
    ids = np.asarray(list(ids))
    return pa.table(
        {
            "x": pa.array(ids.astype(np.float32)),
            "v": pa.array(list(np.stack([ids + 0.5, -ids], 1).astype(np.float32))),
            "label": pa.array(ids.astype(np.int64)),
        }
    )


def _make(tmp_path, sizes, row_group_rows=4, **kwargs) -> ShardedDataset:
    tables, start = [], 0
    for n in sizes:
        tables.append(_table(range(start, start + n)))
        start += n
    root = str(tmp_path / "ds")
    write_dataset(
        root,
        tables,
        feature_cols=["x", "v"],
        label_col="label",
        row_group_rows=row_group_rows,
        **kwargs,
    )
    return ShardedDataset.load(root)


def _ids(loader) -> list[list[int]]:
    return [y.tolist() for _, y in loader]


@pytest.mark.skipif(PROBLEM is None, reason="petastorm works here")
def test_unusable_petastorm_names_the_compat_environment(tmp_path):
    ds = _make(tmp_path, [8, 8])
    for make in (
        lambda: ds.loader(0, 2, batch_size=2, reader="petastorm"),
        lambda: OptimConfig(reader="petastorm"),
    ):
        with pytest.raises(ConfigError, match=r"make test-compat") as info:
            make()
        assert ".venv-compat" in str(info.value)


def test_unknown_reader_is_a_config_error(tmp_path):
    ds = _make(tmp_path, [8, 8])
    with pytest.raises(ConfigError, match="reader must be one of"):
        ds.loader(0, 2, batch_size=2, reader="tfrecord")
    with pytest.raises(ConfigError, match="reader must be one of"):
        OptimConfig(reader="tfrecord")


@needs_petastorm
def test_equal_batches_per_rank_each_rank_reads_its_own_shard(tmp_path):
    ds = _make(tmp_path, [13, 12])
    seen = []
    for rank in range(2):
        pyarrow_len = len(ds.loader(rank, 2, batch_size=4))
        ld = ds.loader(rank, 2, batch_size=4, seed=3, reader="petastorm")
        batches = _ids(ld)
        assert len(ld) == len(batches) == pyarrow_len == 3
        assert all(len(b) == 4 for b in batches)
        rows = {i for b in batches for i in b}
        assert rows <= (set(range(13)) if rank == 0 else set(range(13, 25)))
        seen.append(rows)
    assert not seen[0] & seen[1]


@needs_petastorm
def test_whole_shards_per_rank_and_too_few_files(tmp_path):
    ds = _make(tmp_path, [6, 6, 6, 6])
    assert sorted(
        i for b in _ids(ds.loader(1, 2, batch_size=3, shuffle=False, reader="petastorm")) for i in b
    ) == list(range(12, 24))
    with pytest.raises(ConfigError, match="at least world_size"):
        ds.loader(0, 5, batch_size=1, reader="petastorm")


@needs_petastorm
def test_seeded_epochs_reproduce_and_differ(tmp_path):
    ds = _make(tmp_path, [20, 20])
    ld = ds.loader(0, 2, batch_size=4, seed=5, reader="petastorm")
    first = _ids(ld)
    assert first == _ids(ds.loader(0, 2, batch_size=4, seed=5, reader="petastorm"))
    assert sorted(i for b in first for i in b) == list(range(20))
    ld.set_epoch(1)
    assert _ids(ld) != first
    assert _ids(ds.loader(0, 2, batch_size=4, seed=6, reader="petastorm")) != first


@needs_petastorm
def test_unshuffled_is_file_order_and_drop_last_false_pads_the_short_rank(tmp_path):
    ds = _make(tmp_path, [7, 6])
    got = [
        _ids(ds.loader(r, 2, batch_size=3, shuffle=False, drop_last=False, reader="petastorm"))
        for r in range(2)
    ]
    assert got[0] == [[0, 1, 2], [3, 4, 5], [6]]
    assert got[1] == [[7, 8, 9], [10, 11, 12], [7]]


@needs_petastorm
def test_features_match_the_pyarrow_reader(tmp_path):
    ds = _make(tmp_path, [9, 9])
    out = {}
    for reader in ("pyarrow", "petastorm"):
        ((f, y),) = ds.loader(0, 2, batch_size=9, shuffle=False, reader=reader)
        out[reader] = (f.numpy(), y.numpy())
        assert f.dtype.is_floating_point and f.shape == (9, 3) and str(y.dtype) == "torch.int64"
    np.testing.assert_array_equal(out["pyarrow"][0], out["petastorm"][0])
    np.testing.assert_array_equal(out["pyarrow"][1], out["petastorm"][1])


@needs_petastorm
def test_resume_and_transform(tmp_path):
    ds = _make(tmp_path, [16, 16])
    whole = _ids(ds.loader(0, 2, batch_size=2, seed=2, reader="petastorm"))
    ld = ds.loader(0, 2, batch_size=2, seed=2, reader="petastorm")
    head = []
    for _, y in ld:
        head.append(y.tolist())
        if len(head) == 3:
            break
    resumed = ds.loader(0, 2, batch_size=2, seed=2, reader="petastorm")
    resumed.load_state_dict(ld.state_dict())
    assert head + _ids(resumed) == whole

    def double(batch):
        return {"features": batch["v"] * 2, "label": batch["label"]}

    f, y = next(
        iter(ds.loader(0, 2, batch_size=2, shuffle=False, transform=double, reader="petastorm"))
    )
    assert f.tolist() == [[1.0, 0.0], [3.0, -2.0]] and y.tolist() == [0, 1]


@needs_petastorm
def test_replica_used_when_primary_is_corrupt(tmp_path):
    ds = _make(tmp_path, [8, 8], replicas=2)
    expected = _ids(ds.loader(0, 2, batch_size=2, seed=1, reader="petastorm"))
    entry = ds.manifest.shards_of("train")[0].files[0]
    with open(os.path.join(ds.path, entry.path), "r+b") as f:
        f.seek(10)
        f.write(b"garbage!")
    assert (
        _ids(ShardedDataset.load(ds.path).loader(0, 2, batch_size=2, seed=1, reader="petastorm"))
        == expected
    )
    os.remove(os.path.join(ds.path, entry.replicas[0]))
    with pytest.raises(DataError, match="every replica"):
        _ids(ShardedDataset.load(ds.path).loader(0, 2, batch_size=2, reader="petastorm"))


@needs_petastorm
def test_make_batch_reader_reads_a_sparkdl_dataset(tmp_path):
    from petastorm import make_batch_reader

    from sparkdl.data.petastorm import file_urls

    ds = _make(tmp_path, [10, 11])
    for url in (file_urls(ds), "file://" + ds.path + "/train"):
        with make_batch_reader(url, num_epochs=1, shuffle_row_groups=False) as reader:
            labels = sorted(int(i) for batch in reader for i in batch.label)
        assert labels == list(range(21))
