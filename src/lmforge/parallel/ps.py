"""A parameter server on torch.distributed point-to-point messages.

Roles are set by rank: the first `n_servers` ranks are servers, the others are workers. The parameters
(every tensor of the optimizer, in param-group order) are seen as one flat vector; server `s` owns the
contiguous key range `shard_ranges(numel, n_servers)[s]` of it and runs the optimizer step on that range.
Workers compute gradients, push them to every server and pull the updated parameters back.

Consistency modes:
- "sync": a server waits for one gradient from every active worker, averages them in rank order and steps
  once; every worker then pulls the same parameters. This is data-parallel training by allreduce.
- "async": a server applies every gradient as it arrives and replies at once; gradients may be stale.
- "bounded": stale-synchronous parallel with max delay `tau`: gradients are applied as they arrive, but a
  worker's next step is released only when it is at most `tau` steps ahead of the slowest active worker (its
  pull blocks). Every release is recorded (`ServerLog.releases`) so the bound can be checked from the record.

Messages (all tensors, tags keep the streams apart): a worker sends a float64 header `[kind, step, lr_0, ...,
lr_{G-1}]` then, for a push, its gradient slice; a server answers with its parameter slice. Learning rates
travel in the header so a schedule run by the worker's training loop drives the servers' optimizers.

Every wait has a timeout (`timeout`, 60 s by default): when a peer dies or stalls, the others raise a
`ParameterServerError` naming the ranks they were waiting for instead of hanging.

Only element-wise optimizers (SGD, Adam, AdamW, RMSprop, Adagrad, ...) give the same result sharded as whole,
because each server steps on its slice of every parameter alone.
"""

from __future__ import annotations

import datetime
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

Mode = Literal["sync", "async", "bounded"]
MODES = ("sync", "async", "bounded")

# Message kinds (first header entry) and tags.
PUSH, DONE, STATE = 0, 1, 2
TAG_HEADER, TAG_GRAD, TAG_PARAMS = 11, 12, 13
DEFAULT_TIMEOUT = datetime.timedelta(seconds=60)


class ParameterServerError(RuntimeError):
    """A peer of the parameter server died, stalled or sent something unexpected."""


def _wait(works: list[Any], timeout: datetime.timedelta, what: str) -> None:
    """Wait for point-to-point operations; raise ParameterServerError saying `what` was awaited on failure."""
    for work in works:
        try:
            work.wait(timeout)
        except RuntimeError as err:
            raise ParameterServerError(f"{what} failed or timed out after {timeout.total_seconds():g} s "
                                       f"(a peer may have died): {err}") from err


