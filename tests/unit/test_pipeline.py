"""The pipeline strategy's options, its model split and the driver's checks (no process group)."""

from __future__ import annotations

import re
import types

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn as nn

from sparkdl.config import ModelSpec, OptimConfig, PipelineOptions, SyncConfig
from sparkdl.context import WorkerEnv
from sparkdl.errors import ConfigError
from sparkdl.sync import make_strategy, prepare
from sparkdl.sync.pipeline_split import (
    StagePart,
    check_split_on_batch,
    leftover_state,
    split_model,
)

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"stages": 1}, r"stages must be an integer ≥ 2 \(one stage is the whole model"),
        ({"stages": True}, "stages must be an integer ≥ 2"),
        ({"microbatches": 0}, "microbatches must be"),
        ({"schedule": "zb"}, r"schedule must be one of \('gpipe', '1f1b'\), got 'zb'"),
        ({"split_points": "layers.4"}, "split_points must be a list of module names"),
        ({"split_points": []}, "split_points must be a non-empty list"),
        ({"split_points": ["a", "a"]}, "split_points must be distinct names"),
        ({"stages": 3, "split_points": ["a"]}, r"split_points must be stages - 1 = 2 names"),
        ({"stages": 4, "microbatches": 2}, r'microbatches must be ≥ stages=4 with schedule="1f1b"'),
    ],
)
def test_options_are_refused_with_the_house_message(options, match):
    with pytest.raises(ConfigError, match=match):
        SyncConfig(strategy="pipeline", options=options)


def test_options_that_need_the_worker_count_and_batch_name_the_numbers():
    with pytest.raises(ConfigError, match=r"num_workers must be a multiple of stages=2.*got 3"):
        SyncConfig(strategy="pipeline", options={"stages": 2}).check_world_size(3)
    with pytest.raises(ConfigError, match=r'num_workers must be ≥ 2 for strategy="pipeline"'):
        SyncConfig(strategy="pipeline").check_world_size(1)
    with pytest.raises(ConfigError, match=r"split_points must be stages - 1 = 3 names"):
        SyncConfig(strategy="pipeline", options={"split_points": ["2"]}).check_world_size(4)
    with pytest.raises(
        ConfigError, match=r"microbatches must be a divisor of batch_size=30 .* got 4\. Use one of"
    ):
        SyncConfig(strategy="pipeline").check_world_size(2, batch_size=30)
    assert PipelineOptions().resolved(4) == (4, 8)  # stages default to num_workers
    assert PipelineOptions(stages=2).resolved(8, batch_size=32) == (2, 4)
    SyncConfig(strategy="pipeline", options={"split_points": ["2"]}).check_world_size(2, 64)


def test_a_pipeline_needs_a_process_group():
    with pytest.raises(ConfigError, match='num_workers must be ≥ 2 for strategy="pipeline"'):
        prepare(nn.Linear(2, 2), "pipeline", optimizer=torch.optim.SGD)
    strategy = make_strategy(SyncConfig(strategy="pipeline"), WorkerEnv(world_size=2))
    assert (strategy.stages, strategy.microbatches, strategy.data_shard) == (2, 4, (0, 1))
    with pytest.raises(ConfigError, match="must run inside a process group"):
        strategy.wrap(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


def _names(parts):
    return [[name for name, _ in part] for part in parts]


def test_automatic_split_balances_parameters_and_keeps_activations_with_their_layer():
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    assert _names(split_model(model, 2)) == [["0", "1"], ["2", "3", "4"]]
    assert _names(split_model(model, 3)) == [["0", "1"], ["2", "3"], ["4"]]
    from sparkdl.models import mlp

    parts = split_model(mlp(1024, 10, hidden=(2048, 2048, 2048)), 2)  # the benchmark's mlp10m
    sizes = [sum(p.numel() for _, m in part for p in m.parameters()) for part in parts]
    assert max(sizes) / sum(sizes) <= 0.6


def test_split_points_open_up_sequential_containers():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.layers = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.layers(self.embed(x)))

    model = Net().eval()
    parts = split_model(model, 3, ["layers.2", "layers.4"])
    assert _names(parts) == [
        ["embed", "layers.0", "layers.1"],
        ["layers.2", "layers.3"],
        ["layers.4", "layers.5", "head"],
    ]
    x = torch.randn(5, 4)
    with torch.no_grad():
        check_split_on_batch(model, parts, x, model(x))
    stage = StagePart(parts[1])
    assert list(stage.model_state_dict()) == [
        "layers.2.weight",
        "layers.2.bias",
        "layers.3.weight",
        "layers.3.bias",
    ]
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    stage.load_model_state_dict(state)  # loads its own entries from the whole model's
    assert float(model.layers[2].weight.detach().abs().sum()) == 0
    assert leftover_state(model, parts) == {}


