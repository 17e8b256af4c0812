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

For gradient clipping: opt.synchronize(); clip; `with opt.skip_synchronize(): opt.step()`.
backward_passes_per_step=k: gradients accumulate locally over k backward passes before one allreduce.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmforge.parallel import collectives as C


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


class _DistributedOptimizerMixin:
    """Methods the dynamic subclass puts in front of the user's optimizer class (see the module docstring)."""

    param_groups: list[dict[str, Any]]

    def _setup_distributed(
        self,
        named_parameters: Iterable[tuple[str, Tensor]] | None,
        compression: type[C.Compressor],
        backward_passes_per_step: int,
        op: C.ReduceOp,
        gradient_predivide_factor: float,
        bucket_cap_mb: float,
    ) -> None:
        if not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be an int >= 1, got "
                             f"{backward_passes_per_step!r}")
        if op not in (C.Average, C.Sum):
            raise ValueError(f"DistributedOptimizer op must be Average or Sum, got {op!r}")
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
        self._should_synchronize = True
        self._synchronized = False
        self._buckets = _make_buckets([p for p in params if p.requires_grad], names, bucket_cap_mb)
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
        for p in bucket.params:
            view = bucket.buffer[offset: offset + p.numel()]  # (numel(p),)
            if p.grad is None:  # unused this step: contribute zeros, as Horovod does
                view.zero_()
            else:
                if p.grad.is_sparse:
                    raise ValueError(f"parameter {self._name(p)!r} has a sparse gradient; "
                                     "DistributedOptimizer needs dense gradients")
                view.copy_(p.grad.reshape(-1))
            offset += p.numel()
        bucket.handle = C.allreduce_async_(
            bucket.buffer, name=f"DistributedOptimizer.bucket{bucket.index}", op=self._op,
            prescale_factor=self._prescale, postscale_factor=self._postscale, compression=self._compression,
        )
        self._next_launch = bucket.index + 1

    def synchronize(self) -> None:
        """Finish the allreduce of every gradient (launching buckets still waiting); write results to .grad.

        Parameters no rank gave a gradient end up with a zero gradient.
        """
        for bucket in self._buckets[self._next_launch:]:
            self._launch(bucket)
        for bucket in self._buckets:
            assert bucket.handle is not None and bucket.buffer is not None
            C.synchronize(bucket.handle)
            offset = 0
            with torch.no_grad():
                for p in bucket.params:
                    reduced = bucket.buffer[offset: offset + p.numel()].view_as(p)
                    if p.grad is None:
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
        """Synchronize the gradients (unless already done or inside skip_synchronize), then step."""
        if self._should_synchronize and not self._synchronized:
            self.synchronize()
        self._synchronized = False
        return super().step(closure)  # type: ignore[misc]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; refused while allreduces of this step are in flight (it would race with them)."""
        if any(b.handle is not None for b in self._buckets):
            raise RuntimeError("zero_grad() was called after backward() but before step() or synchronize(): "
                               "the gradient allreduces of this step are still in flight")
        if any(d != self._passes for d in self._delay.values()):
            self._reset_round()
        super().zero_grad(set_to_none)  # type: ignore[misc]


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


def _bucket(index: int, params: list[Tensor], names: dict[Tensor, str]) -> _Bucket:
    return _Bucket(index, params, [names[p] for p in params], sum(p.numel() for p in params))


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, Tensor]] | None = None,
    compression: type[C.Compressor] = C.Compression.none,
    backward_passes_per_step: int = 1,
    op: C.ReduceOp = C.Average,
    gradient_predivide_factor: float = 1.0,
    bucket_cap_mb: float = 25.0,
) -> torch.optim.Optimizer:
    """Wrap `optimizer` so that step() uses gradients averaged (op=Average) or summed (op=Sum) over all ranks.

    named_parameters: (name, parameter) pairs covering the optimizer's parameters (names appear in errors and
    in the collective check). compression: Compression.none or Compression.fp16 on the wire.
    backward_passes_per_step: local accumulation steps per allreduce. gradient_predivide_factor f: gradients
    are scaled by 1/f before the sum and f/size after it. bucket_cap_mb: fusion size of one allreduce.
    Call lmforge.parallel.init() first. Raises ValueError / TypeError on bad arguments.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"DistributedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, _DistributedOptimizerMixin):
        raise ValueError("the optimizer is already a DistributedOptimizer")
    C.size()  # raises when init() was not called
    base = type(optimizer)
    cls = type(f"Distributed{base.__name__}", (_DistributedOptimizerMixin, base), {})
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)  # same param_groups, state and hooks as the original
    wrapped.__dict__.pop("step", None)  # an LR scheduler's per-instance step patch points at the original
    wrapped._setup_distributed(named_parameters, compression, backward_passes_per_step, op,
                               gradient_predivide_factor, bucket_cap_mb)
    return wrapped


# --- broadcasts of model and optimizer state ----------------------------------------------------------------


def broadcast_parameters(
    params: dict[str, Tensor] | Iterable[tuple[str, Tensor]], root_rank: int = 0
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
        handles.append(C.broadcast_async_(tensor.detach(), root_rank, name=f"broadcast.{name}"))
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


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0) -> None:
    """Make every rank's optimizer state (hyperparameters and per-parameter state) equal to root_rank's.

    The state's structure travels as one pickle, its tensors by tensor broadcasts; works whether or not the
    ranks have stepped yet (a root with empty state empties the others).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("broadcast_optimizer_state expects a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    comm_device = C._require().device
    mine: list[Tensor] = []
    skeleton = C.broadcast_object(_strip(optimizer.state_dict(), mine), root_rank, name="optimizer_state")
    slots: list[_TensorSlot] = []
    _collect_slots(skeleton, slots)
    slots.sort(key=lambda s: s.index)
    tensors = []
    for slot in slots:
        if C.rank() == root_rank:
            t = mine[slot.index].detach().to(comm_device).contiguous()
        else:
            t = torch.empty(slot.shape, dtype=slot.dtype, device=comm_device)
        tensors.append(t)
    handles = [C.broadcast_async_(t, root_rank, name=f"optimizer_state.{i}") for i, t in enumerate(tensors)]
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
