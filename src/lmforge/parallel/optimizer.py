"""DistributedOptimizer: the user's own optimizer, with gradients averaged over all ranks, as in Horovod.

    opt = hvd.DistributedOptimizer(torch.optim.AdamW(model.parameters()), model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)

The returned object is an instance of a subclass of the optimizer's own class (so LR schedulers,
isinstance and state_dict keep working) that shares the original's parameter groups and state. Gradient hooks
(post-accumulate-grad) count the backward passes of each parameter; when every parameter of a bucket (about
`bucket_cap_mb` of gradients, filled in reverse registration order, the order backward produces them) has its
final gradient, one fused async allreduce of the bucket is launched while backward goes on. Buckets launch in
index order on every rank, so the collectives line up. step() waits for them (synchronize) and then steps.

For gradient clipping: opt.synchronize(); clip; `with opt.skip_synchronize(): opt.step()` (a step() after
synchronize() outside skip_synchronize() warns, as in Horovod, and does not reduce again).
backward_passes_per_step=k: gradients accumulate locally over k backward passes before one allreduce.
Sparse gradients (e.g. nn.Embedding(sparse=True)) are reduced by Horovod's sparse allreduce (allgather of
indices and values), or densified first with sparse_as_dense=True.

op=Adasum builds Horovod's delta-based Adasum optimizer instead: every rank steps its own optimizer on its own
gradients (its optimizer state stays local), and step() combines the parameter changes, not the gradients:
parameters = start + adasum over ranks of (parameters after the local step - start), each parameter tensor
on its own (see `adasum`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmforge.parallel import collectives as C
from lmforge.parallel import runtime
from lmforge.parallel.adasum import is_power_of_two
from lmforge.parallel.process_sets import ProcessSet, global_process_set

_created = 0  # DistributedOptimizers made by this process


@dataclass
class _Bucket:
    """Parameters whose gradients travel in one fused allreduce."""

    index: int
    params: list[Tensor]
    names: list[str]
    numel: int
    waiting: int = 0  # parameters whose gradient for this step is not final yet
    buffer: Tensor | None = None  # (numel,) flat gradients, allocated on first use
    handle: C.Handle | None = None
    sparse: dict[int, C.Handle] | None = None  # position in params -> sparse allreduce of that gradient


class _WrappedOptimizer:
    """What both wrappers share: the user's optimizer class comes next in the method resolution order."""

    param_groups: list[dict[str, Any]]

    def _local_step(self, closure: Any = None) -> Any:
        """The user's optimizer's own step, on this rank's gradients, communicating nothing."""
        return super().step(closure)  # type: ignore[misc]


def _check_passes(backward_passes_per_step: Any) -> None:
    if not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be an int >= 1, got {backward_passes_per_step!r}")


