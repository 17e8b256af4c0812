"""Horovod-style collectives over torch.distributed (gloo on CPU, NCCL on GPU), launched by torchrun.

Naming grid as in Horovod: `allreduce` returns a new tensor, `allreduce_` works in place, `allreduce_async`
and `allreduce_async_` return a `Handle` for `synchronize(handle)` / `poll(handle)`; the same for the other
collectives. Topology: `rank`/`size` over all processes, `local_rank`/`local_size` within a node,
`cross_rank`/`cross_size` across the processes that share a local rank (one per node when nodes are alike).

Coordinated mode (`init(check=True)` or LMFORGE_CHECK_COLLECTIVES=1, or `init(uneven_inputs=True)` or
LMFORGE_UNEVEN_INPUTS=1) starts every collective with a small header exchange (one all-gather of 8 int64 per
rank). It buys two things at the cost of one extra round trip per call:
- the hang check: ranks that call different collectives, or the same one with different shapes, dtypes, ops,
  roots or names, all raise `CollectiveMismatchError` naming each rank's call instead of hanging;
- `join()` with uneven inputs: a rank that ran out of data calls `join()` and keeps answering the others'
  allreduces (contributing the op's identity: zeros for Sum/Average), allgathers (zero rows), broadcasts and
  barriers until every rank has joined. Average then divides by the number of ranks that have not joined.
Without it, `join()` is a barrier every rank must reach at the same point.

Failures: a peer that dies or stops answering makes the collective raise `CollectiveError` on the others,
at once when its connection closes, at the latest after the timeout (`init(timeout=...)`,
LMFORGE_COLLECTIVE_TIMEOUT seconds, default 60).
"""

from __future__ import annotations

import datetime
import enum
import math
import os
import socket
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT_S = 60.0


class ReduceOp(enum.Enum):
    """Reduction applied by allreduce, grouped_allreduce and reducescatter."""

    AVERAGE = "average"
    SUM = "sum"
    MIN = "min"
    MAX = "max"
    PRODUCT = "product"


Average = ReduceOp.AVERAGE
Sum = ReduceOp.SUM
Min = ReduceOp.MIN
Max = ReduceOp.MAX
Product = ReduceOp.PRODUCT

_BACKEND_OPS = {
    ReduceOp.AVERAGE: dist.ReduceOp.SUM,  # divided afterwards by the number of contributing ranks
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.MIN: dist.ReduceOp.MIN,
    ReduceOp.MAX: dist.ReduceOp.MAX,
    ReduceOp.PRODUCT: dist.ReduceOp.PRODUCT,
}
_OP_CODES = list(ReduceOp)
# torch 2.13 renamed the tensor-output all-gather / reduce-scatter; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CollectiveError(RuntimeError):
    """A collective failed: a peer rank died or timed out, or the ranks could not agree on the call."""


class CollectiveMismatchError(CollectiveError):
    """Coordinated mode: the ranks called different collectives, or the same one on different tensors."""


# --- compression --------------------------------------------------------------------------------------------


class Compressor:
    """Casts a tensor for the wire and back; `none` leaves it as it is."""

    @staticmethod
    def compress(tensor: Tensor) -> tuple[Tensor, torch.dtype]:
        """Return (wire tensor, context for `decompress`)."""
        return tensor, tensor.dtype

    @staticmethod
    def decompress(tensor: Tensor, ctx: torch.dtype) -> Tensor:
        """Return `tensor` in the dtype recorded by `compress`."""
        return tensor


class FP16Compressor(Compressor):
    """Sends floating-point tensors as float16 (half the bytes); other dtypes are sent unchanged."""

    @staticmethod
    def compress(tensor: Tensor) -> tuple[Tensor, torch.dtype]:
        if tensor.is_floating_point() and tensor.dtype != torch.float16:
            return tensor.to(torch.float16), tensor.dtype
        return tensor, tensor.dtype

    @staticmethod
    def decompress(tensor: Tensor, ctx: torch.dtype) -> Tensor:
        return tensor if tensor.dtype == ctx else tensor.to(ctx)


class Compression:
    """Horovod's compression choices: `Compression.none` and `Compression.fp16`."""

    none = Compressor
    fp16 = FP16Compressor


# --- state and topology -------------------------------------------------------------------------------------


@dataclass
class _State:
    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int
    device: torch.device  # where header and object tensors live (cuda for NCCL)
    timeout_s: float
    coordinate: bool  # header exchange before every collective (check + uneven inputs)
    owns_group: bool  # init() created the process group, so shutdown() destroys it
    calls: int = 0  # coordinated calls so far; identical on every rank


