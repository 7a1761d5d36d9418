"""materialize on local-cluster[2,1,1024]: executors in separate JVMs and Python processes.

Its own module because the ``spark_local_cluster`` fixture stops the ``local[2]`` session.
"""

from __future__ import annotations

import os

import pytest

from sparkdl.data import ShardedDataset, materialize

pytestmark = pytest.mark.timeout(280)


def test_materialize_on_separate_executors(spark_local_cluster, tmp_path):
    df = spark_local_cluster.range(0, 2000, numPartitions=4).selectExpr(
        "array(cast(id as double), id * 2.0) as arr", "id % 3 as label"
    )
    root = str(tmp_path / "cluster")
    ds = materialize(df, root, feature_cols=["arr"], label_col="label", num_shards=2, replicas=2)
    assert [s.rows for s in ds.manifest.shards_of("train")] == [1000, 1000]
    loaded = ShardedDataset.load(root)
    seen = []
    for rank in range(2):
        for features, label in loaded.loader(rank, 2, batch_size=100, shuffle=False):
            assert features.shape == (100, 2)
            assert (features[:, 1] == 2 * features[:, 0]).all()
            assert (label == features[:, 0].long() % 3).all()
            seen += features[:, 0].long().tolist()
    assert sorted(seen) == list(range(2000))
    assert os.path.exists(os.path.join(root, "_replicas", "1", "train", "shard-00001.parquet"))
    assert spark_local_cluster.read.parquet(root + "/train").count() == 2000
