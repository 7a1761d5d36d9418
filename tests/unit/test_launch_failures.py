"""Unit tests of failure mapping: markers through Spark-like error text, pre-launch checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sparkdl.errors import ConfigError, RankFailure, WorkerGroupError
from sparkdl.launch.checks import check_dynamic_allocation, check_gpu_conf, check_slots
from sparkdl.launch.launcher import Distributor, worker_group_error
from sparkdl.launch.rendezvous import LaunchOptions, run_rank

pytestmark = pytest.mark.timeout(30)


def _failure(rank, message):
    try:
        raise ValueError(message)
    except ValueError as exc:
        return RankFailure.from_exception(rank, exc)


def _java_like(*markers):
    """Text shaped like a Py4JJavaError from a failed barrier job, markers embedded."""
    lines = [
        "An error occurred while calling z:org.apache.spark.api.python.PythonRDD.collectAndServe.",
        ": org.apache.spark.SparkException: Job aborted due to stage failure: Task 1 in stage 3.0 "
        "failed 1 times, most recent failure: Lost task 1.0 in stage 3.0 (TID 7) (127.0.0.1 "
        "executor driver): org.apache.spark.api.python.PythonException: Traceback (most recent "
        "call last):",
        '  File "pyspark/worker.py", line 1, in main',
    ]
    lines += [f"RuntimeError: {m}" for m in markers]
    lines += ["\tat org.apache.spark.api.python.BasePythonRunner.handlePythonException(x:1)"]
    return "\n".join(lines)


class _Py4JLike(Exception):
    def __init__(self, text, java_text=""):
        super().__init__(text)
        self.java_exception = SimpleNamespace(toString=lambda: java_text)


def test_marker_round_trip_through_java_error_text():
    failure = _failure(1, "bad batch: x[3] = nan")
    error = worker_group_error(_Py4JLike(_java_like(failure.encode())))
    assert isinstance(error, WorkerGroupError)
    assert error.ranks == [1]
    assert error.failures[0] == failure
    assert "ValueError: bad batch" in error.failures[0].traceback
    assert "rank 1: ValueError" in str(error)


def test_markers_of_several_ranks_come_back_sorted_and_deduplicated():
    f2, f0 = _failure(2, "two"), _failure(0, "zero")
    text = _java_like(f2.encode(), f0.encode(), f2.encode())
    error = worker_group_error(_Py4JLike("wrapper", java_text=text))
    assert error.ranks == [0, 2]


def test_no_marker_names_the_lost_task():
    text = (
        "Job aborted due to stage failure: Task 1 in stage 0.0 failed 1 times, most recent "
        "failure: Lost task 1.0 in stage 0.0 (TID 1) (127.0.0.1 executor driver): "
        "org.apache.spark.SparkException: Python worker exited unexpectedly (crashed)\n\tat x"
    )
    error = worker_group_error(_Py4JLike(text))
    assert error.failures == []
    assert "rank 1" in error.detail and "exited unexpectedly" in error.detail


def test_no_marker_from_a_failed_barrier_stage_names_the_rank():
    text = (
        "org.apache.spark.SparkException: Job aborted due to stage failure: Could not recover "
        "from a failed barrier ResultStage. Most recent failure reason: Stage failed because "
        "barrier task ResultTask(4, 1) finished unsuccessfully.\n"
        "org.apache.spark.SparkException: Python worker exited unexpectedly (crashed).\n\tat x"
    )
    error = worker_group_error(_Py4JLike(text))
    assert error.detail.startswith("rank 1 died without reporting an error")
    assert "Python worker exited unexpectedly" in error.detail


def test_unrecognised_spark_errors_keep_a_summary():
    error = worker_group_error(_Py4JLike("SparkContext was shut down\n\tat a\n\tat b\n\tat c"))
    assert error.failures == [] and "SparkContext was shut down" in error.detail


def test_run_rank_turns_exceptions_into_failures():
    from pyspark import cloudpickle

    def boom():
        raise KeyError("missing")

    payload = cloudpickle.dumps((boom, (), {}))
    from sparkdl.launch.rendezvous import build_local_env

    outcome = run_rank(3, lambda: build_local_env(0, 0, LaunchOptions(num_workers=1), 1), payload)
    assert outcome.value is None and outcome.failure.rank == 3
    assert outcome.failure.exc_type == "KeyError" and "boom" in outcome.failure.traceback


def test_dynamic_allocation_is_refused():
    check_dynamic_allocation({"spark.dynamicAllocation.enabled": "false"})
    check_dynamic_allocation({})
    with pytest.raises(ConfigError, match="spark.dynamicAllocation.enabled=false"):
        check_dynamic_allocation({"spark.dynamicAllocation.enabled": "True"})


def test_gpu_needs_a_task_gpu_amount_and_a_gpu_scheduling_master():
    check_gpu_conf({}, use_gpu=False)
    with pytest.raises(ConfigError, match="spark.task.resource.gpu.amount"):
        check_gpu_conf({}, use_gpu=True, master="spark://h:7077")
    with pytest.raises(ConfigError, match="spark.task.resource.gpu.amount"):
        check_gpu_conf({"spark.task.resource.gpu.amount": "0"}, use_gpu=True)
    with pytest.raises(ConfigError, match="local-cluster"):
        check_gpu_conf({"spark.task.resource.gpu.amount": "1"}, use_gpu=True, master="local[2]")
    check_gpu_conf({"spark.task.resource.gpu.amount": "1"}, use_gpu=True, master="spark://h:1")


def _FakeSc(master, slots, conf=None):  # noqa: N802 - reads like the class it stands in for
    """A classic session's side over just enough SparkContext for check_slots."""
    from sparkdl.session import ClassicSide

    return ClassicSide(SimpleNamespace(sparkContext=_Sc(master, slots, conf)))


