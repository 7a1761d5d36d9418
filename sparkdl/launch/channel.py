"""[driver+worker] Authenticated, best-effort channel from the workers to the driver.

The driver runs one :class:`ChannelServer` per launch: a small TCP server bound to the driver's
Spark host address, with a per-run random token. On accept it sends a greeting with a fresh
nonce; every frame after that is one line ``<mac> <json>``, where ``mac`` is the HMAC-SHA256,
keyed by the token, of a direction byte, the nonce and the JSON text. A frame with a wrong MAC
closes the connection and is counted in ``rejected``; the driver signs its replies the same way,
so a worker also knows it talks to its own driver. The token never crosses the wire.

Frames (JSON objects, ``"t"`` names the kind):

- ``log`` ``{rank, level, msg, time}`` and ``progress`` ``{rank, epoch, epochs, step, total,
  ...}``: handed, in arrival order, to the driver's ``sink`` on one consumer thread.
- ``gather`` ``{key, rank, world, msg}``: the driver holds each rank's reply until every rank of
  ``key`` has sent its message, then answers all of them with the messages in rank order (an
  allGather through the driver, without Spark's barrier polling). If they do not all arrive
  within ``GATHER_WAIT_S`` it answers ``fallback`` to every rank, early or late, so all ranks
  take the same other path.

Bounded memory on both sides: the driver's queue and each worker's send queue drop the oldest
frame when full (``dropped`` counts them), frames are at most ``MAX_FRAME_BYTES``, the server
holds at most ``MAX_CONNECTIONS`` connections. Best effort: nothing here raises into training.
A worker whose channel fails writes its log lines to its own stderr instead (plain logging),
and the driver goes on without the frames.

Pure standard library (no pyspark, no torch): worker code imports it.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "ChannelClient",
    "ChannelLogHandler",
    "ChannelServer",
    "GATHER_WAIT_S",
    "MAX_FRAME_BYTES",
    "forward_logs",
    "gather",
    "report_progress",
]

log = logging.getLogger("sparkdl")

PROTOCOL = b"SPARKDL-CHANNEL-1"
MAX_FRAME_BYTES = 64 * 1024
"""Longest frame line accepted; a longer one closes the connection. Log text is cut to fit."""
MAX_CONNECTIONS = 512
"""Connections the driver holds at once; more are closed on accept."""
GATHER_WAIT_S = 20.0
"""How long the driver waits, from the first rank's arrival, for every rank of a gather."""
CONNECT_TIMEOUT_S = 3.0
"""A worker's bound on connecting to the driver and reading its greeting."""
SEND_TIMEOUT_S = 2.0
"""A worker's bound on one blocking send; a driver that stops reading fails the channel."""
_TO_DRIVER, _TO_WORKER = b"w", b"d"
_MAX_MSG_CHARS = 8_000  # ≤ 4 bytes each in UTF-8: a log frame stays under MAX_FRAME_BYTES


def _mac(token: str, direction: bytes, nonce: bytes, payload: bytes) -> str:
    return hmac.new(token.encode(), direction + nonce + payload, hashlib.sha256).hexdigest()


def encode_frame(token: str, direction: bytes, nonce: bytes, frame: dict[str, Any]) -> bytes:
    """One signed line: ``<mac> <json>\\n``."""
    payload = json.dumps(frame, separators=(",", ":"), ensure_ascii=False, default=str).encode()
    return _mac(token, direction, nonce, payload).encode() + b" " + payload + b"\n"


def decode_frame(token: str, direction: bytes, nonce: bytes, line: bytes) -> dict[str, Any] | None:
    """The frame of a signed line, or None when its MAC or shape is wrong."""
    mac, _, payload = line.rstrip(b"\n").partition(b" ")
    expected = _mac(token, direction, nonce, payload).encode()
    if not hmac.compare_digest(mac, expected):
        return None
    try:
        frame = json.loads(payload)
    except ValueError:
        return None
    return frame if isinstance(frame, dict) and isinstance(frame.get("t"), str) else None


