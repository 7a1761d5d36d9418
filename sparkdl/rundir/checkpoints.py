"""[any] The checkpoint format: discovery, commit, retention and the attempt fence.

Layout under ``<run_dir>/checkpoints`` (paths from :class:`sparkdl.rundir.RunLayout`)::

    ATTEMPT               the number of the attempt that last claimed the run (the fence)
    step-000000000120/
        state.pt          model, optimizer, scheduler state dicts and every rank's RNG states:
                          tensors and plain Python types only, read with weights_only=True
        sharded/          only for strategies that shard their state (fsdp, parameter_server):
                          model and optimizer written by every rank, its own piece
                          (torch.distributed.checkpoint files, or one file per server);
                          state.pt then holds neither
        checkpoint.json   the commit marker, written last: step, epoch, loader position,
                          running totals, world size, attempt, sha256 and size of state.pt

Commit protocol (chief only), "payload first, marker last": every rank's sharded pieces (when
the strategy has them), then state.pt, then ``checkpoint.json``, each file published whole by
:func:`sparkdl.storage.write_file`. Nothing is renamed, so the protocol is the same on a local
disk, HDFS and object stores (where a directory rename is a copy, not atomic). A directory
without the marker is ignored (a crash mid-write), and one whose state.pt does not match the
marker's checksum (truncated, corrupt) is skipped with a warning in favour of the previous
complete checkpoint. After a commit only the newest ``keep_last`` complete checkpoints are kept;
deleting one removes its marker first, so a half-deleted checkpoint never looks complete.
A chief of an older attempt never writes after a newer one claimed the run (the fence).

Nothing here unpickles beyond ``torch.load(weights_only=True)``; JSON holds everything else.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from sparkdl import storage
from sparkdl.errors import CheckpointError
from sparkdl.rundir.layout import RunLayout
from sparkdl.rundir.model_dir import check_weights_only

__all__ = [
    "FORMAT",
    "MARKER_FILE",
    "SHARDED_DIR",
    "STATE_FILE",
    "CheckpointInfo",
    "LoadedCheckpoint",
    "list_complete",
    "latest_step",
    "claimed_attempt",
    "claim_attempt",
    "load_checkpoint",
    "load_latest",
    "write_checkpoint",
    "apply_retention",
]

log = logging.getLogger("sparkdl")

STATE_FILE = "state.pt"
SHARDED_DIR = "sharded"
"""Subdirectory of a checkpoint where a sharding strategy's ranks write their pieces."""
MARKER_FILE = "checkpoint.json"
FORMAT = 1
_DIR_RE = re.compile(r"^step-(\d{12})$")
_LEGACY_TMP = ".tmp-step-"  # staging directories of sparkdl 0.1 (renamed into place then)


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint as its marker describes it (the state file is not read)."""

    path: str
    step: int
    epoch: int
    meta: dict[str, Any]


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint read back and verified: its marker and its tensors."""

    info: CheckpointInfo
    state: dict[str, Any]


# ---------------------------------------------------------------- discovery and loading


def list_complete(run_dir: str) -> list[CheckpointInfo]:
    """Committed checkpoints (with a readable marker), oldest first; cheap: reads markers only."""
    root = RunLayout(run_dir).checkpoints_dir
    found = []
    for name in storage.list_dir(root):
        match = _DIR_RE.match(name)
        if not match:
            continue
        path = storage.join(root, name)
        try:
            meta = json.loads(storage.read_file(storage.join(path, MARKER_FILE)))
            info = CheckpointInfo(path, int(meta["step"]), int(meta["epoch"]), meta)
        except FileNotFoundError:
            continue  # not committed: a crash before the marker
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("sparkdl: ignoring checkpoint %s: unreadable marker (%s)", path, exc)
            continue
        if info.step != int(match.group(1)):
            log.warning("sparkdl: ignoring checkpoint %s: marker names step %d", path, info.step)
            continue
        found.append(info)
    return sorted(found, key=lambda i: i.step)


def claimed_attempt(run_dir: str) -> int | None:
    """The attempt number that last claimed the run (see Checkpointer.claim), or None."""
    try:
        return int(storage.read_file(RunLayout(run_dir).fence_file).decode().strip())
    except (OSError, ValueError):
        return None


