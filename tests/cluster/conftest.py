"""A standalone Spark cluster for tests: one master and two workers (1 core each) started from
pyspark's own ``bin/spark-class``, bound to 127.0.0.1 on free ports, and a session connected to it.

Every process is started here and stopped here by its own PID (executors, children of the
workers, included); nothing is found or killed by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

from sparkdl.testing import LOOPBACK, free_port, wait_for_port


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc), e.g. the executor JVMs a Spark worker started."""
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                children.extend(int(c) for c in fh.read().split())
    except FileNotFoundError:
        pass
    return sorted(set(children))


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@dataclass
class StandaloneCluster:
    master_url: str
    master: subprocess.Popen
    workers: list[subprocess.Popen]
    logs: str
    seen_executors: set[int] = field(default_factory=set)
    spark: object = None

    env: dict = field(default_factory=dict)
    spark_class: str = ""

    def add_worker(self) -> int:
        """Start one more 1-core worker JVM (stopped with the others); returns its index."""
        index = len(self.workers)
        work_dir = os.path.join(self.logs, f"work-{index}")
        cmd = [self.spark_class, "org.apache.spark.deploy.worker.Worker", self.master_url]
        cmd += ["--host", LOOPBACK, "--port", str(free_port())]
        cmd += ["--webui-port", str(free_port()), "--cores", "1", "--memory", "1g"]
        cmd += ["--work-dir", work_dir]
        self.workers.append(_start(cmd, self.env, os.path.join(self.logs, f"worker-{index}.log")))
        return index

    def kill_worker(self, worker: int) -> list[int]:
        """SIGKILL worker ``worker``'s JVM and its executors, by PID: its slots are gone for good."""
        pids = [*self.executor_pids(worker), self.workers[worker].pid]
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.workers[worker].wait(timeout=30)
        return pids

    def executor_pids(self, worker: int) -> list[int]:
        """PIDs of the executor JVMs worker ``worker`` runs now."""
        pids = [
            p
            for p in child_pids(self.workers[worker].pid)
            if "CoarseGrainedExecutorBackend" in _cmdline(p)
        ]
        self.seen_executors.update(pids)
        return pids


def _start(cmd: list[str], env: dict[str, str], log: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(pids: list[int], procs: list[subprocess.Popen]) -> None:
    """SIGTERM, then SIGKILL after a grace period, each by its PID; reap our own children."""
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        for proc in procs:
            proc.poll()
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture(scope="module")
def spark_standalone_cluster(tmp_path_factory):
    """A master and two 1-core workers on 127.0.0.1, and a SparkSession using both."""
    import pyspark

    from sparkdl.testing import local_spark_session

    spark_home = os.path.dirname(pyspark.__file__)
    spark_class = os.path.join(spark_home, "bin", "spark-class")
    logs = str(tmp_path_factory.mktemp("standalone"))
    env = {
        **os.environ,
        "SPARK_HOME": spark_home,
        "SPARK_LOCAL_IP": LOOPBACK,
        "SPARK_DAEMON_MEMORY": "256m",
        "PYSPARK_PYTHON": sys.executable,
    }
    port, ui = free_port(), free_port()
    master_cmd = [spark_class, "org.apache.spark.deploy.master.Master"]
    master_cmd += ["--host", LOOPBACK, "--port", str(port), "--webui-port", str(ui)]
    master = _start(master_cmd, env, os.path.join(logs, "master.log"))
    workers: list[subprocess.Popen] = []
    cluster = StandaloneCluster(
        f"spark://{LOOPBACK}:{port}", master, workers, logs, env=env, spark_class=spark_class
    )
    try:
        master_log = os.path.join(logs, "master.log")
        wait_for_port(port, timeout_s=180, process=master, log=master_log)
        for _ in range(2):
            cluster.add_worker()
        cluster.spark = local_spark_session(
            cluster.master_url,
            app_name="sparkdl-tests-standalone",
            ui=False,
            conf={
                "spark.executor.memory": "512m",
                "spark.executor.cores": "1",
                "spark.cores.max": "2",
                "spark.executorEnv.PYTHONPATH": os.pathsep.join(sys.path),
                "spark.executorEnv.PYSPARK_PYTHON": sys.executable,
            },
        )
        deadline = time.monotonic() + 180
        while not all(cluster.executor_pids(i) for i in range(2)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"executors did not start within 180 s; see {logs}")
            time.sleep(0.5)
        yield cluster
    finally:
        if cluster.spark is not None:
            cluster.spark.stop()
        executors = set(cluster.seen_executors)
        for w in workers:
            executors.update(child_pids(w.pid))
        _stop([w.pid for w in workers], workers)
        _stop(sorted(executors), [])  # the workers stop their executors; any straggler here
        _stop([master.pid], [master])
