"""[worker] Checkpoints: atomic save by the chief, latest-complete discovery, retention, resume.

Layout under ``<run_dir>/checkpoints``::

    step-000000000120/
        state.pt          model, optimizer, scheduler state dicts and every rank's RNG states:
                          tensors and plain Python types only, read with weights_only=True
        sharded/          only for strategies that shard their state (fsdp, parameter_server):
                          model and optimizer written by every rank, its own piece
                          (torch.distributed.checkpoint files, or one file per server);
                          state.pt then holds neither
        checkpoint.json   the commit marker, written last: step, epoch, loader position,
                          running totals, world size, attempt, sha256 and size of state.pt

Commit protocol (chief only): state.pt is written into a hidden temporary directory (where every
rank has already written its sharded pieces, when the strategy has them), the directory is
renamed to ``step-<N>``, and ``checkpoint.json`` is then written atomically
(temporary name + rename). A directory without the marker is ignored (a crash mid-write), and one
whose state.pt does not match the marker's checksum (truncated, corrupt) is skipped with a
warning in favour of the previous complete checkpoint. After a commit, only the newest
``keep_last`` complete checkpoints are kept. ``checkpoints/ATTEMPT`` holds the number of the
attempt that last claimed the run; a chief of an older attempt never writes after it (a fence
against a failed group's straggler).

Nothing here unpickles beyond ``torch.load(weights_only=True)``; JSON holds everything else.
Every rank's RNG state (torch CPU, CUDA, numpy's and Python's global generators) travels to the
chief through a collective of plain bytes (JSON), never pickle.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparkdl.config import CheckpointConfig
from sparkdl.errors import CheckpointError
from sparkdl.launch.context import WorkerEnv
from sparkdl.train.model_io import atomic_write_bytes, local_path

__all__ = [
    "CHECKPOINT_DIR",
    "SHARDED_DIR",
    "CheckpointInfo",
    "Checkpointer",
    "LoadedCheckpoint",
    "list_complete",
    "latest_step",
    "claimed_attempt",
    "load_checkpoint",
    "load_latest",
    "write_checkpoint",
    "apply_retention",
    "rng_snapshot",
    "restore_rng",
    "gather_bytes",
    "broadcast_int",
]

log = logging.getLogger("sparkdl")

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"
SHARDED_DIR = "sharded"
"""Subdirectory of a checkpoint where a sharding strategy's ranks write their pieces."""
MARKER_FILE = "checkpoint.json"
FENCE_FILE = "ATTEMPT"
FORMAT = 1
_DIR_RE = re.compile(r"^step-(\d{12})$")


def _root(run_dir: str) -> str:
    return os.path.join(local_path(run_dir), CHECKPOINT_DIR)


def _dir_name(step: int) -> str:
    return f"step-{step:012d}"


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
    root = _root(run_dir)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = _DIR_RE.match(name)
        if not match:
            continue
        path = os.path.join(root, name)
        try:
            with open(os.path.join(path, MARKER_FILE)) as fh:
                meta = json.load(fh)
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
        with open(os.path.join(_root(run_dir), FENCE_FILE)) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def latest_step(run_dir: str) -> int | None:
    """Step of the newest committed checkpoint (not verified), or None; for the driver."""
    complete = list_complete(run_dir)
    return complete[-1].step if complete else None


