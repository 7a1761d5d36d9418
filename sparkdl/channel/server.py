"""[driver] The driver's end of the channel: one :class:`ChannelServer` per launch.

It accepts worker connections, checks every frame's MAC (:mod:`sparkdl.channel.wire`), hands
``log`` and ``progress`` frames to a sink on one consumer thread, and answers ``gather`` frames
once every rank of the key has arrived (or with ``fallback`` when time runs out). Pure standard
library; nothing here raises into training.
"""

from __future__ import annotations

import collections
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from sparkdl.channel.wire import (
    GATHER_WAIT_S,
    MAX_FRAME_BYTES,
    PROTOCOL,
    TO_DRIVER,
    TO_WORKER,
    decode_frame,
    encode_frame,
)

__all__ = ["ChannelServer", "MAX_CONNECTIONS"]

log = logging.getLogger("sparkdl")

MAX_CONNECTIONS = 512
"""Connections the driver holds at once; more are closed on accept."""


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
                frame = decode_frame(self.token, TO_DRIVER, nonce, line)
                if frame is None:
                    with self._cond:
                        self.rejected += 1
                    log.debug("channel: refused a frame with a wrong token or shape")
                    return
                if frame["t"] == "gather":
                    reply = self._gather(frame)
                    conn.sendall(encode_frame(self.token, TO_WORKER, nonce, reply))
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
