"""Horovod-style collectives over torch.distributed (gloo on CPU, NCCL on GPU), launched by torchrun.

Naming grid as in Horovod: `allreduce` returns a new tensor, `allreduce_` works in place, `allreduce_async`
and `allreduce_async_` return a `Handle` for `synchronize(handle)` / `poll(handle)`; the same for the other
collectives. Every collective takes `process_set=` (default `global_process_set`, see `process_sets`).

The collective check (on by default; `init(check=False)` or LMFORGE_CHECK_COLLECTIVES=0 turns it off) starts
every collective with one all-gather of a fixed-size signature (9 int64 per rank: kind, join state, dtype,
element count, row size, op, root, a CRC of the whole call, name and shape included, and whether the rank sent
its data already), except where the history of verified calls lets it be left out (below). It buys:
- safety: ranks that call different collectives, or the same one with different shapes, dtypes, ops, roots
  or names, all raise `CollectiveMismatchError` (a `HorovodInternalError`, as Horovod raises) naming each
  rank's call, instead of aborting in gloo, hanging or returning wrong data silently;
- `join()` with uneven inputs, as in Horovod: a rank that ran out of data calls `join()` and keeps answering
  the others' allreduces (contributing zeros; Average still divides by the full size) and barriers until every
  rank has joined; allgather, broadcast, alltoall and reducescatter raise on the other ranks meanwhile.
With the check off (`uneven_inputs=True` keeps the exchange for join), `join()` is a barrier.

What the check costs: one all-gather round trip per call, except where it is hidden or left out. Every rank
keeps the history of the global calls all ranks verified and predicts the next one from it (what followed the
last call the previous time, as a training step's gradient buckets repeat; else the last call again), so the
ranks agree on the prediction without talking.
- A floating-point Sum/Average allreduce predicted with confidence (the prediction made after the same call
  came true last time) runs no exchange at all: a rank whose call differs joins it with NaN in element 0
  (zeros elsewhere), and every rank looks at element 0 of the result; NaN there makes every rank confirm with
  an exchange, which raises CollectiveMismatchError on every rank for a deviant (group left usable), returns
  the result for a NaN in the data, and redoes element 0 when a rank joined meanwhile. Such an allreduce is
  checked before the next collective starts, so one of them is in flight at a time.
- Another predicted allreduce sends its data at once and checks the signatures while the data moves: a rank
  whose call differs does not speculate, sees the mismatch in the table, and joins the others' allreduce
  with zeros (discarded) before every rank raises, so the group stays usable.
An in-place tensor (`allreduce_`) holds undefined values after a mismatch.

dtypes the backend lacks (int16 on gloo and NCCL) travel promoted (reductions: int32) or reinterpreted
(data movement: the bits of a 16-bit float) and come back in their own dtype. Integer tensors accept
prescale/postscale factors, applied in float64 and truncated, as Horovod does.

Names: a name given to an async collective stays taken until its handle is synchronized (or dropped); a
second collective with the same name meanwhile raises ValueError, before any communication.

Failures: a peer that dies or stops answering makes the collective raise `CollectiveError` on the others,
at once when its connection closes, at the latest after the timeout (`init(timeout=...)`).
"""

from __future__ import annotations

import enum
import math
import time
import weakref
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lmforge.parallel.adasum import adasum_, is_power_of_two
from lmforge.parallel.process_sets import ProcessSet, global_process_set
from lmforge.parallel.runtime import CollectiveError, CollectiveMismatchError, _require


class ReduceOp(enum.Enum):
    """Reduction applied by allreduce, grouped_allreduce and reducescatter."""

    AVERAGE = "average"
    SUM = "sum"
    ADASUM = "adasum"
    MIN = "min"
    MAX = "max"
    PRODUCT = "product"


Average = ReduceOp.AVERAGE
Sum = ReduceOp.SUM
Adasum = ReduceOp.ADASUM
Min = ReduceOp.MIN
Max = ReduceOp.MAX
Product = ReduceOp.PRODUCT

_BACKEND_OPS = {
    ReduceOp.AVERAGE: dist.ReduceOp.SUM,  # scaled afterwards by 1 / size
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.MIN: dist.ReduceOp.MIN,
    ReduceOp.MAX: dist.ReduceOp.MAX,
    ReduceOp.PRODUCT: dist.ReduceOp.PRODUCT,
}
_OP_CODES = list(ReduceOp)
# torch 2.13 renamed the tensor-output all-gather / reduce-scatter; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# dtypes gloo and NCCL lack: promoted for reductions, reinterpreted (same bits) for data movement.
_REDUCE_AS = {torch.int16: torch.int32}
_MOVE_AS = {torch.int16: torch.float16}


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


# --- process sets as groups ---------------------------------------------------------------------------------


@dataclass
class _Group:
    """Where a collective runs: the process group (None: the default one) and its global ranks."""

    pg: Any
    ranks: list[int]
    index: int  # this rank's position in `ranks`
    is_global: bool

    @property
    def size(self) -> int:
        return len(self.ranks)


def _group(process_set: ProcessSet, what: str) -> _Group:
    st = _require()
    if not isinstance(process_set, ProcessSet):
        raise TypeError(f"{what}: process_set must be a ProcessSet, got {type(process_set).__name__}")
    if process_set is global_process_set:
        return _Group(None, list(range(st.size)), st.rank, True)
    if process_set.process_set_id is None:
        raise ValueError(f"{what}: {process_set} is not registered; call add_process_set on every rank first")
    if st.rank not in process_set.ranks:
        raise ValueError(f"{what}: rank {st.rank} is not in {process_set}")
    return _Group(process_set.group, process_set.ranks, process_set.ranks.index(st.rank), False)


# --- the collective check: signature exchange, mismatch errors, join ----------------------------------------

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
_JOINABLE = {"allreduce", "barrier"}  # what a joined rank keeps answering, as in Horovod
_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
]
_HEADER_LEN = 9  # kind, joined_at, wire dtype, numel, row_numel, op, root, signature, speculated
_SPECULATE_ON = 8  # the fields an allreduce's header must share with the predicted call to speculate
_HISTORY_LIMIT = 4096  # distinct calls remembered for prediction
# Predicted calls every rank may run without any exchange: floating-point Sum / Average allreduces, where a
# NaN in element 0 of the result tells every rank that some rank signalled a different call (_Unexchanged).
_ALLREDUCE = _KINDS.index("allreduce")
_NAN_CARRIERS = {_DTYPES.index(d) for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
_ADDITIVE = {_OP_CODES.index(ReduceOp.SUM), _OP_CODES.index(ReduceOp.AVERAGE)}


@dataclass
class _Call:
    """What one rank asks of a collective, as exchanged by the check and named in errors."""

    kind: str
    name: str | None = None
    shape: str = ""  # text; "*" stands for a dimension that may differ between ranks
    dtype: torch.dtype | None = None  # the caller's (after compression)
    numel: int = 0  # elements sent (allgather: rows)
    row_numel: int = 0  # allgather: elements per row
    op: ReduceOp | None = None
    root: int = -1
    wire: torch.dtype | None = None  # what the backend moves, when it differs from dtype

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
        wire = self.wire or self.dtype
        if wire is not None and wire not in _DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in _DTYPES)
            raise ValueError(f"{self.describe()}: lmforge.parallel supports the dtypes {names}, got {wire}")
        dtype = _DTYPES.index(wire) if wire is not None else -1
        op = _OP_CODES.index(self.op) if self.op is not None else -1
        signature = zlib.crc32(self.describe().encode())
        kind = _KINDS.index(self.kind)
        return [kind, joined_at, dtype, self.numel, self.row_numel, op, self.root, signature]