def load_checkpoint(info: CheckpointInfo) -> LoadedCheckpoint:
    """Verify ``info``'s state file against its marker and load it with weights_only=True.

    Raises CheckpointError naming the file when it is missing, truncated or corrupt.
    """
    path = os.path.join(info.path, STATE_FILE)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
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
    tmp: str | None = None,
) -> CheckpointInfo:
    """(chief only) Commit ``state`` (tensors and plain types) and ``meta`` (JSON) as step ``step``.

    state.pt goes into a hidden temporary directory (``tmp``, which may already hold the ranks'
    sharded pieces), which is renamed into place; the marker (``meta`` plus the state's
    checksum) is written last. Raises CheckpointError on failure.
    """
    root = _root(run_dir)
    final = os.path.join(root, _dir_name(step))
    tmp = tmp or os.path.join(root, f".tmp-{_dir_name(step)}-{os.getpid()}-{time.time_ns()}")
    buffer = io.BytesIO()
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
    try:
        os.makedirs(tmp, exist_ok=True)
        with open(os.path.join(tmp, STATE_FILE), "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.exists(final):  # an uncommitted or stale one from an earlier attempt
            shutil.rmtree(final)
        os.rename(tmp, final)
        atomic_write_bytes(
            os.path.join(final, MARKER_FILE), json.dumps(marker, sort_keys=True).encode()
        )
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"checkpoint at step {step} could not be written under {root}: {exc}. "
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
    root = _root(run_dir)
    for name in os.listdir(root):
        path = os.path.join(root, name)
        match = _DIR_RE.match(name)
        if match and path not in keep and int(match.group(1)) <= newest:
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(".tmp-step-"):
            step = int(name[len(".tmp-step-") :].split("-", 1)[0])
            if step < newest:
                shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- RNG states and collectives


def rng_snapshot(device: str) -> bytes:
    """This process's RNG states (torch CPU, CUDA on ``device``, numpy, random) as JSON bytes."""
    np_state: Any = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "cuda": None,
        "numpy": [np_state[0], np_state[1].tolist(), *[_plain(v) for v in np_state[2:]]],
        "python": _plain(random.getstate()),
    }
    if device.startswith("cuda"):
        cuda = torch.cuda.get_rng_state(torch.device(device))
        state["cuda"] = base64.b64encode(cuda.numpy().tobytes()).decode()
    return json.dumps(state).encode()


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def restore_rng(snapshot: bytes, device: str) -> None:
    """Set this process's RNG states from :func:`rng_snapshot`'s bytes."""
    state = json.loads(snapshot)
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
    if state.get("cuda") and device.startswith("cuda"):
        raw = np.frombuffer(base64.b64decode(state["cuda"]), dtype=np.uint8).copy()
        torch.cuda.set_rng_state(torch.from_numpy(raw), torch.device(device))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(_tuples(state["python"]))


def _collective_device(env: WorkerEnv) -> torch.device:
    return torch.device(env.device) if env.backend == "nccl" else torch.device("cpu")


def gather_bytes(data: bytes, env: WorkerEnv) -> list[bytes]:
    """(all ranks) Every rank's ``data``, by rank; plain bytes over all_gather (no pickle)."""
    if not env.distributed:
        return [data]
    import torch.distributed as dist

    device = _collective_device(env)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(env.world_size)]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    padded = padded.to(device)
    out = [torch.zeros_like(padded) for _ in range(env.world_size)]
    dist.all_gather(out, padded)
    return [t.cpu().numpy()[: int(s.item())].tobytes() for t, s in zip(out, sizes)]


def broadcast_int(value: int, env: WorkerEnv) -> int:
    """(all ranks) The chief's ``value`` on every rank."""
    if not env.distributed:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device(env))
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


# ---------------------------------------------------------------- the worker's checkpointer


