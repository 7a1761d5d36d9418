"""The spark-submit entry points, run in-process against the test session."""

from __future__ import annotations

import os
import sys

import pytest

pytestmark = pytest.mark.timeout(240)

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "jobs"))


def test_train_job_on_digits_config(spark_local, tmp_path, capsys):
    import train

    run_dir = tmp_path / "run"
    code = train.main(
        [
            "--config",
            os.path.join(ROOT, "jobs", "configs", "digits.toml"),
            "--set",
            f"run.run_dir={run_dir}",
            "--set",
            "training.epochs=2",
            "--set",
            f"data.train={os.path.join(ROOT, 'data', 'digits', 'train.parquet')}",
            "--set",
            f"data.test={os.path.join(ROOT, 'data', 'digits', 'test.parquet')}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "test accuracy:" in out and f"run directory: {run_dir}" in out
    accuracy = float(out.split("test accuracy:")[1].split()[0])
    assert accuracy > 0.8
    assert (run_dir / "run.json").exists() and (run_dir / "model" / "state_dict.pt").exists()
