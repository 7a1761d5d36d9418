"""[worker] Compatibility re-exports: the channel now lives in :mod:`sparkdl.channel`.

``wire`` (frame format), ``server`` (driver) and ``client`` (worker) are split by zone; import
from them. ``ChannelServer`` is resolved on first use, so importing this module (as worker code
does) never loads the driver's server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sparkdl.channel.client import (
    ChannelClient,
    ChannelLogHandler,
    forward_logs,
    gather,
    report_progress,
)
from sparkdl.channel.wire import GATHER_WAIT_S, MAX_FRAME_BYTES, decode_frame, encode_frame

__all__ = [
    "ChannelClient",
    "ChannelLogHandler",
    "ChannelServer",
    "GATHER_WAIT_S",
    "MAX_FRAME_BYTES",
    "decode_frame",
    "encode_frame",
    "forward_logs",
    "gather",
    "report_progress",
]


def __getattr__(name: str) -> Any:
    if name == "ChannelServer":
        return importlib.import_module("sparkdl.channel.server").ChannelServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from sparkdl.channel.server import ChannelServer