class _DistributedOptimizerMixin(_WrappedOptimizer):
    """Methods the dynamic subclass puts in front of the user's optimizer class (see the module docstring)."""

    def _setup_distributed(
        self,
        named_parameters: Iterable[tuple[str, Tensor]] | None,
        compression: type[C.Compressor],
        backward_passes_per_step: int,
        op: C.ReduceOp,
        gradient_predivide_factor: float,
        bucket_cap_mb: float,
        sparse_as_dense: bool,
        process_set: ProcessSet,
        groups: int | list[list[Tensor]] | None,
    ) -> None:
        _check_passes(backward_passes_per_step)
        if op not in (C.Average, C.Sum):
            raise ValueError(f"DistributedOptimizer op must be Average, Sum or Adasum, got {op!r}")
        if gradient_predivide_factor <= 0 or (gradient_predivide_factor != 1.0 and op != C.Average):
            raise ValueError("gradient_predivide_factor must be > 0 and needs op=Average, got "
                             f"{gradient_predivide_factor!r} with op={op.value}")
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb!r}")
        params = [p for group in self.param_groups for p in group["params"]]
        names = _parameter_names(params, named_parameters)
        self._compression = compression
        self._passes = backward_passes_per_step
        self._op = op
        self._prescale = 1.0 / gradient_predivide_factor
        self._postscale = gradient_predivide_factor
        global _created
        _created += 1  # every rank wraps its optimizers in the same order, so the names agree
        self._prefix = f"DistributedOptimizer{_created}"  # collective names, distinct per optimizer
        self._sparse_as_dense = bool(sparse_as_dense)
        self._process_set = process_set
        self._should_synchronize = True
        self._synchronized = False
        trained = [p for p in params if p.requires_grad]
        if groups is None:
            self._buckets = _make_buckets(trained, names, bucket_cap_mb)
        else:
            self._buckets = _group_buckets(trained, names, groups)
        self._bucket_of: dict[Tensor, _Bucket] = {p: b for b in self._buckets for p in b.params}
        self._delay: dict[Tensor, int] = {}
        self._next_launch = 0
        self._reset_round()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self._bucket_of]

    # -- gradient hooks and buckets -------------------------------------------------------------------------

    def _reset_round(self) -> None:
        self._delay = {p: self._passes for p in self._bucket_of}
        for bucket in self._buckets:
            bucket.waiting = len(bucket.params)
            bucket.handle = None
            bucket.sparse = None
        self._next_launch = 0

    def _on_grad_ready(self, param: Tensor) -> None:
        """Hook: `param.grad` was accumulated; after its k-th pass its bucket may be ready to launch."""
        self._synchronized = False
        self._delay[param] -= 1
        if self._delay[param] < 0:
            raise RuntimeError(
                f"parameter {self._name(param)!r} got gradients more than backward_passes_per_step="
                f"{self._passes} times before step() or synchronize(); raise backward_passes_per_step to "
                "accumulate locally"
            )
        if self._delay[param] == 0:
            self._bucket_of[param].waiting -= 1
            # Launch in index order only, so every rank issues the same collectives in the same order.
            while self._next_launch < len(self._buckets) and self._buckets[self._next_launch].waiting == 0:
                self._launch(self._buckets[self._next_launch])

    def _name(self, param: Tensor) -> str:
        bucket = self._bucket_of[param]
        return bucket.names[[p is param for p in bucket.params].index(True)]

    def _launch(self, bucket: _Bucket) -> None:
        """Copy the bucket's gradients into its flat buffer and start the fused allreduce."""
        first = bucket.params[0]
        if bucket.buffer is None:
            bucket.buffer = torch.empty(bucket.numel, dtype=first.dtype, device=first.device)
        offset = 0
        bucket.sparse = {}
        for i, p in enumerate(bucket.params):
            view = bucket.buffer[offset: offset + p.numel()]  # (numel(p),)
            if p.grad is None:  # unused this step: contribute zeros, as Horovod does
                view.zero_()
            elif p.grad.is_sparse and not self._sparse_as_dense:
                view.zero_()
                bucket.sparse[i] = C.sparse_allreduce_async(
                    p.grad, f"{self._prefix}.sparse.{bucket.names[i]}", self._op, self._process_set)
            else:
                view.copy_((p.grad.to_dense() if p.grad.is_sparse else p.grad).reshape(-1))
            offset += p.numel()
        bucket.handle = C.allreduce_async_(
            bucket.buffer, name=f"{self._prefix}.bucket{bucket.index}", op=self._op,
            prescale_factor=self._prescale, postscale_factor=self._postscale, process_set=self._process_set,
            compression=self._compression,
        )
        self._next_launch = bucket.index + 1

    def synchronize(self) -> None:
        """Finish the allreduce of every gradient (launching buckets still waiting); write results to .grad.

        Parameters no rank gave a gradient end up with a zero gradient.
        """
        for bucket in self._buckets[self._next_launch:]:
            self._launch(bucket)
        for bucket in self._buckets:
            assert bucket.handle is not None and bucket.buffer is not None and bucket.sparse is not None
            C.synchronize(bucket.handle)
            offset = 0
            with torch.no_grad():
                for i, p in enumerate(bucket.params):
                    reduced = bucket.buffer[offset: offset + p.numel()].view_as(p)
                    if i in bucket.sparse:
                        p.grad = bucket.sparse[i].wait()
                    elif p.grad is None or p.grad.is_sparse:
                        p.grad = reduced.clone()
                    else:
                        p.grad.copy_(reduced)
                    offset += p.numel()
        self._reset_round()
        self._synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """In this context step() does not synchronize (use after an explicit synchronize(), e.g. to clip)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure: Any = None) -> Any:
        """Synchronize the gradients (unless already done or inside skip_synchronize), then step.

        Warns (Horovod's warning) when synchronize() was called before without skip_synchronize().
        """
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(); wrap step() in `with optimizer.skip_synchronize():`",
                              UserWarning, stacklevel=2)
            else:
                self.synchronize()
        self._synchronized = False
        return self._local_step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; refused while allreduces of this step are in flight (it would race with them)."""
        if any(b.handle is not None for b in self._buckets):
            raise RuntimeError("zero_grad() was called after backward() but before step() or synchronize(): "
                               "the gradient allreduces of this step are still in flight")
        if any(d != self._passes for d in self._delay.values()):
            self._reset_round()
        super().zero_grad(set_to_none)  # type: ignore[misc]


class _AdasumOptimizerMixin(_WrappedOptimizer):
    """Horovod's delta-based Adasum optimizer, in front of the user's optimizer class (module docstring)."""

    def _setup_adasum(self, named_parameters: Iterable[tuple[str, Tensor]] | None,
                      compression: type[C.Compressor], backward_passes_per_step: int,
                      gradient_predivide_factor: float, process_set: ProcessSet) -> None:
        _check_passes(backward_passes_per_step)
        if gradient_predivide_factor != 1.0:
            raise ValueError("gradient_predivide_factor needs op=Average, got op=adasum")
        if process_set is not global_process_set:
            raise NotImplementedError("Adasum does not support non-global process sets yet.")
        if not is_power_of_two(runtime.size()):
            raise NotImplementedError("Running Adasum with non-power of 2 ranks is not supported yet.")
        params = [p for group in self.param_groups for p in group["params"]]
        _parameter_names(params, named_parameters)  # the same checks of the names as for Average and Sum
        self._compression = compression
        self._trained = [p for p in params if p.requires_grad]
        global _created
        _created += 1
        self._prefix = f"DistributedOptimizer{_created}"

    def synchronize(self) -> None:
        """Nothing to do: the Adasum optimizer combines parameter changes in step(), as Horovod's does."""

    def skip_synchronize(self) -> None:
        """Refused, as in Horovod: the Adasum optimizer has no gradient synchronization to skip."""
        raise AssertionError("Skipping synchronization is not supported when using Adasum optimizer.")

    def step(self, closure: Any = None) -> Any:
        """Step the local optimizer on this rank's gradients, then set every parameter to its value before
        the step plus the Adasum over ranks of the changes (each tensor on its own, in one fused Adasum)."""
        with torch.no_grad():
            starts = [p.detach().clone() for p in self._trained]
        loss = self._local_step(closure)
        with torch.no_grad():
            deltas = [p.detach() - start for p, start in zip(self._trained, starts, strict=True)]
            if deltas:
                C.grouped_allreduce_(deltas, name=f"{self._prefix}.adasum", op=C.Adasum,
                                     compression=self._compression)
            for p, start, delta in zip(self._trained, starts, deltas, strict=True):
                p.copy_(start.add_(delta))
        return loss


def _parameter_names(
    params: list[Tensor], named_parameters: Iterable[tuple[str, Tensor]] | None
) -> dict[Tensor, str]:
    if named_parameters is None:
        return {p: f"param.{i}" for i, p in enumerate(params)}
    named = list(named_parameters)
    if not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], Tensor) for x in named):
        raise TypeError("named_parameters must be (name, tensor) pairs, e.g. model.named_parameters()")
    names = [n for n, _ in named]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"named_parameters has duplicate names: {duplicates}")
    by_param = {p: n for n, p in named}
    missing = [i for i, p in enumerate(params) if p not in by_param]
    if missing:
        raise ValueError(f"named_parameters does not name {len(missing)} of the optimizer's parameters "
                         f"(positions {missing[:10]} in its param_groups); pass model.named_parameters() of "
                         "the model the optimizer trains")
    return {p: by_param[p] for p in params}