@dataclass
class _Peers:
    """The signature exchange's answer: per rank (kind, joined_at, dtype, numel, row_numel, op, root, sig,
    speculated)."""

    rows: list[list[int]]
    signalled: tuple[int, ...] | None = None  # the prediction this rank signalled a deviation from (NaN)

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


class _Exchange:
    """One posted signature exchange (an all-gather of every rank's header); `settle()` waits for it once,
    checks the table and raises CollectiveMismatchError on every rank if the active ranks disagree."""

    def __init__(self, call: _Call, group: _Group, joined_at: int = -1, speculated: bool = False):
        st = _require()
        self.call, self.group, self.joined_at, self.speculated = call, group, joined_at, speculated
        # An all-gather as a sum of rows that are zero but this rank's: gloo starts an all-reduce in the
        # background at once, where its all-gather holds the caller for the whole exchange.
        self.table = torch.zeros(group.size, _HEADER_LEN, dtype=torch.int64)
        self.table[group.index] = torch.tensor(call.header(joined_at) + [int(speculated)])
        self.table = self.table.to(st.device)
        st.exchanges += 1
        self.work = _guarded(call, lambda: dist.all_reduce(self.table, group=group.pg, async_op=True))
        self.data_work: Any = None  # this rank's speculative data collective, posted before the table arrived
        self.peers: _Peers | None = None
        self.error: Exception | None = None

    def settle(self) -> _Peers:
        if self.error is not None:
            raise self.error
        if self.peers is not None:
            return self.peers
        st, call, group = _require(), self.call, self.group
        if st.pending is self:
            st.pending = None
        _guarded(call, self.work.wait)
        st.calls += 1
        rows = self.table.cpu().tolist()
        peers = _Peers(rows)
        agree = len({(rows[r][0], rows[r][7]) for r in peers.active}) <= 1
        if group.is_global:  # the history speculation predicts from (every rank sees the same table)
            _remember(rows)
        if not agree:
            try:
                self._drain(rows)
                _raise_mismatch(call, group, self.joined_at,
                                "the ranks called different collectives or passed different tensors")
            except Exception as err:
                self.error = err
                raise
        self.peers = peers
        return peers

    def _drain(self, rows: list[list[int]]) -> None:
        """After a mismatch, complete the speculating ranks' allreduce (with zeros from the others, the result
        is discarded) so the process group stays in step and usable."""
        speculating = [r for r, row in enumerate(rows) if row[_HEADER_LEN - 1]]
        if speculating and not self.speculated:
            _, _, dtype_code, numel, _, op_code, _, _, _ = rows[speculating[0]]
            buf = torch.zeros(numel, dtype=_DTYPES[dtype_code], device=_require().device)
            backend_op = _BACKEND_OPS[_OP_CODES[op_code]]
            _guarded(self.call, lambda: dist.all_reduce(buf, op=backend_op, group=self.group.pg))
        if self.data_work is not None:
            _guarded(self.call, self.data_work.wait)


class _Unexchanged:
    """A predicted allreduce that every rank runs without a signature exchange (see `_predicted`).

    A rank whose call differs from the prediction knows it: it takes part in the others' allreduce with NaN in
    element 0 and zeros elsewhere (`_signal_deviation`), then exchanges its own signature. IEEE addition
    carries the NaN into element 0 of the sum, which the backend hands to every rank alike, so `settle()`
    looks at that one element: a number there proves that every rank made the predicted call; NaN makes every
    rank confirm with an exchange, which raises CollectiveMismatchError on every rank for a deviant, returns
    the result as it is for a NaN in the data, and recomputes element 0 alone when ranks joined meanwhile
    (they contributed zeros elsewhere, which is what a joined rank contributes anyway).
    """

    def __init__(self, call: _Call, group: _Group, sent: Tensor, header: tuple[int, ...]):
        self.call, self.group, self.sent, self.header = call, group, sent, header
        self.first = sent[:1].clone()  # element 0 as this rank sends it, for the recomputation after a join
        self.data_work: Any = None
        self.settled = False
        self.error: Exception | None = None

    def settle(self) -> None:
        if self.error is not None:
            raise self.error
        if self.settled:
            return
        st = _require()
        if st.pending is self:
            st.pending = None
        self.settled = True
        try:
            if self.data_work is None:  # posting the data failed (and raised) on this rank
                raise CollectiveError(f"rank {st.rank}: {self.call.describe()} was never sent")
            _guarded(self.call, self.data_work.wait)
            if not torch.isnan(self.sent[0]):
                st.calls += 1
                _extend(self.header)
                return
            peers = _Exchange(self.call, self.group).settle()  # raises on every rank if a rank deviated
            if peers.joined:
                _guarded(self.call, lambda: dist.all_reduce(self.first))
                self.sent[:1].copy_(self.first)
        except Exception as err:
            self.error = err
            raise


def _remember(rows: list[list[int]]) -> None:
    """Extend the verified history with the call of a settled global exchange, if every rank agreed on it."""
    headers = {tuple(row[:_SPECULATE_ON]) for row in rows}
    _extend(headers.pop() if len(headers) == 1 else None)


def _extend(header: tuple[int, ...] | None) -> None:
    """Append a global call every rank made to the verified history (None, for a mismatch or a joined rank,
    ends it), and record whether the prediction made for it came true.

    The history is common knowledge (every rank settles the same calls in the same order), so the prediction
    `_predicted()` makes from it, and its confidence, are the same on every rank.
    """
    st = _require()
    if header is None:
        st.last = None
        return
    if st.last is not None:
        came_true = _predicted()[0] == header
        if len(st.successor) >= _HISTORY_LIMIT and st.last not in st.successor:
            st.successor.clear()
            st.confident.clear()
        st.successor[st.last] = header
        if came_true:
            st.confident.add(st.last)
        else:
            st.confident.discard(st.last)
    st.last = header


