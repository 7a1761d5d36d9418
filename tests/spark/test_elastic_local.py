"""Elastic ranges through the estimator on local[2]: the first launch takes the slots there are,
run.json records the size, and a range the master can never host is refused before launch."""

from __future__ import annotations

import json
import os

import pytest

from sparkdl.errors import ConfigError

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]


def test_a_range_launches_with_the_slots_there_are(digits, tmp_path, digits_estimator):
    estimator = digits_estimator(
        tmp_path / "run", num_workers=(1, 2), elastic_batch="global", batch_size=16, epochs=3
    )
    model = estimator.fit(digits[0])
    with open(os.path.join(tmp_path, "run", "run.json")) as fh:
        run = json.load(fh)
    assert [(s["workers"], s["why"]) for s in run["world_sizes"]] == [(2, "start")]
    assert run["world_size"] == 2
    assert run["world_sizes"][0]["started_at_utc"].endswith("Z")  # nested times get twins too
    rows = model.metrics.toPandas()
    assert set(rows[rows.name == "world_size"].value) == {2.0}
    assert estimator.getNumWorkers() == [1, 2]


def test_a_range_above_the_masters_slots_is_refused_before_launch(
    digits, tmp_path, digits_estimator
):
    with pytest.raises(
        ConfigError, match="max_workers must be at most the task slots master local"
    ):
        digits_estimator(tmp_path / "run", num_workers=(1, 3)).fit(digits[0])
    assert not os.path.exists(tmp_path / "run" / "data")
