"""Named inputs (issue 15) without Spark: every column kind → tensor dtype and shape, padding,
truncation and lengths, decode_images, model calls, and the loader's named batches with
transform, shuffle and resume."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from sparkdl.data import ShardedDataset, ShardLoader, decode_images
from sparkdl.data.input_specs import InputSpec, check_feature_cols, plan_inputs
from sparkdl.data.inputs import build_inputs, call_model
from sparkdl.data.manifest import write_dataset
from sparkdl.errors import ConfigError, DataError

pytestmark = pytest.mark.timeout(60)


def _png(value: int, size=(8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (value, 255 - value, 0)).save(out, format="PNG")
    return out.getvalue()


def _table(n: int = 10) -> pa.Table:
    rng = np.random.default_rng(0)
    tokens = [list(range(1, 1 + (i % 4) + 1)) for i in range(n)]
    return pa.table(
        {
            "user": pa.array(np.arange(n) * 3, pa.int32()),
            "price": pa.array(rng.random(n), pa.float64()),
            "flag": pa.array([i % 2 == 0 for i in range(n)]),
            "age": pa.array(np.arange(n), pa.int64()),
            "vec": pa.array([[float(i), 1.0, 2.0] for i in range(n)], pa.list_(pa.float32())),
            "pixels": pa.array([[i] * 4 for i in range(n)], pa.list_(pa.int16())),
            "tokens": pa.array(tokens, pa.list_(pa.int64())),
            "events": pa.array([[0.5] * (i % 3) for i in range(n)], pa.list_(pa.float32())),
            "image": pa.array([_png(i) for i in range(n)], pa.binary()),
            "label": pa.array(np.arange(n) % 2, pa.int64()),
        }
    )


FEATURES = {
    "user": "user",
    "price": "price",
    "flag": "flag",
    "dense": ["age", "vec"],
    "pixels": "pixels",
    "tokens": "tokens",
    "events": "events",
    "image": "image",
}


def test_every_column_kind_becomes_its_tensor(tmp_path):
    manifest = write_dataset(
        str(tmp_path / "ds"),
        [_table()],
        feature_cols=FEATURES,
        label_col="label",
        feature_shapes={"pixels": [1, 2, 2]},
        max_lengths={"tokens": 3},
        pad_values={"tokens": -1},
    )
    kinds = {s.name: (s.kind, s.dtype) for s in manifest.inputs}
    assert kinds == {
        "user": ("int", "int64"),
        "price": ("float", "float32"),
        "flag": ("float", "float32"),
        "dense": ("dense", "float32"),
        "pixels": ("array", "int64"),
        "tokens": ("ragged", "int64"),
        "events": ("ragged", "float32"),
        "image": ("binary", "bytes"),
    }
    batch = build_inputs(_table(), manifest.inputs)
    assert batch["user"].dtype == torch.int64 and batch["user"].tolist()[:3] == [0, 3, 6]
    assert batch["price"].dtype == torch.float32 and batch["price"].shape == (10,)
    assert batch["flag"].tolist()[:2] == [1.0, 0.0]
    assert batch["dense"].dtype == torch.float32 and batch["dense"].shape == (10, 4)
    assert batch["dense"][2].tolist() == [2.0, 2.0, 1.0, 2.0]
    assert batch["pixels"].dtype == torch.int64 and batch["pixels"].shape == (10, 1, 2, 2)
    # tokens: rows of 1..4 ids, capped at 3 (truncating), padded with -1
    assert batch["tokens"].shape == (10, 3)
    assert batch["tokens"][0].tolist() == [1, -1, -1]
    assert batch["tokens"][3].tolist() == [1, 2, 3]
    assert batch["tokens_length"].tolist()[:4] == [1, 2, 3, 3]
    assert batch["events"].dtype == torch.float32 and batch["events"].shape == (10, 2)
    assert batch["events_length"].tolist()[:3] == [0, 1, 2]
    assert isinstance(batch["image"], list) and batch["image"][1] == _png(1)


def test_padding_follows_the_batch_and_slices(tmp_path):
    spec = InputSpec("t", ("t",), "ragged", "int64", (), None, 0.0)
    column = pa.array([[1, 2, 3, 4, 5], [6], [7, 8]], pa.list_(pa.int64()))
    table = pa.table({"t": column}).slice(1, 2)  # a slice: offsets do not start at 0
    out = build_inputs(table, [spec])
    assert out["t"].tolist() == [[6, 0], [7, 8]]
    assert out["t_length"].tolist() == [1, 2]
    empty = build_inputs(pa.table({"t": column}).slice(0, 0), [spec])
    assert empty["t"].shape == (0, 0)


def test_declared_shapes_and_bad_columns_name_the_column():
    bases = {"img": "list_float", "name": "string", "grid": "nested_float", "m": "map<x>"}
    lengths = {"img": (784, 784)}
    with pytest.raises(DataError, match=r"feature_shapes\['img'\].*784"):
        plan_inputs({"img": "img"}, bases, lengths, feature_shapes={"img": [1, 28, 27]})
    with pytest.raises(DataError, match="'name'.*Tokenize"):
        plan_inputs({"name": "name"}, bases, {})
    with pytest.raises(DataError, match="'grid'.*feature_shapes"):
        plan_inputs({"grid": "grid"}, bases, {})
    with pytest.raises(DataError, match="'m'"):
        plan_inputs({"m": "m"}, bases, {})
    with pytest.raises(ConfigError, match="max_lengths keys"):
        plan_inputs({"img": "img"}, bases, lengths, max_lengths={"other": 3})
    with pytest.raises(ConfigError, match="identifiers"):
        check_feature_cols({"not ok": "x"})
    assert check_feature_cols(["a", "b"]) == ["a", "b"]


def test_nulls_and_wrong_lengths_name_the_column():
    spec = InputSpec("img", ("px",), "array", "float32", (2, 2))
    with pytest.raises(DataError, match="'px'.*4 values per row"):
        build_inputs(pa.table({"px": pa.array([[1.0, 2.0, 3.0]])}), [spec])
    ids = InputSpec("user", ("u",), "int", "int64")
    with pytest.raises(DataError, match="'u'.*nulls"):
        build_inputs(pa.table({"u": pa.array([1, None])}), [ids])


def test_decode_images_is_to_tensor_layout():
    images = [_png(0, (6, 4)), _png(255, (6, 4))]
    out = decode_images(images)
    assert out.shape == (2, 3, 4, 6) and out.dtype == torch.float32
    assert out[0, 1].max().item() == 1.0 and out[1, 0].min().item() == 1.0
    resized = decode_images(images, size=(8, 8), mode="L")
    assert resized.shape == (2, 1, 8, 8) and 0.0 <= resized.min() <= resized.max() <= 1.0
    with pytest.raises(DataError, match=r"images\[1\]"):
        decode_images([images[0], b"not an image"])
    with pytest.raises(DataError, match="size"):
        decode_images([_png(0, (6, 4)), _png(0, (4, 4))])
    many = [_png(i, (6, 4)) for i in range(40)]
    torch.testing.assert_close(decode_images(many, workers=2), decode_images(many))
    with pytest.raises(DataError, match=r"images\[33\]"):
        decode_images([*many[:33], b"broken", *many[33:]], workers=2)
    with pytest.raises(ConfigError, match="workers"):
        decode_images(many, workers=-1)


class _Model(torch.nn.Module):
    def forward(self, tokens, tokens_length):
        return tokens.sum(1) + tokens_length


class _NoLengths(torch.nn.Module):
    def forward(self, tokens):
        return tokens.sum(1)


def test_lengths_reach_only_a_forward_that_takes_them():
    inputs = {"tokens": torch.ones(2, 3), "tokens_length": torch.tensor([3, 1])}
    assert call_model(_Model(), inputs).tolist() == [6, 4]
    assert call_model(_NoLengths(), inputs).tolist() == [3, 3]
    assert call_model(torch.nn.Identity(), torch.ones(2)).tolist() == [1, 1]
    # rows of one length (an "array" input, no lengths built): the forward still gets them
    assert call_model(_Model(), {"tokens": torch.ones(2, 3)}).tolist() == [6, 6]
    # **kwargs is no parameter named tokens_length: no lengths
    assert call_model(_AnyKeywords(), inputs) == ["tokens"]


class _AnyKeywords(torch.nn.Module):
    def forward(self, **inputs):
        return sorted(inputs)


def _loader_dataset(tmp_path, rows=40):
    n = rows
    table = pa.table(
        {
            "user": pa.array(np.arange(n), pa.int64()),
            "tokens": pa.array([[i] * (1 + i % 5) for i in range(n)], pa.list_(pa.int64())),
            "label": pa.array(np.arange(n), pa.int64()),
        }
    )
    write_dataset(
        str(tmp_path / "ds"),
        [table.slice(0, n // 2), table.slice(n // 2)],
        feature_cols={"user": "user", "tokens": "tokens"},
        label_col="label",
        row_group_rows=5,
    )
    return ShardedDataset.load(str(tmp_path / "ds"))


def test_loader_yields_named_batches_in_a_seeded_order(tmp_path):
    ds = _loader_dataset(tmp_path)
    loader = ds.loader(0, 2, batch_size=4, shuffle=True, seed=3, shuffle_buffer_rows=8)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    seen = []
    for inputs, label in batches:
        assert set(inputs) == {"user", "tokens", "tokens_length"}
        assert inputs["user"].dtype == torch.int64 and label.tolist() == inputs["user"].tolist()
        # each row's tokens are its own id repeated (1 + id % 5) times, then padding
        for uid, row, length in zip(label.tolist(), inputs["tokens"], inputs["tokens_length"]):
            assert length.item() == 1 + uid % 5 and row[: length.item()].tolist() == [uid] * length
            assert row[length.item() :].eq(0).all()
        seen += label.tolist()
    assert sorted(seen) == list(range(20)) and seen != list(range(20))
    again = [
        b[1].tolist()
        for b in ds.loader(0, 2, batch_size=4, shuffle=True, seed=3, shuffle_buffer_rows=8)
    ]
    assert again == [b[1].tolist() for b in batches]


def test_transform_runs_per_batch_in_order_and_a_resumed_epoch_repeats_it(tmp_path):
    ds = _loader_dataset(tmp_path)
    calls: list[list[int]] = []

    def transform(batch):
        calls.append(batch["label"].tolist())
        return {"ids": batch["user"] * 10, "label": batch["label"] + 100}

    def loader():
        return ds.loader(1, 2, batch_size=3, shuffle=True, seed=1, epoch=2, transform=transform)

    full = [(b[0]["ids"].tolist(), b[1].tolist()) for b in loader()]
    assert all(set(map(lambda x: x // 10, ids)) == {y - 100 for y in ys} for ids, ys in full)
    assert calls == [[y - 100 for y in ys] for _, ys in full]
    first = loader()
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    calls.clear()
    rest = [(b[0]["ids"].tolist(), b[1].tolist()) for b in resumed]
    assert rest == full[2:]
    assert len(calls) == len(full) - 2  # skipped batches are never built nor transformed


def test_named_inputs_refuse_petastorm(tmp_path):
    ds = _loader_dataset(tmp_path)
    with pytest.raises(ConfigError, match="reader must be 'pyarrow'"):
        ShardLoader(ds, 0, 1, batch_size=2, reader="petastorm")


class _Ids(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.user = torch.nn.Embedding(8, 4)
        self.head = torch.nn.Linear(5, 2)

    def forward(self, user, tokens, tokens_length):
        pooled = tokens.float().sum(1, keepdim=True) / tokens_length.unsqueeze(1)
        return self.head(torch.cat([self.user(user), pooled], dim=1))


def _run(tmp_path, users, **spec_fields):
    from sparkdl.config import ModelSpec, OptimConfig, TrainSpec
    from sparkdl.context import WorkerEnv
    from sparkdl.train.worker import run_worker

    n = len(users)
    table = pa.table(
        {
            "u": pa.array(users, pa.int64()),
            "t": pa.array([[1] * (1 + i % 3) for i in range(n)], pa.list_(pa.int64())),
            "label": pa.array(np.arange(n) % 2, pa.int64()),
        }
    )
    write_dataset(
        str(tmp_path / "ds"),
        [table],
        feature_cols={"user": "u", "tokens": "t"},
        label_col="label",
        validation_shards=[table],
    )
    spec = TrainSpec(
        model=ModelSpec(factory=_Ids),
        dataset_path=str(tmp_path / "ds"),
        run_dir=str(tmp_path / "run"),
        optim=OptimConfig(batch_size=4, epochs=1, learning_rate=0.1),
        **spec_fields,
    )
    return run_worker(spec, WorkerEnv(rank=0, world_size=1))


def test_run_worker_trains_named_inputs_with_transform_fns(tmp_path):
    seen = {"train": 0, "validation": 0}

    def train_fn(batch):
        seen["train"] += 1
        return {**batch, "user": batch["user"] % 8}

    def eval_fn(batch):
        seen["validation"] += 1
        return {**batch, "user": batch["user"] % 8}

    result = _run(tmp_path, list(range(16)), transform_fn=train_fn, inference_transform_fn=eval_fn)
    assert result.steps == 4 and seen == {"train": 4, "validation": 4}
    assert "validation/loss" in result.metrics


def test_an_id_outside_the_embedding_names_the_column_and_its_range(tmp_path):
    with pytest.raises(DataError, match=r"column 'u' \(input 'user'\): -3\.\.2"):
        _run(tmp_path, [0, 1, 2, -3, 1, 2, 0, 1])


def _weighted_step(tmp_path, name, x, y, weights=None, loss="mse"):
    from sparkdl.config import ModelSpec, OptimConfig, TrainSpec
    from sparkdl.context import WorkerEnv
    from sparkdl.rundir.model_dir import STATE_FILE
    from sparkdl.train.worker import run_worker

    columns = {"x": pa.array(list(x), pa.list_(pa.float32())), "y": pa.array(y)}
    if weights is not None:
        columns["w"] = pa.array(weights, pa.float64())
    path = str(tmp_path / name)
    write_dataset(
        path,
        [pa.table(columns)],
        feature_cols=["x"],
        label_col="y",
        sample_weight_col="w" if weights is not None else None,
    )
    spec = TrainSpec(
        model=ModelSpec(factory=lambda: torch.nn.Linear(3, 1 if loss == "mse" else 2)),
        dataset_path=path,
        run_dir=str(tmp_path / f"{name}-run"),
        optim=OptimConfig(
            batch_size=len(y),
            epochs=1,
            optimizer="sgd",
            learning_rate=0.5,
            loss=loss,
            shuffle=False,
        ),
    )
    result = run_worker(spec, WorkerEnv(rank=0, world_size=1))
    return torch.load(os.path.join(result.model_dir, STATE_FILE), weights_only=True)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_rows_of_weight_zero_change_nothing(tmp_path, loss):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3)).astype(np.float32)
    y = (rng.random(12) > 0.5).astype(np.int64) if loss == "cross_entropy" else rng.normal(size=12)
    weights = np.where(np.arange(12) % 3 == 0, 0.0, 1.0)
    keep = weights > 0
    with_zeros = _weighted_step(tmp_path, "zeros", x, y, weights, loss)
    without = _weighted_step(tmp_path, "without", x[keep], y[keep], None, loss)
    unweighted = _weighted_step(tmp_path, "all", x, y, None, loss)
    for key in with_zeros:
        torch.testing.assert_close(with_zeros[key], without[key], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(with_zeros["weight"], unweighted["weight"])
    doubled = _weighted_step(tmp_path, "doubled", x, y, weights * 2.0, loss)
    torch.testing.assert_close(doubled["weight"], with_zeros["weight"])  # normalised by the sum


def test_several_labels_and_array_labels_reach_the_batch(tmp_path):
    n = 8
    table = pa.table(
        {
            "x": pa.array(np.arange(n, dtype=np.float32)),
            "clicked": pa.array(np.arange(n) % 2, pa.int32()),
            "rating": pa.array(np.arange(n) / 2.0),
            "tags": pa.array([[i % 2, 1, 0] for i in range(n)], pa.list_(pa.int64())),
            "w": pa.array(np.ones(n)),
        }
    )
    ds_path = str(tmp_path / "multi")
    write_dataset(ds_path, [table], feature_cols=["x"], label_col=["clicked", "rating"])
    features, (clicked, rating) = next(
        iter(ShardedDataset.load(ds_path).loader(0, 1, batch_size=4, shuffle=False))
    )
    assert features.shape == (4, 1) and features.dtype == torch.float32
    assert clicked.dtype == torch.int64 and rating.dtype == torch.float32
    assert rating.tolist() == [0.0, 0.5, 1.0, 1.5]
    tags_path = str(tmp_path / "tags")
    write_dataset(tags_path, [table], feature_cols=["x"], label_col="tags", sample_weight_col="w")
    features, tags, w = next(
        iter(ShardedDataset.load(tags_path).loader(0, 1, batch_size=4, shuffle=False))
    )
    assert tags.shape == (4, 3) and tags.dtype == torch.float32 and w.dtype == torch.float32
    with pytest.raises(DataError, match="label column 's'.*numeric"):
        write_dataset(
            str(tmp_path / "bad"),
            [table.append_column("s", pa.array(["a"] * n))],
            feature_cols=["rating"],
            label_col=["s"],
        )


def test_transform_threads_give_the_same_batches_in_order(tmp_path):
    ds = _loader_dataset(tmp_path)

    def transform(batch):
        return {**batch, "user": batch["user"] * 2}

    def batches(threads):
        loader = ds.loader(
            0, 1, batch_size=3, shuffle=True, seed=4, transform=transform, transform_threads=threads
        )
        return [(b[0]["user"].tolist(), b[1].tolist()) for b in loader]

    assert batches(3) == batches(1) and len(batches(1)) == 13
    with pytest.raises(ConfigError, match="transform_threads"):
        ds.loader(0, 1, batch_size=3, transform_threads=0)


def test_spark_types_map_to_bases_and_refused_ones_name_the_column():
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql import types as T

    from sparkdl.data.named_columns import named_bases

    fields = {
        "id": T.IntegerType(),
        "price": T.DecimalType(10, 2),
        "flag": T.BooleanType(),
        "vec": VectorUDT(),
        "ids": T.ArrayType(T.ShortType()),
        "grid": T.ArrayType(T.ArrayType(T.DoubleType())),
        "png": T.BinaryType(),
        "span": T.DayTimeIntervalType(),
        "tags": T.MapType(T.StringType(), T.IntegerType()),
    }
    named = {c: c for c in ("id", "price", "flag", "vec", "ids", "grid", "png")}
    assert named_bases(named, fields, {"grid": [2, 2]}) == {
        "id": "int",
        "price": "float",
        "flag": "float",
        "vec": "list_float",
        "ids": "list_int",
        "grid": "nested_float",
        "png": "binary",
    }
    for column in ("span", "tags"):
        with pytest.raises(DataError, match=f"'{column}'"):
            named_bases({column: column}, fields, {})


class _TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.click, self.rating = torch.nn.Linear(1, 2), torch.nn.Linear(1, 1)

    def forward(self, x):
        return self.click(x), self.rating(x).squeeze(1)


def _multi_task_loss(outputs, labels):
    clicked, rating = labels
    return torch.nn.functional.cross_entropy(outputs[0], clicked) + torch.nn.functional.mse_loss(
        outputs[1], rating
    )


@pytest.mark.parametrize("case", ["multi-task", "multi-label"])
def test_run_worker_trains_several_and_array_labels(tmp_path, case):
    from sparkdl.config import ModelSpec, OptimConfig, TrainSpec
    from sparkdl.context import WorkerEnv
    from sparkdl.train.worker import run_worker

    n = 32
    table = pa.table(
        {
            "x": pa.array(np.linspace(-1, 1, n, dtype=np.float32)),
            "clicked": pa.array((np.arange(n) % 2).astype(np.int64)),
            "rating": pa.array(np.arange(n) / 10.0),
            "tags": pa.array([[i % 2, (i + 1) % 2, 1] for i in range(n)], pa.list_(pa.int64())),
        }
    )
    multi = case == "multi-task"
    write_dataset(
        str(tmp_path / "ds"),
        [table],
        feature_cols=["x"],
        label_col=["clicked", "rating"] if multi else "tags",
        validation_shards=[table],
    )
    spec = TrainSpec(
        model=ModelSpec(factory=_TwoHeads if multi else (lambda: torch.nn.Linear(1, 3))),
        dataset_path=str(tmp_path / "ds"),
        run_dir=str(tmp_path / "run"),
        optim=OptimConfig(
            batch_size=8,
            epochs=2,
            loss=_multi_task_loss if multi else "bce_with_logits",
            learning_rate=0.05,
        ),
    )
    result = run_worker(spec, WorkerEnv(rank=0, world_size=1))
    assert result.steps == 8 and np.isfinite(result.metrics["validation/loss"])


def test_inference_builds_the_training_inputs_and_names_bad_ids():
    from pyspark import cloudpickle

    from sparkdl.ml.inference import ShippedModule, _Plan, _Predictor

    torch.manual_seed(0)
    module = _Ids().eval()
    specs = (
        InputSpec("user", ("u",), "int", "int64"),
        InputSpec("tokens", ("t",), "ragged", "int64"),
    )
    shipped = ShippedModule("named-inputs-test", payload=cloudpickle.dumps(module))
    plan = _Plan(shipped, ("u", "t"), None, True, 2, True, "cpu", specs, None, with_raw=True)
    users = pa.array([1, 2, 3], pa.int64())
    tokens = pa.array([[1], [1, 1, 1], [1, 1]], pa.list_(pa.int64()))
    predictions, (probabilities, raw) = _Predictor(plan)([users, tokens])
    with torch.no_grad():  # batches of 2: rows 0-1 padded to 3, row 2 alone
        first = module(
            torch.tensor([1, 2]), torch.tensor([[1, 0, 0], [1, 1, 1]]), torch.tensor([1, 3])
        )
        last = module(torch.tensor([3]), torch.tensor([[1, 1]]), torch.tensor([2]))
    expected = torch.cat([first, last])
    assert predictions.to_pylist() == expected.argmax(1).double().tolist()
    np.testing.assert_allclose(raw.to_pylist(), expected.numpy(), rtol=1e-6)
    assert len(probabilities) == 3
    with pytest.raises(DataError, match=r"column 'u' \(input 'user'\): 1\.\.9"):
        _Predictor(plan)([pa.array([1, 9, 3], pa.int64()), tokens])