class _Sc:
    """Just enough SparkContext for check_slots: a master, a conf, maxNumConcurrentTasks."""

    def __init__(self, master, slots, conf=None):
        self.master, self._slots, self._conf = master, slots, conf or {}
        jsc = SimpleNamespace(
            resourceProfileManager=lambda: SimpleNamespace(defaultResourceProfile=lambda: "rp"),
            maxNumConcurrentTasks=lambda rp: self._slots(),
        )
        self._jsc = SimpleNamespace(sc=lambda: jsc)

    def getConf(self):
        return self._conf


def test_slots_in_local_mode_are_final():
    calls = []
    sc = _FakeSc("local[2]", lambda: calls.append(1) or 2)
    check_slots(sc, 2, wait_s=30)
    with pytest.raises(ConfigError, match="num_workers must be at most .* got 3 with 2 slot"):
        check_slots(sc, 3, wait_s=30)
    assert len(calls) == 2  # no waiting loop in local mode


def test_slots_wait_for_executors_then_pass():
    counts = iter([0, 0, 1, 2])
    check_slots(_FakeSc("spark://h:7077", lambda: next(counts)), 2, wait_s=10)


def test_slots_above_local_cluster_ceiling_fail_without_waiting():
    sc = _FakeSc("local-cluster[2,1,1024]", lambda: 0)
    with pytest.raises(ConfigError, match="got 3 with 0 slot"):
        check_slots(sc, 3, wait_s=30)


def test_unreadable_slots_warn_and_go_on(caplog):
    def broken():
        raise RuntimeError("no such method")

    check_slots(_FakeSc("yarn", broken), 4, wait_s=0)
    assert "unchecked" in caplog.text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_workers": 0},
        {"num_workers": 1.5},
        {"num_workers": True},
        {"backend": "mpi"},
        {"timeout_s": 0},
        {"collective_timeout_s": -1},
    ],
)
def test_invalid_arguments_are_config_errors(kwargs):
    args = {"num_workers": 2, **kwargs}
    with pytest.raises(ConfigError, match="must be"):
        Distributor(**args)


def test_backend_defaults_follow_use_gpu():
    assert Distributor(2).backend == "gloo"
    assert Distributor(2, use_gpu=True).backend == "nccl"
    assert Distributor(2, use_gpu=True, backend="gloo").backend == "gloo"


def test_unpicklable_arguments_fail_on_the_driver():
    import threading

    with pytest.raises(ConfigError, match="picklable"):
        Distributor(2, local_mode=True).run(lambda lock: None, threading.Lock())
