"""The spark-submit entry points, run in-process against the test session."""

from __future__ import annotations

import os
import sys

import pytest

pytestmark = pytest.mark.timeout(400)

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "jobs"))


def test_prepare_train_predict_pipeline(spark_local, tmp_path, capsys):
    import predict
    import prepare
    import train

    config = os.path.join(ROOT, "jobs", "configs", "digits_pipeline.toml")
    digits = os.path.join(ROOT, "data", "digits")
    common = ["--config", config]
    for key, value in {
        "data.train": os.path.join(digits, "train.parquet"),
        "data.test": os.path.join(digits, "test.parquet"),
        "data.dataset": tmp_path / "ds",
        "run.run_dir": tmp_path / "run",
        "run.model_path": tmp_path / "model",
        "predict.output": tmp_path / "pred",
        "training.epochs": 3,
    }.items():
        common += ["--set", f"{key}={value}"]

    assert prepare.main(common) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == str(tmp_path / "ds")
    assert "'validation'" in out

    assert train.main(common) == 0
    out = capsys.readouterr().out
    assert "test accuracy:" in out and f"run directory: {tmp_path / 'run'}" in out
    assert float(out.split("test accuracy:")[1].split()[0]) > 0.8
    summary_dataset = (tmp_path / "run" / "run.json").read_text()
    assert str(tmp_path / "ds") in summary_dataset  # trained from the prepared dataset
    assert (tmp_path / "model" / "model" / "state_dict.pt").exists()

    assert predict.main(common) == 0
    assert "predictions: 359 rows" in capsys.readouterr().out
    scored = spark_local.read.parquet(str(tmp_path / "pred"))
    assert scored.columns == ["label", "prediction", "probability"]
    accuracy = scored.selectExpr("avg(cast(label = prediction as double))").first()[0]
    assert accuracy > 0.8
