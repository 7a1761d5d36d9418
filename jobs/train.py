"""Train a torch model on Spark data from a TOML config.

spark-submit jobs/train.py --config jobs/configs/digits.toml [--set training.epochs=3 ...]
python jobs/train.py --config jobs/configs/digits.toml        # local Spark from [spark]
Trains from data.dataset (a ShardedDataset from jobs/prepare.py) when set, else from
data.train; saves the TorchModel to run.model_path (default <run.run_dir>/spark_model) for
jobs/predict.py, and scores data.test when set.
"""

from __future__ import annotations

import sys

from pyspark.sql import functions as F

import sparkdl
from sparkdl.cli import (
    estimator_kwargs,
    load_config,
    parse_args,
    read_input,
    run_job,
    saved_model_path,
    spark_session_for_job,
)
from sparkdl.columns import quote_column
from sparkdl.launch.launcher import job_description, spark_job_phase
from sparkdl.rundir import RunLayout


def main(argv=None) -> int:
    args = parse_args(argv, description=__doc__)
    config = load_config(args.config, args.overrides)
    spark = spark_session_for_job(config)
    data, run = config["data"], config["run"]
    estimator = sparkdl.TorchEstimator(**estimator_kwargs(config))
    source = (
        sparkdl.ShardedDataset.load(data["dataset"])
        if data["dataset"]
        else read_input(spark, data["train"], data["format"], data["options"])
    )
    model = estimator.fit(source)
    summary = model.summary
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(summary["metrics"].items()))
    print(
        f"training: {summary['status']} in {summary['timings']['total_s']:.1f} s, "
        f"{summary['epochs_run']} epochs; {metrics}"
    )
    writer = model.write().overwrite() if run["mode"] == "overwrite" else model.write()
    writer.save(saved_model_path(config))
    if data["test"]:
        label = F.col(quote_column(data["label_col"]))
        scored = model.transform(read_input(spark, data["test"], data["format"], data["options"]))
        run_name = RunLayout(model.run_dir).name
        with spark_job_phase(spark, job_description(run_name, "predict")):
            if model.classification:
                hits = (F.col("prediction") == label).cast("double")
                print(f"test accuracy: {scored.select(F.avg(hits)).first()[0]:.4f}")
            else:
                errors = (F.col("prediction") - label) ** 2
                print(f"test rmse: {scored.select(F.sqrt(F.avg(errors))).first()[0]:.4f}")
    print(f"model: {saved_model_path(config)}")
    print(f"run directory: {model.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
