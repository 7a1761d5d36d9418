"""Prepare a training dataset: read a table, select and cast columns, materialize shards.

spark-submit jobs/prepare.py --config jobs/configs/digits_pipeline.toml [--set prepare.mode=overwrite]
python jobs/prepare.py --config jobs/configs/digits_pipeline.toml       # local Spark from [spark]
Reads data.train (data.format, data.options), keeps data.feature_cols + data.label_col (+
data.validation_col) cast per data.cast, writes a ShardedDataset to data.dataset and prints
its path last, for jobs/train.py (which trains from data.dataset when it is set).
"""

from __future__ import annotations

import datetime
import sys

from pyspark.sql import functions as F

import sparkdl
from sparkdl.cli import load_config, parse_args, read_input, run_job, spark_session_for_job
from sparkdl.columns import quote_column


def main(argv=None) -> int:
    args = parse_args(argv, description=__doc__)
    config = load_config(args.config, args.overrides)
    data, prepare = config["data"], config["prepare"]
    if not data["dataset"]:
        raise sparkdl.ConfigError(
            "data.dataset must be the output path, got ''. Set it, e.g. --set data.dataset=runs/ds"
        )
    columns = [*data["feature_cols"], data["label_col"]]
    columns += [data["validation_col"]] if data["validation_col"] else []
    unknown = sorted(set(data["cast"]) - set(columns))
    if unknown:
        raise sparkdl.ConfigError(
            f"data.cast keys must be selected columns {columns}, got {unknown}. Fix the names"
        )
    spark = spark_session_for_job(config)
    df = read_input(spark, data["train"], data["format"], data["options"])
    selected = [
        F.col(quote_column(c)).cast(data["cast"][c]).alias(c)
        if c in data["cast"]
        else F.col(quote_column(c))
        for c in columns
    ]
    started = datetime.datetime.now(datetime.timezone.utc)
    dataset = sparkdl.materialize(
        df.select(*selected),
        data["dataset"],
        feature_cols=data["feature_cols"],
        label_col=data["label_col"],
        num_shards=prepare["num_shards"] or config["training"]["num_workers"],
        seed=config["training"]["seed"],
        mode=prepare["mode"],
        validation_fraction=data["validation_fraction"],
        validation_col=data["validation_col"] or None,
    )
    written = datetime.datetime.fromisoformat(dataset.manifest.created)
    how = "reused (unchanged input)" if written < started else "written"
    print(f"dataset {how}: {dataset.manifest.splits} rows, {dataset.manifest.num_shards} shards")
    print(dataset.path)
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
