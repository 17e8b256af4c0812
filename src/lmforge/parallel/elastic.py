"""Elastic training with Horovod's API, on torchrun's restarts: `hvd.elastic.run`, `TorchState`, `ObjectState`.

    @hvd.elastic.run
    def train(state):
        for state.epoch in range(state.epoch, epochs):
            for state.batch in range(state.batch, batches):
                step(...)
                state.commit()
            state.batch = 0

    state = hvd.elastic.TorchState(model, optimizer, epoch=0, batch=0)
    train(state)

As in Horovod: `commit()` saves a copy of the state; when the function raises HorovodInternalError (a peer
died or timed out), `run` restores the last commit, leaves the group and joins a fresh one (`shutdown()`,
`init()` with the same arguments), calls the reset callbacks, broadcasts the state from rank 0 and calls the
function again. A CollectiveMismatchError (a program bug, not a membership change) is raised, not retried;
so is any error after LMFORGE_ELASTIC_RESET_LIMIT resets (default 3).

Where it differs: torchrun changes membership by restarting every worker (`--max-restarts`, `--nnodes
MIN:MAX`), not by resizing a running job, so an in-memory commit dies with the process. With
LMFORGE_ELASTIC_DIR set, every commit is also written (atomically) to that folder by the first process of
each node, and after a restart (TORCHELASTIC_RESTART_COUNT > 0) `run` starts from the newest commit of the
same job (TORCHELASTIC_RUN_ID) any node finds there: the restarted job resumes where the last commit left it.
A first attempt never reads the folder, so a reused folder cannot leak an old run's state. The file is read
with `torch.load(weights_only=True)`: state attributes must be plain values (numbers, strings, lists, dicts,
tensors).
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from lmforge.parallel import runtime
from lmforge.parallel.collectives import allgather_object, broadcast_object
from lmforge.parallel.optimizer import broadcast_optimizer_state, broadcast_parameters
from lmforge.parallel.runtime import CollectiveMismatchError, HorovodInternalError

_FILE = "elastic_state.pt"


class State:
    """Horovod's elastic state: commit / restore / sync, and callbacks run after a reset."""

    def __init__(self) -> None:
        self._reset_callbacks: list[Callable[[], None]] = []
        self._commits = 0  # commits made, carried in the durable copy to find the newest

    def register_reset_callbacks(self, callbacks: Iterable[Callable[[], None]]) -> None:
        """Functions called (without arguments) after each reset, before the state is synchronized."""
        self._reset_callbacks.extend(callbacks)

    def on_reset(self) -> None:
        """Run the reset callbacks."""
        for callback in self._reset_callbacks:
            callback()

    def commit(self) -> None:
        """Save the state: a later failure restores it (and with LMFORGE_ELASTIC_DIR, a restarted job)."""
        self.save()
        self._commits += 1
        folder = os.environ.get("LMFORGE_ELASTIC_DIR")
        if folder and runtime.local_rank() == 0:
            path = Path(folder) / _FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{_FILE}.{runtime.rank()}.tmp")
            torch.save({"job": _job(), "commits": self._commits, "state": self._saved()}, tmp)
            os.replace(tmp, path)  # a kill during the write leaves the previous commit whole
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """Nothing to check: under torchrun a change of membership restarts every worker instead."""

    def save(self) -> None:
        """Keep a copy of the current state (commit() calls this)."""
        raise NotImplementedError

    def restore(self) -> None:
        """Go back to the last saved copy."""
        raise NotImplementedError

    def sync(self, root_rank: int = 0) -> None:
        """Make every rank's state root_rank's, and save it."""
        raise NotImplementedError

    def _saved(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_saved(self, saved: dict[str, Any]) -> None:
        raise NotImplementedError

    def _recover(self) -> int:
        """After a torchrun restart, load the newest durable commit of this job that any node's first
        process can read (LMFORGE_ELASTIC_DIR); return the rank that has it (0 when there is none)."""
        folder = os.environ.get("LMFORGE_ELASTIC_DIR")
        path = Path(folder) / _FILE if folder else None
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        found = None
        if restarted and path is not None and runtime.local_rank() == 0 and path.exists():
            found = torch.load(path, weights_only=True)
            if found.get("job") != _job():  # another job's commit in a reused folder
                found = None
        commits = allgather_object(-1 if found is None else found["commits"])
        newest = max(commits)
        if newest < 0:
            return 0
        root = commits.index(newest)
        if runtime.rank() == root:
            assert found is not None
            self._load_saved(found["state"])
            self._commits = newest
            self.restore()
        return root


class ObjectState(State):
    """Plain attributes given as keyword arguments (state.epoch, state.batch, ...), saved by deep copy and
    synchronized with broadcast_object."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self._names = list(kwargs)
        for name, value in kwargs.items():
            setattr(self, name, value)
        self._objects: dict[str, Any] = {}
        ObjectState.save(self)

    def save(self) -> None:
        self._objects = copy.deepcopy({name: getattr(self, name) for name in self._names})

    def restore(self) -> None:
        for name, value in copy.deepcopy(self._objects).items():
            setattr(self, name, value)

    def sync(self, root_rank: int = 0) -> None:
        values = broadcast_object({name: getattr(self, name) for name in self._names}, root_rank,
                                  "elastic.objects")
        for name, value in values.items():
            setattr(self, name, value)
        self._commits = broadcast_object(self._commits, root_rank, "elastic.commits")
        ObjectState.save(self)

    def _saved(self) -> dict[str, Any]:
        return {"objects": self._objects}

    def _load_saved(self, saved: dict[str, Any]) -> None:
        self._objects = saved["objects"]


class TorchState(ObjectState):
    """A model and an optimizer (either may be None) plus plain attributes, as Horovod's TorchState.

    save() copies the model's and the optimizer's state_dict; sync() broadcasts the parameters and buffers
    (broadcast_parameters) and the optimizer state (broadcast_optimizer_state) from root_rank.
    """

    def __init__(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 **kwargs: Any) -> None:
        self.model, self.optimizer = model, optimizer
        self._model_state: dict[str, Any] | None = None
        self._optimizer_state: dict[str, Any] | None = None
        super().__init__(**kwargs)
        self._save_torch()

    def _save_torch(self) -> None:
        if self.model is not None:
            self._model_state = copy.deepcopy(self.model.state_dict())
        if self.optimizer is not None:
            self._optimizer_state = copy.deepcopy(self.optimizer.state_dict())

    def save(self) -> None:
        self._save_torch()
        super().save()

    def restore(self) -> None:
        if self.model is not None and self._model_state is not None:
            self.model.load_state_dict(self._model_state)
        if self.optimizer is not None and self._optimizer_state is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._optimizer_state))
        super().restore()

    def sync(self, root_rank: int = 0) -> None:
        if self.model is not None:
            broadcast_parameters(self.model.state_dict(), root_rank=root_rank)
        if self.optimizer is not None:
            broadcast_optimizer_state(self.optimizer, root_rank=root_rank)
        self._save_torch()
        super().sync(root_rank)

    def _saved(self) -> dict[str, Any]:
        return {"model": self._model_state, "optimizer": self._optimizer_state, **super()._saved()}

    def _load_saved(self, saved: dict[str, Any]) -> None:
        self._model_state, self._optimizer_state = saved["model"], saved["optimizer"]
        super()._load_saved(saved)


def _job() -> str:
    """The torchrun job a durable commit belongs to (its rendezvous id)."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "")


def run(func: Callable[..., Any]) -> Callable[..., Any]:
    """Horovod's decorator: call func(state, ...) until it returns, restoring and resetting on failures.

    The wrapped function starts from the newest durable commit (LMFORGE_ELASTIC_DIR, after a torchrun
    restart) or the state as given, synchronized from one rank. See the module docstring for what is retried.
    """

    @functools.wraps(func)
    def wrapper(state: State, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(state, State):
            raise TypeError(f"elastic.run: the first argument must be an elastic State, got "
                            f"{type(state).__name__}")
        limit = int(os.environ.get("LMFORGE_ELASTIC_RESET_LIMIT", "3"))
        resets = 0
        state.sync(state._recover())
        while True:
            try:
                return func(state, *args, **kwargs)
            except CollectiveMismatchError:
                raise
            except HorovodInternalError:
                if resets >= limit:
                    raise
                resets += 1
                state.restore()
                runtime._reset()
                state.on_reset()
                state.sync()

    return wrapper