def _make_buckets(params: list[Tensor], names: dict[Tensor, str], cap_mb: float) -> list[_Bucket]:
    """Fill buckets of at most cap_mb (one dtype and device each) in reverse parameter order."""
    cap = cap_mb * 2**20
    buckets: list[_Bucket] = []
    current: list[Tensor] = []
    for p in reversed(params):
        if current and (
            sum(q.numel() * q.element_size() for q in current) + p.numel() * p.element_size() > cap
            or (p.dtype, p.device) != (current[0].dtype, current[0].device)
        ):
            buckets.append(_bucket(len(buckets), current, names))
            current = []
        current.append(p)
    if current:
        buckets.append(_bucket(len(buckets), current, names))
    return buckets


def _group_buckets(params: list[Tensor], names: dict[Tensor, str], groups: int | list[list[Tensor]]) -> list[_Bucket]:
    """Horovod's explicit grouping: `groups` equal parts of the parameters, or the given lists (each other
    parameter alone); one bucket per group and dtype, launched in the order backward finishes them."""
    position = {p: i for i, p in enumerate(params)}
    if isinstance(groups, int):
        if groups < 1:
            raise ValueError(f"groups / num_groups must be >= 1, got {groups}")
        k = min(groups, len(params))
        sizes = [len(params) // k + (1 if i < len(params) % k else 0) for i in range(k)]
        starts = [sum(sizes[:i]) for i in range(k)]
        parts = [params[a: a + n] for a, n in zip(starts, sizes, strict=True)]
    else:
        parts = [list(g) for g in groups]
        listed = [p for part in parts for p in part]
        seen = set(listed)
        if any(p not in position for p in listed) or len(seen) != len(listed):
            raise ValueError("groups must be lists of distinct parameters of the optimizer that require grad")
        parts += [[p] for p in params if p not in seen]
    by_kind = []
    for part in parts:
        kinds: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for p in part:
            kinds.setdefault((p.dtype, p.device), []).append(p)
        by_kind += [sorted(members, key=position.__getitem__, reverse=True) for members in kinds.values()]
    by_kind.sort(key=lambda members: min(position[p] for p in members), reverse=True)  # ready first, first
    return [_bucket(i, members, names) for i, members in enumerate(by_kind) if members]


def _bucket(index: int, params: list[Tensor], names: dict[Tensor, str]) -> _Bucket:
    return _Bucket(index, params, [names[p] for p in params], sum(p.numel() for p in params))


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, Tensor]] | None = None,
    compression: type[C.Compressor] = C.Compression.none,
    backward_passes_per_step: int = 1,
    op: C.ReduceOp = C.Average,
    gradient_predivide_factor: float = 1.0,
    num_groups: int = 0,
    groups: int | list[list[Tensor]] | None = None,
    sparse_as_dense: bool = False,
    process_set: ProcessSet = global_process_set,
    bucket_cap_mb: float = 25.0,
) -> torch.optim.Optimizer:
    """Wrap `optimizer` so that step() uses gradients averaged (op=Average) or summed (op=Sum) over all ranks,
    or combines each rank's parameter changes with Adasum (op=Adasum).

    named_parameters: (name, parameter) pairs covering the optimizer's parameters (names appear in errors and
    in the collective check). compression: Compression.none or Compression.fp16 on the wire.
    backward_passes_per_step: local accumulation steps per allreduce. gradient_predivide_factor f: gradients
    are scaled by 1/f before the sum and f/size after it. num_groups / groups (Horovod's explicit grouping:
    a number of equal parts, or lists of parameters, each reduced as one fused allreduce) replace the default
    bucketing by bucket_cap_mb, the fusion size of one allreduce.
    sparse_as_dense: densify sparse gradients before the allreduce (else Horovod's sparse allreduce).
    process_set: the ranks that average their gradients (every rank of it wraps its optimizer).
    op=Adasum: Horovod's delta-based Adasum optimizer (module docstring); it needs the global process set and a
    power-of-two number of ranks (NotImplementedError otherwise, as Horovod's CPU path), takes no
    gradient_predivide_factor, and has no synchronize() to skip (skip_synchronize raises AssertionError, as in
    Horovod); num_groups, groups, bucket_cap_mb and sparse_as_dense do not change what it computes.
    Call lmforge.parallel.init() first. Raises ValueError / TypeError on bad arguments.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"DistributedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, _WrappedOptimizer):
        raise ValueError("the optimizer is already a DistributedOptimizer")
    runtime.size()  # raises when init() was not called
    if num_groups and groups is not None:
        raise ValueError("pass either num_groups or groups (Horovod's newer name), not both")
    base = type(optimizer)
    mixin = _AdasumOptimizerMixin if op == C.Adasum else _DistributedOptimizerMixin
    cls = type(f"Distributed{base.__name__}", (mixin, base), {})
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)  # same param_groups, state and hooks as the original
    wrapped.__dict__.pop("step", None)  # an LR scheduler's per-instance step patch points at the original
    if isinstance(wrapped, _AdasumOptimizerMixin):
        wrapped._setup_adasum(named_parameters, compression, backward_passes_per_step, gradient_predivide_factor,
                              process_set)
    else:
        wrapped._setup_distributed(named_parameters, compression, backward_passes_per_step, op,
                                   gradient_predivide_factor, bucket_cap_mb, sparse_as_dense, process_set,
                                   groups if groups is not None else (num_groups or None))
    return wrapped


# --- broadcasts of model and optimizer state ----------------------------------------------------------------


def broadcast_parameters(
    params: dict[str, Tensor] | Iterable[tuple[str, Tensor]],
    root_rank: int = 0,
    *,
    process_set: ProcessSet = global_process_set,
) -> None:
    """Overwrite, in place, every tensor of a state_dict or of named_parameters() with root_rank's value."""
    items = sorted(params.items()) if isinstance(params, dict) else list(params)
    if not all(isinstance(x, tuple) and len(x) == 2 for x in items):
        raise TypeError("broadcast_parameters expects a state_dict or (name, tensor) pairs such as "
                        "model.named_parameters()")
    handles = []
    for name, tensor in items:
        if tensor is None:
            continue
        if not isinstance(tensor, Tensor):
            raise TypeError(f"broadcast_parameters: {name!r} is a {type(tensor).__name__}, not a tensor")
        handles.append(C.broadcast_async_(tensor.detach(), root_rank, f"broadcast.{name}", process_set))
    for handle in handles:
        C.synchronize(handle)


