"""Joining and leaving the process group, topology, build flags and errors of `lmforge.parallel`.

`init()` joins the group torchrun describes; `shutdown()` leaves it; `init()` again joins a new one. Each init
talks through a fresh prefix of one store kept for the life of the process (torchrun's agent store, or the
TCPStore rank 0 hosts), so a re-initialised rank never reads the previous group's peer addresses: without the
fresh prefix, torch names every new default group "0" and a fast rank can connect to a stale address and hang
or fail with "Connection refused".
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0


class HorovodInternalError(RuntimeError):
    """A collective failed inside the communication layer (Horovod's name; elastic training restores on it)."""


class CollectiveError(HorovodInternalError):
    """A collective failed: a peer rank died or timed out, or the ranks could not agree on the call."""


class CollectiveMismatchError(CollectiveError):
    """The collective check: the ranks called different collectives, or the same one on different tensors."""


@dataclass
class _State:
    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int
    backend: str  # "gloo" or "nccl"
    device: torch.device  # where header and object tensors live (cuda for NCCL)
    timeout_s: float
    coordinate: bool  # header exchange before every collective (the check + uneven inputs)
    owns_group: bool  # init() created the process group, so shutdown() destroys it
    calls: int = 0  # coordinated calls on the global set so far; identical on every rank
    last: tuple[int, ...] | None = None  # the last global call's header, if every rank agreed on it
    successor: dict[tuple[int, ...], tuple[int, ...]] = field(default_factory=dict)  # header -> next header
    confident: set[tuple[int, ...]] = field(default_factory=set)  # headers whose last prediction came true
    pending: Any = None  # a speculative allreduce not yet checked (collectives._Exchange or ._Unexchanged)
    exchanges: int = 0  # signature exchanges this rank posted (what the check cost, for tests and benchmarks)


_state: _State | None = None
_base_store: Any = None  # the store every init of this process talks through, under a fresh prefix
_base_key: tuple[str, ...] = ()  # the torchrun variables it was made for
_inits = 0  # process groups this process has created; the prefix of the next one
_init_args: dict[str, Any] = {}  # the arguments of the last init(), for a reset (elastic)


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{name} must be 1/0, true/false, yes/no or on/off, got {os.environ[name]!r}")


def _fresh_store(timeout: datetime.timedelta) -> Any:
    """The process-lifetime store (torch's env:// rendezvous, created once) under a prefix new to this init."""
    global _base_store, _base_key, _inits
    key = tuple(os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"))
    if _base_store is None or key != _base_key:
        _base_store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        _base_key = key
    _inits += 1
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's store outlives restarts too
    return dist.PrefixStore(f"lmforge/attempt{attempt}/init{_inits}", _base_store)


def init(
    check: bool | None = None,
    uneven_inputs: bool | None = None,
    timeout: float | None = None,
    backend: str | None = None,
    process_sets: list[Any] | None = None,
) -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK...).

    Without those variables, runs as a single process (size 1). Reuses a process group the caller already
    created. Calling init() twice does nothing the second time; after shutdown() it joins a new group.
    check: the collective check (on by default; LMFORGE_CHECK_COLLECTIVES=0 or check=False turns it off):
    every collective first exchanges a small signature so mismatched calls raise CollectiveMismatchError on
    every rank instead of hanging, aborting or returning wrong data. uneven_inputs: keep the exchange (and so
    join()) even with the check off (default LMFORGE_UNEVEN_INPUTS). timeout: seconds a collective waits for
    its peers (default LMFORGE_COLLECTIVE_TIMEOUT or 60). backend: "gloo" or "nccl"; default nccl with CUDA,
    else gloo. process_sets: ProcessSet objects to register (as add_process_set does), as in Horovod.
    Raises ValueError on a bad timeout, backend or environment flag.
    """
    global _state, _init_args
    if _state is not None:
        return
    _init_args = {"check": check, "uneven_inputs": uneven_inputs, "timeout": timeout, "backend": backend}
    check = _env_flag("LMFORGE_CHECK_COLLECTIVES", True) if check is None else check
    uneven_inputs = _env_flag("LMFORGE_UNEVEN_INPUTS", False) if uneven_inputs is None else uneven_inputs
    if timeout is None:
        timeout = float(os.environ.get("LMFORGE_COLLECTIVE_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    owns_group = not dist.is_initialized()
    if not owns_group:
        backend = "nccl" if "nccl" in str(dist.get_backend()) else "gloo"
    elif backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")

    env_local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None
    if backend == "nccl":
        torch.cuda.set_device(env_local_rank or 0)
    if owns_group:
        delta = datetime.timedelta(seconds=timeout)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend, store=_fresh_store(delta), rank=rank, world_size=world,
                                    timeout=delta)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=delta)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    rank, size = dist.get_rank(), dist.get_world_size()

    # Topology: node = GROUP_RANK (torchrun) or host name; local rank = LOCAL_RANK or place on the node.
    everyone: list[Any] = [None] * size
    dist.all_gather_object(everyone, (os.environ.get("GROUP_RANK", socket.gethostname()), env_local_rank))
    nodes = [node for node, _ in everyone]
    local_ranks = [lr if lr is not None else nodes[:r].count(nodes[r]) for r, (_, lr) in enumerate(everyone)]
    local_rank = local_ranks[rank]
    on_my_node = [r for r in range(size) if nodes[r] == nodes[rank]]
    same_local = [r for r in range(size) if local_ranks[r] == local_rank]
    _state = _State(
        rank=rank,
        size=size,
        local_rank=local_rank,
        local_size=len(on_my_node),
        cross_rank=same_local.index(rank),
        cross_size=len(same_local),
        backend=backend,
        device=device,
        timeout_s=float(timeout),
        coordinate=bool(check or uneven_inputs),
        owns_group=owns_group,
    )
    if process_sets:
        from lmforge.parallel.process_sets import add_process_set

        for process_set in process_sets:
            add_process_set(process_set)


def shutdown() -> None:
    """Leave the process group (destroying it if init() created it); drop every added process set.

    Safe to call when not initialised; init() afterwards joins a fresh group.
    """
    global _state
    if _state is None:
        return
    from lmforge.parallel.process_sets import _forget_all

    _forget_all()
    if _state.owns_group and dist.is_initialized():
        dist.destroy_process_group()
    _state = None


def _reset() -> None:
    """Leave the group and join a fresh one with the last init()'s arguments (elastic's reset)."""
    args = dict(_init_args)
    shutdown()
    init(**args)


def is_initialized() -> bool:
    """True between init() and shutdown()."""
    return _state is not None


def _require() -> _State:
    if _state is None:
        raise ValueError("lmforge.parallel is not initialised: call lmforge.parallel.init() first")
    return _state


def size() -> int:
    """Number of processes."""
    return _require().size


def rank() -> int:
    """This process's rank in [0, size)."""
    return _require().rank


