"""petastorm interop both ways, and TorchEstimator(reader="petastorm"), in Spark local[2].

Runs in the compat environment (``make test-compat``); skipped where petastorm cannot run.
"""

from __future__ import annotations

import pytest
from pyspark.sql import functions as F

import sparkdl
from sparkdl.errors import ConfigError

pytestmark = pytest.mark.timeout(300)


def _petastorm_problem() -> str | None:
    from sparkdl.data.petastorm import require_petastorm

    try:
        require_petastorm()
    except ConfigError as e:
        return str(e)
    return None


if _petastorm_problem() is not None:
    pytest.skip(
        "petastorm runs in the compat environment only (make test-compat)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def converter(spark_local, digits, tmp_path_factory):
    from petastorm.spark import SparkDatasetConverter, make_spark_converter

    cache = tmp_path_factory.mktemp("petastorm_cache")
    spark_local.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, f"file://{cache}")
    conv = make_spark_converter(digits[0].repartition(3))
    yield conv
    conv.delete()


def test_converter_output_opens_and_trains_with_the_petastorm_reader(
    converter, digits, tmp_path, digits_estimator
):
    ds = sparkdl.ShardedDataset.from_parquet(
        converter.cache_dir_url, feature_cols=["features"], label_col="label", num_shards=2
    )
    assert ds.num_rows == len(converter) == digits[0].count()
    assert ds.feature_dim == 64 and ds.label_is_integer
    est = digits_estimator(tmp_path / "run", epochs=8, reader="petastorm")
    model = est.fit(ds)
    assert model.summary["config"]["optim"]["reader"] == "petastorm"
    scored = model.transform(digits[1])
    accuracy = scored.select(F.avg((F.col("prediction") == F.col("label")).cast("double")))
    assert accuracy.first()[0] >= 0.9


def test_make_batch_reader_reads_a_materialized_dataset(digits, tmp_path):
    from petastorm import make_batch_reader

    from sparkdl.data.petastorm import file_urls

    ds = sparkdl.materialize(
        digits[0], str(tmp_path / "ds"), feature_cols=["features"], label_col="label", num_shards=2
    )
    with make_batch_reader(file_urls(ds), num_epochs=1) as reader:
        labels = sorted(int(v) for batch in reader for v in batch.label)
    expected = sorted(r.label for r in digits[0].select("label").collect())
    assert labels == expected
