"""[worker] Parameter server: asynchronous SGD with a bounded staleness, on torch.distributed.

Ranks 0 … num_servers-1 each own a shard of the parameters (whole tensors, balanced by size)
and the optimizer over it. A server runs one thread per remote worker on a dedicated gloo
group (point-to-point send/recv), next to its own rank's training, which it serves by direct
calls. Every rank trains: each step it pushes its gradient shards to their servers and pulls
the updated shards back, with no barrier with the other workers. A server applies a gradient
only if at most ``max_staleness`` updates happened since the parameters it was computed on
(the worker's version); staler gradients are dropped and counted. Each request is logged
(worker, version computed on, version on arrival, applied) so the bound can be checked.
The model of record (final model, checkpoints) is the servers' parameters.
"""

from __future__ import annotations

import datetime
import logging
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from sparkdl.config import ParameterServerOptions
from sparkdl.errors import ConfigError
from sparkdl.sync.base import OptimizerFactory, SyncStrategy

__all__ = ["ParameterServerStrategy", "ShardServer", "assign_shards"]

log = logging.getLogger("sparkdl")

_REQUEST, _REPLY = 7301, 7302
"""Message tags: requests to servers and replies from them never match each other."""
_PUSH, _PULL, _STOP = 0, 1, 2
_IDLE_TIMEOUT = datetime.timedelta(hours=1)
"""How long a server thread waits for its worker's next request. Gaps are legitimate (epoch
ends, evaluation); a dead worker closes its connection, which ends the wait at once."""


def assign_shards(sizes: list[int], num_servers: int) -> list[int]:
    """The server of each tensor: largest first onto the least loaded server (deterministic)."""
    load = [0] * num_servers
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        server = min(range(num_servers), key=lambda s: (load[s], s))
        owner[i] = server
        load[server] += sizes[i]
    return owner


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]) if tensors else torch.empty(0)


def _unflat_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


class ShardServer:
    """One server's shard: parameters, the optimizer over them, a version and a request log."""

    def __init__(
        self, params: Sequence[torch.Tensor], build: OptimizerFactory, max_staleness: int
    ) -> None:
        # Servers keep their shard on the CPU: gloo point-to-point moves CPU tensors.
        self.params = [nn.Parameter(p.detach().cpu().clone()) for p in params]
        self.optimizer = build(self.params)
        self.max_staleness = max_staleness
        self.version = 0
        """Updates applied so far."""
        self.log: list[tuple[int, int, int, bool]] = []
        """(worker rank, version computed on, version on arrival, applied) per pushed gradient."""
        self.lock = threading.Lock()

    def handle(
        self, worker: int, grad: torch.Tensor | None, computed_on: int
    ) -> tuple[int, int, torch.Tensor]:
        """Apply ``grad`` unless too stale; (version, staleness or -1 if dropped, parameters)."""
        with self.lock:
            staleness = self.version - computed_on
            if grad is not None:
                applied = staleness <= self.max_staleness
                self.log.append((worker, computed_on, self.version, applied))
                if applied:
                    offset = 0
                    for p in self.params:
                        p.grad = grad[offset : offset + p.numel()].view_as(p).clone()
                        offset += p.numel()
                    self.optimizer.step()
                    self.version += 1
                else:
                    staleness = -1
            return self.version, staleness, _flat(self.params)

    def state(self) -> dict[str, Any]:
        """A snapshot (copies: other workers keep pushing while it is written)."""
        import copy

        with self.lock:
            return {
                "params": [p.detach().clone() for p in self.params],
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "version": self.version,
            }

    def load(self, state: dict[str, Any]) -> None:
        with self.lock:
            for p, value in zip(self.params, state["params"]):
                p.data.copy_(value)
            self.optimizer.load_state_dict(state["optimizer"])
            self.version = int(state["version"])


class _PushPullOptimizer(torch.optim.Optimizer):
    """What the loop steps on a worker: push gradients, pull parameters (the servers optimize)."""

    def __init__(self, params: Any, strategy: ParameterServerStrategy) -> None:
        super().__init__(params, {})
        self._strategy = strategy

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self._strategy.push_pull()


