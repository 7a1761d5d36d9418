"""[worker] Failures in sparkdl's words, and the deliberate ones tests inject.

:func:`translated` maps what a training step raised to the error the user should read (a lost
collective → PeerLostError; DDP's unused-parameter complaint → ConfigError naming the option;
an embedding index out of range → DataError naming the column); :func:`inject` fires a
configured FaultInjection.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

from sparkdl.data.inputs import id_range_error
from sparkdl.errors import ConfigError, PeerLostError, is_peer_loss

__all__ = ["inject", "translated"]

log = logging.getLogger("sparkdl")


def inject(fault: Any) -> None:
    """Fail as ``fault`` says: exit, SIGKILL, raise, or hang (sleep until killed)."""
    what = f"fault injection: rank {fault.rank} at step {fault.step}, attempt {fault.attempt}"
    log.warning("sparkdl: %s (%s)", what, fault.mode)
    if fault.mode == "exit":
        os._exit(1)
    if fault.mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.mode == "raise":
        raise RuntimeError(what)
    while True:  # "hang": only the group's teardown ends this process
        time.sleep(3600)


_UNUSED_PARAMETERS = "Expected to have finished reduction in the prior iteration"


def translated(exc: BaseException, trainer: Any) -> BaseException:
    """A failure in sparkdl's words: a lost collective → PeerLostError saying where this rank was
    and what bound applied; DDP's unused-parameter error → ConfigError naming the option."""
    if _UNUSED_PARAMETERS in str(exc):
        return ConfigError(
            f"every parameter of the model must get a gradient in each step under "
            f"strategy='allreduce' (DistributedDataParallel), got parameters unused by forward "
            f"at epoch {trainer.epoch + 1}, step {trainer.step}. Pass "
            "strategy_options={'find_unused_parameters': True} (a little slower), or "
            "static_graph=True when the same parameters are unused in every step, or remove "
            "the unused parameters"
        )
    named = id_range_error(exc, trainer.batch, trainer.dataset.manifest.inputs)
    if named is not None:
        return named
    if isinstance(exc, PeerLostError) or not is_peer_loss(exc):
        return exc
    name = type(exc).__name__
    return PeerLostError(
        f"rank {trainer.env.rank} of {trainer.env.world_size} lost its group at epoch "
        f"{trainer.epoch + 1}, step {trainer.step}: a collective did not complete within "
        f"collective_timeout_s={trainer.env.timeout_s:g} s, or a peer closed its connection "
        f"(another rank died, hung or failed; its own error, if it reported one, comes "
        f"first). {name}: {str(exc).strip()[:500]}"
    )
