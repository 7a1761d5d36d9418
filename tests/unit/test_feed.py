"""The run-directory feed: workers that cannot reach the driver channel report through storage."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from sparkdl import storage
from sparkdl.channel import feed as feed_module
from sparkdl.channel.client import forward_logs, report_progress
from sparkdl.channel.feed import MAX_FRAMES, FeedPoller, FeedWriter
from sparkdl.launch.progress import RunMonitor
from sparkdl.testing import free_port

pytestmark = pytest.mark.timeout(60)


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_unreachable_channel_falls_back_to_the_feed_and_the_driver_shows_it(tmp_path, caplog):
    """The worker logs once that it switched; the driver's monitor gets the same frames."""
    caplog.set_level(logging.DEBUG, logger="sparkdl")
    feed_dir = str(tmp_path / "logs" / "feed" / "attempt-0")
    unreachable = f"127.0.0.1:{free_port()}"  # nobody listens there
    monitor = RunMonitor(log_dir=str(tmp_path / "logs"), interactive=False, log_interval_s=0)
    monitor.start()
    poller = FeedPoller(feed_dir, monitor.handle, poll_s=0.05).start()
    try:
        with forward_logs(unreachable, "t" * 32, rank=1, feed_dir=feed_dir) as route:
            logging.getLogger("sparkdl").info("epoch 1 done")
            report_progress(epoch=0, epochs=2, step=3, total=6, loss=0.5)
            assert _wait_for(lambda: route.failure is not None)
        assert _wait_for(lambda: 1 in monitor.started)
    finally:
        poller.close()
        monitor.close()
    lines = (tmp_path / "logs" / "rank-1.log").read_text()
    assert "epoch 1 done" in lines
    assert "cannot be reached" in lines and feed_dir in lines  # the switch, said once
    assert lines.count("cannot be reached") == 1
    progress = [r.getMessage() for r in caplog.records if r.name == "sparkdl.progress"]
    assert any("step 3/6" in line for line in progress), progress


def test_the_feed_is_bounded_and_says_what_it_dropped(tmp_path):
    feed_dir = str(tmp_path / "feed")
    writer = FeedWriter(feed_dir, rank=0, interval_s=60)  # one write now, the rest at close
    writer.send({"t": "log", "rank": 0, "msg": "first"})
    assert _wait_for(lambda: (tmp_path / "feed" / "rank-0.json").exists())
    seen = []
    poller = FeedPoller(feed_dir, seen.append, poll_s=60)
    poller.poll()
    for i in range(MAX_FRAMES + 50):
        writer.send({"t": "log", "rank": 0, "msg": f"line {i}"})
    for step in range(5):
        writer.send({"t": "progress", "rank": 0, "step": step})
    writer.close()
    saved = json.loads((tmp_path / "feed" / "rank-0.json").read_text())
    assert len(saved["frames"]) == MAX_FRAMES + 1  # the window and the latest progress
    poller.poll()
    messages = [f["msg"] for f in seen if f["t"] == "log"]
    assert messages[0] == "first"
    assert "50 earlier line(s) not shown" in messages[1]
    assert messages[2] == "line 50" and messages[-1] == f"line {MAX_FRAMES + 49}"
    assert [f["step"] for f in seen if f["t"] == "progress"] == [4]  # the latest only
    poller.poll()  # nothing new: nothing handed on twice
    assert len([f for f in seen if f["t"] == "log"]) == len(messages)


def test_the_feed_writer_is_rate_limited_and_its_files_always_parse(tmp_path, monkeypatch):
    writes = []
    real_write = storage.write_file

    def counting_write(uri, data):
        writes.append(time.monotonic())
        real_write(uri, data)

    monkeypatch.setattr(feed_module.storage, "write_file", counting_write)
    feed_dir = str(tmp_path / "feed")
    writer = FeedWriter(feed_dir, rank=2, interval_s=0.2)
    stop = threading.Event()
    bad = []

    def read_all_the_time():
        path = tmp_path / "feed" / "rank-2.json"
        while not stop.is_set():
            if path.exists():
                try:
                    json.loads(path.read_text())
                except ValueError as exc:  # a torn file would show here
                    bad.append(exc)

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    start = time.monotonic()
    while time.monotonic() - start < 1.0:
        writer.send({"t": "log", "rank": 2, "msg": "x" * 200})
        time.sleep(0.001)
    writer.close()
    stop.set()
    reader.join()
    elapsed = time.monotonic() - start
    assert not bad
    assert 2 <= len(writes) <= elapsed / 0.2 + 2, writes  # hundreds of frames, a few writes


def test_a_feed_that_cannot_be_written_never_fails_the_worker(tmp_path, capfd):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the feed directory should be")
    writer = FeedWriter(str(blocker / "feed"), rank=0, interval_s=0.01)
    assert writer.send({"t": "log", "rank": 0, "msg": "hello"})
    assert _wait_for(lambda: writer.failure is not None)
    assert not writer.send({"t": "log", "rank": 0, "msg": "later"})
    writer.close()
    assert "cannot write the progress feed" in capfd.readouterr().err