_state: _State | None = None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def init(
    check: bool | None = None,
    uneven_inputs: bool | None = None,
    timeout: float | None = None,
    backend: str | None = None,
) -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK...).

    Without those variables, runs as a single process (size 1). Reuses a process group the caller already
    created. Calling init() twice does nothing the second time.
    check / uneven_inputs: coordinated mode (see the module docstring); default from
    LMFORGE_CHECK_COLLECTIVES / LMFORGE_UNEVEN_INPUTS. timeout: seconds a collective waits for its peers
    (default LMFORGE_COLLECTIVE_TIMEOUT or 60). backend: "gloo" or "nccl"; default nccl with CUDA, else gloo.
    Raises ValueError on a bad timeout or backend.
    """
    global _state
    if _state is not None:
        return
    check = _env_flag("LMFORGE_CHECK_COLLECTIVES") if check is None else check
    uneven_inputs = _env_flag("LMFORGE_UNEVEN_INPUTS") if uneven_inputs is None else uneven_inputs
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
            dist.init_process_group(backend, init_method="env://", timeout=delta)
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
        device=device,
        timeout_s=float(timeout),
        coordinate=bool(check or uneven_inputs),
        owns_group=owns_group,
    )


def shutdown() -> None:
    """Leave the process group (destroying it if init() created it). Safe to call when not initialised."""
    global _state
    if _state is not None and _state.owns_group and dist.is_initialized():
        dist.destroy_process_group()
    _state = None


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


def gloo_built() -> bool:
    """Whether torch.distributed has the gloo backend (Horovod's name for the question)."""
    return dist.is_gloo_available()


def nccl_built() -> bool:
    """Whether torch.distributed has the NCCL backend."""
    return dist.is_nccl_available()


def mpi_built() -> bool:
    """Whether torch.distributed has the MPI backend (lmforge itself never uses it)."""
    return dist.is_mpi_available()


# --- coordination: header exchange, hang check, join --------------------------------------------------------

_KINDS = [
    "join",
    "allreduce",
    "allgather",
    "broadcast",
    "alltoall",
    "reducescatter",
    "barrier",
    "broadcast_object",
    "allgather_object",
]
# Collectives a joined rank can keep answering.
_JOINABLE = {"allreduce", "allgather", "broadcast", "barrier"}
_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool,
]
_HEADER_LEN = 8  # kind, joined_at, dtype, numel, row_numel, op, root, signature


@dataclass
class _Call:
    """What one rank asks of a collective, as exchanged in coordinated mode and named in errors."""

    kind: str
    name: str | None = None
    shape: str = ""  # text; "*" stands for a dimension that may differ between ranks
    dtype: torch.dtype | None = None  # on the wire (after compression)
    numel: int = 0  # elements sent (allgather: rows)
    row_numel: int = 0  # allgather: elements per row
    op: ReduceOp | None = None
    root: int = -1

    def describe(self) -> str:
        parts = [f"name={self.name!r}"]
        if self.shape:
            parts.append(f"shape={self.shape}")
        if self.dtype is not None:
            parts.append(f"dtype={str(self.dtype).replace('torch.', '')}")
        if self.op is not None:
            parts.append(f"op={self.op.value}")
        if self.root >= 0:
            parts.append(f"root_rank={self.root}")
        return f"{self.kind}({', '.join(parts)})"

    def header(self, joined_at: int) -> list[int]:
        if self.dtype is not None and self.dtype not in _DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in _DTYPES)
            raise ValueError(f"{self.describe()}: coordinated mode (check / uneven_inputs) supports "
                             f"the dtypes {names}, got {self.dtype}")
        dtype = _DTYPES.index(self.dtype) if self.dtype is not None else -1
        op = _OP_CODES.index(self.op) if self.op is not None else -1
        signature = zlib.crc32(self.describe().encode())
        kind = _KINDS.index(self.kind)
        return [kind, joined_at, dtype, self.numel, self.row_numel, op, self.root, signature]


@dataclass
class _Peers:
    """The header exchange's answer: per rank (kind, joined_at, dtype, numel, row_numel, op, root, sig)."""

    rows: list[list[int]]

    @property
    def joined(self) -> list[int]:
        return [r for r, row in enumerate(self.rows) if row[1] >= 0]

    @property
    def active(self) -> list[int]:
        return [r for r, row in enumerate(self.rows) if row[1] < 0]


