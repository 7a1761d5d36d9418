"""What a worker group listens on: the chief's store on the chief's address only, never on every
interface (torch's TCPStore alone would bind 0.0.0.0)."""

from __future__ import annotations

import os
import sys

import pytest

import sparkdl
from sparkdl.context import get_context

pytestmark = pytest.mark.timeout(180)


def _hex_to_ip(hex_addr: str) -> str:
    if len(hex_addr) == 8:  # IPv4, little-endian
        return ".".join(str(int(hex_addr[i : i + 2], 16)) for i in (6, 4, 2, 0))
    return "::" if set(hex_addr) == {"0"} else f"ipv6:{hex_addr}"


def listening_sockets():
    """(address, port) of every TCP socket this process listens on, from /proc."""
    import torch
    import torch.distributed as dist

    dist.all_reduce(torch.zeros(1))  # the group is fully formed
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            inodes.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                parts = line.split()
                local, state, inode = parts[1], parts[3], parts[9]
                if state == "0A" and f"socket:[{inode}]" in inodes:
                    address, port = local.rsplit(":", 1)
                    found.append((_hex_to_ip(address), int(port, 16)))
    dist.barrier()
    return get_context().rank, found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_nothing_listens_on_every_interface():
    results = sparkdl.Distributor(2, local_mode=True, timeout_s=120).run(listening_sockets)
    chief = dict(results)[0]
    assert chief, "the chief must host the store"
    for _rank, sockets in results:
        for address, _port in sockets:
            assert address not in ("0.0.0.0", "::"), sockets
