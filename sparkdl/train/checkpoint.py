"""[worker] When to checkpoint, and the save/restore collectives of one worker's run.

The format (files, commit, discovery, retention, fence) is :mod:`sparkdl.rundir.checkpoints`'.
Every rank's RNG state (torch CPU, CUDA, numpy's and Python's global generators) travels to the
chief through a collective of plain bytes (JSON), never pickle.
"""

from __future__ import annotations

import base64
import json
import logging
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sparkdl import storage
from sparkdl.config import CheckpointConfig
from sparkdl.context import WorkerEnv
from sparkdl.errors import CheckpointError
from sparkdl.rundir.checkpoints import (
    SHARDED_DIR,
    LoadedCheckpoint,
    apply_retention,
    claim_attempt,
    claimed_attempt,
    list_complete,
    load_checkpoint,
    load_latest,
    write_checkpoint,
)
from sparkdl.rundir.layout import RunLayout
from sparkdl.rundir.model_dir import cpu_state
from sparkdl.train.collectives import broadcast_int, gather_bytes

__all__ = ["SHARDED_DIR", "Checkpointer", "ResizeRequested", "rng_snapshot", "restore_rng"]

log = logging.getLogger("sparkdl")


# ---------------------------------------------------------------- RNG states


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


# ---------------------------------------------------------------- the worker's checkpointer


class ResizeRequested(Exception):
    """Raised on every rank after a checkpoint when the driver asked the group to stop there
    (an elastic grow): ``run_worker`` returns a record marked ``stopped_for_resize``."""


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
        if sharded is not None:
            # Straight into the checkpoint's directory: without its marker it is not a checkpoint.
            sharded(storage.join(RunLayout(self.run_dir).checkpoint_dir(step), SHARDED_DIR))
        rngs = gather_bytes(rng_snapshot(self.env.device), self.env)
        self.last_step = step
        if not self.env.is_chief:
            return
        state: dict[str, Any] = {
            name: (None if obj is None else cpu_state(obj.state_dict()))
            for name, obj in modules.items()
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
        info = write_checkpoint(self.run_dir, step=step, epoch=epoch, state=state, meta=meta)
        apply_retention(self.run_dir, self.config.keep_last)
        log.info("[rank %d] checkpoint at step %d: %s", self.env.rank, step, info.path)

    def resize_requested(self) -> bool:
        """(all ranks) Whether the driver asked this attempt to stop at this checkpoint.

        The chief reads the run directory's request and broadcasts what it found, so every rank
        decides the same at the same step and no collective is left unmatched.
        """
        asked = 0
        if self.env.is_chief:
            path = RunLayout(self.run_dir).resize_request
            try:
                if storage.path_exists(path):
                    request = json.loads(storage.read_file(path))
                    asked = int(request.get("attempt", -1) == self.env.attempt)
            except Exception as exc:  # a torn or unreadable request: keep training
                log.warning("sparkdl: resize request %s unreadable (%s); ignored", path, exc)
        return bool(broadcast_int(asked, self.env))

    def claim(self) -> None:
        """(chief only) Record this attempt as the run's current one (the fence, see
        :meth:`check_current`)."""
        if self.env.is_chief:
            claim_attempt(self.run_dir, self.env.attempt)

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
                    f"{RunLayout(self.run_dir).checkpoints_dir}, got none. run_dir must be shared storage every "
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