def _shape_text(shape: Sequence[int], free_first: bool = False) -> str:
    dims = ["*" if free_first and i == 0 else str(d) for i, d in enumerate(shape)]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _guarded(call: _Call, fn: Callable[[], Any]) -> Any:
    """Run a backend call, turning a dead or silent peer into a CollectiveError that says what was running."""
    try:
        return fn()
    except CollectiveError:
        raise
    except RuntimeError as err:
        st = _require()
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CollectiveError(
            f"rank {st.rank}: {call.describe()} failed: a peer rank died, did not answer within "
            f"{st.timeout_s:g} s, or the backend refused the call ({reason})"
        ) from err


def _exchange(call: _Call, joined_at: int = -1) -> _Peers:
    """Coordinated mode: all-gather every rank's header for this call; check that the active ranks agree."""
    st = _require()
    mine = torch.tensor(call.header(joined_at), dtype=torch.int64, device=st.device)
    table = torch.empty(st.size * _HEADER_LEN, dtype=torch.int64, device=st.device)
    _guarded(call, lambda: _all_gather_single(table, mine))
    st.calls += 1
    peers = _Peers(table.view(st.size, _HEADER_LEN).cpu().tolist())
    active = peers.active
    if len({(peers.rows[r][0], peers.rows[r][7]) for r in active}) > 1:
        _raise_mismatch(call, joined_at, "the ranks called different collectives or passed different tensors")
    if active and peers.joined:
        kind, root = _KINDS[peers.rows[active[0]][0]], peers.rows[active[0]][6]
        if kind not in _JOINABLE:
            raise CollectiveError(
                f"rank {st.rank}: {kind} cannot run while rank(s) {peers.joined} have called join(); joined "
                "ranks answer only allreduce, allgather, broadcast and barrier"
            )
        if kind == "broadcast" and root in peers.joined:
            raise CollectiveError(f"rank {st.rank}: broadcast from root rank {root}, which has called join()")
    return peers


def _raise_mismatch(call: _Call, joined_at: int, reason: str) -> None:
    """Every rank sees the same table, so every rank gets here: swap descriptions and raise the same error."""
    st = _require()
    mine = "join()" if joined_at >= 0 else call.describe()
    calls: list[Any] = [None] * st.size
    _guarded(call, lambda: dist.all_gather_object(calls, mine))
    groups: dict[str, list[int]] = {}
    for r, text in enumerate(calls):
        groups.setdefault(text, []).append(r)
    lines = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} called {text}"
                      for text, rs in groups.items())
    raise CollectiveMismatchError(
        f"collective mismatch at coordinated call #{st.calls} (seen by rank {st.rank}): {reason}: {lines}"
    )


def _identity(op: ReduceOp, dtype: torch.dtype) -> float | int | bool:
    """The value a joined rank contributes so the reduction is unchanged."""
    if op in (ReduceOp.SUM, ReduceOp.AVERAGE):
        return 0
    if op == ReduceOp.PRODUCT:
        return 1
    if dtype == torch.bool:
        return op == ReduceOp.MIN
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    return info.max if op == ReduceOp.MIN else info.min


def _answer(peers: _Peers) -> None:
    """A joined rank takes part in the active ranks' collective with a neutral contribution."""
    st = _require()
    kind, _, dtype_code, numel, row_numel, op_code, root, _ = peers.rows[peers.active[0]]
    dtype = _DTYPES[dtype_code] if dtype_code >= 0 else torch.uint8  # barrier: no tensor
    call = _Call("join", name="join")
    if kind == _KINDS.index("allreduce"):
        op = _OP_CODES[op_code]
        buf = torch.full((numel,), _identity(op, dtype), dtype=dtype, device=st.device)
        _guarded(call, lambda: dist.all_reduce(buf, op=_BACKEND_OPS[op]))
    elif kind == _KINDS.index("allgather"):
        rows = max(peers.rows[r][3] for r in range(st.size))
        mine = torch.zeros(rows * row_numel, dtype=dtype, device=st.device)
        out = torch.empty(st.size * rows * row_numel, dtype=dtype, device=st.device)
        _guarded(call, lambda: _all_gather_single(out, mine))
    elif kind == _KINDS.index("broadcast"):
        buf = torch.empty(numel, dtype=dtype, device=st.device)
        _guarded(call, lambda: dist.broadcast(buf, src=root))
    elif kind == _KINDS.index("barrier"):
        _guarded(call, dist.barrier)


