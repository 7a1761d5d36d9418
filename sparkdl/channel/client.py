"""[worker] The workers' end of the channel: log forwarding, progress frames, gather.

:func:`forward_logs` opens a :class:`ChannelClient` for a run and routes this process's log
records through it; :func:`report_progress` sends progress frames on the same client;
:func:`gather` exchanges one message per rank through the driver. A worker whose channel fails
writes its log lines to its own stderr instead, and training goes on. Pure standard library
(no pyspark, no torch).
"""

from __future__ import annotations

import collections
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sparkdl.channel.wire import (
    GATHER_WAIT_S,
    MAX_FRAME_BYTES,
    PROTOCOL,
    TO_DRIVER,
    TO_WORKER,
    decode_frame,
    encode_frame,
    split_addr,
)

__all__ = [
    "CONNECT_TIMEOUT_S",
    "ChannelClient",
    "ChannelLogHandler",
    "FrameRoute",
    "SEND_TIMEOUT_S",
    "forward_logs",
    "gather",
    "report_progress",
]

log = logging.getLogger("sparkdl")

CONNECT_TIMEOUT_S = 3.0
"""A worker's bound on connecting to the driver and reading its greeting."""
SEND_TIMEOUT_S = 2.0
"""A worker's bound on one blocking send; a driver that stops reading fails the channel."""
_MAX_MSG_CHARS = 8_000  # ≤ 4 bytes each in UTF-8: a log frame stays under MAX_FRAME_BYTES


def _connect(addr: str, timeout_s: float) -> tuple[socket.socket, bytes]:
    """Connect to the driver's channel and read its greeting; (socket, nonce)."""
    host, port = split_addr(addr)
    sock = socket.create_connection((host, port), timeout=timeout_s)
    try:
        greeting = b""
        while not greeting.endswith(b"\n") and len(greeting) < 256:
            chunk = sock.recv(256 - len(greeting))
            if not chunk:
                break
            greeting += chunk
        proto, _, nonce_hex = greeting.strip().partition(b" ")
        if proto != PROTOCOL:
            raise OSError(f"unexpected channel greeting {greeting[:40]!r}")
        return sock, bytes.fromhex(nonce_hex.decode())
    except (OSError, ValueError):
        sock.close()
        raise


def gather(
    addr: str,
    token: str,
    *,
    key: str,
    rank: int,
    world: int,
    message: Any,
    timeout_s: float = GATHER_WAIT_S + 10.0,
) -> list[Any] | None:
    """(all ranks) Every rank's ``message`` in rank order, exchanged through the driver.

    None when the driver answers ``fallback`` or cannot be reached: the caller then uses another
    way to meet (the driver answers fallback to every rank of the key alike).
    """
    try:
        sock, nonce = _connect(addr, CONNECT_TIMEOUT_S)
    except (OSError, ValueError) as exc:
        log.debug("channel gather: cannot reach the driver at %s: %s", addr, exc)
        return None
    try:
        frame = {"t": "gather", "key": key, "rank": rank, "world": world, "msg": message}
        sock.settimeout(timeout_s)
        sock.sendall(encode_frame(token, TO_DRIVER, nonce, frame))
        line = sock.makefile("rb").readline(MAX_FRAME_BYTES * 4)
        reply = decode_frame(token, TO_WORKER, nonce, line)
    except (OSError, ValueError) as exc:
        log.debug("channel gather failed: %s", exc)
        return None
    finally:
        sock.close()
    if reply is None or reply.get("t") != "gathered" or len(reply.get("msgs", ())) != world:
        return None
    return list(reply["msgs"])