def _predicted() -> tuple[tuple[int, ...] | None, bool]:
    """The next global call as the verified history predicts it, and whether it runs without an exchange.

    The prediction: what followed the last call the previous time it was made (a training step's bucket
    sequence repeats), else the last call again. It runs unexchanged when the prediction made after the same
    last call came true the previous time and the call is a floating-point Sum or Average allreduce of at
    least one element (a NaN in element 0 can signal through it).
    """
    st = _require()
    if st.last is None:
        return None, False
    predicted = st.successor.get(st.last, st.last)
    kind, _, dtype, numel, _, op, _, _ = predicted
    unexchanged = (st.last in st.confident and kind == _ALLREDUCE and dtype in _NAN_CARRIERS
                   and op in _ADDITIVE and numel >= 1)
    return predicted, unexchanged


def _settle_pending() -> None:
    """Check the last speculative allreduce before anything else is posted: every rank then decides on the
    next speculation from the same verified call."""
    pending = _require().pending
    if pending is not None:
        pending.settle()


def _signal_deviation(call: _Call, joined_at: int) -> tuple[int, ...] | None:
    """If every rank expects the predicted call without an exchange and this call is another, join their
    allreduce with NaN in element 0 (zeros elsewhere): every rank then confirms with an exchange, this one's
    next step (see `_Unexchanged`). Returns the prediction signalled against, else None."""
    predicted, unexchanged = _predicted()
    if predicted is None or not unexchanged or tuple(call.header(joined_at)[:_SPECULATE_ON]) == predicted:
        return None
    _, _, dtype, numel, _, _, _, _ = predicted
    signal = torch.zeros(numel, dtype=_DTYPES[dtype], device=_require().device)
    signal[0] = math.nan
    _guarded(call, lambda: dist.all_reduce(signal))
    return predicted


def _exchange(call: _Call, group: _Group, joined_at: int = -1) -> _Peers:
    """All-gather every rank's signature for this call; raise if the active ranks disagree."""
    _settle_pending()
    signalled = _signal_deviation(call, joined_at) if group.is_global else None
    peers = _Exchange(call, group, joined_at).settle()
    peers.signalled = signalled
    return peers


def _speculative(call: _Call, group: _Group, sent: Tensor) -> _Exchange | _Unexchanged | None:
    """Start checking this allreduce so that its data (`sent`) may go at once, when the prediction allows.

    Safe when this call's header equals the prediction every rank made from the same verified history
    (`_predicted`). Unexchanged when the prediction is confident (see `_Unexchanged`); else the exchange is
    posted without waiting for it: the ranks that speculate all send the same tensor size, dtype and op; a
    rank whose call differs waits for the table as usual, sees the mismatch, and drains the others' allreduce
    before every rank raises.
    """
    st = _require()
    if not (st.coordinate and group.is_global and group.size > 1 and call.op != ReduceOp.ADASUM):
        return None
    _settle_pending()
    predicted, unexchanged = _predicted()
    header = tuple(call.header(-1)[:_SPECULATE_ON])
    if header != predicted:
        return None
    st.pending = _Unexchanged(call, group, sent, header) if unexchanged else _Exchange(call, group,
                                                                                         speculated=True)
    return st.pending


def _raise_mismatch(call: _Call, group: _Group, joined_at: int, reason: str) -> None:
    """Every rank sees the same table, so every rank gets here: swap descriptions and raise the same error."""
    st = _require()
    mine = "join()" if joined_at >= 0 else call.describe()
    calls: list[Any] = [None] * group.size
    _guarded(call, lambda: dist.all_gather_object(calls, mine, group=group.pg))
    by_call: dict[str, list[int]] = {}
    for index, text in enumerate(calls):
        by_call.setdefault(text, []).append(group.ranks[index])
    lines = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} called {text}"
                      for text, rs in by_call.items())
    raise CollectiveMismatchError(
        f"collective mismatch at checked call #{st.calls} (seen by rank {st.rank}): {reason}: {lines}"
    )


def _begin(call: _Call, group: _Group) -> _Peers | None:
    """Start a collective: with the check on, exchange signatures (and refuse what joined ranks cannot do)."""
    st = _require()
    if not st.coordinate or group.size == 1:
        return None
    peers = _exchange(call, group)
    if group.is_global and peers.joined:
        if call.kind not in _JOINABLE or call.op == ReduceOp.ADASUM:
            raise CollectiveError(
                f"rank {st.rank}: {call.describe()} cannot run while rank(s) {peers.joined} have called "
                "join(); joined ranks answer only allreduce (not Adasum) and barrier, as in Horovod"
            )
    return peers


def _identity(op: ReduceOp, dtype: torch.dtype) -> float | int | bool:
    """What a joined rank contributes: zeros for Sum and Average (as Horovod), else the op's neutral value."""
    if op in (ReduceOp.SUM, ReduceOp.AVERAGE):
        return 0
    if op == ReduceOp.PRODUCT:
        return 1
    if dtype == torch.bool:
        return op == ReduceOp.MIN
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    return info.max if op == ReduceOp.MIN else info.min


def _answer(peers: _Peers) -> None:
    """A joined rank takes part in the active ranks' allreduce or barrier; anything else they refuse."""
    st = _require()
    active = peers.rows[peers.active[0]]
    kind, _, dtype_code, numel, _, op_code, _, _, _ = active
    if peers.signalled is not None and tuple(active[:_SPECULATE_ON]) == peers.signalled:
        numel = 1  # they ran it unexchanged with this rank's NaN signal: only element 0 is redone
    call = _Call("join", name="join")
    if kind == _KINDS.index("allreduce") and _OP_CODES[op_code] != ReduceOp.ADASUM:
        op, dtype = _OP_CODES[op_code], _DTYPES[dtype_code]
        buf = torch.full((numel,), _identity(op, dtype), dtype=dtype, device=st.device)
        _guarded(call, lambda: dist.all_reduce(buf, op=_BACKEND_OPS[op]))
    elif kind == _KINDS.index("barrier"):
        _guarded(call, dist.barrier)


def join(device: int = -1) -> int:
    """Declare that this rank has no more data; return the rank that joined last once every rank has joined.

    With the check on (the default) or uneven_inputs, this rank meanwhile answers the others' allreduces
    (contributing zeros; Average divides by the full size, as in Horovod) and barriers; their allgathers,
    broadcasts, alltoalls and reducescatters raise CollectiveError. With both off, join() is a barrier.
    `device` is accepted for Horovod compatibility and ignored.
    """
    st = _require()
    if st.size == 1:
        return 0
    call = _Call("join", name="join")
    group = _group(global_process_set, "join")
    if not st.coordinate:
        arrived = torch.tensor([time.time()], dtype=torch.float64, device=st.device)
        times = torch.empty(st.size, dtype=torch.float64, device=st.device)
        _guarded(call, lambda: _all_gather_single(times, arrived))
        return int(times.argmax())
    _settle_pending()
    joined_at = st.calls
    while True:
        peers = _exchange(call, group, joined_at)
        if not peers.active:
            # Last to join: the largest joined_at (ties broken by the highest rank).
            return max(range(st.size), key=lambda r: (peers.rows[r][1], r))
        _answer(peers)