def _begin(call: _Call) -> _Peers | None:
    """Start a collective: in coordinated mode exchange headers (and check them); return the peers' table."""
    st = _require()
    if not st.coordinate or st.size == 1:
        return None
    return _exchange(call)


def _contributors(peers: _Peers | None) -> int:
    return _require().size if peers is None else len(peers.active)


def join(device: int = -1) -> int:
    """Declare that this rank has no more data; return the rank that joined last once every rank has joined.

    Coordinated mode (uneven_inputs / check): until then this rank answers the others' allreduces (with the
    op's identity), allgathers (with no rows), broadcasts and barriers. Otherwise join() is a barrier every
    rank must reach at the same point. `device` is accepted for Horovod compatibility and ignored.
    """
    st = _require()
    if st.size == 1:
        return 0
    call = _Call("join", name="join")
    if not st.coordinate:
        arrived = torch.tensor([time.time()], dtype=torch.float64, device=st.device)
        times = torch.empty(st.size, dtype=torch.float64, device=st.device)
        _guarded(call, lambda: _all_gather_single(times, arrived))
        return int(times.argmax())
    joined_at = st.calls
    while True:
        peers = _exchange(call, joined_at)
        if not peers.active:
            # Last to join: the largest joined_at (ties broken by the highest rank).
            return max(range(st.size), key=lambda r: (peers.rows[r][1], r))
        _answer(peers)


# --- async handles ------------------------------------------------------------------------------------------


class Handle:
    """In flight: `synchronize(handle)` waits and returns its result, `poll(handle)` checks it."""

    def __init__(self, call: _Call, works: list[Any], finish: Callable[[], Any]):
        self._call = call
        self._works = works
        self._finish = finish
        self._done = False
        self._result: Any = None

    def poll(self) -> bool:
        """True when the collective has completed (synchronize will not block)."""
        return self._done or all(w.is_completed() for w in self._works)

    def wait(self) -> Any:
        """Block until done and return the result (the same object on later calls)."""
        if not self._done:
            for work in self._works:
                _guarded(self._call, work.wait)
            self._result = self._finish()
            self._done = True
            self._works = []
        return self._result


class _GroupHandle(Handle):
    """Several handles finished together; the result is `result` once all of them are done."""

    def __init__(self, handles: list[Handle], result: Any):
        def finish() -> Any:
            for h in handles:
                h.wait()
            return result

        super().__init__(_Call("allreduce"), [], finish)
        self._handles = handles

    def poll(self) -> bool:
        return self._done or all(h.poll() for h in self._handles)


def synchronize(handle: Handle) -> Any:
    """Wait for an async collective; return its output (alltoall with splits: (output, received_splits))."""
    if not isinstance(handle, Handle):
        raise TypeError(f"synchronize expects a Handle from an *_async call, got {type(handle).__name__}")
    return handle.wait()


def poll(handle: Handle) -> bool:
    """True when the async collective behind `handle` has completed."""
    if not isinstance(handle, Handle):
        raise TypeError(f"poll expects a Handle from an *_async call, got {type(handle).__name__}")
    return handle.poll()


# --- allreduce ----------------------------------------------------------------------------------------------


def _check_tensor(tensor: Any, what: str) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{what} expects a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_sparse:
        raise ValueError(f"{what} does not support sparse tensors; pass tensor.to_dense()")


def _resolve_op(op: ReduceOp | None, average: bool | None, what: str) -> ReduceOp:
    if op is not None and average is not None:
        raise ValueError(f"{what}: pass either op or the deprecated average flag, not both")
    if op is None:
        return ReduceOp.SUM if average is False else ReduceOp.AVERAGE
    if not isinstance(op, ReduceOp):
        raise ValueError(f"{what}: op must be one of Average, Sum, Min, Max, Product; got {op!r}")
    return op


def _check_scaling(tensor: Tensor, op: ReduceOp, prescale: float, postscale: float, what: str) -> None:
    if not tensor.is_floating_point():
        if prescale != 1.0 or postscale != 1.0:
            raise ValueError(f"{what}: prescale/postscale factors need a floating-point tensor, got "
                             f"{tensor.dtype}")
        if op == ReduceOp.AVERAGE and tensor.dtype == torch.bool:
            raise ValueError(f"{what}: op=Average is undefined for bool tensors; use Min, Max or Sum")


