"""The driver channel: authentication, gather, bounded queues, fallback; the driver's monitor."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from sparkdl.channel import client as worker_side
from sparkdl.channel import wire
from sparkdl.channel.client import ChannelClient, forward_logs, gather, report_progress
from sparkdl.channel.server import ChannelServer
from sparkdl.channel.wire import TO_DRIVER, encode_frame
from sparkdl.launch.launcher import job_description, spark_job_phase
from sparkdl.launch.progress import RunMonitor, format_progress
from sparkdl.testing import free_port

pytestmark = pytest.mark.timeout(60)

LOOPBACK = "127.0.0.1"


class Sink:
    def __init__(self):
        self.frames = []
        self.event = threading.Event()

    def __call__(self, frame):
        self.frames.append(frame)
        self.event.set()


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _hung_up(sock):
    """Whether the driver closed this connection (EOF or reset)."""
    sock.settimeout(5.0)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _raw_send(addr, token, frames):
    """Connect like a worker and send signed frames; the socket, for reading what comes back."""
    sock, nonce = worker_side._connect(addr, 5.0)
    try:
        sock.sendall(b"".join(encode_frame(token, TO_DRIVER, nonce, f) for f in frames))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the driver may hang up before the last bytes of a refused frame
    return sock


def test_frames_with_the_token_reach_the_sink_in_order():
    sink = Sink()
    with ChannelServer(LOOPBACK, sink) as server:
        assert server.address.startswith("127.0.0.1:")
        sock = _raw_send(server.address, server.token, [{"t": "log", "n": i} for i in range(5)])
        assert _wait_for(lambda: len(sink.frames) == 5)
        sock.close()
    assert [f["n"] for f in sink.frames] == list(range(5))
    assert server.rejected == 0


def test_a_wrong_token_is_refused_and_the_connection_closed():
    sink = Sink()
    with ChannelServer(LOOPBACK, sink) as server:
        sock = _raw_send(server.address, "0" * 32, [{"t": "log", "msg": "forged"}])
        assert _hung_up(sock)  # the driver hung up
        sock.close()
        assert _wait_for(lambda: server.rejected == 1)
        # an unsigned line is refused the same way
        sock, _ = worker_side._connect(server.address, 5.0)
        sock.sendall(b'{"t": "log", "msg": "plain"}\n')
        assert _hung_up(sock)
        sock.close()
        assert _wait_for(lambda: server.rejected == 2)
        # so is a frame longer than MAX_FRAME_BYTES, even correctly signed
        huge = {"t": "log", "msg": "x" * (wire.MAX_FRAME_BYTES + 10)}
        sock = _raw_send(server.address, server.token, [huge])
        assert _hung_up(sock)
        sock.close()
        assert _wait_for(lambda: server.rejected == 3)
    assert sink.frames == []


def test_gather_returns_every_message_in_rank_order():
    with ChannelServer(LOOPBACK, Sink()) as server:
        out = {}

        def rank(r):
            out[r] = gather(
                server.address, server.token, key="7", rank=r, world=3, message={"port": 100 + r}
            )

        threads = [threading.Thread(target=rank, args=(r,)) for r in (2, 0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
    expected = [{"port": 100}, {"port": 101}, {"port": 102}]
    assert out == {0: expected, 1: expected, 2: expected}


def test_gather_falls_back_for_every_rank_when_one_never_comes():
    with ChannelServer(LOOPBACK, Sink(), gather_wait_s=0.3) as server:
        early = gather(server.address, server.token, key="1", rank=0, world=2, message=0)
        late = gather(server.address, server.token, key="1", rank=1, world=2, message=1)
    assert early is None and late is None  # both ranks take Spark's allGather


def test_gather_with_a_wrong_token_or_no_driver_is_none():
    with ChannelServer(LOOPBACK, Sink(), gather_wait_s=0.3) as server:
        assert gather(server.address, "f" * 32, key="1", rank=0, world=1, message=0) is None
        address = server.address
    assert gather(address, "f" * 32, key="1", rank=0, world=1, message=0) is None


def test_the_driver_queue_is_bounded_and_counts_drops():
    release = threading.Event()
    seen = []

    def slow_sink(frame):
        release.wait(10)
        seen.append(frame["n"])

    server = ChannelServer(LOOPBACK, slow_sink, queue_size=4)
    sock = _raw_send(server.address, server.token, [{"t": "log", "n": i} for i in range(50)])
    assert _wait_for(lambda: server.received == 50)
    release.set()
    sock.close()
    server.close()
    assert server.dropped >= 40
    assert seen[-1] == 49  # the newest frames are kept


def test_client_falls_back_when_the_driver_is_gone(capfd):
    port = free_port()  # a port with nobody listening
    undelivered = []
    client = ChannelClient(f"{LOOPBACK}:{port}", "t" * 32, on_fail=undelivered.extend)
    assert client.send({"t": "log", "msg": "first"})
    assert _wait_for(lambda: not client.healthy)
    assert not client.send({"t": "log", "msg": "second"})
    client.close()
    assert [f["msg"] for f in undelivered] == ["first"]


def test_forward_logs_sends_records_and_progress_then_falls_back_to_stderr(capfd):
    sink = Sink()
    server = ChannelServer(LOOPBACK, sink)
    logger = logging.getLogger("sparkdl")
    with forward_logs(server.address, server.token, rank=3) as client:
        logger.info("step %d", 1)
        report_progress(epoch=0, epochs=1, step=1, total=2)
        logging.getLogger("sparkdl.test").debug("not at INFO")
        assert _wait_for(lambda: len(sink.frames) == 3)
        server.close(grace_s=0)  # the driver's channel dies mid-run
        # keeps logging, never raises; a send notices the closed socket only once the peer's
        # reset has arrived, so log until it does (a single burst can fit in the socket buffer)
        deadline, i = time.monotonic() + 20, 0
        while client.healthy and time.monotonic() < deadline:
            logger.warning("after the driver left %d", i)
            i += 1
            time.sleep(0.005)
        assert not client.healthy
        logger.warning("plainly logged")
    started, log_frame, progress_frame = sink.frames
    assert (started["t"], started["rank"]) == ("started", 3)  # the start watch counts these
    assert (log_frame["t"], log_frame["rank"], log_frame["msg"]) == ("log", 3, "step 1")
    assert (progress_frame["t"], progress_frame["step"], progress_frame["rank"]) == (
        "progress",
        1,
        3,
    )
    assert "[rank 3] plainly logged" in capfd.readouterr().err
    assert not [
        h for h in logging.getLogger().handlers if isinstance(h, worker_side.ChannelLogHandler)
    ]


def test_forward_logs_without_an_address_does_nothing():
    with forward_logs("", "", rank=0) as client:
        report_progress(step=1)  # no channel: a no-op
    assert client is None


def test_monitor_writes_rank_files_and_prefixed_lines(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="sparkdl")  # worker INFO lines: DEBUG here
    monitor = RunMonitor(log_dir=str(tmp_path / "logs"), interactive=False).start()
    for rank in (0, 1):
        monitor.handle({"t": "log", "rank": rank, "level": 20, "msg": f"hi {rank}", "time": 1.0})
    monitor.handle({"t": "log", "rank": 1, "msg": "[rank 1] named already", "time": 2.0})
    monitor.handle({"t": "log", "rank": "x", "msg": "bad rank is ignored"})
    frame = {"t": "progress", "rank": 0, "epoch": 0, "epochs": 2, "step": 5, "total": 10}
    monitor.handle({**frame, "samples": 640, "seconds": 2.0, "loss": 0.5, "epoch_end": True})
    monitor.close()
    lines = [r.getMessage() for r in caplog.records]
    assert "[rank 0] hi 0" in lines and "[rank 1] hi 1" in lines
    assert "[rank 1] named already" in lines
    assert any(line.startswith("train: epoch 1/2 | step 5/10 (50%)") for line in lines)
    assert sorted(os.listdir(tmp_path / "logs")) == ["rank-0.log", "rank-1.log"]
    assert (tmp_path / "logs" / "rank-1.log").read_text().strip().endswith("INFO named already")


def test_monitor_without_progress_shows_no_progress(caplog):
    caplog.set_level(logging.DEBUG, logger="sparkdl")  # worker INFO lines: DEBUG here
    monitor = RunMonitor(progress=False, interactive=False).start()
    monitor.handle({"t": "progress", "rank": 0, "step": 1, "total": 2, "epoch_end": True})
    monitor.close()
    assert not [r for r in caplog.records if r.name == "sparkdl.progress"]


def test_monitor_bar_when_interactive(capsys):
    monitor = RunMonitor(interactive=True, name="demo").start()
    for step in (1, 2, 4):
        monitor.handle(
            {
                "t": "progress",
                "rank": 0,
                "epoch": 0,
                "epochs": 1,
                "step": step,
                "total": 4,
                "samples": step * 64,
                "seconds": step * 0.1,
                "loss": 1.0 / step,
            }
        )
    monitor.close()
    err = capsys.readouterr().err
    assert "demo epoch 1/1" in err and "4/4" in err and "samples/s" in err


def test_format_progress_names_epoch_step_loss_rate_eta():
    frame = {
        "epoch": 1,
        "epochs": 3,
        "step": 40,
        "total": 120,
        "samples": 25000,
        "seconds": 2.0,
        "loss": 0.51234,
    }
    assert format_progress("train", frame, 10.0) == (
        "train: epoch 2/3 | step 40/120 (33%) | loss 0.5123 | 12,500 samples/s | ETA 0:00:10"
    )


class FakeSparkContext:
    def __init__(self):
        self.props = {"spark.jobGroup.id": "outer", "spark.job.description": "mine"}

    def getLocalProperty(self, key):
        return self.props.get(key)

    def setLocalProperty(self, key, value):
        self.props[key] = value

    def setJobGroup(self, group, description, interruptOnCancel=False):
        self.props.update({"spark.jobGroup.id": group, "spark.job.description": description})


def test_spark_job_phase_names_run_and_phase_then_restores():
    sc = FakeSparkContext()
    description = job_description("digits", "train", "2 workers")
    assert description == "sparkdl digits: train (2 workers)"
    with spark_job_phase(SimpleNamespace(sparkContext=sc), description) as group:
        assert group.startswith("sparkdl-digits-train-2-workers-")
        assert sc.props["spark.job.description"] == description
    assert sc.props["spark.jobGroup.id"] == "outer"
    assert sc.props["spark.job.description"] == "mine"


@pytest.mark.parametrize("root_handler", [True, False])
def test_a_worker_line_prints_once_while_the_bar_is_live(capsys, root_handler):
    """tqdm's redirect must not give every logger on the way to the root its own handler."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    # a script with logging.basicConfig (a root handler), else a bare notebook (none at all)
    root.handlers = [logging.StreamHandler(sys.stderr)] if root_handler else []
    root.setLevel(logging.INFO)
    try:
        monitor = RunMonitor(interactive=True, name="demo").start()
        frame = {"t": "progress", "rank": 0, "epoch": 0, "epochs": 1, "step": 1, "total": 4}
        monitor.handle(frame)  # the bar is live from here on
        monitor.handle({"t": "log", "rank": 1, "level": 30, "msg": "only once", "time": 1.0})
        monitor.close()
    finally:
        root.handlers, root.level = saved_handlers, saved_level
    err = capsys.readouterr().err
    assert err.count("[rank 1] only once") == 1, err