@pytest.mark.parametrize(
    ("model", "stages", "points", "match"),
    [
        (nn.Linear(2, 2), 2, None, r"at least stages=2 top-level children holding parameters"),
        (nn.Sequential(nn.Linear(2, 2), nn.ReLU()), 2, None, "got 1 among"),
        (
            nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)),
            2,
            ["3"],
            r"name modules of the model, got '3'",
        ),
        (nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 2, ["0"], "after the first"),
        (
            nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)),
            3,
            ["2", "1"],
            "in the order the model runs",
        ),
        (
            nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)),
            3,
            ["1", "2"],
            re.escape("every pipeline stage must hold parameters, got stage 1 with only ['1']"),
        ),
        (
            nn.Sequential(nn.Linear(2, 2), nn.TransformerEncoderLayer(4, 1)),
            2,
            ["1.linear1"],
            "through nn.Sequential containers, got '1', a TransformerEncoderLayer",
        ),
    ],
)
def test_models_that_cannot_be_cut_are_refused(model, stages, points, match):
    with pytest.raises(ConfigError, match=match):
        split_model(model, stages, points)


def test_tied_weights_across_stages_and_parameters_outside_the_layers_are_refused():
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(ConfigError, match="must not share parameters"):
        split_model(tied, 2)

    class Scaled(nn.Sequential):
        def __init__(self) -> None:
            super().__init__(nn.Linear(3, 3), nn.Linear(3, 3))
            self.scale = nn.Parameter(torch.ones(1))

    model = Scaled()
    with pytest.raises(ConfigError, match=r"parameters and buffers must live in the layers.*scale"):
        leftover_state(model, split_model(model, 2))


def test_a_model_that_does_not_run_its_children_in_order_fails_the_batch_check():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.b(self.a(x)) + x  # not b(a(x)): the stages cannot reproduce it

    model = Residual()
    x = torch.randn(4, 3)
    with pytest.raises(ConfigError, match="must run its top-level children in order"):
        with torch.no_grad():
            check_split_on_batch(model, split_model(model, 2), x, model(x))

    class Dicts(nn.Sequential):
        pass

    class ToDict(nn.Linear):
        def forward(self, x):
            return {"h": super().forward(x)}

    model = Dicts(ToDict(3, 3), nn.Linear(3, 3))
    with pytest.raises(ConfigError, match="must be a tensor or a tuple of tensors, got dict"):
        check_split_on_batch(model, split_model(model, 2), x, None)


def _dataset(tmp_path, weights: bool = False):
    from sparkdl.data.dataset import ShardedDataset
    from sparkdl.data.manifest import write_dataset

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype(np.float32)
    columns = {"features": pa.array(list(x), pa.list_(pa.float32())), "y": x.argmax(1) % 3}
    if weights:
        columns["w"] = np.ones(16, dtype=np.float32)
    write_dataset(
        str(tmp_path / "ds"),
        [pa.table(columns)],
        feature_cols=["features"],
        label_col="y",
        sample_weight_col="w" if weights else None,
    )
    return ShardedDataset.load(str(tmp_path / "ds"))


def _configs(factory, **options):
    return types.SimpleNamespace(
        model=ModelSpec(factory=factory),
        optim=OptimConfig(),
        sync=SyncConfig(strategy="pipeline", options=options),
    )


def test_the_driver_check_cuts_the_model_and_runs_its_stages(tmp_path):
    from sparkdl.ml.driver_check import check_model_on_driver

    dataset = _dataset(tmp_path)

    def mlp():
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    check_model_on_driver(_configs(mlp), dataset, ["features"], num_workers=2)
    with pytest.raises(ConfigError, match="at least stages=4 top-level children"):
        check_model_on_driver(_configs(mlp), dataset, ["features"], num_workers=4)
    with pytest.raises(ConfigError, match="got 'nope'"):
        check_model_on_driver(
            _configs(mlp, split_points=["nope"]), dataset, ["features"], num_workers=2
        )

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(self.a(x) + x)

    with pytest.raises(ConfigError, match="must run its top-level children in order"):
        check_model_on_driver(_configs(Skip), dataset, ["features"], num_workers=2)
    weighted = _dataset(tmp_path / "w", weights=True)
    with pytest.raises(ConfigError, match="sample_weight_col must be empty"):
        check_model_on_driver(_configs(mlp), weighted, ["features"], num_workers=2)