def shard_ranges(numel: int, n_servers: int) -> list[tuple[int, int]]:
    """Split `numel` flat elements into `n_servers` contiguous [lo, hi) key ranges of near-equal size.

    Raises ValueError when there are fewer elements than servers.
    """
    if n_servers < 1:
        raise ValueError(f"n_servers must be at least 1, got {n_servers}")
    if numel < n_servers:
        raise ValueError(f"cannot shard {numel} parameter elements across {n_servers} servers")
    bounds = [numel * s // n_servers for s in range(n_servers + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def is_server(rank: int, n_servers: int) -> bool:
    """True when `rank` plays the server role (the first `n_servers` ranks do)."""
    return rank < n_servers


def check_mode(mode: str, tau: int | None) -> None:
    """Raise ValueError for an unknown consistency mode or a missing / negative `tau` in bounded mode."""
    if mode not in MODES:
        raise ValueError(f"parameter-server mode must be one of {MODES}, got {mode!r}")
    if mode == "bounded" and (tau is None or tau < 0):
        raise ValueError(f"bounded-staleness mode needs tau >= 0 (max steps ahead of the slowest), "
                         f"got {tau!r}")


def optimizer_params(optimizer: Optimizer) -> list[Tensor]:
    """The optimizer's tensors in param-group order: the order of the flat parameter vector.

    Raises ValueError when they differ in dtype or device (one flat vector holds them all).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not params:
        raise ValueError("the optimizer holds no parameters")
    if len({(p.dtype, p.device) for p in params}) > 1:
        raise ValueError("parameter server needs every parameter in one dtype and on one device, got "
                         f"{sorted({(str(p.dtype), str(p.device)) for p in params})}")
    return params


@dataclass
class Traffic:
    """Bytes this rank sent and received (headers included) and the number of steps it took part in."""

    bytes_sent: int = 0
    bytes_received: int = 0
    steps: int = 0

    def per_step(self) -> tuple[float, float]:
        """(bytes sent, bytes received) per step."""
        n = max(self.steps, 1)
        return self.bytes_sent / n, self.bytes_received / n


@dataclass
class Update:
    """One optimizer step on a server: the version it produced, whose gradient(s), and how stale they were."""

    version: int  # server version after the step (the initial parameters are version 0)
    workers: list[int]  # ranks whose gradients went into the step (all active workers in sync mode)
    staleness: int  # max over those gradients of (version before the step - version they were computed on)


@dataclass
class Release:
    """A worker allowed to start a step: its clock (pushes applied) and the slowest active worker's clock."""

    worker: int
    clock: int
    min_clock: int


@dataclass
class ServerLog:
    """What a server did: its steps, the releases of workers, and its traffic."""

    updates: list[Update] = field(default_factory=list)
    releases: list[Release] = field(default_factory=list)
    traffic: Traffic = field(default_factory=Traffic)

    def max_gap(self) -> int:
        """The largest (clock - slowest clock) at any release: never above tau in bounded mode."""
        return max((r.clock - r.min_clock for r in self.releases), default=0)

    def max_staleness(self) -> int:
        return max((u.staleness for u in self.updates), default=0)


@dataclass
class _Piece:
    """The part of one parameter that falls inside a server's shard."""

    param: int  # index in the flat parameter order
    group: int  # param group index
    start: int  # first element within the parameter
    stop: int
    offset: int  # first element within the shard


def _pieces(params: list[Tensor], group_of: list[int], lo: int, hi: int) -> list[_Piece]:
    pieces, base = [], 0
    for i, p in enumerate(params):
        a, b = max(lo, base), min(hi, base + p.numel())
        if a < b:
            pieces.append(_Piece(i, group_of[i], a - base, b - base, a - lo))
        base += p.numel()
    return pieces


def _group_of(optimizer: Optimizer) -> list[int]:
    return [gi for gi, g in enumerate(optimizer.param_groups) for _ in g["params"]]


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _header_len(optimizer: Optimizer) -> int:
    return 2 + len(optimizer.param_groups)


class ParameterServer:
    """The server role: owns one key range of the parameters and the optimizer state for it.

    `optimizer` is the optimizer the training code built over the whole model (possibly with restored state);
    the server builds an optimizer of the same class and hyperparameters over views of its slice of every
    parameter, with the matching slice of any existing state. `serve()` then answers workers until all finish.
    Must run on rank < n_servers of the default process group, with at least one worker rank.
    """

    def __init__(self, optimizer: Optimizer, n_servers: int, mode: Mode = "sync", tau: int | None = None,
                 timeout: datetime.timedelta = DEFAULT_TIMEOUT):
        check_mode(mode, tau)
        self.timeout = timeout
        self.rank, world = dist.get_rank(), dist.get_world_size()
        if not is_server(self.rank, n_servers):
            raise ValueError(f"rank {self.rank} is a worker, not a server "
                             f"(servers are ranks 0..{n_servers - 1})")
        if world <= n_servers:
            raise ValueError(f"world size {world} leaves no worker rank beside {n_servers} server(s)")
        self.mode, self.tau = mode, tau
        self.workers = list(range(n_servers, world))
        params = optimizer_params(optimizer)
        group_of = _group_of(optimizer)
        self.lo, self.hi = shard_ranges(sum(p.numel() for p in params), n_servers)[self.rank]
        self.pieces = _pieces(params, group_of, self.lo, self.hi)
        n = self.hi - self.lo
        self.shard = torch.empty(n, dtype=params[0].dtype, device=params[0].device)  # (n,) this key range
        self.grad = torch.zeros_like(self.shard)
        views = []
        for pc in self.pieces:
            view = self.shard[pc.offset:pc.offset + pc.stop - pc.start]
            view.copy_(params[pc.param].detach().reshape(-1)[pc.start:pc.stop])
            view.grad = self.grad[pc.offset:pc.offset + pc.stop - pc.start]
            views.append(view)
        groups = [dict(_hyper(g), params=[v for v, pc in zip(views, self.pieces, strict=True)
                                          if pc.group == gi])
                  for gi, g in enumerate(optimizer.param_groups)]
        accepted = inspect.signature(type(optimizer).__init__).parameters
        defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
        self.optimizer = type(optimizer)(groups, **defaults)
        for view, pc in zip(views, self.pieces, strict=True):
            state = optimizer.state.get(params[pc.param])
            if state:
                sliced = {k: _slice_state(v, params[pc.param], pc) for k, v in state.items()}
                self.optimizer.state[view] = sliced
        self.views = views
        self.header = torch.zeros(_header_len(optimizer), dtype=torch.float64)
        self.version = 0
        self.log = ServerLog()

    def serve(self) -> ServerLog:
        """Send the initial parameters, answer pushes until every worker has sent DONE; return the log."""
        active = set(self.workers)
        clock = dict.fromkeys(self.workers, 0)  # pushes applied per worker
        base = dict.fromkeys(self.workers, 0)  # version each worker's next gradient is computed on
        waiting: set[int] = set()  # workers whose pull is held back (bounded mode)
        pending: dict[int, Tensor] = {}  # sync mode: this round's gradients by worker
        self._reply(self.workers, base)
        buf = torch.empty_like(self.shard)
        while active:
            work = dist.irecv(self.header, src=None, tag=TAG_HEADER)
            _wait([work], self.timeout, f"parameter server rank {self.rank}: waiting for a message from "
                                        f"workers {sorted(active)}")
            src = work._source_rank()  # as torch.distributed.recv does for src=None
            self.log.traffic.bytes_received += self.header.nbytes
            kind = int(self.header[0])
            if kind == STATE:
                dist.send_object_list([self.state_pieces()], dst=src)
                continue
            if kind == DONE:
                active.discard(src)
                waiting.discard(src)
            elif kind == PUSH:
                target = buf if self.mode != "sync" else torch.empty_like(self.shard)
                _wait([dist.irecv(target, src=src, tag=TAG_GRAD)], self.timeout,
                      f"parameter server rank {self.rank}: receiving a gradient from worker {src}")
                self.log.traffic.bytes_received += target.nbytes
                self._set_lrs()
                if self.mode == "sync":
                    pending[src] = target
                else:
                    self._step([src], [target], base)
                    clock[src] += 1
                    waiting.add(src)
            else:
                raise RuntimeError(f"parameter server rank {self.rank}: unknown message kind {kind} "
                                   f"from rank {src}")
            if self.mode == "sync":
                if pending and set(pending) >= active:
                    ranks = sorted(pending)
                    self._step(ranks, [pending[r] for r in ranks], base)
                    pending.clear()
                    self._reply(ranks, base)
            else:
                self._release(waiting, active, clock, base)
        return self.log

    def _set_lrs(self) -> None:
        for g, lr in zip(self.optimizer.param_groups, self.header[2:].tolist(), strict=True):
            g["lr"] = lr

    def _step(self, ranks: list[int], grads: list[Tensor], base: dict[int, int]) -> None:
        self.grad.copy_(grads[0])
        for g in grads[1:]:
            self.grad.add_(g)
        if len(grads) > 1:
            self.grad.div_(len(grads))
        self.optimizer.step()
        self.log.updates.append(Update(self.version + 1, ranks, max(self.version - base[r] for r in ranks)))
        self.version += 1
        self.log.traffic.steps += 1

    def _release(self, waiting: set[int], active: set[int], clock: dict[int, int],
                 base: dict[int, int]) -> None:
        slowest = min((clock[w] for w in active), default=0)
        limit = math.inf if self.mode == "async" else self.tau
        ready = sorted(w for w in waiting if clock[w] - slowest <= limit)
        for w in ready:
            self.log.releases.append(Release(w, clock[w], slowest))
            waiting.discard(w)
        self._reply(ready, base)

    def _reply(self, ranks: list[int], base: dict[int, int]) -> None:
        handles = [dist.isend(self.shard, dst=r, tag=TAG_PARAMS) for r in ranks]
        for r in ranks:
            base[r] = self.version
        self.log.traffic.bytes_sent += self.shard.nbytes * len(ranks)
        # The shard changes at the next step: the sends must finish first.
        _wait(handles, self.timeout, f"parameter server rank {self.rank}: sending parameters to {ranks}")

    def state_pieces(self) -> list[tuple[int, int, int, dict[str, Any]]]:
        """This server's optimizer state as (param index, start, stop, state) pieces of whole parameters."""
        return [(pc.param, pc.start, pc.stop, dict(self.optimizer.state.get(v, {})))
                for v, pc in zip(self.views, self.pieces, strict=True)]


def _slice_state(value: Any, param: Tensor, pc: _Piece) -> Any:
    if isinstance(value, Tensor) and value.shape == param.shape and value.dim() > 0:
        return value.detach().reshape(-1)[pc.start:pc.stop].clone()
    return value.clone() if isinstance(value, Tensor) else value


class PSWorker:
    """The worker role: pushes the `.grad` of the optimizer's parameters and pulls parameters back.

    Construction receives the servers' initial parameters into the local tensors (so every worker starts from
    the servers' copy). `step()` sends each server its slice of the flat gradient (missing gradients count as
    zeros) with the current learning rates, then waits for the servers' parameter slices and writes them into
    the parameters. `close()` tells the servers this worker has finished. Must run on rank >= n_servers.
    """

    def __init__(self, optimizer: Optimizer, n_servers: int, timeout: datetime.timedelta = DEFAULT_TIMEOUT):
        self.timeout = timeout
        self.rank, world = dist.get_rank(), dist.get_world_size()
        if is_server(self.rank, n_servers) or self.rank >= world:
            raise ValueError(f"rank {self.rank} is not a worker rank "
                             f"(workers are ranks {n_servers}..{world - 1})")
        self.optimizer = optimizer
        self.params = optimizer_params(optimizer)
        numel = sum(p.numel() for p in self.params)
        self.ranges = shard_ranges(numel, n_servers)
        p0 = self.params[0]
        self.flat_params = torch.empty(numel, dtype=p0.dtype, device=p0.device)  # (numel,)
        self.flat_grad = torch.empty_like(self.flat_params)
        self.header = torch.zeros(_header_len(optimizer), dtype=torch.float64)
        self.traffic = Traffic()
        self.closed = False
        self._wait(self._post_pulls(), "pulling the initial parameters")
        self._unflatten()

    def _post_pulls(self) -> list[Any]:
        self.traffic.bytes_received += self.flat_params.nbytes
        return [dist.irecv(self.flat_params[lo:hi], src=s, tag=TAG_PARAMS)
                for s, (lo, hi) in enumerate(self.ranges)]

    def _wait(self, handles: list[Any], what: str) -> None:
        _wait(handles, self.timeout, f"worker rank {self.rank}: {what} (servers 0..{len(self.ranges) - 1})")

    def _unflatten(self) -> None:
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(self.flat_params[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def _send_header(self, kind: int, server: int) -> Any:
        self.traffic.bytes_sent += self.header.nbytes
        return dist.isend(self.header, dst=server, tag=TAG_HEADER)

    def step(self) -> None:
        """Push this worker's gradients, pull the servers' parameters into the model (blocks per the mode)."""
        if self.closed:
            raise RuntimeError(f"worker rank {self.rank}: step() after close()")
        pulls = self._post_pulls()
        offset = 0
        for p in self.params:  # (numel,) flat gradient, zeros where a parameter got none
            chunk = self.flat_grad[offset:offset + p.numel()]
            if p.grad is None:
                chunk.zero_()
            else:
                chunk.copy_(p.grad.reshape(-1))
            offset += p.numel()
        self.header[0], self.header[1] = PUSH, self.traffic.steps
        self.header[2:] = torch.tensor([g["lr"] for g in self.optimizer.param_groups], dtype=torch.float64)
        sends = []
        for s, (lo, hi) in enumerate(self.ranges):
            sends.append(self._send_header(PUSH, s))
            sends.append(dist.isend(self.flat_grad[lo:hi], dst=s, tag=TAG_GRAD))
        self.traffic.bytes_sent += self.flat_grad.nbytes
        self._wait(sends + pulls, "pushing gradients and pulling parameters")
        self._unflatten()
        self.traffic.steps += 1

    def optimizer_state(self) -> dict[int, dict[str, Any]]:
        """The servers' optimizer state reassembled per whole parameter, keyed by flat parameter index (the
        `state` part of `optimizer.state_dict()`)."""
        self.header.zero_()
        self.header[0] = STATE
        state: dict[int, dict[str, Any]] = {}
        for s in range(len(self.ranges)):
            self._wait([self._send_header(STATE, s)], "requesting the optimizer state")
            reply: list[Any] = [None]
            dist.recv_object_list(reply, src=s)
            for index, start, stop, piece in reply[0]:
                p = self.params[index]
                full = state.setdefault(index, {})
                for k, v in piece.items():
                    if isinstance(v, Tensor) and v.dim() > 0 and v.numel() == stop - start:
                        full.setdefault(k, torch.empty(p.numel(), dtype=v.dtype))[start:stop] = v
                    else:
                        full[k] = v
        for index, full in state.items():
            shape = self.params[index].shape
            for k, v in full.items():
                if isinstance(v, Tensor) and v.dim() > 0 and v.numel() == self.params[index].numel():
                    full[k] = v.view(shape)
        return state

    def close(self) -> None:
        """Tell every server this worker is done (idempotent)."""
        if self.closed:
            return
        self.header.zero_()
        self.header[0] = DONE
        self._wait([self._send_header(DONE, s) for s in range(len(self.ranges))], "saying done")
        self.closed = True