def _allreduce_flat(
    buffer: Tensor,
    out: Tensor,
    op: ReduceOp,
    prescale: float,
    postscale: float,
    compression: type[Compressor],
    call: _Call,
) -> Handle:
    """Allreduce `buffer` and leave the scaled result in `out`, asynchronously.

    `buffer` is contiguous and ours to overwrite: `out` itself, or a private copy of it.
    """
    if prescale != 1.0:
        buffer.mul_(prescale)
    wire, ctx = compression.compress(buffer)
    call.dtype = wire.dtype
    peers = _begin(call)
    work = _guarded(call, lambda: dist.all_reduce(wire, op=_BACKEND_OPS[op], async_op=True))

    def finish() -> Tensor:
        result = compression.decompress(wire, ctx)
        scale = postscale
        if op == ReduceOp.AVERAGE:
            if not result.is_floating_point():
                result = torch.div(result, _contributors(peers), rounding_mode="trunc")
            else:
                scale = scale / _contributors(peers)
        if scale != 1.0:
            result.mul_(scale)  # `result` is the wire buffer or a fresh tensor, never the caller's input
        if result is not out:
            out.copy_(result)
        return out

    return Handle(call, [work], finish)


def allreduce_async_(
    tensor: Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    compression: type[Compressor] = Compression.none,
) -> Handle:
    """Start an in-place allreduce of `tensor`; synchronize(handle) returns `tensor` holding the result.

    op: Average (default), Sum, Min, Max or Product; the result is postscale * reduce(prescale * tensor).
    Average of integer tensors rounds toward zero. Raises ValueError for ops or factors the dtype cannot take.
    """
    _check_tensor(tensor, "allreduce")
    op = _resolve_op(op, average, "allreduce")
    _check_scaling(tensor, op, prescale_factor, postscale_factor, "allreduce")
    call = _Call("allreduce", name, _shape_text(tensor.shape), tensor.dtype, tensor.numel(), op=op)
    target = tensor.detach()  # same storage; in-place writes bypass autograd, as Horovod's do
    buffer = target if target.is_contiguous() else target.contiguous()
    inner = _allreduce_flat(buffer, target, op, prescale_factor, postscale_factor, compression, call)
    return _GroupHandle([inner], tensor)


def allreduce_async(
    tensor: Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    compression: type[Compressor] = Compression.none,
) -> Handle:
    """Start an allreduce of `tensor` into a new tensor (see allreduce_async_); `tensor` is left unchanged."""
    _check_tensor(tensor, "allreduce")
    return allreduce_async_(tensor.detach().clone(memory_format=torch.contiguous_format), average, name, op,
                            prescale_factor, postscale_factor, compression)


