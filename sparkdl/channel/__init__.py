"""[any] The driver channel: an authenticated, best-effort line from the workers to the driver.

Split by zone, so a worker never loads the driver's server and the driver never loads a worker:

- :mod:`sparkdl.channel.wire` [any]: the frame format, its HMAC, the protocol's constants;
- :mod:`sparkdl.channel.server` [driver]: :class:`ChannelServer`, one per launch;
- :mod:`sparkdl.channel.client` [worker]: ``forward_logs``, ``report_progress``, ``gather``.

Import the module you need; this package imports none of them.
"""

from __future__ import annotations

__all__: list[str] = []