class ChannelClient:
    """(worker) Sends frames to the driver from a background thread.

    ``send`` never blocks on the network and never raises: it queues the frame (dropping the
    oldest when ``queue_size`` are pending) and returns False once the channel has failed, so
    the caller can fall back. The connection is opened lazily, on the first frame.
    ``on_fail(frames)`` receives the frames still queued when the channel fails.
    """

    def __init__(
        self,
        addr: str,
        token: str,
        *,
        queue_size: int = 1000,
        on_fail: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.addr, self.token = addr, token
        self.dropped = 0
        self.failure: str | None = None
        self.on_fail = on_fail
        self._queue: collections.deque[dict[str, Any]] = collections.deque(maxlen=queue_size)
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def healthy(self) -> bool:
        return self.failure is None

    def send(self, frame: dict[str, Any]) -> bool:
        """Queue ``frame`` for the driver; False when the channel has failed or is closed."""
        with self._cond:
            if self.failure is not None or self._closing:
                return False
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(frame)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="sparkdl-channel-client", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return True

    def _run(self) -> None:
        try:
            sock, nonce = _connect(self.addr, CONNECT_TIMEOUT_S)
            sock.settimeout(SEND_TIMEOUT_S)
            self._sock = sock
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        self._cond.wait()
                    if not self._queue:
                        return
                    frames = list(self._queue)
                    self._queue.clear()
                data = b"".join(encode_frame(self.token, TO_DRIVER, nonce, f) for f in frames)
                try:
                    sock.sendall(data)
                except OSError:
                    with self._cond:
                        self._queue.extendleft(reversed(frames))
                    raise
        except (OSError, ValueError) as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            if self._sock is not None:
                self._sock.close()

    def _fail(self, reason: str) -> None:
        with self._cond:
            self.failure = reason
            pending = list(self._queue)
            self._queue.clear()
        if self.on_fail is not None:
            try:
                self.on_fail(pending)
            except Exception:
                pass

    def close(self, timeout_s: float = 2.0) -> None:
        """Send what is queued (waiting at most ``timeout_s``), then close the connection."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=timeout_s)
            if thread.is_alive() and self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)  # unblocks a stuck send
                except OSError:
                    pass


class FrameRoute:
    """(worker) Where one rank's frames go: the driver channel while it works, then the
    run-directory feed (:mod:`sparkdl.channel.feed`) when there is one, else nowhere (False).

    The switch to the feed happens once, when the channel fails (or there is none), and is
    logged once; frames the channel had queued when it failed go to the feed too.
    """

    def __init__(self, client: ChannelClient | None, feed: Any = None) -> None:
        self.client, self.feed = client, feed
        self.on_switch: Callable[[], None] | None = None
        self._switched = False

    @property
    def healthy(self) -> bool:
        """Whether frames still go through the driver channel."""
        return self.client is not None and self.client.healthy

    @property
    def failure(self) -> str | None:
        if self.client is None:
            return "no driver channel"
        return self.client.failure

    def send(self, frame: dict[str, Any]) -> bool:
        if self.client is not None and self.client.send(frame):
            return True
        return self._to_feed(frame)

    def _to_feed(self, frame: dict[str, Any]) -> bool:
        if self.feed is None:
            return False
        if not self._switched:
            self._switched = True
            if self.client is not None and self.on_switch is not None:
                self.on_switch()
        return bool(self.feed.send(frame))

    def replay(self, frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Hand frames the channel could not deliver to the feed; those it could not take."""
        return [f for f in frames if not self._to_feed(f)]


class ChannelLogHandler(logging.Handler):
    """(worker) Forwards log records to the driver (through a :class:`FrameRoute`); writes them
    to stderr when no route takes them."""

    def __init__(self, client: ChannelClient | FrameRoute, rank: int) -> None:
        super().__init__(logging.INFO)
        self.client = client if isinstance(client, FrameRoute) else FrameRoute(client)
        self.rank = rank
        self.fallback = logging.StreamHandler(sys.stderr)
        self.fallback.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s [rank {rank}] %(message)s")
        )
        self._warned = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            frame = {
                "t": "log",
                "rank": self.rank,
                "level": record.levelno,
                "msg": msg[:_MAX_MSG_CHARS],
                "time": record.created,
            }
            if not self.client.send(frame):
                self._plain(record)
        except Exception:  # logging must never fail training
            pass

    def _plain(self, record: logging.LogRecord) -> None:
        if not self._warned:
            self._warned = True
            self.fallback.emit(
                logging.makeLogRecord(
                    {
                        "levelno": logging.WARNING,
                        "levelname": "WARNING",
                        "msg": f"the driver channel failed ({self.client.failure}); "
                        "log lines go to this process's stderr",
                    }
                )
            )
        self.fallback.emit(record)

    def replay(self, frames: list[dict[str, Any]]) -> None:
        """Frames the channel could not deliver (the client's ``on_fail``): to the feed when
        there is one, else their log lines to stderr."""
        for frame in self.client.replay(frames):
            if frame.get("t") == "log":
                record = logging.makeLogRecord(
                    {
                        "levelno": frame.get("level", logging.INFO),
                        "levelname": logging.getLevelName(frame.get("level", logging.INFO)),
                        "msg": frame.get("msg", ""),
                        "created": frame.get("time", time.time()),
                    }
                )
                self._plain(record)


