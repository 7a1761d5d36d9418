"""Exact data accounting across a size change: each row of an epoch once, whatever the sizes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from sparkdl.data import ShardedDataset
from sparkdl.data.manifest import write_dataset
from sparkdl.errors import ConfigError

pytestmark = pytest.mark.timeout(120)

SIZES = [23, 5, 0, 14, 9]  # skewed shards, one empty; 51 rows over several files


def _plain(tmp_path, sizes=SIZES, row_group_rows=4) -> ShardedDataset:
    tables, start = [], 0
    for n in sizes:
        ids = list(range(start, start + n))
        start += n
        tables.append(
            pa.table(
                {
                    "x": pa.array([float(i) for i in ids], pa.float32()),
                    "label": pa.array(ids, pa.int64()),  # the row id
                }
            )
        )
    root = str(tmp_path / "plain")
    write_dataset(
        root, tables, feature_cols=["x"], label_col="label", row_group_rows=row_group_rows
    )
    return ShardedDataset.load(root)


def _named(tmp_path, sizes=SIZES) -> ShardedDataset:
    tables, start = [], 0
    for n in sizes:
        ids = np.arange(start, start + n)
        start += n
        tables.append(
            pa.table(
                {
                    "user": pa.array(ids, pa.int64()),  # the row id, as a named input
                    "tokens": pa.array([[int(i)] * (1 + i % 3) for i in ids], pa.list_(pa.int64())),
                    "label": pa.array(ids % 2, pa.int64()),
                }
            )
        )
    root = str(tmp_path / "named")
    write_dataset(
        root,
        tables,
        feature_cols={"user": "user", "tokens": "tokens"},
        label_col="label",
        row_group_rows=3,
    )
    return ShardedDataset.load(root)


def _batch_ids(batch) -> list[int]:
    features, label = batch[0], batch[1]
    if isinstance(features, dict):
        user = features["user"].tolist()
        assert label.tolist() == [u % 2 for u in user]
        return user
    assert features[:, 0].long().tolist() == label.tolist()
    return label.tolist()


def _run(ds, sequence, *, epoch, shuffle, drop_last=True, state=None, strip=(), **kwargs):
    """Simulate the ranks of each (world_size, batch_size, batches or None = to the end) in
    turn, each resuming from the chief's position of the one before; the row ids they trained
    on, and the last position."""
    seen: list[int] = []
    for world, batch, take in sequence:
        states, yielded = [], []
        for rank in range(world):
            ld = ds.loader(
                rank,
                world,
                batch_size=batch,
                shuffle=shuffle,
                seed=11,
                drop_last=drop_last,
                shuffle_buffer_rows=kwargs.get("buffer"),
                prefetch_batches=kwargs.get("prefetch", 0),
            )
            if state is None:
                ld.set_epoch(epoch)
            else:
                ld.load_state_dict({k: v for k, v in state.items() if k not in strip})
            left = len(ld) - ld.state_dict()["batches_consumed"]
            n = left if take is None else min(take, left)
            it = iter(ld)
            for _ in range(n):
                seen += _batch_ids(next(it))
            if take is None:  # a loop that reads to the end gets exactly len - consumed
                assert next(it, None) is None
            it.close()
            states.append(ld.state_dict())
            yielded.append(n)
        assert len(set(yielded)) == 1, yielded  # equal steps on every rank
        assert len({s["batches_consumed"] for s in states}) == 1
        assert len({str(s.get("resize")) for s in states}) == 1
        state = states[0]
    return seen, state


def _check_once(seen, total, last_world, last_batch):
    counts = Counter(seen)
    assert max(counts.values()) == 1, [i for i, c in counts.items() if c > 1]
    assert set(counts) <= set(range(total))
    assert total - len(counts) < last_world * last_batch  # the documented drop_last remainder


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("kind", ["plain", "named"])
def test_two_to_one_to_two_trains_each_row_once(tmp_path, shuffle, kind):
    ds = _plain(tmp_path) if kind == "plain" else _named(tmp_path)
    total = ds.num_rows
    sequence = [(2, 3, 2), (1, 4, 3), (2, 2, None)]
    seen, state = _run(ds, sequence, epoch=3, shuffle=shuffle, buffer=6)
    _check_once(seen, total, 2, 2)
    assert state["resize"]["epoch"] == 3
    assert [s[:3] for s in state["resize"]["segments"]] == [[2, 3, 2], [1, 4, 3]]
    # the next epoch is a normal one at the new size
    after = ds.loader(0, 2, batch_size=2, shuffle=shuffle, seed=11, shuffle_buffer_rows=6)
    after.set_epoch(4)
    fresh = ds.loader(0, 2, batch_size=2, shuffle=shuffle, seed=11, epoch=4, shuffle_buffer_rows=6)
    assert [_batch_ids(b) for b in after] == [_batch_ids(b) for b in fresh]


@pytest.mark.parametrize("shuffle", [True, False])
def test_several_changes_and_default_buffers(tmp_path, shuffle):
    ds = _plain(tmp_path, sizes=[40, 3, 31, 0, 26], row_group_rows=5)
    sequence = [(3, 2, 4), (1, 5, 2), (4, 3, 1), (2, 4, 1), (2, 4, None)]
    seen, state = _run(ds, sequence, epoch=0, shuffle=shuffle, prefetch=2)
    _check_once(seen, ds.num_rows, 2, 4)
    assert len(state["resize"]["segments"]) == 3  # the last step resumed at the same size


def test_resume_at_the_same_size_inside_a_remainder_continues_it(tmp_path):
    ds = _plain(tmp_path)
    through, _ = _run(ds, [(2, 3, 3), (1, 2, None)], epoch=1, shuffle=True, buffer=5)
    head, state = _run(ds, [(2, 3, 3), (1, 2, 4)], epoch=1, shuffle=True, buffer=5)
    tail, _ = _run(ds, [(1, 2, None)], epoch=1, shuffle=True, buffer=5, state=state)
    assert head + tail == through
    _check_once(through, ds.num_rows, 1, 2)


def test_same_size_resume_is_unchanged_and_has_no_chain(tmp_path):
    ds = _plain(tmp_path)
    full, _ = _run(ds, [(2, 3, None)], epoch=2, shuffle=True, buffer=7)
    head, state = _run(ds, [(2, 3, 2)], epoch=2, shuffle=True, buffer=7)
    assert "resize" not in state
    tail, _ = _run(ds, [(2, 3, None)], epoch=2, shuffle=True, buffer=7, state=state)
    # rank by rank: each rank's remaining batches are exactly its uninterrupted ones
    per_rank = len(full) // 2
    head_rank = len(head) // 2
    assert tail[: per_rank - head_rank] == full[head_rank:per_rank]
    assert tail[per_rank - head_rank :] == full[per_rank + head_rank :]


@pytest.mark.parametrize("shuffle", [True, False])
def test_an_old_format_position_still_resizes_exactly(tmp_path, shuffle):
    ds = _plain(tmp_path)
    strip = ("resize", "drop_last", "shuffle_buffer_rows")
    head, state = _run(ds, [(2, 3, 2)], epoch=5, shuffle=shuffle)
    tail, _ = _run(ds, [(1, 4, None)], epoch=5, shuffle=shuffle, state=state, strip=strip)
    _check_once(head + tail, ds.num_rows, 1, 4)
    bare = {"epoch": 5, "batches_consumed": 0}  # the oldest positions: no sizes at all
    again, _ = _run(ds, [(1, 4, None)], epoch=5, shuffle=shuffle, state=bare)
    assert sorted(again) == sorted(_run(ds, [(1, 4, None)], epoch=5, shuffle=shuffle)[0])


def test_drop_last_false_yields_every_row(tmp_path):
    ds = _plain(tmp_path)
    head, state = _run(ds, [(2, 4, 2)], epoch=0, shuffle=True, drop_last=False, buffer=6)
    tail, _ = _run(ds, [(3, 4, None)], epoch=0, shuffle=True, drop_last=False, state=state)
    assert set(head + tail) == set(range(ds.num_rows))
    assert len(head + tail) - ds.num_rows < 3 * 4  # the repeated padding rows only


def test_an_epoch_end_position_starts_the_next_epoch_normally(tmp_path):
    ds = _plain(tmp_path)
    _, state = _run(ds, [(2, 3, 2), (1, 4, None)], epoch=0, shuffle=True)
    state = dict(state, epoch=1, batches_consumed=0)  # as the worker's end_epoch writes it
    nxt, _ = _run(ds, [(1, 4, None)], epoch=1, shuffle=True, state=state)
    assert nxt == _run(ds, [(1, 4, None)], epoch=1, shuffle=True)[0]


def test_a_position_of_other_settings_falls_back_to_scaling_with_a_warning(tmp_path, caplog):
    ds = _plain(tmp_path)
    _, state = _run(ds, [(2, 3, 2)], epoch=0, shuffle=True)
    ld = ds.loader(0, 1, batch_size=3, seed=12)  # another seed: the old order is unknown
    with caplog.at_level("WARNING", logger="sparkdl"):
        ld.load_state_dict(state)
    assert "approximate" in caplog.text and ld.state_dict()["batches_consumed"] == 4
    assert "resize" not in ld.state_dict()
    with pytest.raises(ConfigError, match="resize"):
        ld.load_state_dict(dict(state, resize={"epoch": 0, "segments": [["x"]]}))
