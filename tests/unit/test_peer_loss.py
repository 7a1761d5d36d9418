"""is_peer_loss: the one "a peer died" classifier, for every type and message it recognises."""

from __future__ import annotations

import pickle

import pytest
import torch.distributed as dist

from sparkdl.errors import ConfigError, PeerLostError, is_peer_loss

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    "exc",
    [
        PeerLostError("rank 1 of 2 lost its group at epoch 0, step 3"),
        dist.DistError("store client failed"),
        dist.DistBackendError("[../third_party/gloo/...] Connection closed by peer"),
        dist.DistNetworkError("failed to recv, got 0 bytes"),
        dist.DistStoreError("Socket Timeout"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_peer_loss_types(exc):
    assert is_peer_loss(exc)


def test_types_match_by_name_without_torch():
    """errors.py never imports torch: torch's classes are recognised by their names."""
    for name in ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError"):
        assert is_peer_loss(type(name, (Exception,), {})("no peer text here"))


def test_subclass_of_peer_lost_error():
    class Late(PeerLostError):
        pass

    assert is_peer_loss(Late("x"))
    assert is_peer_loss(pickle.loads(pickle.dumps(PeerLostError("x"))))


@pytest.mark.parametrize(
    "message",
    [
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer",
        "[gloo/transport/tcp/unbound_buffer.cc:81] Connection reset by peer",
        "Broken pipe",
        "NCCL error: remote process exited or there was a network error",
        "Timed out waiting 10000ms for recv operation to complete",
        "Watchdog caught collective operation timeout: WorkNCCL(SeqNum=4, OpType=ALLREDUCE)",
        "NCCL communicator was aborted on rank 1",
    ],
)
def test_peer_loss_messages_in_runtime_errors(message):
    assert is_peer_loss(RuntimeError(message))
    assert is_peer_loss(RuntimeError(message.upper()))


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x5 and 6x1)"),
        ValueError("connection reset by peer"),  # the hints count only in a RuntimeError
        ConfigError("batch_size must be an integer ≥ 1, got 0. Pass a positive batch size."),
        KeyError("timeout"),
        SystemExit(1),
    ],
    ids=lambda exc: f"{type(exc).__name__}:{str(exc)[:20]}",
)
def test_other_errors_are_not_peer_loss(exc):
    assert not is_peer_loss(exc)
