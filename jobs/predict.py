"""Score a table with a saved TorchModel and write the predictions as Parquet.

spark-submit jobs/predict.py --config jobs/configs/digits_pipeline.toml [--set predict.output=...]
python jobs/predict.py --config jobs/configs/digits_pipeline.toml       # local Spark from [spark]
Loads predict.model (default: where jobs/train.py saved it, run.model_path or
<run.run_dir>/spark_model), reads predict.input (default data.test), appends the prediction
(and predict.probability_col when set), keeps predict.keep_cols (default: every column) and
writes Parquet to predict.output (predict.mode: error | overwrite).
"""

from __future__ import annotations

import sys

import sparkdl
from sparkdl.cli import (
    load_config,
    parse_args,
    read_input,
    run_job,
    saved_model_path,
    spark_session_for_job,
)


def main(argv=None) -> int:
    args = parse_args(argv, description=__doc__)
    config = load_config(args.config, args.overrides)
    settings, data = config["predict"], config["data"]
    if not settings["output"]:
        raise sparkdl.ConfigError(
            "predict.output must be a path, got ''. Set it, e.g. --set predict.output=runs/pred"
        )
    spark = spark_session_for_job(config)
    model = sparkdl.TorchModel.load(settings["model"] or saved_model_path(config))
    model.setInferenceBatchSize(settings["batch_size"])
    if settings["probability_col"]:
        model.setProbabilityCol(settings["probability_col"])
    source = settings["input"] or data["test"]
    df = read_input(spark, source, settings["format"] or data["format"], data["options"])
    scored = model.transform(df)
    if settings["keep_cols"]:
        outputs = [model.getPredictionCol()] + [c for c in [model.getProbabilityCol()] if c]
        scored = scored.select(*settings["keep_cols"], *outputs)
    scored.write.mode(settings["mode"]).parquet(settings["output"])
    rows = spark.read.parquet(settings["output"]).count()
    print(f"predictions: {rows:,} rows from {source} -> {settings['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