class _Tracker:
    """A SparkContext status tracker with one job of two stages, advancing on every call."""

    def __init__(self) -> None:
        self.calls = 0

    def getJobIdsForGroup(self, group):
        self.calls += 1
        return [7] if group == "g" else []

    def getJobInfo(self, job_id):
        return type("Job", (), {"stageIds": [1, 2]})()

    def getStageInfo(self, stage_id):
        done = min(self.calls, 4) if stage_id == 1 else 0
        return SimpleNamespace(
            numCompletedTasks=done, numActiveTasks=0, numFailedTasks=0, numTasks=4
        )


def test_spark_phase_progress_shows_tasks_done(caplog):
    from sparkdl.launch.progress import SparkPhaseProgress

    caplog.set_level(logging.INFO, logger="sparkdl.progress")
    tracker = _Tracker()
    from sparkdl.session import ClassicSide

    sc = SimpleNamespace(statusTracker=lambda: tracker)
    sc = ClassicSide(SimpleNamespace(sparkContext=sc))
    with SparkPhaseProgress(sc, "g", "demo: materialize", interactive=False, poll_s=0.01) as p:
        assert _wait_for(lambda: tracker.calls >= 3)
        assert p.tasks()[1] == 8
    lines = [r.getMessage() for r in caplog.records if r.name == "sparkdl.progress"]
    assert lines[0].startswith("demo: materialize: ") and lines[-1].endswith("/8 Spark tasks done")
    with SparkPhaseProgress(sc, "g", "off", enabled=False):
        pass  # disabled: no thread, no line
    assert not [r for r in caplog.records if r.getMessage().startswith("off")]