# --- async handles and names in flight ----------------------------------------------------------------------


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
        """Block until done and return the result (the same object on later calls). Its name, if it had one,
        is free again once this returns or raises."""
        if not self._done:
            try:
                for work in self._works:
                    _guarded(self._call, work.wait)
                self._result = self._finish()
            finally:
                for name in [k for k, v in _in_flight.items() if v is self]:
                    del _in_flight[name]
            self._done = True
            self._works = []
        return self._result

    def __call__(self) -> Any:
        """Same as wait(): Horovod's sparse_allreduce_async returns a function to call."""
        return self.wait()


class _GroupHandle(Handle):
    """Several handles finished together; the result is `result(...)` once all of them are done."""

    def __init__(self, handles: list[Handle], result: Callable[[], Any]):
        def finish() -> Any:
            for h in handles:
                h.wait()
            return result()

        super().__init__(handles[0]._call if handles else _Call("allreduce"), [], finish)
        self._handles = handles

    def poll(self) -> bool:
        return self._done or all(h.poll() for h in self._handles)


_in_flight: weakref.WeakValueDictionary[str, Handle] = weakref.WeakValueDictionary()


def _check_name(name: str | None, what: str) -> None:
    """Horovod's rule: a name may not be reused while a collective with that name is in flight."""
    if name is None:
        return
    if not isinstance(name, str):
        raise TypeError(f"{what}: name must be a str or None, got {type(name).__name__}")
    held = _in_flight.get(name)
    if held is not None and not held._done:
        raise ValueError(f"{what}: a collective named {name!r} is still in flight (not synchronized); "
                         "names of concurrent collectives must differ")


def _named(handle: Handle, name: str | None) -> Handle:
    if name is not None:
        _in_flight[name] = handle
    return handle


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
        raise ValueError(f"{what} does not support sparse tensors; pass tensor.to_dense() "
                         "(or use sparse_allreduce_async)")


def _resolve_op(op: ReduceOp | None, average: bool | None, what: str) -> ReduceOp:
    if op is not None and average is not None:
        raise ValueError(f"{what}: pass either op or the deprecated average flag, not both")
    if op is None:
        return ReduceOp.SUM if average is False else ReduceOp.AVERAGE
    if not isinstance(op, ReduceOp):
        raise ValueError(f"{what}: op must be one of Average, Sum, Adasum, Min, Max, Product; got {op!r}")
    return op


def _check_op(tensor: Tensor, op: ReduceOp, group: _Group, what: str) -> None:
    if tensor.dtype == torch.bool and op in (ReduceOp.AVERAGE, ReduceOp.ADASUM):
        raise ValueError(f"{what}: op={op.value} is undefined for bool tensors; use Min, Max or Sum")
    if op == ReduceOp.ADASUM:
        if not tensor.is_floating_point():
            raise ValueError(f"{what}: Adasum needs a floating-point tensor, got {tensor.dtype}")
        if not group.is_global:
            raise NotImplementedError("Adasum does not support non-global process sets yet.")
        if not is_power_of_two(group.size):
            raise NotImplementedError("Running Adasum with non-power of 2 ranks is not supported yet.")


def _scale_(buffer: Tensor, factor: float) -> Tensor:
    """buffer *= factor in place; integer tensors are scaled in float64 and truncated, as Horovod does."""
    if factor == 1.0:
        return buffer
    if buffer.is_floating_point() or buffer.is_complex():
        return buffer.mul_(factor)
    if buffer.dtype == torch.bool:
        raise ValueError("prescale/postscale factors are undefined for bool tensors")
    return buffer.copy_(buffer.double().mul_(factor).trunc_())


def _allreduce_flat(
    buffer: Tensor,
    out: Tensor,
    op: ReduceOp,
    prescale: float,
    postscale: float,
    compression: type[Compressor],
    call: _Call,
    group: _Group,
    segments: list[int] | None = None,
) -> Handle:
    """Allreduce `buffer` and leave the scaled result in `out`, asynchronously.

    `buffer` is contiguous and ours to overwrite: `out` itself, or a private copy of it. segments: the
    lengths of the tensors laid end to end in it, which Adasum combines each on its own.
    """
    _scale_(buffer, prescale)
    wire, ctx = compression.compress(buffer)
    call.dtype = wire.dtype
    promoted = _REDUCE_AS.get(wire.dtype)
    if promoted is not None:
        call.wire = promoted
    sent = wire if promoted is None else wire.to(promoted)
    exchange = _speculative(call, group, sent)
    if exchange is None:
        _begin(call, group)
    if op == ReduceOp.ADASUM:  # blocking, so overlapping async calls never interleave its messages
        _guarded(call, lambda: adasum_(sent, _require().rank, group.size, segments))
        works = []
    else:
        works = [_guarded(call, lambda: dist.all_reduce(sent, op=_BACKEND_OPS[op], group=group.pg,
                                                       async_op=True))]
    if exchange is not None:
        exchange.data_work = works[0]

    def finish() -> Tensor:
        if exchange is not None:
            exchange.settle()  # raises CollectiveMismatchError if another rank called something else
        result = compression.decompress(sent if promoted is None else wire.copy_(sent), ctx)
        scale = postscale / group.size if op == ReduceOp.AVERAGE else postscale
        _scale_(result, scale)  # `result` is a buffer of ours, never the caller's input
        if result.data_ptr() != out.data_ptr():  # else `result` is `out`'s own memory, seen flat
            out.copy_(result.view(out.shape))
        return out

    return Handle(call, works, finish)


def allreduce_async_(
    tensor: Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: ProcessSet = global_process_set,
    compression: type[Compressor] = Compression.none,
) -> Handle:
    """Start an in-place allreduce of `tensor`; synchronize(handle) returns `tensor` holding the result.

    op: Average (default), Sum, Adasum, Min, Max or Product; the result is post * reduce(pre * tensor).
    Integer tensors are scaled (and averaged) in float64 and truncated. Raises ValueError for a name in flight
    or an op the dtype cannot take, NotImplementedError for Adasum over a non-power-of-two number of ranks.
    """
    _check_tensor(tensor, "allreduce")
    _check_name(name, "allreduce")
    op = _resolve_op(op, average, "allreduce")
    group = _group(process_set, "allreduce")
    _check_op(tensor, op, group, "allreduce")
    call = _Call("allreduce", name, _shape_text(tensor.shape), tensor.dtype, tensor.numel(), op=op)
    target = tensor.detach()  # same storage; in-place writes bypass autograd, as Horovod's do
    buffer = target if target.is_contiguous() else target.contiguous()
    inner = _allreduce_flat(buffer.view(-1), target, op, prescale_factor, postscale_factor, compression,
                            call, group)
    return _named(_GroupHandle([inner], lambda: tensor), name)


def allreduce_async(
    tensor: Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: ProcessSet = global_process_set,
    compression: type[Compressor] = Compression.none,
) -> Handle:
    """Start an allreduce of `tensor` into a new tensor (see allreduce_async_); `tensor` is left unchanged."""
    _check_tensor(tensor, "allreduce")
    return allreduce_async_(tensor.detach().clone(memory_format=torch.contiguous_format), average, name, op,
                            prescale_factor, postscale_factor, process_set, compression)