def local_size() -> int:
    """Number of processes on this node."""
    return _require().local_size


def local_rank() -> int:
    """This process's rank on its node."""
    return _require().local_rank


def cross_size() -> int:
    """Number of processes with this process's local rank (the number of nodes when nodes are alike)."""
    return _require().cross_size


def cross_rank() -> int:
    """This process's index among the processes with its local rank (its node's index if nodes are alike)."""
    return _require().cross_rank


def is_homogeneous() -> bool:
    """True when every node runs the same number of processes."""
    st = _require()
    return st.size == st.local_size * st.cross_size


# --- what is built and what runs (Horovod's names) ----------------------------------------------------------


def gloo_built() -> bool:
    """Whether torch.distributed has the gloo backend."""
    return dist.is_gloo_available()


def gloo_enabled() -> bool:
    """Whether the running group communicates with gloo (False before init())."""
    return _state is not None and _state.backend == "gloo"


def nccl_built() -> bool:
    """Whether torch.distributed has the NCCL backend."""
    return dist.is_nccl_available()


def mpi_built() -> bool:
    """Whether torch.distributed has the MPI backend (lmforge itself never uses it)."""
    return dist.is_mpi_available()


def mpi_enabled() -> bool:
    """Always False: lmforge runs on gloo or NCCL, never MPI."""
    return False


def mpi_threads_supported() -> bool:
    """Always False (no MPI); kept for Horovod programs that ask."""
    return False


def ccl_built() -> bool:
    """Always False: lmforge has no oneCCL path."""
    return False


def ddl_built() -> bool:
    """Always False: lmforge has no IBM DDL path."""
    return False


def cuda_built() -> bool:
    """Whether torch was built with CUDA."""
    return torch.backends.cuda.is_built() and torch.version.cuda is not None


def rocm_built() -> bool:
    """Whether torch was built with ROCm."""
    return torch.version.hip is not None