def split_addr(addr: str) -> tuple[str, int]:
    """``host:port`` (IPv6 ``[::1]:port`` too) → (host, port)."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------- driver side


class _Gather:
    """One gather's state on the driver: each rank's message until all arrive or time runs out."""

    def __init__(self, world: int, deadline: float) -> None:
        self.world, self.deadline = world, deadline
        self.messages: dict[int, Any] = {}
        self.verdict: str | None = None  # "ok" | "fallback"
        self.answered = 0


class ChannelServer:
    """(driver) Accepts worker connections for one launch and hands verified frames to ``sink``.

    ``sink(frame)`` runs on one consumer thread, in arrival order; its exceptions are logged and
    swallowed. Use as a context manager, or call :meth:`close`; ``address`` and ``token`` go to
    the workers (WorkerEnv.channel_addr / run_token).
    """

    def __init__(
        self,
        host: str,
        sink: Callable[[dict[str, Any]], None],
        *,
        queue_size: int = 10_000,
        gather_wait_s: float = GATHER_WAIT_S,
    ) -> None:
        self.token = secrets.token_hex(16)
        self.sink = sink
        self.gather_wait_s = gather_wait_s
        self.dropped = 0
        self.rejected = 0
        self.received = 0
        self._queue: collections.deque[dict[str, Any]] = collections.deque(maxlen=queue_size)
        self._cond = threading.Condition()
        self._gathers: dict[str, _Gather] = {}
        self._conns: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()
        self._closing = False
        self._closed = False
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.bind((host, 0))
            self._listener.listen(64)
        except OSError:
            self._listener.close()
            raise
        bound = self._listener.getsockname()
        self.address = (
            f"[{bound[0]}]:{bound[1]}" if family == socket.AF_INET6 else f"{bound[0]}:{bound[1]}"
        )
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="sparkdl-channel", daemon=True
        )
        self._consumer = threading.Thread(
            target=self._consume, name="sparkdl-channel-sink", daemon=True
        )
        self._acceptor.start()
        self._consumer.start()

    def __enter__(self) -> ChannelServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- accepting and reading

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._cond:
                if self._closed or len(self._conns) >= MAX_CONNECTIONS:
                    conn.close()
                    continue
                self._conns.add(conn)
                handler = threading.Thread(
                    target=self._serve, args=(conn,), name="sparkdl-channel-conn", daemon=True
                )
                self._handlers.add(handler)
            handler.start()

    def _serve(self, conn: socket.socket) -> None:
        nonce = secrets.token_bytes(16)
        try:
            conn.settimeout(None)
            conn.sendall(PROTOCOL + b" " + nonce.hex().encode() + b"\n")
            reader = conn.makefile("rb")
            while not self._closed:
                line = reader.readline(MAX_FRAME_BYTES + 1)
                if not line.endswith(b"\n") and len(line) <= MAX_FRAME_BYTES:
                    return  # the worker closed its end (mid-frame if it died writing)
                frame = decode_frame(self.token, _TO_DRIVER, nonce, line)
                if frame is None:
                    with self._cond:
                        self.rejected += 1
                    log.debug("channel: refused a frame with a wrong token or shape")
                    return
                if frame["t"] == "gather":
                    reply = self._gather(frame)
                    conn.sendall(encode_frame(self.token, _TO_WORKER, nonce, reply))
                else:
                    self._enqueue(frame)
        except OSError:
            return
        finally:
            with self._cond:
                self._conns.discard(conn)
                self._handlers.discard(threading.current_thread())
                self._cond.notify_all()
            conn.close()

    def _enqueue(self, frame: dict[str, Any]) -> None:
        with self._cond:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1  # the deque drops the oldest frame
            self._queue.append(frame)
            self.received += 1
            self._cond.notify_all()

    def _consume(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                frame = self._queue.popleft()
            try:
                self.sink(frame)
            except Exception as exc:  # a display or file problem never reaches training
                log.debug("channel sink failed on a %s frame: %s", frame.get("t"), exc)

    # ---- gather

    def _gather(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Hold this rank until every rank of the gather's key arrived (or time ran out)."""
        try:
            key, rank, world = str(frame["key"]), int(frame["rank"]), int(frame["world"])
        except (KeyError, TypeError, ValueError):
            return {"t": "fallback"}
        with self._cond:
            state = self._gathers.get(key)
            if state is None:
                state = self._gathers[key] = _Gather(world, time.monotonic() + self.gather_wait_s)
            if state.verdict is None and (world != state.world or not 0 <= rank < world):
                state.verdict = "fallback"
            if state.verdict is None:
                state.messages[rank] = frame.get("msg")
                if len(state.messages) == state.world:
                    state.verdict = "ok"
                self._cond.notify_all()
            while state.verdict is None:
                remaining = state.deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    state.verdict = "fallback"
                    missing = sorted(set(range(state.world)) - set(state.messages))
                    log.warning(
                        "ranks %s did not reach the driver channel within %.0f s; the workers "
                        "meet through Spark's allGather instead",
                        missing,
                        self.gather_wait_s,
                    )
                    self._cond.notify_all()
                    break
                self._cond.wait(remaining)
            if state.verdict != "ok":
                return {"t": "fallback"}  # kept: every later rank of this key falls back too
            state.answered += 1
            if state.answered == state.world:
                # Done: a retried stage attempt (same key) must meet afresh, not reuse old ports.
                del self._gathers[key]
            return {"t": "gathered", "msgs": [state.messages[r] for r in range(state.world)]}

    # ---- closing

    def close(self, grace_s: float = 1.0) -> None:
        """Stop accepting, let connected workers finish sending (≤ ``grace_s``), drain the queue
        into the sink, and stop. Idempotent; never raises."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        except OSError:
            pass
        self._listener.close()
        deadline = time.monotonic() + grace_s
        with self._cond:
            while self._handlers and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            self._closed = True
            conns = list(self._conns)
            self._cond.notify_all()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._consumer.join(timeout=max(1.0, grace_s))
        if self.dropped or self.rejected:
            log.info(
                "channel closed: %d frames received, %d dropped (queue full), %d refused",
                self.received,
                self.dropped,
                self.rejected,
            )


# ---------------------------------------------------------------- worker side


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
        sock.sendall(encode_frame(token, _TO_DRIVER, nonce, frame))
        line = sock.makefile("rb").readline(MAX_FRAME_BYTES * 4)
        reply = decode_frame(token, _TO_WORKER, nonce, line)
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
                data = b"".join(encode_frame(self.token, _TO_DRIVER, nonce, f) for f in frames)
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


class ChannelLogHandler(logging.Handler):
    """(worker) Forwards log records to the driver; writes them to stderr once the channel fails."""

    def __init__(self, client: ChannelClient, rank: int) -> None:
        super().__init__(logging.INFO)
        self.client, self.rank = client, rank
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
        """Write frames the channel could not deliver to stderr (the client's ``on_fail``)."""
        for frame in frames:
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


_active: tuple[ChannelClient, int] | None = None


@contextmanager
def forward_logs(addr: str, token: str, rank: int) -> Iterator[ChannelClient | None]:
    """(worker) For the duration of a run: this process's log records (the ``sparkdl`` logger
    at INFO and above, other loggers at their levels) and :func:`report_progress` go to the
    driver. Without an address it does nothing. The channel is flushed and closed on exit."""
    global _active
    if not addr or not token:
        yield None
        return
    client = ChannelClient(addr, token)
    handler = ChannelLogHandler(client, rank)
    client.on_fail = handler.replay
    root, ours = logging.getLogger(), logging.getLogger("sparkdl")
    saved_level = ours.level
    if ours.getEffectiveLevel() > logging.INFO:
        ours.setLevel(logging.INFO)
    root.addHandler(handler)
    previous, _active = _active, (client, rank)
    try:
        yield client
    finally:
        _active = previous
        root.removeHandler(handler)
        ours.setLevel(saved_level)
        client.close()


def report_progress(**fields: Any) -> None:
    """(chief only, by convention) Send a progress frame to the driver, if a channel is open.

    Fields the driver shows: ``epoch`` (0-based), ``epochs``, ``step`` and ``total`` (global
    steps done / planned), ``samples`` and ``seconds`` (this epoch so far, all ranks), ``loss``.
    """
    active = _active
    if active is not None:
        client, rank = active
        client.send({"t": "progress", "rank": rank, **fields})