def allreduce(
    tensor: Tensor,
    average: bool | None = None,
    name: str | None = None,
    compression: type[Compressor] = Compression.none,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: ProcessSet = global_process_set,
) -> Tensor:
    """Return the reduction of `tensor` over the ranks (same shape and dtype); `tensor` is left unchanged.

    Differentiable for Sum and Average: the gradient is the same reduction of the output gradients (Horovod's
    rule, which is autograd's for the sum of every rank's loss); Adasum, Min, Max and Product carry none.
    """
    op = _resolve_op(op, average, "allreduce")
    if isinstance(tensor, Tensor) and tensor.requires_grad and op in (Sum, Average) and torch.is_grad_enabled():
        return _AllreduceGrad.apply(tensor, name, op, prescale_factor, postscale_factor, process_set,
                                    compression)
    return allreduce_async(tensor, None, name, op, prescale_factor, postscale_factor, process_set,
                           compression).wait()


def allreduce_(
    tensor: Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: ProcessSet = global_process_set,
    compression: type[Compressor] = Compression.none,
) -> Tensor:
    """Reduce `tensor` over the ranks in place and return it."""
    return allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set,
                            compression).wait()


def _tensor_list(tensors: Any, what: str) -> list[Tensor]:
    if isinstance(tensors, Tensor) or not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError(f"{what} expects a list of torch.Tensor")
    tensors = list(tensors)
    for t in tensors:
        _check_tensor(t, what)
    return tensors


def grouped_allreduce_async_(
    tensors: Sequence[Tensor],
    average: bool | None = None,
    name: str | None = None,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: ProcessSet = global_process_set,
    compression: type[Compressor] = Compression.none,
) -> Handle:
    """Start one fused allreduce per dtype over `tensors`, in place; synchronize returns the list.

    Adasum combines each tensor on its own (its own dot products, as Horovod's fused Adasum) in one fused
    Adasum per dtype.
    """
    tensors = _tensor_list(tensors, "grouped_allreduce")
    _check_name(name, "grouped_allreduce")
    op = _resolve_op(op, average, "grouped_allreduce")
    group = _group(process_set, "grouped_allreduce")
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        _check_op(t, op, group, "grouped_allreduce")
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    handles = []
    for key, members in by_dtype.items():
        flat = torch.cat([t.detach().reshape(-1) for t in members])  # (sum of numels,)
        shape = "[" + ", ".join(_shape_text(t.shape) for t in members) + "]"
        call = _Call("allreduce", name, shape, key[0], flat.numel(), op=op)
        inner = _allreduce_flat(flat, flat, op, prescale_factor, postscale_factor, compression, call, group,
                                [t.numel() for t in members])

        def unflatten(inner: Handle = inner, members: list[Tensor] = members) -> None:
            flat = inner.wait()
            offset = 0
            for t in members:
                t.detach().copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()

        handles.append(Handle(call, [], unflatten))
    return _named(_GroupHandle(handles, lambda: tensors), name)


def grouped_allreduce_async(
    tensors: Sequence[Tensor],
    average: bool | None = None,
    name: str | None = None,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: ProcessSet = global_process_set,
    compression: type[Compressor] = Compression.none,
) -> Handle:
    """Like grouped_allreduce_async_ on copies; the input tensors are left unchanged."""
    tensors = _tensor_list(tensors, "grouped_allreduce")
    copies = [t.detach().clone(memory_format=torch.contiguous_format) for t in tensors]
    return grouped_allreduce_async_(copies, average, name, op, prescale_factor, postscale_factor, process_set,
                                    compression)


def grouped_allreduce(
    tensors: Sequence[Tensor],
    average: bool | None = None,
    name: str | None = None,
    compression: type[Compressor] = Compression.none,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: ProcessSet = global_process_set,
) -> list[Tensor]:
    """Reduce every tensor of the list (one fused collective per dtype); return new tensors.

    Differentiable for Sum and Average, like allreduce.
    """
    tensors = _tensor_list(tensors, "grouped_allreduce")
    op = _resolve_op(op, average, "grouped_allreduce")
    if any(t.requires_grad for t in tensors) and op in (Sum, Average) and torch.is_grad_enabled():
        return list(_GroupedAllreduceGrad.apply(name, op, prescale_factor, postscale_factor, process_set,
                                                compression, *tensors))
    return grouped_allreduce_async(tensors, None, name, op, prescale_factor, postscale_factor, process_set,
                                   compression).wait()


def grouped_allreduce_(
    tensors: Sequence[Tensor],
    average: bool | None = None,
    name: str | None = None,
    op: ReduceOp | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: ProcessSet = global_process_set,
    compression: type[Compressor] = Compression.none,
) -> list[Tensor]:
    """Reduce every tensor of the list in place (one fused collective per dtype) and return the list."""
    return grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor, process_set,
                                    compression).wait()


def sparse_allreduce_async(
    tensor: Tensor, name: str | None, op: ReduceOp, process_set: ProcessSet = global_process_set
) -> Handle:
    """Reduce a sparse COO tensor by allgathering its indices and values (Horovod's method).

    The result (from `handle()` or synchronize) is a sparse tensor holding every rank's entries (duplicates
    uncoalesced, so their sum is the Sum); Average divides the values by the set's size. Only Sum and Average.
    """
    if not isinstance(tensor, Tensor) or not tensor.is_sparse:
        raise TypeError("sparse_allreduce_async expects a sparse COO torch.Tensor")
    if op not in (Sum, Average):
        raise ValueError(f"sparse_allreduce_async: op must be Sum or Average, got {op!r}")
    _check_name(name, "sparse_allreduce_async")
    group = _group(process_set, "sparse_allreduce_async")
    t = tensor.coalesce() if not tensor.is_coalesced() else tensor
    prefix = "sparse" if name is None else name
    values = allgather_async(t.values(), f"{prefix}.values", process_set)
    indices = allgather_async(t.indices().t().contiguous(), f"{prefix}.indices", process_set)  # (nnz, ndim)

    def finish() -> Tensor:
        v = values.wait()
        v = v / group.size if op == Average else v
        return torch.sparse_coo_tensor(indices.wait().t(), v, t.shape)

    return _named(_GroupHandle([values, indices], finish), name)


# --- allgather ----------------------------------------------------------------------------------------------


def _moved(x: Tensor) -> Tensor:
    """The tensor the backend moves: `x`, or its bits as a dtype the backend has."""
    alias = _MOVE_AS.get(x.dtype)
    return x if alias is None else x.view(alias)


