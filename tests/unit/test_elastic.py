"""Elastic sizing without Spark: range validation, the sizes a strategy accepts, the global
batch, and how the sizer follows the slots (first launch, after a loss, growing)."""

from __future__ import annotations

import pytest

from sparkdl.config import ElasticConfig, SyncConfig
from sparkdl.errors import ConfigError
from sparkdl.launch.elastic import ElasticSizer, elastic_config, launch_sizes

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


class FakeSide:
    """A session whose task slots a test sets."""

    def __init__(self, slots):
        self.slots = slots
        self.master = "spark://fake"

    def task_slots(self):
        return self.slots


@pytest.mark.parametrize(
    ("num_workers", "message"),
    [
        ((3, 2), r"min ≤ max, got \(3, 2\)"),
        ((0, 2), "min_workers must be an integer ≥ 1, got 0"),
        ((1, 2, 3), "a pair"),
        ("2", "num_workers must be an integer"),
        (0, "num_workers must be an integer ≥ 1"),
    ],
)
def test_bad_ranges_are_refused_naming_the_numbers(num_workers, message):
    with pytest.raises(ConfigError, match=message):
        elastic_config({"num_workers": num_workers})


def test_an_int_is_a_fixed_size_and_a_list_a_range():
    assert elastic_config({"num_workers": 2}) is None
    config = elastic_config({"num_workers": [1, 4], "elastic_wait_s": 5.0})
    assert (config.min_workers, config.max_workers, config.wait_s) == (1, 4, 5.0)
    with pytest.raises(ConfigError, match="elastic_batch must be one of"):
        elastic_config({"num_workers": [1, 4], "elastic_batch": "fixed"})


def test_the_global_batch_is_the_same_at_every_size():
    config = ElasticConfig(min_workers=1, max_workers=4, batch="global")
    for size in (1, 2, 4):
        assert config.per_worker_batch(16, size) * size == 64
    with pytest.raises(ConfigError, match="global batch 64"):
        config.per_worker_batch(16, 3)
    assert launch_sizes(config, SyncConfig(), 16) == [1, 2, 4]  # 3 does not divide 64
    per_worker = ElasticConfig(min_workers=1, max_workers=4)
    assert per_worker.per_worker_batch(16, 3) == 16


def test_sizes_follow_the_strategy():
    pipeline = SyncConfig(strategy="pipeline", options={"stages": 2, "microbatches": 2})
    assert launch_sizes(ElasticConfig(min_workers=2, max_workers=6), pipeline, 8) == [2, 4, 6]
    with pytest.raises(ConfigError, match="stages must be set"):
        launch_sizes(
            ElasticConfig(min_workers=2, max_workers=4), SyncConfig(strategy="pipeline"), 8
        )
    fsdp = SyncConfig(strategy="fsdp")
    assert launch_sizes(ElasticConfig(min_workers=1, max_workers=3), fsdp, 8) == [2, 3]
    with pytest.raises(ConfigError, match="≥ 2"):
        launch_sizes(ElasticConfig(min_workers=1, max_workers=1), fsdp, 8)


def test_the_sizer_takes_the_slots_there_are_and_grows_after_the_interval():
    side = FakeSide(3)
    config = ElasticConfig(min_workers=1, max_workers=4, wait_s=0.2, grow_interval_s=0.3)
    sizer = ElasticSizer(side, config, [1, 2, 3, 4], timeout_s=1)
    assert sizer.first_size() == 3
    side.slots = 1  # an executor is gone for good
    assert sizer.after_failure(3) == 1
    sizer.changed()
    side.slots = 4
    assert sizer.grow_target(1) is None  # too soon after the last change
    import time

    time.sleep(0.35)
    assert sizer.grow_target(1) == 4 and sizer.grow_target(4) is None
    side.slots = 0
    with pytest.raises(ConfigError, match="min_workers=1 task slots, got 0"):
        sizer.after_failure(4)


def test_unknown_slots_launch_the_top_of_the_range_and_never_grow():
    sizer = ElasticSizer(
        FakeSide(None),
        ElasticConfig(min_workers=1, max_workers=3, grow_interval_s=0),
        [1, 2, 3],
        timeout_s=1,
    )
    assert sizer.first_size() == 3
    assert sizer.grow_target(1) is None
