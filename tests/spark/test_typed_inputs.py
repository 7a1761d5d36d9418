"""Named, typed inputs through Spark local[2] (issue 15): a recommender with id embeddings, a
CNN from a binary PNG column and from an array column with feature_shapes, a token-sequence
classifier; each predicts with transform and survives save/load. Materialize stores the kinds
without loss and refuses what it cannot feed, naming the column."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pyspark.ml import Pipeline, PipelineModel
from pyspark.sql import functions as F

import sparkdl
from sparkdl.data import decode_images
from sparkdl.errors import DataError
from sparkdl.ml import trust_pickle

pytestmark = pytest.mark.timeout(900)

DIGITS = os.path.join(os.path.dirname(__file__), "..", "..", "data", "digits")


class Recommender(torch.nn.Module):
    def __init__(self, users=40, items=30):
        super().__init__()
        self.user = torch.nn.Embedding(users, 8)
        self.item = torch.nn.Embedding(items, 8)
        self.head = torch.nn.Sequential(
            torch.nn.Linear(18, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
        )

    def forward(self, user_id, item_id, dense):
        x = torch.cat([self.user(user_id), self.item(item_id), dense], dim=1)
        return self.head(x)


def dense_only():
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


class DigitsCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(32 * 16, 10),
        )

    def forward(self, image):
        return self.net(image)


class BagOfTokens(torch.nn.Module):
    def __init__(self, vocab=21):
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(vocab, 16, mode="sum", padding_idx=0)
        self.head = torch.nn.Linear(16, 2)

    def forward(self, tokens, tokens_length):  # int64 [B, T] padded with 0, int64 [B]
        summed = self.bag(tokens)
        return self.head(summed / tokens_length.clamp(min=1).unsqueeze(1).float())


def decode_digit(batch):
    return {**batch, "image": decode_images(batch["image"], mode="L")}


def _accuracy(pred):
    return pred.selectExpr("avg(cast(prediction = label as double))").first()[0]


@pytest.fixture(scope="module")
def ratings(spark_local):
    rng = np.random.default_rng(0)
    n = 2000
    users, items = rng.integers(0, 40, n), rng.integers(0, 30, n)
    user_bias, item_bias = rng.normal(0, 1, 40), rng.normal(0, 1, 30)
    rating = user_bias[users] + item_bias[items] + rng.normal(0, 0.1, n)
    rows = [
        (int(u), int(i), float(a), float(p), float(r))
        for u, i, a, p, r in zip(users, items, rng.random(n), rng.random(n), rating)
    ]
    return spark_local.createDataFrame(
        rows, "user int, item long, age double, price double, y double"
    )


def _loss(model):
    return model.summary["metrics"]["train/loss"]


def test_a_recommender_beats_a_dense_baseline_and_predicts_after_save_load(
    ratings, tmp_path, spark_local
):
    common = dict(label_col="y", loss="mse", learning_rate=1e-2, batch_size=64, epochs=6)
    baseline = sparkdl.TorchEstimator(
        model=dense_only, feature_cols=["age", "price"], run_dir=str(tmp_path / "dense"), **common
    ).fit(ratings)
    features = {"user_id": "user", "item_id": "item", "dense": ["age", "price"]}
    est = sparkdl.TorchEstimator(
        model=Recommender, feature_cols=features, run_dir=str(tmp_path / "rec"), **common
    )
    model = est.fit(ratings)
    assert _loss(model) < 0.5 * _loss(baseline), (_loss(model), _loss(baseline))
    manifest = json.loads(open(tmp_path / "rec" / "data" / "_sparkdl_manifest.json").read())
    assert {s["name"]: s["kind"] for s in manifest["inputs"]} == {
        "user_id": "int",
        "item_id": "int",
        "dense": "dense",
    }
    stored = {f["name"]: f["type"] for f in manifest["schema"]}
    assert stored["user"] == "int64" and stored["item"] == "int64"
    pred = model.transform(ratings)
    mse = pred.selectExpr("avg(pow(prediction - y, 2))").first()[0]
    assert mse < 0.5 * _loss(baseline)
    model.save(str(tmp_path / "saved"))
    loaded = sparkdl.TorchModel.load(str(tmp_path / "saved"), trust_pickle=True)
    again = loaded.transform(ratings).selectExpr("avg(pow(prediction - y, 2))").first()[0]
    assert again == pytest.approx(mse, rel=1e-6)


@pytest.fixture(scope="module")
def digit_images(spark_local):
    def frame(name):
        table = pq.read_table(os.path.join(DIGITS, f"{name}.parquet"))
        rows = []
        for features, label in zip(table.column("features").to_pylist(), table.column("label")):
            pixels = (np.asarray(features).reshape(8, 8) * 255).round().astype(np.uint8)
            out = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(out, format="PNG")
            rows.append((bytearray(out.getvalue()), list(features), label.as_py()))
        return spark_local.createDataFrame(rows, "image binary, pixels array<float>, label int")

    return frame("train"), frame("test")


def test_a_cnn_trains_from_a_png_column_and_predicts_after_save_load(digit_images, tmp_path):
    train, test = digit_images
    est = sparkdl.TorchEstimator(
        model=DigitsCNN,
        feature_cols={"image": "image"},
        label_col="label",
        transform_fn=decode_digit,
        learning_rate=3e-3,
        batch_size=32,
        epochs=8,
        run_dir=str(tmp_path / "png"),
    )
    model = est.fit(train)
    manifest = json.loads(open(tmp_path / "png" / "data" / "_sparkdl_manifest.json").read())
    assert [f["type"] for f in manifest["schema"] if f["name"] == "image"] == ["binary"]
    accuracy = _accuracy(model.transform(test))
    assert accuracy >= 0.90
    model.save(str(tmp_path / "saved"))
    loaded = sparkdl.TorchModel.load(str(tmp_path / "saved"), trust_pickle=True)
    assert _accuracy(loaded.transform(test)) == pytest.approx(accuracy)


def test_a_cnn_trains_from_an_array_column_with_feature_shapes(digit_images, tmp_path):
    train, test = digit_images
    est = sparkdl.TorchEstimator(
        model=DigitsCNN,
        feature_cols={"image": "pixels"},
        feature_shapes={"image": [1, 8, 8]},
        label_col="label",
        learning_rate=3e-3,
        batch_size=32,
        epochs=8,
        run_dir=str(tmp_path / "array"),
    )
    fitted = Pipeline(stages=[est]).fit(train)  # and through a Pipeline's save/load
    assert _accuracy(fitted.transform(test)) >= 0.90
    fitted.save(str(tmp_path / "saved"))
    with trust_pickle():
        loaded = PipelineModel.load(str(tmp_path / "saved"))
    assert loaded.stages[0].getFeatureCols() == {"image": "pixels"}
    assert _accuracy(loaded.transform(test)) >= 0.90


def test_a_token_classifier_trains_on_variable_length_arrays(spark_local, tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(1200):
        tokens = rng.integers(4, 21, rng.integers(2, 15)).tolist()
        label = int(rng.random() < 0.5)
        if label:
            tokens[rng.integers(len(tokens))] = 3
        rows.append((tokens, label))
    df = spark_local.createDataFrame(rows, "tokens array<int>, label int")
    train, test = df.randomSplit([0.8, 0.2], seed=0)
    est = sparkdl.TorchEstimator(
        model=BagOfTokens,
        feature_cols={"tokens": "tokens"},
        max_lengths={"tokens": 16},
        label_col="label",
        learning_rate=1e-2,
        batch_size=32,
        epochs=8,
        run_dir=str(tmp_path / "tokens"),
    )
    model = est.fit(train)
    manifest = json.loads(open(tmp_path / "tokens" / "data" / "_sparkdl_manifest.json").read())
    (spec,) = manifest["inputs"]
    assert spec["kind"] == "ragged" and spec["max_length"] == 16
    assert [f["type"] for f in manifest["schema"] if f["name"] == "tokens"] == [
        "list<element: int64>"
    ]
    accuracy = _accuracy(model.transform(test))
    assert accuracy >= 0.85
    raw = model.copy({model.output_col: "logits"}).transform(test).select("prediction", "logits")
    rows = raw.collect()
    assert all(len(r["logits"]) == 2 for r in rows)
    assert all(int(np.argmax(r["logits"])) == r["prediction"] for r in rows)
    model.save(str(tmp_path / "saved"))
    loaded = sparkdl.TorchModel.load(str(tmp_path / "saved"), trust_pickle=True)
    assert _accuracy(loaded.transform(test)) == pytest.approx(accuracy)


def test_bad_named_inputs_are_refused_on_the_driver_naming_the_column(spark_local, tmp_path):
    df = spark_local.createDataFrame(
        [(1, "a b", [[1.0, 2.0], [3.0, 4.0]], 0), (2, "c", [[1.0, 2.0], [3.0, 4.0]], 1)],
        "user int, text string, grid array<array<double>>, label int",
    ).withColumn("info", F.struct("user", "text"))

    def materialize(feature_cols, **options):
        return sparkdl.materialize(
            df,
            str(tmp_path / "ds"),
            feature_cols=feature_cols,
            label_col="label",
            num_shards=1,
            mode="overwrite",
            **options,
        )

    with pytest.raises(DataError, match="'text'.*Tokenize"):
        materialize({"text": "text"})
    with pytest.raises(DataError, match="'info'"):
        materialize({"info": "info"})
    with pytest.raises(DataError, match="'grid'.*feature_shapes"):
        materialize({"grid": "grid"})
    with pytest.raises(DataError, match=r"feature_shapes\['grid'\].*4 values"):
        materialize({"grid": "grid"}, feature_shapes={"grid": [3, 3]})
    ds = materialize({"user": "user", "grid": "grid"}, feature_shapes={"grid": [2, 2]})
    inputs, label = next(iter(ds.loader(0, 1, batch_size=2, shuffle=False)))
    assert inputs["user"].dtype == torch.int64 and inputs["grid"].shape == (2, 2, 2)


def linear3():
    return torch.nn.Linear(3, 1)


def test_sample_weights_two_workers_of_b_equal_one_worker_of_2b(spark_local, tmp_path):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(32, 3)), rng.normal(size=32)
    # row i goes to shard i % 2 = rank: rank 0's weights sum far below rank 1's, so a
    # per-rank normalisation could not match the one-worker step
    weights = np.where(np.arange(32) % 2 == 0, rng.uniform(0.1, 0.5, 32), rng.uniform(2, 4, 32))
    rows = [(list(map(float, a)), float(b), float(w)) for a, b, w in zip(x, y, weights)]
    df = spark_local.createDataFrame(rows, "x array<double>, y double, w double")

    def fit(workers, name, **extra):
        return (
            sparkdl.TorchEstimator(
                model=linear3,
                feature_cols=["x"],
                label_col="y",
                loss="mse",
                optimizer="sgd",
                learning_rate=0.5,
                batch_size=32 // workers,
                epochs=1,
                num_workers=workers,
                shuffle=False,
                run_dir=str(tmp_path / name),
                **extra,
            )
            .fit(df)
            .module.state_dict()
        )

    one = fit(1, "one", sample_weight_col="w")
    two = fit(2, "two", sample_weight_col="w")
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-5)
    unweighted = fit(1, "unweighted")
    assert not torch.allclose(one["weight"], unweighted["weight"], atol=1e-3)


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.click, self.rating = torch.nn.Linear(3, 2), torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.click(x), self.rating(x).squeeze(1)


def weighted_multi_task(outputs, labels, weights):
    clicked, rating = labels
    rows = torch.nn.functional.cross_entropy(outputs[0], clicked, reduction="none")
    rows = rows + (outputs[1] - rating) ** 2
    return (rows * weights).sum() / weights.sum()


def test_several_labels_and_weights_through_materialize_and_fit(spark_local, tmp_path):
    rng = np.random.default_rng(3)
    rows = [
        (rng.normal(size=3).tolist(), int(i % 2), float(i % 5), int(1 + i % 3)) for i in range(96)
    ]
    df = spark_local.createDataFrame(rows, "x array<double>, clicked int, rating double, w int")
    model = sparkdl.TorchEstimator(
        model=TwoHeads,
        feature_cols=["x"],
        label_col=["clicked", "rating"],
        sample_weight_col="w",
        loss=weighted_multi_task,
        batch_size=8,
        epochs=2,
        run_dir=str(tmp_path / "multi"),
    ).fit(df)
    manifest = json.loads(open(tmp_path / "multi" / "data" / "_sparkdl_manifest.json").read())
    assert [(s["name"], s["kind"]) for s in manifest["labels"]] == [
        ("clicked", "int"),
        ("rating", "float"),
    ]
    assert manifest["weight_col"] == "w" and manifest["feature_cols"] == ["x"]
    stored = {f["name"]: f["type"] for f in manifest["schema"]}
    assert stored["clicked"] == "int64" and stored["w"] == "float"
    assert model.getLabelCol() == "clicked"
    assert model.transform(df).count() == 96
    with pytest.raises(sparkdl.ConfigError, match="callable loss"):
        sparkdl.TorchEstimator(
            model=TwoHeads, feature_cols=["x"], label_col=["clicked", "rating"], run_dir="x"
        )
