"""Shared fixtures; one marker per tier (unit, dist, spark, connect, cluster, s3, gpu), each test with a timeout.

Helpers used by more than one test module live here (or, when users want them too, in
``sparkdl.testing``); a helper a test module needs is requested as a fixture. Functions defined
in conftest files travel to Spark executors and spawned ranks by value, like test modules'.
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ["PYSPARK_PYTHON"] = sys.executable


@pytest.fixture(scope="module")
def spark_local():
    """A ``local[2]`` SparkSession bound to loopback (reused across modules while it lives)."""
    from sparkdl.testing import local_spark_session

    return local_spark_session("local[2]", app_name="sparkdl-tests", ui=False)


@pytest.fixture(scope="module")
def spark_local_cluster():
    """A ``local-cluster[2,1,1024]`` SparkSession: two separate executor JVMs on loopback.

    One SparkContext per process: asking for it stops a local[2] session (and vice versa);
    collection puts the *_cluster.py modules last so that happens once.
    """
    from sparkdl.testing import local_spark_session

    return local_spark_session(
        "local-cluster[2,1,1024]", app_name="sparkdl-tests-cluster", ui=False
    )


@pytest.fixture(scope="session")
def small_estimator():
    """Builder of the small TorchEstimator the fault and bad-input tests train:
    ``small_estimator(run_dir, model=factory, **overrides)``.

    SGD at 0.1, batch 8, 2 epochs on 2 workers over ``features`` / ``label`` (the columns of
    ``sparkdl.testing.classification_frame``), the loss every 2 steps, and a 30 s collective
    timeout so that a lost rank fails the group quickly; ``overrides`` replace or add parameters.
    """

    def build(run_dir, *, model, **overrides):
        import sparkdl

        kwargs = dict(
            model=model,
            feature_cols=["features"],
            label_col="label",
            optimizer="sgd",
            learning_rate=0.1,
            batch_size=8,
            epochs=2,
            num_workers=2,
            run_dir=str(run_dir),
            log_every_steps=2,
            collective_timeout_s=30,
        )
        kwargs.update(overrides)
        return sparkdl.TorchEstimator(**kwargs)

    return build


def small_classifier():
    """The fault tests' model: 6 features → 16 → 3 classes (travels by value)."""
    import torch

    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


@pytest.fixture(scope="session")
def fault_setup(small_estimator):
    """What the fault tests of every tier share, on whichever session: ``frame(spark)`` (192
    rows × 6 features, 3 classes, 3 partitions: 12 steps per epoch on 2 workers at batch 8),
    ``estimator(run_dir, **overrides)`` (the small estimator on ``model``, checkpoints every 5
    steps and at each epoch's end) and ``model`` (:func:`small_classifier`)."""
    import functools
    from types import SimpleNamespace

    from sparkdl.testing import classification_frame

    def frame(spark):
        return classification_frame(spark, rows=192, features=6, classes=3, seed=11, partitions=3)

    return SimpleNamespace(
        frame=frame,
        estimator=functools.partial(
            small_estimator, model=small_classifier, checkpoint_every_steps=5
        ),
        model=small_classifier,
    )


@pytest.fixture(scope="session")
def digits_estimator():
    """Builder of the digits TorchEstimator (data/digits: 64 features, 10 classes):
    ``digits_estimator(run_dir, **overrides)``.

    ``sparkdl.models:mlp`` 64 → 10 (named by import path), Adam at 3e-3, batch 32, 15 epochs on
    2 workers, which reaches 95% test accuracy; ``overrides`` replace or add parameters.
    """

    def build(run_dir, **overrides):
        import sparkdl

        kwargs = dict(
            model="sparkdl.models:mlp",
            model_kwargs={"in_features": 64, "out_features": 10},
            feature_cols=["features"],
            label_col="label",
            learning_rate=3e-3,
            batch_size=32,
            epochs=15,
            num_workers=2,
            run_dir=str(run_dir),
        )
        kwargs.update(overrides)
        return sparkdl.TorchEstimator(**kwargs)

    return build


def fail_on_rank_one():
    import torch
    import torch.distributed as dist

    from sparkdl.context import get_context

    if get_context().rank == 1:
        raise ValueError("rank one has a bad batch")
    dist.all_reduce(torch.zeros(1))


def exit_mid_collective():
    import os

    import torch
    import torch.distributed as dist

    from sparkdl.context import get_context

    dist.all_reduce(torch.zeros(1))  # both ranks are in the group
    if get_context().rank == 1:
        os._exit(3)
    dist.all_reduce(torch.zeros(1))
    dist.all_reduce(torch.zeros(1))


@pytest.fixture(scope="session", name="fail_on_rank_one")
def _fail_on_rank_one_task():
    """A Distributor task body: rank 1 raises ``ValueError("rank one has a bad batch")`` while
    rank 0 waits in an all-reduce."""
    return fail_on_rank_one


@pytest.fixture(scope="session", name="exit_mid_collective")
def _exit_mid_collective_task():
    """A Distributor task body: after one all-reduce of both ranks, rank 1's process exits
    (status 3) while rank 0 goes on to the next collectives."""
    return exit_mid_collective


@pytest.fixture(scope="session", autouse=True)
def _stop_spark_at_exit():
    yield
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()


def pytest_collection_modifyitems(config, items):
    """Tier marker from the directory; GPU tests skip without CUDA.

    Test modules and conftest files are not importable on Spark's Python workers or in spawned
    ranks, so functions defined in them travel by value (conftest files all share the module
    name ``conftest``, which is what cloudpickle registers).
    """
    from pyspark import cloudpickle

    modules = {item.module for item in items if getattr(item, "module", None)}
    conftest = sys.modules.get(__name__)
    if conftest is not None:  # else cloudpickle finds no module and ships them by value anyway
        modules.add(conftest)
    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    items.sort(key=lambda item: item.path.name.endswith("_cluster.py"))  # stable: cluster last
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing means the env is broken anyway
        has_cuda = False
    for item in items:
        parts = item.path.parts
        for tier in ("unit", "dist", "spark", "connect", "cluster", "s3", "gpu"):
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
        if "gpu" in parts and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
