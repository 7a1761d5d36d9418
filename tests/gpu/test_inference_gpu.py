"""TorchModel.transform on a CUDA device agrees with the CPU (skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sparkdl

pytestmark = pytest.mark.timeout(240)


def test_cuda_inference_matches_cpu(spark_local):
    rng = np.random.default_rng(0)
    rows = [(i, [float(v) for v in rng.normal(size=8)]) for i in range(200)]
    df = spark_local.createDataFrame(rows, "id long, f array<double>")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    outputs = {}
    for device in ("cpu", "cuda"):
        model = sparkdl.TorchModel(
            module, feature_cols=["f"], probability_col="p", inference_device=device
        )
        outputs[device] = model.transform(df).orderBy("id").select("prediction", "p").collect()
    assert [r.prediction for r in outputs["cuda"]] == [r.prediction for r in outputs["cpu"]]
    np.testing.assert_allclose(
        [r.p for r in outputs["cuda"]], [r.p for r in outputs["cpu"]], rtol=1e-4, atol=1e-5
    )