@dataclass
class _TensorSlot:
    """Stands for the index-th tensor of an optimizer state while its skeleton travels as a pickle."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device_type: str


def _strip(obj: Any, found: list[Tensor]) -> Any:
    if isinstance(obj, Tensor):
        found.append(obj)
        return _TensorSlot(len(found) - 1, tuple(obj.shape), obj.dtype, obj.device.type)
    if isinstance(obj, dict):
        return {k: _strip(v, found) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_strip(v, found) for v in obj)
    return obj


def _fill(obj: Any, tensors: list[Tensor]) -> Any:
    if isinstance(obj, _TensorSlot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


def _create_state(optimizer: torch.optim.Optimizer) -> None:
    """Horovod's way to give a fresh optimizer its state: zero gradients and one step.

    Unlike Horovod, the parameters and gradients are put back afterwards (a step with zero gradients still
    moves parameters under weight decay); a DistributedOptimizer steps its base class, communicating nothing.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    saved = [(p.detach().clone(), p.grad) for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    with torch.no_grad():
        if isinstance(optimizer, _WrappedOptimizer):
            optimizer._local_step()
        else:
            optimizer.step()
        for p, (value, grad) in zip(params, saved, strict=True):
            p.copy_(value)
            p.grad = grad


def broadcast_optimizer_state(
    optimizer: torch.optim.Optimizer, root_rank: int = 0, *, process_set: ProcessSet = global_process_set
) -> None:
    """Make every rank's optimizer state (hyperparameters and per-parameter state) equal to root_rank's.

    An optimizer without state gets it first, as in Horovod (zero gradients, one step; see _create_state), so
    every rank ends with the same, complete state. The state's structure travels as one pickle, its tensors
    by tensor broadcasts. Raises ValueError for LBFGS (its state holds closures' history), as Horovod does.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("broadcast_optimizer_state expects a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("cannot broadcast torch.optim.LBFGS state")
    if not optimizer.state:
        _create_state(optimizer)
    comm_device = runtime._require().device
    mine: list[Tensor] = []
    skeleton = C.broadcast_object(_strip(optimizer.state_dict(), mine), root_rank, "optimizer_state",
                                  process_set)
    slots: list[_TensorSlot] = []
    _collect_slots(skeleton, slots)
    slots.sort(key=lambda s: s.index)
    tensors = []
    for slot in slots:
        if runtime.rank() == root_rank:
            t = mine[slot.index].detach().to(comm_device).contiguous()
        else:
            t = torch.empty(slot.shape, dtype=slot.dtype, device=comm_device)
        tensors.append(t)
    handles = [C.broadcast_async_(t, root_rank, f"optimizer_state.{i}", process_set)
               for i, t in enumerate(tensors)]
    for handle in handles:
        C.synchronize(handle)
    home = [t.to(s.device_type) for t, s in zip(tensors, slots, strict=True)]  # back where root kept them
    optimizer.load_state_dict(_fill(skeleton, home))


def _collect_slots(obj: Any, out: list[_TensorSlot]) -> None:
    if isinstance(obj, _TensorSlot):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_slots(v, out)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _collect_slots(v, out)