class Checkpointer:
    """When to checkpoint, and the save/restore collectives of one worker's run.

    A step checkpoint falling on an epoch's last step is taken at the end of that epoch instead
    (after validation and the epoch's metrics), so that a checkpoint is always either strictly
    inside an epoch or after everything the epoch does.
    """

    def __init__(self, run_dir: str, config: CheckpointConfig, env: WorkerEnv) -> None:
        self.run_dir, self.config, self.env = run_dir, config, env
        self.last_step = -1

    def due_in_epoch(self, step: int, last_in_epoch: bool) -> bool:
        every = self.config.every_steps
        return bool(every) and step % every == 0 and not last_in_epoch

    def due_at_epoch_end(self, epoch: int, step: int) -> bool:
        if step == self.last_step:
            return False
        every_e, every_s = self.config.every_epochs, self.config.every_steps
        if every_e and (epoch + 1) % every_e == 0:
            return True
        return bool(every_s) and step % every_s == 0  # a step checkpoint deferred to here

    def save(
        self,
        *,
        step: int,
        epoch: int,
        position: dict[str, Any],
        totals: dict[str, float],
        modules: dict[str, Any],
        before_commit: Any = None,
        sharded: Callable[[str], None] | None = None,
    ) -> None:
        """(all ranks) Gather RNG states, then the chief commits the checkpoint.

        ``modules`` maps names ("model", "optimizer", "scheduler") to objects with
        ``state_dict()`` (or None); ``totals`` are already summed over ranks; ``before_commit``
        (chief only) runs before the commit, e.g. to flush the metrics of the steps it covers.
        ``sharded(directory)`` (all ranks), when given, first writes every rank's pieces into
        the not yet committed checkpoint's ``sharded/`` directory.
        """
        # Named by step and attempt, so every rank finds it and an earlier attempt's leftovers
        # are never reused (retention deletes those).
        staging = os.path.join(
            _root(self.run_dir), f".tmp-{_dir_name(step)}-attempt{self.env.attempt}"
        )
        if sharded is not None:
            sharded(os.path.join(staging, SHARDED_DIR))
        rngs = gather_bytes(rng_snapshot(self.env.device), self.env)
        self.last_step = step
        if not self.env.is_chief:
            return
        state: dict[str, Any] = {
            name: (None if obj is None else _cpu(obj.state_dict())) for name, obj in modules.items()
        }
        state["rng"] = [r.decode() for r in rngs]
        meta = {
            "position": position,
            "totals": totals,
            "world_size": self.env.world_size,
            "attempt": self.env.attempt,
        }
        self.check_current()
        if before_commit is not None:
            before_commit()
        info = write_checkpoint(
            self.run_dir,
            step=step,
            epoch=epoch,
            state=state,
            meta=meta,
            tmp=staging if sharded is not None else None,
        )
        apply_retention(self.run_dir, self.config.keep_last)
        log.info("[rank %d] checkpoint at step %d: %s", self.env.rank, step, info.path)

    def claim(self) -> None:
        """(chief only) Record this attempt as the run's current one (the fence, see
        :meth:`check_current`)."""
        if self.env.is_chief:
            path = os.path.join(_root(self.run_dir), FENCE_FILE)
            atomic_write_bytes(path, str(self.env.attempt).encode())

    def check_current(self) -> None:
        """(chief only) Raise CheckpointError when a newer attempt has claimed the run.

        A chief of a failed attempt may outlive its group by a moment (Spark kills tasks
        asynchronously); checking the fence before every write keeps it from writing metrics or
        checkpoints under the attempt that replaced it.
        """
        if not self.env.is_chief:
            return
        current = claimed_attempt(self.run_dir)
        if current is not None and current > self.env.attempt:
            raise CheckpointError(
                f"attempt {self.env.attempt} must be the run's current attempt to write, got "
                f"attempt {current} in {self.run_dir}: this worker group was replaced; stopping"
            )

    def restore(self) -> LoadedCheckpoint | None:
        """(all ranks) The latest complete checkpoint, the same one on every rank, or None.

        The chief picks it (skipping bad ones with a warning) and broadcasts its step; the others
        load that step. The caller applies the states (see :func:`apply_states`).
        """
        chosen = load_latest(self.run_dir) if self.env.is_chief else None
        step = broadcast_int(chosen.info.step if chosen else -1, self.env)
        if step < 0:
            return None
        if chosen is None:
            infos = [i for i in list_complete(self.run_dir) if i.step == step]
            if not infos:
                raise CheckpointError(
                    f"checkpoint at step {step} must be visible to rank {self.env.rank} under "
                    f"{_root(self.run_dir)}, got none. run_dir must be shared storage every "
                    "worker reaches"
                )
            chosen = load_checkpoint(infos[0])
        self.last_step = step
        return chosen

    def apply_states(self, loaded: LoadedCheckpoint, modules: dict[str, Any], seed: int) -> None:
        """Load the module/optimizer/scheduler states and this rank's RNG state.

        With the world size of the checkpoint, rank r gets rank r's RNG state back exactly;
        with another world size every rank reseeds from (seed, step, rank) instead.
        """
        for name, obj in modules.items():
            saved = loaded.state.get(name)
            if obj is not None and saved is not None:
                obj.load_state_dict(saved)
        rngs = loaded.state.get("rng") or []
        if len(rngs) == self.env.world_size:
            restore_rng(rngs[self.env.rank].encode(), self.env.device)
        else:
            torch.manual_seed(seed * 1_000_003 + loaded.info.step * 1_009 + self.env.rank)


def _cpu(value: Any) -> Any:
    """A state dict with every tensor on the CPU (so a GPU run's checkpoint loads anywhere)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value
