"""[any] The driver channel's wire format: signed JSON lines, and the protocol's constants.

The driver runs one server per launch (:mod:`sparkdl.channel.server`): a small TCP server bound
to the driver's Spark host address, with a per-run random token. On accept it sends a greeting
with a fresh nonce; every frame after that is one line ``<mac> <json>``, where ``mac`` is the
HMAC-SHA256, keyed by the token, of a direction byte, the nonce and the JSON text. A frame with a
wrong MAC closes the connection and is counted in ``rejected``; the driver signs its replies the
same way, so a worker also knows it talks to its own driver. The token never crosses the wire.

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
holds at most ``server.MAX_CONNECTIONS`` connections. Best effort: nothing here raises into
training. A worker whose channel fails writes its log lines to its own stderr instead (plain
logging), and the driver goes on without the frames.

Pure standard library (no pyspark, no torch), like the server and the client.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

__all__ = [
    "GATHER_WAIT_S",
    "MAX_FRAME_BYTES",
    "PROTOCOL",
    "TO_DRIVER",
    "TO_WORKER",
    "decode_frame",
    "encode_frame",
    "split_addr",
]

PROTOCOL = b"SPARKDL-CHANNEL-1"
MAX_FRAME_BYTES = 64 * 1024
"""Longest frame line accepted; a longer one closes the connection. Log text is cut to fit."""
GATHER_WAIT_S = 20.0
"""How long the driver waits, from the first rank's arrival, for every rank of a gather."""
TO_DRIVER, TO_WORKER = b"w", b"d"
"""Direction bytes signed into every frame: a frame cannot be replayed the other way."""


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
