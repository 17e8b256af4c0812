"""Process sets, as in Horovod: collectives over a subset of the ranks, each set a torch.distributed group.

    evens = hvd.add_process_set([0, 2])          # every rank calls it, in the same order
    if hvd.rank() in evens.ranks:
        hvd.allreduce(x, process_set=evens)
    hvd.remove_process_set(evens)

`global_process_set` (id 0) stands for every rank. Root ranks (broadcast) are global ranks, as in Horovod.
shutdown() drops every added set; `global_process_set` stays valid across init/shutdown.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

from lmforge.parallel import runtime


class ProcessSet:
    """A sorted set of global ranks; after add_process_set it has an id and a process group."""

    def __init__(self, ranks: Sequence[int]):
        if isinstance(ranks, str) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
            raise ValueError(f"ProcessSet expects a sequence of int ranks, got {ranks!r}")
        if len(set(ranks)) != len(ranks) or not ranks:
            raise ValueError(f"ProcessSet ranks must be distinct and non-empty, got {list(ranks)}")
        self.ranks = sorted(ranks)
        self.process_set_id: int | None = None
        self.group: Any = None  # the torch.distributed group; None for the global set

    def _check_registered(self) -> None:
        if self.process_set_id is None:
            raise ValueError(f"{self} is not registered: call add_process_set(...) on every rank first")

    def size(self) -> int:
        """Number of ranks in the set."""
        self._check_registered()
        return len(self._ranks())

    def rank(self) -> int:
        """This process's index within the set; raises ValueError when it is not a member."""
        self._check_registered()
        me = runtime.rank()
        ranks = self._ranks()
        if me not in ranks:
            raise ValueError(f"rank {me} is not in {self}")
        return ranks.index(me)

    def included(self) -> bool:
        """Whether this process belongs to the set."""
        self._check_registered()
        return runtime.rank() in self._ranks()

    def _ranks(self) -> list[int]:
        return self.ranks

    def __repr__(self) -> str:
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks})"


class _GlobalProcessSet(ProcessSet):
    """Every rank of the running group (its ranks follow init/shutdown)."""

    def __init__(self) -> None:
        self.ranks = []
        self.process_set_id = 0
        self.group = None

    def _ranks(self) -> list[int]:
        return list(range(runtime.size()))

    def __repr__(self) -> str:
        return "global_process_set"


global_process_set: ProcessSet = _GlobalProcessSet()
_registered: dict[int, ProcessSet] = {}
_next_id = 1


def add_process_set(process_set: ProcessSet | Sequence[int]) -> ProcessSet:
    """Register a process set (every rank must call this, in the same order) and return it.

    Raises ValueError for ranks outside [0, size), a set registered already, or one equal to a registered set.
    """
    global _next_id
    st = runtime._require()
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    if ps.process_set_id is not None:
        raise ValueError(f"{ps} is registered already")
    if any(not 0 <= r < st.size for r in ps.ranks):
        raise ValueError(f"process set ranks must lie in [0, {st.size}), got {ps.ranks}")
    if ps.ranks == list(range(st.size)) or any(other.ranks == ps.ranks for other in _registered.values()):
        raise ValueError(f"Attempted to add a duplicate process set: ranks {ps.ranks}")
    ps.group = dist.new_group(ps.ranks, timeout=datetime.timedelta(seconds=st.timeout_s))
    ps.process_set_id = _next_id
    _registered[_next_id] = ps
    _next_id += 1
    return ps


def remove_process_set(process_set: ProcessSet) -> bool:
    """Unregister a set added with add_process_set (every rank calls it); False if it was not registered."""
    if process_set is global_process_set:
        raise ValueError("the global process set cannot be removed")
    if process_set.process_set_id not in _registered:
        return False
    del _registered[process_set.process_set_id]
    if process_set.group is not None and runtime.rank() in process_set.ranks:
        dist.destroy_process_group(process_set.group)
    process_set.group = None
    process_set.process_set_id = None
    return True


def _forget_all() -> None:
    """shutdown(): the sets die with the group (the group's destruction frees theirs)."""
    for ps in _registered.values():
        ps.group = None
        ps.process_set_id = None
    _registered.clear()

