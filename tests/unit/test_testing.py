"""sparkdl.testing without Spark: free loopback ports, waiting for a server, the synthetic frame."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest

from sparkdl.errors import ConfigError
from sparkdl.testing import LOOPBACK, classification_frame, free_port, wait_for_port

pytestmark = pytest.mark.timeout(60)


class _Rows:
    """Stands in for a SparkSession: createDataFrame hands back what it was given."""

    def createDataFrame(self, data, schema):  # noqa: N802 - Spark's name
        return data, schema


def test_free_port_refuses_connections_and_can_be_bound():
    port = free_port()
    with pytest.raises(OSError), socket.create_connection((LOOPBACK, port), timeout=1):
        pass
    with socket.socket() as server:
        server.bind((LOOPBACK, port))


def test_wait_for_port_returns_once_something_listens():
    with socket.socket() as server:
        server.bind((LOOPBACK, 0))
        server.listen()
        wait_for_port(server.getsockname()[1], timeout_s=5)


def test_wait_for_port_gives_up_on_an_exited_process_or_after_the_timeout(tmp_path):
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    with pytest.raises(RuntimeError, match=f"process {done.pid} exited with 0.*see server.log"):
        wait_for_port(free_port(), timeout_s=30, process=done, log="server.log")
    with pytest.raises(RuntimeError, match="nothing listened on 127.0.0.1:.* within 0.5 s"):
        wait_for_port(free_port(), timeout_s=0.5)


def test_classification_frame_labels_count_the_thresholds_crossed():
    rows, schema = classification_frame(_Rows(), rows=50, features=4, classes=3, seed=11)
    assert schema == "features array<float>, label int"
    x = np.array([r[0] for r in rows], dtype=np.float32)
    assert x.shape == (50, 4)
    expected = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    assert [r[1] for r in rows] == expected.tolist()
    assert {r[1] for r in rows} == {0, 1, 2}
    again, _ = classification_frame(_Rows(), rows=50, features=4, classes=3, seed=11)
    assert again == rows  # same arguments, same rows
    two, _ = classification_frame(_Rows(), rows=50, features=4, seed=11)
    assert [r[1] for r in two] == (x[:, 0] > 0).astype(int).tolist()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rows": 8, "features": 2, "classes": 1}, "classes must be an integer ≥ 2"),
        ({"rows": 8, "features": 1, "classes": 3}, "features must be an integer ≥ 2"),
        ({"rows": -1, "features": 2}, "rows must be an integer ≥ 0"),
    ],
)
def test_classification_frame_refuses_bad_sizes(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        classification_frame(_Rows(), **kwargs)
