"""Loader: equal steps per rank, seeded shuffle, order, dtypes, resume, transform, replicas."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys

import pyarrow as pa
import pytest
import torch

from sparkdl.data import ShardedDataset
from sparkdl.data.loader import rank_slice
from sparkdl.data.manifest import write_dataset
from sparkdl.errors import ConfigError, DataError

pytestmark = pytest.mark.timeout(60)


def _table(ids, label_type=pa.int64()) -> pa.Table:
    ids = list(ids)
    return pa.table(
        {
            "x": pa.array([float(i) for i in ids], pa.float32()),
            "v": pa.array([[float(i) + 0.5, -float(i)] for i in ids], pa.list_(pa.float32())),
            "label": pa.array(ids, label_type),
        }
    )


def _make(tmp_path, sizes, name="ds", row_group_rows=4, **kwargs) -> ShardedDataset:
    tables, start = [], 0
    for n in sizes:
        tables.append(_table(range(start, start + n)))
        start += n
    root = str(tmp_path / name)
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


def test_equal_steps_across_ranks_with_skewed_and_empty_shards(tmp_path):
    ds = _make(tmp_path, [10, 3, 0])
    for drop_last, expected in ((True, 3), (False, 4)):
        lens = []
        for rank in range(2):
            ld = ds.loader(rank, 2, batch_size=2, drop_last=drop_last, seed=1)
            batches = _ids(ld)
            assert (
                len(ld) == len(batches) == expected == ds.steps_per_epoch(2, 2, drop_last=drop_last)
            )
            lens.append([len(b) for b in batches])
        assert lens[0] == lens[1]  # every rank's batch sizes match, step by step


def test_drop_last_false_yields_every_row_of_the_slice(tmp_path):
    ds = _make(tmp_path, [10, 3, 0])
    seen = []
    for rank in range(2):
        ids = [i for b in _ids(ds.loader(rank, 2, batch_size=2, drop_last=False)) for i in b]
        start, stop = rank_slice(13, 2, rank)
        assert set(ids) == set(range(start, stop))
        seen += ids
    assert len(seen) == 14  # rank 1 has 6 rows and repeats one to match rank 0's 7


def test_shuffle_is_seeded_by_seed_and_epoch_and_keeps_rows(tmp_path):
    ds = _make(tmp_path, [40, 37], row_group_rows=5)

    def run(epoch, seed=3, prefetch=2, buffer=16):
        ld = ds.loader(
            1,
            2,
            batch_size=4,
            seed=seed,
            epoch=epoch,
            prefetch_batches=prefetch,
            shuffle_buffer_rows=buffer,
        )
        return _ids(ld)

    first = run(0)
    assert first == run(0) == run(0, prefetch=0) == run(0, prefetch=7)
    assert first != run(1)
    assert first != run(0, seed=4)
    start, stop = rank_slice(77, 2, 1)
    flat = [i for b in first for i in b]
    assert len(flat) == len(set(flat)) == (38 // 4) * 4
    assert set(flat) <= set(range(start, stop))
    assert flat != sorted(flat)
    dropped = [set(range(start, stop)) - {i for b in run(e) for i in b} for e in range(4)]
    assert len({frozenset(d) for d in dropped}) > 1  # the dropped remainder changes by epoch


def test_set_epoch_reseeds(tmp_path):
    ds = _make(tmp_path, [30])
    ld = ds.loader(0, 1, batch_size=5)
    ld.set_epoch(2)
    assert _ids(ld) == _ids(ds.loader(0, 1, batch_size=5, epoch=2))


def test_unshuffled_batches_are_consecutive_rows_of_the_rank_slice(tmp_path):
    ds = _make(tmp_path, [9, 8, 8])
    for world in (1, 2, 3, 4):
        for rank in range(world):
            start, stop = rank_slice(25, world, rank)
            b = 2
            batches = _ids(ds.loader(rank, world, batch_size=b, shuffle=False))
            for i, batch in enumerate(batches):
                assert batch == list(range(start + i * b, start + (i + 1) * b))
    # num_shards == world_size: rank r reads exactly shard r
    for rank, (lo, hi) in enumerate(((0, 9), (9, 17), (17, 25))):
        ids = _ids(ds.loader(rank, 3, batch_size=1, shuffle=False))
        assert [i[0] for i in ids] == list(range(lo, hi))[: len(ids)]


def test_features_are_float32_in_column_order_and_label_dtypes(tmp_path):
    ds = _make(tmp_path, [6])
    features, label = next(iter(ds.loader(0, 1, batch_size=3, shuffle=False)))
    assert features.dtype == torch.float32 and features.shape == (3, 3)
    assert label.dtype == torch.int64
    assert features[1].tolist() == [1.0, 1.5, -1.0]
    root = str(tmp_path / "float_label")
    write_dataset(
        root, [_table(range(4), pa.float64())], feature_cols=["v", "x"], label_col="label"
    )
    fds = ShardedDataset.load(root)
    assert not fds.label_is_integer
    features, label = next(iter(fds.loader(0, 1, batch_size=4, shuffle=False)))
    assert label.dtype == torch.float32
    assert features[2].tolist() == [2.5, -2.0, 2.0]


def test_state_dict_resume_concatenates_to_one_epoch(tmp_path):
    ds = _make(tmp_path, [50, 47], row_group_rows=6)
    kwargs = dict(batch_size=4, seed=7, epoch=3, shuffle_buffer_rows=12)
    full = _ids(ds.loader(1, 2, **kwargs))
    for k in (0, 1, 5, len(full)):
        ld = ds.loader(1, 2, **kwargs)
        batches = iter(ld)
        head = [next(batches)[1].tolist() for _ in range(k)]
        state = ld.state_dict()  # as a training loop saves it right after step k
        assert state["epoch"] == 3 and state["batches_consumed"] == k
        resumed = ds.loader(1, 2, batch_size=4, seed=7, shuffle_buffer_rows=12)
        resumed.load_state_dict(state)
        assert head + _ids(resumed) == full
        assert resumed.state_dict()["batches_consumed"] == len(full)


def test_transform_hook_sees_columns_and_shapes(tmp_path):
    ds = _make(tmp_path, [8])
    seen = {}

    def transform(batch):
        seen.update({k: tuple(v.shape) for k, v in batch.items()})
        return {"x": batch["x"] * 10, "v": batch["v"], "label": batch["label"] + 100}

    features, label = next(iter(ds.loader(0, 1, batch_size=4, shuffle=False, transform=transform)))
    assert seen == {"x": (4,), "v": (4, 2), "label": (4,)}
    assert features[1].tolist() == [10.0, 1.5, -1.0]
    assert label.tolist() == [100, 101, 102, 103]


def test_validation_split(tmp_path):
    root = str(tmp_path / "val")
    write_dataset(
        root,
        [_table(range(0, 10)), _table(range(10, 20))],
        validation_shards=[_table(range(100, 103)), _table(range(103, 103))],
        feature_cols=["x"],
        label_col="label",
    )
    ds = ShardedDataset.load(root)
    assert ds.num_rows_of("validation") == 3
    ids = [
        i
        for b in _ids(ds.loader(0, 1, batch_size=2, split="validation", drop_last=False))
        for i in b
    ]
    assert sorted(ids) == [100, 101, 102]


def _corrupt(path):
    with open(path, "r+b") as f:
        f.seek(10)
        f.write(b"garbage!")


def test_replicas_fall_back_when_missing_or_corrupt(tmp_path, caplog):
    ds = _make(tmp_path, [12, 12], replicas=3)
    expected = _ids(ds.loader(0, 2, batch_size=3, seed=1))
    entry = ds.manifest.shards_of("train")[0].files[0]
    os.remove(os.path.join(ds.path, entry.path))
    _corrupt(os.path.join(ds.path, entry.replicas[0]))
    fresh = ShardedDataset.load(ds.path)
    with caplog.at_level(logging.WARNING, logger="sparkdl"):
        assert _ids(fresh.loader(0, 2, batch_size=3, seed=1)) == expected
    assert "next replica" in caplog.text
    _corrupt(os.path.join(ds.path, entry.replicas[1]))
    with pytest.raises(DataError, match="shard-00000.parquet") as info:
        _ids(ShardedDataset.load(ds.path).loader(0, 2, batch_size=3))
    assert "checksum mismatch" in str(info.value)
    assert "FileNotFoundError" in str(info.value)


def _trained(ds) -> dict[str, torch.Tensor]:
    """Two seeded epochs of SGD on a tiny regression over both ranks' batches."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for epoch in range(2):
        for rank in range(2):
            for x, y in ds.loader(rank, 2, batch_size=3, seed=7, epoch=epoch):
                loss = ((model(x).squeeze(1) - y.float()) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    return model.state_dict()


def test_training_on_damaged_replicas_gives_identical_parameters(tmp_path):
    """One file's primary deleted, its first replica corrupted: the second replica serves it,
    and training ends with exactly the parameters of a run on the intact dataset."""
    ds = _make(tmp_path, [12, 12], replicas=3)
    expected = _trained(ds)
    entry = ds.manifest.shards_of("train")[1].files[0]
    os.remove(os.path.join(ds.path, entry.path))
    _corrupt(os.path.join(ds.path, entry.replicas[0]))
    got = _trained(ShardedDataset.load(ds.path))
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_early_break_stops_the_prefetch_thread(tmp_path):
    import threading

    ds = _make(tmp_path, [200], row_group_rows=10)
    before = threading.active_count()
    for _ in range(3):
        for _step, _ in enumerate(ds.loader(0, 1, batch_size=2, prefetch_batches=1)):
            break
    import gc

    gc.collect()
    assert threading.active_count() <= before + 1


def test_errors_in_the_loader_thread_reach_the_caller(tmp_path):
    ds = _make(tmp_path, [8])

    def broken(batch):
        raise RuntimeError("boom in transform")

    with pytest.raises(RuntimeError, match="boom in transform"):
        _ids(ds.loader(0, 1, batch_size=2, transform=broken))


def test_bad_arguments_are_config_errors(tmp_path):
    ds = _make(tmp_path, [8])
    for kwargs in (
        dict(rank=2, world_size=2, batch_size=1),
        dict(rank=0, world_size=0, batch_size=1),
        dict(rank=0, world_size=1, batch_size=0),
        dict(rank=0, world_size=1, batch_size=1, prefetch_batches=-1),
        dict(rank=0, world_size=1, batch_size=1, shuffle_buffer_rows=0),
        dict(rank=0, world_size=1, batch_size=1, seed=-1),
    ):
        with pytest.raises(ConfigError):
            ds.loader(**kwargs)


def test_dataset_pickles_for_workers(tmp_path):
    ds = _make(tmp_path, [8])
    clone = pickle.loads(pickle.dumps(ds))
    assert _ids(clone.loader(0, 1, batch_size=4, shuffle=False)) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_loader_module_does_not_import_pyspark():
    code = "import sys, sparkdl.data.loader; sys.exit('pyspark' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0


def test_dataset_handle_and_reader_names_load_without_torch():
    code = (
        "import sys, sparkdl.config, sparkdl.data, sparkdl.data.dataset, sparkdl.data.readers;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pyspark'));"
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], env=env, timeout=60, check=True)


@pytest.mark.parametrize("first", ["sparkdl.data.materialize", "sparkdl.data", "sparkdl"])
def test_materialize_is_the_function_whichever_import_comes_first(first):
    code = (
        f"import inspect, {first}, sparkdl, sparkdl.data;"
        "from sparkdl.data import materialize;"
        "from sparkdl.data.materialize import check_on_invalid;"
        "assert inspect.isfunction(materialize), materialize;"
        "assert sparkdl.data.materialize is materialize is sparkdl.materialize"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], env=env, timeout=60, check=True)


def test_fewer_row_groups_than_ranks_still_feeds_every_rank(tmp_path):
    ds = _make(tmp_path, [10], row_group_rows=10)  # one row group, five ranks
    assert ds.manifest.files_of("train")[0].row_groups == (10,)
    seen = []
    for rank in range(5):
        ld = ds.loader(rank, 5, batch_size=2, seed=3)
        batches = _ids(ld)
        assert len(batches) == len(ld) == 1
        seen += batches[0]
    assert sorted(seen) == list(range(10))
