"""fp16 on a CUDA device (world of one): autocast plus a gradient scaler whose state is in the
checkpoint, so a resumed run ends where an uninterrupted one does; the saved model is fp32."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from sparkdl.config import CheckpointConfig, FaultInjection, ModelSpec, OptimConfig, TrainSpec
from sparkdl.context import WorkerEnv
from sparkdl.data.manifest import write_dataset
from sparkdl.rundir import checkpoints as ckpt
from sparkdl.train.worker import run_worker

pytestmark = pytest.mark.timeout(300)


def _model():
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def _spec(tmp_path, name, faults=()):
    path = tmp_path / "ds"
    if not path.exists():
        rng = np.random.default_rng(1)
        x = rng.normal(size=(128, 4)).astype(np.float32)
        table = pa.table(
            {
                "features": pa.array(list(x), pa.list_(pa.float32())),
                "y": (x[:, 0] > 0).astype(np.int64),
            }
        )
        write_dataset(str(path), [table], feature_cols=["features"], label_col="y")
    return TrainSpec(
        model=ModelSpec(factory=_model),
        dataset_path=str(path),
        run_dir=str(tmp_path / name),
        optim=OptimConfig(
            optimizer="adam",
            batch_size=8,
            epochs=2,
            log_every_steps=4,
            precision="fp16",
            grad_clip_norm=1.0,
            lr_schedule="cosine",
        ),
        checkpoint=CheckpointConfig(every_steps=5),
        faults=tuple(faults),
    )


def test_fp16_resume_on_cuda_is_exact_with_the_scaler_in_the_checkpoint(tmp_path):
    env = {"device": "cuda:0", "backend": "nccl"}
    run_worker(_spec(tmp_path, "ref"), WorkerEnv(**env))
    spec = _spec(tmp_path, "run", [FaultInjection(step=23, mode="raise")])
    with pytest.raises(RuntimeError, match="fault injection"):
        run_worker(spec, WorkerEnv(**env))
    saved = ckpt.load_latest(spec.run_dir)
    assert saved.state["scaler"]["scale"] > 0 and saved.state["scheduler"] is not None
    result = run_worker(spec, WorkerEnv(attempt=1, **env))
    assert result.resumed_from_step == 20 and result.steps == 32
    load = lambda name: torch.load(  # noqa: E731
        os.path.join(tmp_path, name, "model", "state_dict.pt"), weights_only=True
    )
    expected, got = load("ref"), load("run")
    for key in expected:
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