def _allgather_start(tensor: Tensor, name: str | None, group: _Group) -> tuple[Handle, list[int]]:
    """Start an allgather; return its handle and every rank's number of rows."""
    st = _require()
    x = tensor.detach()
    x = x.reshape(1) if x.dim() == 0 else x.contiguous()  # (rows, *trailing)
    row_numel = math.prod(x.shape[1:])
    call = _Call("allgather", name, _shape_text(x.shape, free_first=True), x.dtype, x.shape[0], row_numel)
    peers = _begin(call, group)
    if peers is not None:
        rows = [row[3] for row in peers.rows]
    else:
        mine = torch.tensor([x.shape[0]], dtype=torch.int64, device=st.device)
        sizes = torch.empty(group.size, dtype=torch.int64, device=st.device)
        _guarded(call, lambda: _all_gather_single(sizes, mine, group=group.pg))
        rows = sizes.tolist()
    most = max(rows)
    if x.shape[0] < most:
        pad = torch.zeros((most - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        x = torch.cat([x, pad])
    out = torch.empty((group.size * most, *x.shape[1:]), dtype=x.dtype, device=x.device)  # (N*most, ...)
    work = _guarded(call, lambda: _all_gather_single(_moved(out), _moved(x), group=group.pg, async_op=True))

    def finish() -> Tensor:
        if all(n == most for n in rows):
            return out
        return torch.cat([out[r * most: r * most + n] for r, n in enumerate(rows)])

    return Handle(call, [work], finish), rows


def allgather_async(tensor: Tensor, name: str | None = None,
                    process_set: ProcessSet = global_process_set) -> Handle:
    """Start an allgather along dim 0; the first dimension may differ between ranks (the others must not)."""
    _check_tensor(tensor, "allgather")
    _check_name(name, "allgather")
    return _named(_allgather_start(tensor, name, _group(process_set, "allgather"))[0], name)


def allgather(tensor: Tensor, name: str | None = None, process_set: ProcessSet = global_process_set) -> Tensor:
    """Concatenate every rank's tensor along dim 0, in rank order (first dimensions may differ).

    A scalar counts as one row. Differentiable with Horovod's rule: a rank's input gradient is its rows of the
    average over ranks of the output gradients (autograd's gradient of the mean of the ranks' losses).
    """
    if isinstance(tensor, Tensor) and tensor.requires_grad and torch.is_grad_enabled():
        return _AllgatherGrad.apply(tensor, name, process_set)
    return allgather_async(tensor, name, process_set).wait()


def grouped_allgather_async(tensors: Sequence[Tensor], name: str | None = None,
                            process_set: ProcessSet = global_process_set) -> Handle:
    """Start one allgather per tensor; synchronize returns the list of gathered tensors."""
    tensors = _tensor_list(tensors, "grouped_allgather")
    _check_name(name, "grouped_allgather")
    group = _group(process_set, "grouped_allgather")
    handles = [_allgather_start(t, None if name is None else f"{name}.{i}", group)[0]
               for i, t in enumerate(tensors)]
    return _named(_GroupHandle(handles, lambda: [h.wait() for h in handles]), name)


def grouped_allgather(tensors: Sequence[Tensor], name: str | None = None,
                      process_set: ProcessSet = global_process_set) -> list[Tensor]:
    """allgather of every tensor of the list; differentiable like allgather."""
    tensors = _tensor_list(tensors, "grouped_allgather")
    if any(t.requires_grad for t in tensors) and torch.is_grad_enabled():
        return list(_GroupedAllgatherGrad.apply(name, process_set, *tensors))
    return grouped_allgather_async(tensors, name, process_set).wait()


# --- broadcast ----------------------------------------------------------------------------------------------


def broadcast_async_(tensor: Tensor, root_rank: int, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> Handle:
    """Start overwriting `tensor` on every rank with its value on `root_rank` (a global rank, in the set)."""
    _check_tensor(tensor, "broadcast")
    _check_name(name, "broadcast")
    group = _group(process_set, "broadcast")
    if not isinstance(root_rank, int) or root_rank not in group.ranks:
        raise ValueError(f"broadcast: root_rank must be one of the ranks {group.ranks}, got {root_rank!r}")
    call = _Call("broadcast", name, _shape_text(tensor.shape), tensor.dtype, tensor.numel(), root=root_rank)
    _begin(call, group)
    target = tensor.detach()  # same storage; in-place writes bypass autograd, as Horovod's do
    buffer = target if target.is_contiguous() else target.contiguous()
    work = _guarded(call, lambda: dist.broadcast(_moved(buffer), src=root_rank, group=group.pg, async_op=True))

    def finish() -> Tensor:
        if buffer is not target:
            target.copy_(buffer)
        return tensor

    return _named(Handle(call, [work], finish), name)


def broadcast_async(tensor: Tensor, root_rank: int, name: str | None = None,
                    process_set: ProcessSet = global_process_set) -> Handle:
    """Start a broadcast into a new tensor; `tensor` is left unchanged."""
    _check_tensor(tensor, "broadcast")
    return broadcast_async_(tensor.detach().clone(memory_format=torch.contiguous_format), root_rank, name,
                            process_set)


def broadcast(tensor: Tensor, root_rank: int, name: str | None = None,
              process_set: ProcessSet = global_process_set) -> Tensor:
    """Return `root_rank`'s value of `tensor` on every rank (a new tensor).

    Differentiable with Horovod's rule: the root's gradient is the average over ranks of the output gradients,
    the other ranks' is zero.
    """
    if isinstance(tensor, Tensor) and tensor.requires_grad and torch.is_grad_enabled():
        return _BroadcastGrad.apply(tensor, root_rank, name, process_set)
    return broadcast_async(tensor, root_rank, name, process_set).wait()


def broadcast_(tensor: Tensor, root_rank: int, name: str | None = None,
               process_set: ProcessSet = global_process_set) -> Tensor:
    """Overwrite `tensor` with its value on `root_rank`, in place, and return it."""
    return broadcast_async_(tensor, root_rank, name, process_set).wait()


# --- alltoall -----------------------------------------------------------------------------------------------


def alltoall_async(tensor: Tensor, splits: Sequence[int] | Tensor | None = None, name: str | None = None,
                   process_set: ProcessSet = global_process_set) -> Handle:
    """Start an alltoall: rows splits[i] go to the set's i-th rank (default: dim 0 split evenly)."""
    _check_tensor(tensor, "alltoall")
    _check_name(name, "alltoall")
    group = _group(process_set, "alltoall")
    x = tensor.detach().contiguous()
    if x.dim() == 0:
        raise ValueError("alltoall expects a tensor with at least one dimension, got a scalar")
    if splits is None:
        if x.shape[0] % group.size:
            raise ValueError(f"alltoall: dim 0 ({x.shape[0]}) is not divisible by the number of ranks "
                             f"({group.size}); pass splits")
        send = [x.shape[0] // group.size] * group.size
    else:
        send = [int(s) for s in (splits.tolist() if isinstance(splits, Tensor) else splits)]
        if len(send) != group.size or any(s < 0 for s in send) or sum(send) != x.shape[0]:
            raise ValueError(f"alltoall: splits must be {group.size} non-negative ints summing to dim 0 "
                             f"({x.shape[0]}), got {send}")
    call = _Call("alltoall", name, _shape_text(x.shape, free_first=True), x.dtype)
    _begin(call, group)
    send_t = torch.tensor(send, dtype=torch.int64, device=x.device)
    recv_t = torch.empty(group.size, dtype=torch.int64, device=x.device)
    _guarded(call, lambda: dist.all_to_all_single(recv_t, send_t, group=group.pg))
    recv = recv_t.tolist()
    out = torch.empty((sum(recv), *x.shape[1:]), dtype=x.dtype, device=x.device)
    work = _guarded(call, lambda: dist.all_to_all_single(_moved(out), _moved(x), recv, send, group=group.pg,
                                                         async_op=True))
    received = torch.tensor(recv, dtype=torch.int32)
    return _named(Handle(call, [work], (lambda: out) if splits is None else (lambda: (out, received))), name)


def alltoall(tensor: Tensor, splits: Sequence[int] | Tensor | None = None, name: str | None = None,
             process_set: ProcessSet = global_process_set) -> Tensor | tuple[Tensor, Tensor]:
    """Send rows splits[i] of `tensor` (dim 0, in order) to rank i; concatenate what arrives in rank order.

    As in Horovod: returns the output tensor, or (output, received_splits) when `splits` is given.
    Differentiable: the gradient is the alltoall of the output gradient back along the received splits.
    Raises ValueError when splits do not sum to dim 0 (or dim 0 is not divisible by size without splits).
    """
    if isinstance(tensor, Tensor) and tensor.requires_grad and torch.is_grad_enabled():
        out, received = _AlltoallGrad.apply(tensor, splits, name, process_set)
        return out if splits is None else (out, received)
    return alltoall_async(tensor, splits, name, process_set).wait()


# --- reducescatter ------------------------------------------------------------------------------------------


def _scatter_rows(rows: int, n: int) -> list[int]:
    """Horovod's split of dim 0 for reducescatter: as even as possible, the first ranks take extra rows."""
    return [rows // n + (1 if r < rows % n else 0) for r in range(n)]


def _reducescatter_start(tensor: Tensor, name: str | None, compression: type[Compressor], op: ReduceOp,
                         prescale: float, postscale: float, group: _Group) -> Handle:
    if tensor.dim() == 0:
        raise ValueError("reducescatter expects a tensor with at least one dimension, got a scalar")
    if op == ReduceOp.ADASUM:
        raise ValueError("reducescatter: op must be Average, Sum, Min, Max or Product, got Adasum")
    _check_op(tensor, op, group, "reducescatter")
    call = _Call("reducescatter", name, _shape_text(tensor.shape), None, tensor.numel(), op=op)
    x = _scale_(tensor.detach().clone(memory_format=torch.contiguous_format), prescale)
    wire, ctx = compression.compress(x)
    call.dtype = wire.dtype
    promoted = _REDUCE_AS.get(wire.dtype)
    call.wire = promoted
    _begin(call, group)
    sent = wire if promoted is None else wire.to(promoted)
    counts = _scatter_rows(sent.shape[0], group.size)
    most = counts[0]
    if any(c != most for c in counts):  # pad every block to `most` rows; the padding is dropped below
        blocks = list(torch.split(sent, counts))
        sent = torch.cat([torch.cat([b, b.new_zeros((most - b.shape[0], *b.shape[1:]))]) for b in blocks])
    out = torch.empty((most, *sent.shape[1:]), dtype=sent.dtype, device=sent.device)  # (most, *trailing)
    work = _guarded(call, lambda: _reduce_scatter_single(out, sent, op=_BACKEND_OPS[op], group=group.pg,
                                                         async_op=True))

    def finish() -> Tensor:
        mine = out[: counts[group.index]]
        result = compression.decompress(mine if promoted is None else mine.to(wire.dtype), ctx).clone()
        return _scale_(result, postscale / group.size if op == ReduceOp.AVERAGE else postscale)

    return Handle(call, [work], finish)


def reducescatter_async(
    tensor: Tensor,
    name: str | None = None,
    op: ReduceOp = ReduceOp.AVERAGE,
    process_set: ProcessSet = global_process_set,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    compression: type[Compressor] = Compression.none,
) -> Handle:
    """Start a reducescatter: reduce `tensor` over the ranks; the i-th rank of the set keeps block i of rows."""
    _check_tensor(tensor, "reducescatter")
    _check_name(name, "reducescatter")
    op = _resolve_op(op, None, "reducescatter")
    group = _group(process_set, "reducescatter")
    handle = _reducescatter_start(tensor, name, compression, op, prescale_factor, postscale_factor, group)
    return _named(handle, name)


def reducescatter(
    tensor: Tensor,
    name: str | None = None,
    compression: type[Compressor] = Compression.none,
    op: ReduceOp = ReduceOp.AVERAGE,
    process_set: ProcessSet = global_process_set,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> Tensor:
    """Reduce `tensor` (same shape on every rank) and return this rank's block of dim 0.

    Dim 0 is split as evenly as possible, the first ranks taking one extra row, as Horovod does.
    Differentiable with Horovod's rule: the input gradient is the allgather of the output gradients times
    size (Sum) and the scale factors.
    """
    if isinstance(tensor, Tensor) and tensor.requires_grad and torch.is_grad_enabled():
        return _ReducescatterGrad.apply(tensor, name, op, process_set, prescale_factor, postscale_factor,
                                        compression)
    return reducescatter_async(tensor, name, op, process_set, prescale_factor, postscale_factor,
                               compression).wait()


def grouped_reducescatter_async(
    tensors: Sequence[Tensor],
    name: str | None = None,
    op: ReduceOp = ReduceOp.AVERAGE,
    process_set: ProcessSet = global_process_set,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    compression: type[Compressor] = Compression.none,
) -> Handle:
    """Start one reducescatter per tensor; synchronize returns the list of this rank's blocks."""
    tensors = _tensor_list(tensors, "grouped_reducescatter")
    _check_name(name, "grouped_reducescatter")
    op = _resolve_op(op, None, "grouped_reducescatter")
    group = _group(process_set, "grouped_reducescatter")
    handles = [_reducescatter_start(t, None if name is None else f"{name}.{i}", compression, op,
                                    prescale_factor, postscale_factor, group) for i, t in enumerate(tensors)]
    return _named(_GroupHandle(handles, lambda: [h.wait() for h in handles]), name)


def grouped_reducescatter(
    tensors: Sequence[Tensor],
    name: str | None = None,
    compression: type[Compressor] = Compression.none,
    op: ReduceOp = ReduceOp.AVERAGE,
    process_set: ProcessSet = global_process_set,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> list[Tensor]:
    """reducescatter of every tensor of the list; differentiable like reducescatter."""
    tensors = _tensor_list(tensors, "grouped_reducescatter")
    if any(t.requires_grad for t in tensors) and torch.is_grad_enabled():
        return list(_GroupedReducescatterGrad.apply(name, op, process_set, prescale_factor, postscale_factor,
                                                    compression, *tensors))
    return grouped_reducescatter_async(tensors, name, op, process_set, prescale_factor, postscale_factor,
                                       compression).wait()


# --- barrier and objects ------------------------------------------------------------------------------------


def barrier(process_set: ProcessSet = global_process_set) -> None:
    """Block until every rank of the set has reached the barrier."""
    group = _group(process_set, "barrier")
    call = _Call("barrier", "barrier")
    _begin(call, group)
    if group.size > 1:
        _guarded(call, lambda: dist.barrier(group=group.pg))


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> Any:
    """Return `root_rank`'s picklable object on every rank of the set."""
    group = _group(process_set, "broadcast_object")
    if not isinstance(root_rank, int) or root_rank not in group.ranks:
        raise ValueError(f"broadcast_object: root_rank must be one of the ranks {group.ranks}, "
                         f"got {root_rank!r}")
    call = _Call("broadcast_object", name, root=root_rank)
    _begin(call, group)
    box = [obj]
    _guarded(call, lambda: dist.broadcast_object_list(box, src=root_rank, group=group.pg,
                                                      device=_require().device))
    return box[0]


def allgather_object(obj: Any, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> list[Any]:
    """Return the list of every rank's picklable object, in rank order."""
    group = _group(process_set, "allgather_object")
    call = _Call("allgather_object", name)
    _begin(call, group)
    out: list[Any] = [None] * group.size
    _guarded(call, lambda: dist.all_gather_object(out, obj, group=group.pg))
    return out


# --- Horovod's gradient rules -------------------------------------------------------------------------------


class _AllreduceGrad(torch.autograd.Function):
    """y = post * reduce_s(pre * x_s) on every rank, so dL/dx_r = post * pre * reduce_s(dL/dy_s)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, name: str | None, op: ReduceOp, pre: float, post: float,
                process_set: ProcessSet, compression: type[Compressor]) -> Tensor:
        ctx.args = (op, pre, post, process_set, compression)
        return allreduce_async(tensor, None, name, op, pre, post, process_set, compression).wait()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        op, pre, post, process_set, compression = ctx.args
        reduced = allreduce(grad, None, None, compression, op, pre, post, process_set)
        return reduced, None, None, None, None, None, None


class _GroupedAllreduceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, name: str | None, op: ReduceOp, pre: float, post: float, process_set: ProcessSet,
                compression: type[Compressor], *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.args = (op, pre, post, process_set, compression)
        return tuple(grouped_allreduce_async(list(tensors), None, name, op, pre, post, process_set,
                                             compression).wait())

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        op, pre, post, process_set, compression = ctx.args
        reduced = grouped_allreduce(list(grads), None, None, compression, op, pre, post, process_set)
        return (None, None, None, None, None, None, *reduced)


def _own_rows(grad: Tensor, rows: list[int], index: int, shape: torch.Size) -> Tensor:
    start = sum(rows[:index])
    return grad[start: start + rows[index]].reshape(shape)


class _AllgatherGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, name: str | None, process_set: ProcessSet) -> Tensor:
        _check_tensor(tensor, "allgather")
        _check_name(name, "allgather")
        group = _group(process_set, "allgather")
        handle, rows = _allgather_start(tensor, name, group)
        ctx.rows, ctx.index, ctx.shape, ctx.process_set = rows, group.index, tensor.shape, process_set
        return handle.wait()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        averaged = allreduce(grad, op=Average, process_set=ctx.process_set)  # (total rows, *trailing)
        return _own_rows(averaged, ctx.rows, ctx.index, ctx.shape), None, None


class _GroupedAllgatherGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, name: str | None, process_set: ProcessSet, *tensors: Tensor) -> tuple[Tensor, ...]:
        group = _group(process_set, "grouped_allgather")
        _check_name(name, "grouped_allgather")
        started = [_allgather_start(t, None if name is None else f"{name}.{i}", group)
                   for i, t in enumerate(tensors)]
        ctx.rows = [rows for _, rows in started]
        ctx.index, ctx.shapes, ctx.process_set = group.index, [t.shape for t in tensors], process_set
        return tuple(h.wait() for h, _ in started)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        averaged = grouped_allreduce(list(grads), op=Average, process_set=ctx.process_set)
        own = [_own_rows(g, rows, ctx.index, shape) for g, rows, shape in zip(averaged, ctx.rows, ctx.shapes,
                                                                             strict=True)]
        return (None, None, *own)


class _BroadcastGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, root_rank: int, name: str | None, process_set: ProcessSet) -> Tensor:
        ctx.root_rank, ctx.process_set = root_rank, process_set
        return broadcast_async(tensor, root_rank, name, process_set).wait()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        averaged = allreduce(grad, op=Average, process_set=ctx.process_set)
        if _require().rank != ctx.root_rank:
            averaged = torch.zeros_like(averaged)
        return averaged, None, None, None


class _AlltoallGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, splits: Any, name: str | None,
                process_set: ProcessSet) -> tuple[Tensor, Tensor]:
        out = alltoall_async(tensor, splits, name, process_set).wait()
        if splits is None:
            n = _group(process_set, "alltoall").size
            out, received = out, torch.full((n,), out.shape[0] // n, dtype=torch.int32)
        else:
            out, received = out
        ctx.received, ctx.process_set = received, process_set
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Tensor) -> tuple[Tensor | None, None, None, None]:
        back, _ = alltoall(grad.contiguous(), splits=ctx.received, process_set=ctx.process_set)
        return back, None, None, None


def _reducescatter_grad_scale(op: ReduceOp, pre: float, post: float, n: int) -> float:
    """Horovod's factor on the gathered output gradient: size for Sum, times the scale factors."""
    return (n if op == Sum else 1) * pre * post


class _ReducescatterGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, name: str | None, op: ReduceOp, process_set: ProcessSet, pre: float,
                post: float, compression: type[Compressor]) -> Tensor:
        ctx.args = (op, pre, post, process_set)
        return reducescatter_async(tensor, name, op, process_set, pre, post, compression).wait()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        op, pre, post, process_set = ctx.args
        n = _group(process_set, "reducescatter").size
        gathered = allgather(grad * _reducescatter_grad_scale(op, pre, post, n), process_set=process_set)
        return gathered, None, None, None, None, None, None


class _GroupedReducescatterGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, name: str | None, op: ReduceOp, process_set: ProcessSet, pre: float, post: float,
                compression: type[Compressor], *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.args = (op, pre, post, process_set)
        return tuple(grouped_reducescatter_async(list(tensors), name, op, process_set, pre, post,
                                                 compression).wait())

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        op, pre, post, process_set = ctx.args
        scale = _reducescatter_grad_scale(op, pre, post, _group(process_set, "reducescatter").size)
        gathered = grouped_allgather([g * scale for g in grads], process_set=process_set)
        return (None, None, None, None, None, None, *gathered)