_active: tuple[FrameRoute, int] | None = None


@contextmanager
def forward_logs(addr: str, token: str, rank: int, feed_dir: str = "") -> Iterator[Any]:
    """(worker) For the duration of a run: this process's log records (the ``sparkdl`` logger
    at INFO and above, other loggers at their levels) and :func:`report_progress` go to the
    driver, through its channel at ``addr`` or, when the channel cannot be reached (or there is
    none), through the run-directory feed ``feed_dir`` (see :mod:`sparkdl.channel.feed`).
    Without either it does nothing. A ``started`` frame goes first (the driver's start watch
    counts them); everything is flushed and closed on exit."""
    global _active
    if not (addr and token) and not feed_dir:
        yield None
        return
    from sparkdl.channel.feed import FeedWriter

    client = ChannelClient(addr, token) if addr and token else None
    feed = FeedWriter(feed_dir, rank) if feed_dir else None
    route = FrameRoute(client, feed)
    handler = ChannelLogHandler(route, rank)
    route.on_switch = lambda: log.warning(
        "the driver channel at %s cannot be reached (%s); progress and log lines go through "
        "the run directory (%s)",
        addr,
        route.failure,
        feed_dir,
    )
    if client is not None:
        client.on_fail = handler.replay
    root, ours = logging.getLogger(), logging.getLogger("sparkdl")
    saved_level = ours.level
    if ours.getEffectiveLevel() > logging.INFO:
        ours.setLevel(logging.INFO)
    root.addHandler(handler)
    previous, _active = _active, (route, rank)
    route.send({"t": "started", "rank": rank, "time": time.time()})
    try:
        yield route
    except BaseException as exc:
        # Spark reports only the first failed task of a barrier stage: every failing rank also
        # tells the driver itself, so the group's error lists them all.
        route.send({"t": "failure", "rank": rank, "failure": _encoded(rank, exc)})
        raise
    finally:
        _active = previous
        root.removeHandler(handler)
        ours.setLevel(saved_level)
        if client is not None:
            client.close()
        if feed is not None:
            feed.close()


def _encoded(rank: int, exc: BaseException) -> str:
    from sparkdl.errors import RankFailure

    return RankFailure.from_exception(rank, exc).encode()


def report_progress(**fields: Any) -> None:
    """(chief only, by convention) Send a progress frame to the driver, if a channel is open.

    Fields the driver shows: ``epoch`` (0-based), ``epochs``, ``step`` and ``total`` (global
    steps done / planned), ``samples`` and ``seconds`` (this epoch so far, all ranks), ``loss``.
    """
    active = _active
    if active is not None:
        route, rank = active
        route.send({"t": "progress", "rank": rank, **fields})