def allreduce(
    tensor: Tensor,
    average: bool | None = None,
    name: str | None = None,
    compression: type[Compressor] = Compression.none,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> Tensor:
    """Return the reduction of `tensor` over all ranks (same shape and dtype); `tensor` is left unchanged.

    Differentiable for op Sum and Average (the gradient is the same reduction of the output gradients, as in
    Horovod); Min, Max and Product results carry no gradient.
    """
    op = _resolve_op(op, average, "allreduce")
    differentiable = op in (Sum, Average) and torch.is_grad_enabled()
    if isinstance(tensor, Tensor) and tensor.requires_grad and differentiable:
        return _DifferentiableAllreduce.apply(tensor, name, op, prescale_factor, postscale_factor,
                                              compression)
    return allreduce_async(tensor, None, name, op, prescale_factor, postscale_factor, compression).wait()


class _DifferentiableAllreduce(torch.autograd.Function):
    """y = post * reduce_r(pre * x_r) on every rank, so dL/dx_r = post * pre * reduce_s(dL/dy_s)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, name: str | None, op: ReduceOp, pre: float, post: float,
                compression: type[Compressor]) -> Tensor:
        ctx.args = (name, op, pre, post, compression)
        return allreduce_async(tensor, None, name, op, pre, post, compression).wait()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        name, op, pre, post, compression = ctx.args
        grad_name = None if name is None else f"{name}.grad"
        reduced = allreduce_async(grad, None, grad_name, op, pre, post, compression).wait()
        return reduced, None, None, None, None, None


def allreduce_(
    tensor: Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    compression: type[Compressor] = Compression.none,
) -> Tensor:
    """Reduce `tensor` over all ranks in place and return it."""
    return allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, compression).wait()


def grouped_allreduce_async_(
    tensors: Sequence[Tensor],
    average: bool | None = None,
    name: str | None = None,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    compression: type[Compressor] = Compression.none,
) -> Handle:
    """Start one fused allreduce per dtype over `tensors`, in place; synchronize returns the list."""
    if isinstance(tensors, Tensor) or not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError("grouped_allreduce expects a list of torch.Tensor")
    op = _resolve_op(op, average, "grouped_allreduce")
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        _check_tensor(t, "grouped_allreduce")
        _check_scaling(t, op, prescale_factor, postscale_factor, "grouped_allreduce")
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    handles = []
    for (dtype, _), group in by_dtype.items():
        flat = torch.cat([t.reshape(-1) for t in group])  # (sum of numels,)
        shape = "[" + ", ".join(_shape_text(t.shape) for t in group) + "]"
        call = _Call("allreduce", name, shape, dtype, flat.numel(), op=op)
        inner = _allreduce_flat(flat, flat, op, prescale_factor, postscale_factor, compression, call)

        def unflatten(inner: Handle = inner, group: list[Tensor] = group) -> list[Tensor]:
            flat = inner.wait()
            offset = 0
            for t in group:
                t.detach().copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()
            return group

        handles.append(Handle(call, [], unflatten))
    return _GroupHandle(handles, list(tensors))


def grouped_allreduce_async(
    tensors: Sequence[Tensor],
    average: bool | None = None,
    name: str | None = None,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    compression: type[Compressor] = Compression.none,
) -> Handle:
    """Like grouped_allreduce_async_ on copies; the input tensors are left unchanged."""
    if isinstance(tensors, Tensor) or not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError("grouped_allreduce expects a list of torch.Tensor")
    copies = [t.clone(memory_format=torch.contiguous_format) for t in tensors]
    return grouped_allreduce_async_(copies, average, name, op, prescale_factor, postscale_factor, compression)


def grouped_allreduce(
    tensors: Sequence[Tensor],
    average: bool | None = None,
    name: str | None = None,
    compression: type[Compressor] = Compression.none,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> list[Tensor]:
    """Reduce every tensor of the list over all ranks (one fused collective per dtype); return new tensors."""
    return grouped_allreduce_async(tensors, average, name, op, prescale_factor, postscale_factor,
                                   compression).wait()


def grouped_allreduce_(
    tensors: Sequence[Tensor],
    average: bool | None = None,
    name: str | None = None,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    compression: type[Compressor] = Compression.none,
) -> list[Tensor]:
    """Reduce every tensor of the list in place (one fused collective per dtype) and return the list."""
    return grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor,
                                    compression).wait()


# --- allgather, broadcast, alltoall, reducescatter, barrier -------------------------------------------------


def allgather_async(tensor: Tensor, name: str | None = None) -> Handle:
    """Start an allgather along dim 0; the first dimension may differ between ranks (the others must not)."""
    return _allgather_start(tensor, name)[0]


def _allgather_start(tensor: Tensor, name: str | None) -> tuple[Handle, list[int]]:
    """Start an allgather; return its handle and every rank's number of rows."""
    _check_tensor(tensor, "allgather")
    tensor = tensor.detach()
    st = _require()
    x = tensor.reshape(1) if tensor.dim() == 0 else tensor.contiguous()  # (rows, *trailing)
    row_numel = math.prod(x.shape[1:])
    call = _Call("allgather", name, _shape_text(x.shape, free_first=True), x.dtype, x.shape[0], row_numel)
    peers = _begin(call)
    if peers is not None:
        rows = [row[3] for row in peers.rows]
    else:
        mine = torch.tensor([x.shape[0]], dtype=torch.int64, device=st.device)
        sizes = torch.empty(st.size, dtype=torch.int64, device=st.device)
        _guarded(call, lambda: _all_gather_single(sizes, mine))
        rows = sizes.tolist()
    most = max(rows)
    if x.shape[0] < most:
        pad = torch.zeros((most - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        x = torch.cat([x, pad])
    out = torch.empty((st.size * most, *x.shape[1:]), dtype=x.dtype, device=x.device)  # (N * most, *trailing)
    work = _guarded(call, lambda: _all_gather_single(out, x, async_op=True))

    def finish() -> Tensor:
        if all(n == most for n in rows):
            return out
        return torch.cat([out[r * most: r * most + n] for r, n in enumerate(rows)])

    return Handle(call, [work], finish), rows


def allgather(tensor: Tensor, name: str | None = None) -> Tensor:
    """Concatenate every rank's tensor along dim 0, in rank order (first dimensions may differ).

    A scalar counts as one row. Differentiable: a rank's input gradient is its rows of the sum over ranks of
    the output gradients.
    """
    if isinstance(tensor, Tensor) and tensor.requires_grad and torch.is_grad_enabled():
        return _DifferentiableAllgather.apply(tensor, name)
    return allgather_async(tensor, name).wait()


class _DifferentiableAllgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, name: str | None) -> Tensor:
        handle, rows = _allgather_start(tensor, name)
        st = _require()
        ctx.start, ctx.rows, ctx.shape, ctx.name = sum(rows[: st.rank]), rows[st.rank], tensor.shape, name
        return handle.wait()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        grad_name = None if ctx.name is None else f"{ctx.name}.grad"
        summed = allreduce_async(grad, None, grad_name, Sum).wait()  # (total rows, *trailing)
        return summed[ctx.start: ctx.start + ctx.rows].reshape(ctx.shape), None


def broadcast_async_(tensor: Tensor, root_rank: int, name: str | None = None) -> Handle:
    """Start overwriting `tensor` on every rank with its value on `root_rank`; synchronize returns it."""
    _check_tensor(tensor, "broadcast")
    st = _require()
    if not isinstance(root_rank, int) or not 0 <= root_rank < st.size:
        raise ValueError(f"broadcast: root_rank must be an int in [0, {st.size}), got {root_rank!r}")
    call = _Call("broadcast", name, _shape_text(tensor.shape), tensor.dtype, tensor.numel(), root=root_rank)
    _begin(call)
    target = tensor.detach()  # same storage; in-place writes bypass autograd, as Horovod's do
    buffer = target if target.is_contiguous() else target.contiguous()
    work = _guarded(call, lambda: dist.broadcast(buffer, src=root_rank, async_op=True))

    def finish() -> Tensor:
        if buffer is not target:
            target.copy_(buffer)
        return tensor

    return Handle(call, [work], finish)


def broadcast_async(tensor: Tensor, root_rank: int, name: str | None = None) -> Handle:
    """Start a broadcast into a new tensor; `tensor` is left unchanged."""
    _check_tensor(tensor, "broadcast")
    return broadcast_async_(tensor.clone(memory_format=torch.contiguous_format), root_rank, name)


def broadcast(tensor: Tensor, root_rank: int, name: str | None = None) -> Tensor:
    """Return `root_rank`'s value of `tensor` on every rank (a new tensor)."""
    return broadcast_async(tensor, root_rank, name).wait()


def broadcast_(tensor: Tensor, root_rank: int, name: str | None = None) -> Tensor:
    """Overwrite `tensor` with its value on `root_rank`, in place, and return it."""
    return broadcast_async_(tensor, root_rank, name).wait()


def alltoall_async(
    tensor: Tensor, splits: Sequence[int] | Tensor | None = None, name: str | None = None
) -> Handle:
    """Start an alltoall: rows splits[i] go to rank i (default: dim 0 split evenly). See alltoall."""
    _check_tensor(tensor, "alltoall")
    st = _require()
    x = tensor.contiguous()
    if x.dim() == 0:
        raise ValueError("alltoall expects a tensor with at least one dimension, got a scalar")
    if splits is None:
        if x.shape[0] % st.size:
            raise ValueError(f"alltoall: dim 0 ({x.shape[0]}) is not divisible by size ({st.size}); "
                             "pass splits")
        send = [x.shape[0] // st.size] * st.size
    else:
        send = [int(s) for s in (splits.tolist() if isinstance(splits, Tensor) else splits)]
        if len(send) != st.size or any(s < 0 for s in send) or sum(send) != x.shape[0]:
            raise ValueError(f"alltoall: splits must be {st.size} non-negative ints summing to dim 0 "
                             f"({x.shape[0]}), got {send}")
    call = _Call("alltoall", name, _shape_text(x.shape, free_first=True), x.dtype)
    _begin(call)
    send_t = torch.tensor(send, dtype=torch.int64, device=x.device)
    recv_t = torch.empty(st.size, dtype=torch.int64, device=x.device)
    _guarded(call, lambda: dist.all_to_all_single(recv_t, send_t))
    recv = recv_t.tolist()
    out = torch.empty((sum(recv), *x.shape[1:]), dtype=x.dtype, device=x.device)
    work = _guarded(call, lambda: dist.all_to_all_single(out, x, recv, send, async_op=True))
    received = torch.tensor(recv, dtype=torch.int32)
    return Handle(call, [work], (lambda: out) if splits is None else (lambda: (out, received)))


def alltoall(
    tensor: Tensor, splits: Sequence[int] | Tensor | None = None, name: str | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """Send rows splits[i] of `tensor` (dim 0, in order) to rank i; concatenate what arrives in rank order.

    As in Horovod: returns the output tensor, or (output, received_splits) when `splits` is given.
    Raises ValueError when splits do not sum to dim 0 (or dim 0 is not divisible by size without splits).
    """
    return alltoall_async(tensor, splits, name).wait()


def _scatter_rows(rows: int, n: int) -> list[int]:
    """Horovod's split of dim 0 for reducescatter: as even as possible, the first ranks take extra rows."""
    return [rows // n + (1 if r < rows % n else 0) for r in range(n)]


def reducescatter_async(
    tensor: Tensor,
    name: str | None = None,
    compression: type[Compressor] = Compression.none,
    op: ReduceOp = ReduceOp.AVERAGE,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> Handle:
    """Start a reducescatter: reduce `tensor` over ranks; rank r keeps its block of rows."""
    _check_tensor(tensor, "reducescatter")
    st = _require()
    op = _resolve_op(op, None, "reducescatter")
    _check_scaling(tensor, op, prescale_factor, postscale_factor, "reducescatter")
    if tensor.dim() == 0:
        raise ValueError("reducescatter expects a tensor with at least one dimension, got a scalar")
    call = _Call("reducescatter", name, _shape_text(tensor.shape), None, tensor.numel(), op=op)
    x = tensor * prescale_factor if prescale_factor != 1.0 else tensor
    wire, ctx = compression.compress(x.contiguous())
    call.dtype = wire.dtype
    _begin(call)
    counts = _scatter_rows(wire.shape[0], st.size)
    most = counts[0]
    if any(c != most for c in counts):  # pad every block to `most` rows; the padding is dropped below
        blocks = list(torch.split(wire, counts))
        wire = torch.cat([torch.cat([b, b.new_zeros((most - b.shape[0], *b.shape[1:]))]) for b in blocks])
    out = torch.empty((most, *wire.shape[1:]), dtype=wire.dtype, device=wire.device)  # (most, *trailing)
    work = _guarded(call, lambda: _reduce_scatter_single(out, wire, op=_BACKEND_OPS[op], async_op=True))

    def finish() -> Tensor:
        result = compression.decompress(out[: counts[st.rank]], ctx)
        scale = postscale_factor / (st.size if op == ReduceOp.AVERAGE and result.is_floating_point() else 1)
        if op == ReduceOp.AVERAGE and not result.is_floating_point():
            result = torch.div(result, st.size, rounding_mode="trunc")
        return result * scale if scale != 1.0 else result.clone()

    return Handle(call, [work], finish)


def reducescatter(
    tensor: Tensor,
    name: str | None = None,
    compression: type[Compressor] = Compression.none,
    op: ReduceOp = ReduceOp.AVERAGE,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> Tensor:
    """Reduce `tensor` (same shape on every rank) and return this rank's block of dim 0.

    Dim 0 is split as evenly as possible, the first ranks taking one extra row, as Horovod does.
    """
    return reducescatter_async(tensor, name, compression, op, prescale_factor, postscale_factor).wait()


def barrier() -> None:
    """Block until every rank has reached the barrier."""
    st = _require()
    call = _Call("barrier", "barrier")
    _begin(call)
    if st.size > 1:
        _guarded(call, dist.barrier)


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None) -> Any:
    """Return `root_rank`'s picklable object on every rank."""
    st = _require()
    if not isinstance(root_rank, int) or not 0 <= root_rank < st.size:
        raise ValueError(f"broadcast_object: root_rank must be an int in [0, {st.size}), got {root_rank!r}")
    call = _Call("broadcast_object", name, root=root_rank)
    _begin(call)
    box = [obj]
    _guarded(call, lambda: dist.broadcast_object_list(box, src=root_rank, device=st.device))
    return box[0]


def allgather_object(obj: Any, name: str | None = None) -> list[Any]:
    """Return the list of every rank's picklable object, in rank order."""
    st = _require()
    call = _Call("allgather_object", name)
    _begin(call)
    out: list[Any] = [None] * st.size
    _guarded(call, lambda: dist.all_gather_object(out, obj))
    return out
