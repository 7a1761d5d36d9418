"""Train a torch model on Spark data from a TOML config.

spark-submit jobs/train.py --config jobs/configs/digits.toml [--set training.epochs=3 ...]
python jobs/train.py --config jobs/configs/digits.toml        # local Spark from [spark]
"""

from __future__ import annotations

import os
import sys

from pyspark.sql import functions as F

import sparkdl
from sparkdl.cli import load_config, parse_args, spark_session_for_job
from sparkdl.launch.launcher import job_description, spark_job_phase


def read_table(spark, path: str, fmt: str):
    return spark.read.format(fmt).load(path) if fmt != "table" else spark.table(path)


def main(argv=None) -> int:
    args = parse_args(argv, description=__doc__)
    config = load_config(args.config, args.overrides)
    spark = spark_session_for_job(config)
    data, train, run = config["data"], config["training"], config["run"]
    estimator = sparkdl.TorchEstimator(
        model=config["model"]["factory"],
        model_kwargs=config["model"]["kwargs"],
        feature_cols=data["feature_cols"],
        label_col=data["label_col"],
        validation_fraction=data["validation_fraction"],
        run_dir=run["run_dir"],
        overwrite=run["mode"] == "overwrite",
        resume=run["mode"] == "resume",
        **train,
    )
    source = (
        sparkdl.ShardedDataset.load(data["dataset"])
        if data["dataset"]
        else read_table(spark, data["train"], data["format"])
    )
    model = estimator.fit(source)
    summary = model.summary
    print(
        f"training: {summary['status']} in {summary['timings']['total_s']:.1f} s, "
        f"final metrics {summary['metrics']}"
    )
    if data["test"]:
        test = read_table(spark, data["test"], data["format"])
        scored = model.transform(test)
        run_name = os.path.basename(os.path.normpath(model.run_dir))
        with spark_job_phase(spark.sparkContext, job_description(run_name, "predict")):
            if estimator.optim.loss in ("cross_entropy", "nll"):
                value = scored.select(
                    F.avg((F.col("prediction") == F.col(data["label_col"])).cast("double"))
                ).first()[0]
                print(f"test accuracy: {value:.4f}")
            else:
                value = scored.select(
                    F.sqrt(F.avg((F.col("prediction") - F.col(data["label_col"])) ** 2))
                ).first()[0]
                print(f"test rmse: {value:.4f}")
    print(f"run directory: {model.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