class ParameterServerStrategy(SyncStrategy):
    """Asynchronous SGD: servers on ranks 0 … num_servers-1, every rank a worker."""

    name = "parameter_server"
    synchronous = False
    sharded_checkpoint = True

    def __init__(self, env: Any, options: ParameterServerOptions | None = None) -> None:
        super().__init__(env, options or ParameterServerOptions())
        if self.options.num_servers > env.world_size:
            raise ConfigError(
                f"num_servers must be at most the world size ({env.world_size}), got "
                f"{self.options.num_servers}. Lower num_servers"
            )
        self.server: ShardServer | None = None
        self._group: Any = None
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._step_times: list[float] = []
        self.pushes = 0
        """Steps this rank pushed."""
        self.applied = self.dropped = 0
        """Gradient shards the servers applied / dropped as too stale."""
        self.max_staleness_seen = 0

    # ---- setup -------------------------------------------------------------------------------

    def wrap(self, module: nn.Module) -> nn.Module:
        """(all ranks) Split the parameters over the servers; form the servers' gloo group."""
        self._module = self._wrapped = module
        self._params = [p for p in module.parameters() if p.requires_grad]
        if len({p.dtype for p in self._params}) > 1:
            raise ConfigError(
                "parameters must share one dtype for strategy='parameter_server', got "
                f"{sorted({str(p.dtype) for p in self._params})}. Cast the model, e.g. .float()"
            )
        owner = assign_shards([p.numel() for p in self._params], self.options.num_servers)
        self._shards = [
            [p for p, o in zip(self._params, owner) if o == s]
            for s in range(self.options.num_servers)
        ]
        self._versions = [0] * self.options.num_servers
        if self.env.distributed:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
        return module

    def build_optimizer(self, build: OptimizerFactory) -> torch.optim.Optimizer:
        """(all ranks) Start this rank's server (if it is one); every rank pulls the start point."""
        rank = self.env.rank
        if rank < self.options.num_servers:
            self.server = ShardServer(self._shards[rank], build, self.options.max_staleness)
            for peer in range(self.env.world_size):
                if peer != rank:
                    thread = threading.Thread(
                        target=self._serve, args=(peer,), name=f"sparkdl-ps-{peer}", daemon=True
                    )
                    thread.start()
                    self._threads.append(thread)
        self._exchange(push=False)
        return _PushPullOptimizer(self._params, self)

    # ---- worker side -------------------------------------------------------------------------

    def push_pull(self) -> None:
        """Push this rank's gradient shards, pull the servers' current parameters."""
        self._step_times.append(time.perf_counter())
        self.pushes += 1
        self._exchange(push=True)

    def _exchange(self, *, push: bool) -> None:
        """Requests to every server (remote ones first, so they overlap), then their replies."""
        if self._errors:
            raise RuntimeError("a parameter-server thread failed") from self._errors[0]
        import torch.distributed as dist

        grads = {s: self._grad(s) for s in range(len(self._shards))} if push else {}
        remote = [s for s in range(len(self._shards)) if s != self.env.rank]
        for s in remote:
            header = torch.tensor([_PUSH if push else _PULL, self._versions[s]])
            dist.send(header, dst=s, group=self._group, tag=_REQUEST)
            if push:
                dist.send(grads[s], dst=s, group=self._group, tag=_REQUEST)
                self.count("send", grads[s].numel() * grads[s].element_size() + 16)
            else:
                self.count("send", 16)
        if self.server is not None:
            version, staleness, flat = self.server.handle(
                self.env.rank, grads.get(self.env.rank), self._versions[self.env.rank]
            )
            self._take(self.env.rank, version, staleness, flat, push)
        for s in remote:
            reply = torch.zeros(2, dtype=torch.int64)
            flat = torch.empty(sum(p.numel() for p in self._shards[s]), dtype=self._dtype())
            timeout = datetime.timedelta(seconds=self.env.timeout_s)
            for buffer in (reply, flat):
                work = dist.irecv(buffer, src=s, group=self._group, tag=_REPLY)
                assert work is not None  # this rank is in the group
                work.wait(timeout)
            self._take(s, int(reply[0]), int(reply[1]), flat, push)

    def _grad(self, server: int) -> torch.Tensor:
        grads = [
            p.grad if p.grad is not None else torch.zeros_like(p) for p in self._shards[server]
        ]
        return _flat(grads).to("cpu", self._dtype())

    def _take(
        self, server: int, version: int, staleness: int, flat: torch.Tensor, push: bool
    ) -> None:
        with torch.no_grad():
            _unflat_into(flat.to(self.env.device), self._shards[server])
        self._versions[server] = version
        if push:
            if staleness < 0:
                self.dropped += 1
            else:
                self.applied += 1
                self.max_staleness_seen = max(self.max_staleness_seen, staleness)

    def _dtype(self) -> torch.dtype:
        return self._params[0].dtype if self._params else torch.float32

    # ---- server side -------------------------------------------------------------------------

    def _serve(self, peer: int) -> None:
        """(server thread) Answer ``peer``'s requests until it says stop."""
        import torch.distributed as dist

        assert self.server is not None
        numel = sum(p.numel() for p in self.server.params)
        header = torch.zeros(2, dtype=torch.int64)
        grad = torch.empty(numel, dtype=self._dtype())
        try:
            while True:
                dist.recv(header, src=peer, group=self._group, tag=_REQUEST)
                kind, computed_on = int(header[0]), int(header[1])
                if kind == _STOP:
                    return
                if kind == _PUSH:
                    dist.recv(grad, src=peer, group=self._group, tag=_REQUEST)
                version, staleness, flat = self.server.handle(
                    peer, grad if kind == _PUSH else None, computed_on
                )
                dist.send(
                    torch.tensor([version, staleness]), dst=peer, group=self._group, tag=_REPLY
                )
                dist.send(flat, dst=peer, group=self._group, tag=_REPLY)
                self.count("send", flat.numel() * flat.element_size() + 16)
        except BaseException as exc:  # surfaced on this rank's next step
            log.error(
                "[rank %d] parameter server thread for rank %d failed: %s", self.env.rank, peer, exc
            )
            self._errors.append(exc)

    # ---- model of record, checkpoints, stats, teardown ----------------------------------------

    def synchronize(self) -> None:
        """(all ranks) Wait until every rank's pushes are in, then pull the servers' parameters."""
        self._barrier()
        self._exchange(push=False)

    def update_log(self) -> list[tuple[int, int, int, bool]]:
        """This rank's server log (empty on non-server ranks): see ShardServer.log."""
        if self.server is None:
            return []
        with self.server.lock:
            return list(self.server.log)

    def save_checkpoint(self, path: str, optimizer: torch.optim.Optimizer) -> None:
        """(all ranks) Each server writes its shard (parameters, optimizer state, version)."""
        import io

        from sparkdl import storage

        self.synchronize()
        if self.server is not None:
            buffer = io.BytesIO()
            torch.save(self.server.state(), buffer)
            storage.write_file(
                storage.join(path, f"ps-shard-{self.env.rank:04d}.pt"), buffer.getvalue()
            )
        self._barrier()

    def load_checkpoint(self, path: str, optimizer: torch.optim.Optimizer) -> None:
        """(all ranks) Servers load their shards; then every rank pulls them."""
        if self.server is not None:
            import io

            from sparkdl import storage

            shard = storage.read_file(storage.join(path, f"ps-shard-{self.env.rank:04d}.pt"))
            self.server.load(torch.load(io.BytesIO(shard), weights_only=True))
        self._barrier()
        self._versions = [0] * len(self._shards)
        self._exchange(push=False)

    def stats(self) -> dict[str, float]:
        """Worker counters, its median step interval, and (on servers) the server's counters."""
        out = {
            "pushes": float(self.pushes),
            "applied": float(self.applied),
            "stale_dropped": float(self.dropped),
            "staleness_max": float(self.max_staleness_seen),
        }
        gaps = [b - a for a, b in zip(self._step_times, self._step_times[1:])]
        if gaps:
            out["step_interval_median_s"] = statistics.median(gaps)
        for _worker, computed_on, arrived, applied in self.update_log():
            key = "server_applied" if applied else "server_dropped"
            out[key] = out.get(key, 0.0) + 1
            if applied:
                out["server_staleness_max"] = max(
                    out.get("server_staleness_max", 0.0), float(arrived - computed_on)
                )
        return out

    def teardown(self) -> None:
        """(all ranks) Tell every remote server this worker is done; servers join their threads."""
        if self._group is not None:
            import torch.distributed as dist

            for s in range(len(self._shards)):
                if s != self.env.rank:
                    dist.send(torch.tensor([_STOP, 0]), dst=s, group=self._group, tag=_REQUEST)
        for thread in self._threads:
            thread.join(timeout=self.env.timeout_s)
            if thread.is_alive():
                log.warning(
                    "[rank %d] parameter server thread %s did not stop", self.env.rank, thread.name
                )
        self._threads.clear()