def claim_attempt(run_dir: str, attempt: int) -> None:
    """(chief only) Record ``attempt`` as the one that owns the run from now on."""
    storage.write_file(RunLayout(run_dir).fence_file, str(attempt).encode())


def latest_step(run_dir: str) -> int | None:
    """Step of the newest committed checkpoint (not verified), or None; for the driver."""
    complete = list_complete(run_dir)
    return complete[-1].step if complete else None


def load_checkpoint(info: CheckpointInfo) -> LoadedCheckpoint:
    """Verify ``info``'s state file against its marker and load it with weights_only=True.

    Raises CheckpointError naming the file when it is missing, truncated or corrupt.
    """
    path = storage.join(info.path, STATE_FILE)
    try:
        data = storage.read_file(path)
    except OSError as exc:
        raise CheckpointError(f"checkpoint file {path} could not be read: {exc}") from exc
    sha = hashlib.sha256(data).hexdigest()
    if len(data) != info.meta.get("bytes") or sha != info.meta.get("sha256"):
        raise CheckpointError(
            f"checkpoint file {path} must have {info.meta.get('bytes')} bytes with sha256 "
            f"{info.meta.get('sha256')}, got {len(data)} bytes with sha256 {sha} "
            "(truncated or corrupt)"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint file {path} could not be loaded: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint file {path} must hold format {FORMAT}")
    return LoadedCheckpoint(info, state)


def load_latest(run_dir: str) -> LoadedCheckpoint | None:
    """The newest checkpoint that verifies and loads; a bad one is skipped with a warning."""
    for info in reversed(list_complete(run_dir)):
        try:
            return load_checkpoint(info)
        except CheckpointError as exc:
            log.warning("sparkdl: skipping checkpoint at step %d: %s", info.step, exc)
    return None


# ---------------------------------------------------------------- writing and retention


def write_checkpoint(
    run_dir: str,
    *,
    step: int,
    epoch: int,
    state: dict[str, Any],
    meta: dict[str, Any],
) -> CheckpointInfo:
    """(chief only) Commit ``state`` (tensors and plain types) and ``meta`` (JSON) as step ``step``.

    Writes state.pt into ``step-<N>/`` (where the ranks' sharded pieces already are, when the
    strategy has them), then the marker (``meta`` plus the state's checksum) last. Raises
    CheckpointError on failure.
    """
    final = RunLayout(run_dir).checkpoint_dir(step)
    buffer = io.BytesIO()
    check_weights_only(state, "checkpoint state")
    torch.save({**state, "format": FORMAT}, buffer)
    data = buffer.getvalue()
    marker = {
        **meta,
        "step": step,
        "epoch": epoch,
        "format": FORMAT,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "written_at": time.time(),
    }
    marker_path = storage.join(final, MARKER_FILE)
    try:
        # A marker an earlier attempt left at this step (its state was skipped as corrupt) goes
        # first: from here until the new marker lands, the directory does not look complete.
        storage.delete(marker_path)
        storage.write_file(storage.join(final, STATE_FILE), data)
        storage.write_file(marker_path, json.dumps(marker, sort_keys=True).encode())
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint at step {step} could not be written under {final}: {exc}. "
            "Check free space and permissions of run_dir"
        ) from exc
    return CheckpointInfo(final, step, epoch, marker)


def apply_retention(run_dir: str, keep_last: int) -> None:
    """(chief only) Delete all but the newest ``keep_last`` committed checkpoints, and leftovers
    (uncommitted directories, temporaries) older than the newest committed one."""
    complete = list_complete(run_dir)
    if not complete:
        return
    newest = complete[-1].step
    keep = {info.path for info in complete[-keep_last:]}
    root = RunLayout(run_dir).checkpoints_dir
    for name in storage.list_dir(root):
        path = storage.join(root, name)
        match = _DIR_RE.match(name)
        if match and path not in keep and int(match.group(1)) <= newest:
            _delete_quietly(storage.join(path, MARKER_FILE))  # first: never half-deleted+complete
            _delete_quietly(path)
        elif name.startswith(_LEGACY_TMP):
            step = int(name[len(_LEGACY_TMP) :].split("-", 1)[0])
            if step < newest:
                _delete_quietly(path)


def _delete_quietly(uri: str) -> None:
    try:
        storage.delete(uri)
    except OSError as exc:  # retention is housekeeping: the next commit tries again
        log.warning("sparkdl: could not delete old checkpoint data %s (%s)", uri, exc)
