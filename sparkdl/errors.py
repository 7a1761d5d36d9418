"""[any] sparkdl's exception hierarchy; every class pickles, so errors cross process and task boundaries.

Messages follow the house form: ``"<what> must be <constraint>, got <value>. <how to fix>."``
"""

from __future__ import annotations

import base64
import json
import re
import traceback as _traceback
from dataclasses import asdict, dataclass

__all__ = [
    "SparkdlError",
    "ConfigError",
    "DataError",
    "RendezvousError",
    "CheckpointError",
    "RankFailure",
    "WorkerGroupError",
    "WorkerConfigError",
    "WorkerDataError",
    "WorkerCheckpointError",
    "PeerLostError",
    "is_peer_loss",
    "is_peer_loss_failure",
    "promote",
]


class SparkdlError(Exception):
    """Base class of every error sparkdl raises on purpose."""


class ConfigError(SparkdlError, ValueError):
    """A configuration value, or its fit with the data or the cluster, is wrong."""


class DataError(SparkdlError):
    """The input data (DataFrame, dataset files, manifest) is missing, malformed or corrupt."""


class RendezvousError(SparkdlError):
    """Workers could not find each other or form a process group."""


class CheckpointError(SparkdlError):
    """A checkpoint could not be written, found or loaded."""


_FAILURE_MARK = "SPARKDL_RANK_FAILURE"
_FAILURE_RE = re.compile(_FAILURE_MARK + r"<([A-Za-z0-9+/=]+)>")


@dataclass(frozen=True)
class RankFailure:
    """One rank's failure: what was raised there, with the original traceback text."""

    rank: int
    exc_type: str
    message: str
    traceback: str

    @classmethod
    def from_exception(cls, rank: int, exc: BaseException) -> RankFailure:
        tb = "".join(_traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(rank=rank, exc_type=type(exc).__name__, message=str(exc), traceback=tb)

    def encode(self) -> str:
        """A one-line marker that survives Spark's exception wrapping and can be parsed back."""
        payload = base64.b64encode(json.dumps(asdict(self)).encode()).decode()
        return f"{_FAILURE_MARK}<{payload}>"

    @staticmethod
    def decode_all(text: str) -> list[RankFailure]:
        """Every distinct failure marker found in ``text`` (e.g. a Spark job's error), by rank."""
        found: dict[int, RankFailure] = {}
        for match in _FAILURE_RE.finditer(text):
            try:
                failure = RankFailure(**json.loads(base64.b64decode(match.group(1))))
            except (ValueError, TypeError):
                continue
            found.setdefault(failure.rank, failure)
        return [found[r] for r in sorted(found)]


class WorkerGroupError(SparkdlError):
    """One or more ranks of a worker group failed; ``failures`` holds one entry per failed rank."""

    def __init__(self, failures: list[RankFailure], detail: str = "") -> None:
        self.failures = list(failures)
        self.detail = detail
        super().__init__(self._summary())

    def _summary(self) -> str:
        if not self.failures:
            return f"worker group failed without a rank-tagged error: {self.detail}".strip()
        lines = [f"{len(self.failures)} rank(s) failed:"]
        for f in self.failures:
            lines.append(f"  rank {f.rank}: {f.exc_type}: {f.message}")
        if self.detail:
            lines.append(f"  ({self.detail})")
        first = self.failures[0]
        lines.append(f"original traceback of rank {first.rank}:\n{first.traceback}")
        return "\n".join(lines)

    @property
    def ranks(self) -> list[int]:
        return [f.rank for f in self.failures]

    @property
    def headline(self) -> str:
        """One line for logs: how many ranks failed and the first one's error, e.g.
        ``2 rank(s) failed; rank 1: RuntimeError: boom``."""
        if not self.failures:
            return (self.detail or "the worker group failed").splitlines()[0][:300]
        first = self.failures[0]
        message = (first.message.strip().splitlines() or [""])[0][:300]
        return (
            f"{len(self.failures)} rank(s) failed; rank {first.rank}: {first.exc_type}: {message}"
        )

    def __reduce__(self):  # keep the failures when pickled
        return (type(self), (self.failures, self.detail))


class PeerLostError(RuntimeError):
    """A collective failed on this rank because another rank died, hung or left the group.

    A secondary failure: the rank that really failed reports its own error, or (killed or hung)
    none at all; this one says where the survivors were when they noticed.
    """


_PEER_LOSS_TYPES = frozenset(
    {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError", "PeerLostError"}
)
"""Exception type names that always mean a collective lost its group: torch.distributed's own
errors (matched by name, so this module never imports torch) and sparkdl's PeerLostError."""

_PEER_LOSS_HINTS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "remote process exited",
    "timed out",
    "timeout",
    "nccl communicator was aborted",
)
"""Lower-case texts that, in a RuntimeError's message, mean the same (gloo and nccl raise plain
RuntimeErrors when a peer's socket closes or a collective times out)."""


def is_peer_loss_failure(failure: RankFailure) -> bool:
    """:func:`is_peer_loss` for a rank's reported failure (its type name and message)."""
    if failure.exc_type in _PEER_LOSS_TYPES:
        return True
    text = failure.message.lower()
    return failure.exc_type == "RuntimeError" and any(hint in text for hint in _PEER_LOSS_HINTS)


def is_peer_loss(exc: BaseException) -> bool:
    """Whether ``exc`` only says that another rank went away: a secondary failure.

    The one "a peer died" classifier (the worker loop turns such an error into PeerLostError;
    a rank failing with one reports it a moment late, so the rank that really failed comes
    first). True for:

    - PeerLostError (and subclasses), and torch.distributed's ``DistError``,
      ``DistBackendError``, ``DistNetworkError``, ``DistStoreError`` (matched by type name, so
      this module never imports torch);
    - a RuntimeError whose message contains, in any case, "connection closed by peer",
      "connection reset by peer", "broken pipe", "remote process exited", "timed out",
      "timeout" or "nccl communicator was aborted" (gloo and nccl raise plain RuntimeErrors).

    Anything else (a ValueError, a RuntimeError with other text, SystemExit) is not.
    """
    if isinstance(exc, PeerLostError) or type(exc).__name__ in _PEER_LOSS_TYPES:
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(hint in text for hint in _PEER_LOSS_HINTS)


class WorkerConfigError(WorkerGroupError, ConfigError):
    """A worker raised ConfigError (e.g. the model factory raised): a WorkerGroupError that is also
    a ConfigError. Deterministic, so the driver does not restart the group for it."""


class WorkerDataError(WorkerGroupError, DataError):
    """A worker raised DataError (unreadable shard, loss turned NaN): also a DataError."""


class WorkerCheckpointError(WorkerGroupError, CheckpointError):
    """A worker raised CheckpointError (no checkpoint could be written or read)."""


_PROMOTIONS: tuple[tuple[str, type[WorkerGroupError]], ...] = (
    ("ConfigError", WorkerConfigError),
    ("DataError", WorkerDataError),
    ("CheckpointError", WorkerCheckpointError),
)


def promote(error: WorkerGroupError) -> WorkerGroupError:
    """``error`` as WorkerConfigError/WorkerDataError/WorkerCheckpointError when a rank raised one
    of sparkdl's deterministic errors (retrying would fail the same way); else ``error`` itself."""
    if type(error) is not WorkerGroupError:
        return error
    kinds = {f.exc_type for f in error.failures}
    for name, cls in _PROMOTIONS:
        if name in kinds:
            first = [f for f in error.failures if f.exc_type == name]
            rest = [f for f in error.failures if f.exc_type != name]
            return cls(first + rest, error.detail)
    return error
