"""lmforge.parallel collectives under real processes (gloo, CPU), against closed-form answers.

One run per world size goes through every phase (the check on by default, off, and each way to turn it on or
off) and every check in it; each check's outcome is reported under its own test id (`default:check_join`), and a
failing check makes the ranks start the next one in a fresh process group (parallel_helpers.run_checks).
Rank r contributes `base + r`, so Sum = N*base + N(N-1)/2, Min = base, Max = base + N - 1,
Product = prod_r (base + r).
"""

from __future__ import annotations

import functools
import math
import os
import signal
import time
from collections.abc import Callable

import pytest
import torch
from parallel_helpers import Phase, adasum_reference, phase_tests, run, spawn

import lmforge.parallel as hvd
from lmforge.parallel import collectives

WORLD_SIZES = [2, 3, 4]
LOCAL_SIZE = {2: 2, 3: 3, 4: 2}  # world size 4 runs as 2 "nodes" x 2 processes
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.int16]
SHAPES = [(), (5,), (3, 4), (2, 3, 4)]
OPS = [hvd.Average, hvd.Sum, hvd.Min, hvd.Max, hvd.Product]  # Adasum: check_adasum


def _base(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    n = math.prod(shape)
    return (torch.arange(n) % 5 + 1).reshape(shape).to(dtype)  # values 1..5


def _expected(op: hvd.ReduceOp, base: torch.Tensor, n: int) -> torch.Tensor:
    """Closed form for reducing base + r over r = 0..n-1, in float64."""
    b = base.double()
    if op == hvd.Sum:
        return n * b + n * (n - 1) / 2
    if op == hvd.Average:
        avg = b + (n - 1) / 2
        return avg if base.is_floating_point() else torch.trunc(avg)
    if op == hvd.Min:
        return b
    if op == hvd.Max:
        return b + n - 1
    return math.prod(b + r for r in range(n))


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype, (actual.dtype, dtype)
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


# --- checks run inside every rank ---------------------------------------------------------------------------


def check_topology(n: int, r: int) -> None:
    local = LOCAL_SIZE[n]
    assert (hvd.size(), hvd.rank()) == (n, r)
    assert (hvd.local_size(), hvd.local_rank()) == (local, r % local)
    assert (hvd.cross_size(), hvd.cross_rank()) == (n // local, r // local)
    assert hvd.is_homogeneous() and hvd.gloo_built()


def check_allreduce(n: int, r: int) -> None:
    for dtype in DTYPES:
        for shape in SHAPES:
            base = _base(shape, dtype)
            for op in OPS:
                x = base + r
                out = hvd.allreduce(x, op=op, name=f"t{shape}")
                _close(out, _expected(op, base, n), dtype)
                torch.testing.assert_close(x, base + r)  # input untouched
    base = _base((4, 3), torch.float32)
    x = base + r
    assert hvd.allreduce_(x, op=hvd.Sum) is x
    _close(x, _expected(hvd.Sum, base, n), torch.float32)
    _close(hvd.allreduce(base + r, average=False), _expected(hvd.Sum, base, n), torch.float32)
    _close(hvd.allreduce(base + r), _expected(hvd.Average, base, n), torch.float32)
    scaled = hvd.allreduce(base + r, op=hvd.Average, prescale_factor=3.0, postscale_factor=0.5)
    _close(scaled, 1.5 * _expected(hvd.Average, base, n), torch.float32)
    param = torch.nn.Parameter(torch.full((2,), float(r)))  # a leaf that requires grad, changed in place
    assert hvd.allreduce_(param, op=hvd.Sum) is param and param.requires_grad
    _close(param.detach(), torch.full((2,), n * (n - 1) / 2), torch.float32)
    assert hvd.broadcast_(param, root_rank=0) is param
    strided = (base + r).t()  # non-contiguous input, reduced in place
    assert hvd.allreduce_(strided, op=hvd.Max) is strided
    _close(strided, _expected(hvd.Max, base, n).t(), torch.float32)


def check_allreduce_async(n: int, r: int) -> None:
    base = _base((64, 17), torch.float64)
    handles = [hvd.allreduce_async(base + r, op=op, name=f"a{op.value}") for op in OPS]
    x = base + r
    inplace = hvd.allreduce_async_(x, op=hvd.Sum)
    while not hvd.poll(inplace):
        time.sleep(0.001)
    assert hvd.synchronize(inplace) is x
    _close(x, _expected(hvd.Sum, base, n), torch.float64)
    for op, handle in zip(OPS, handles, strict=True):
        _close(hvd.synchronize(handle), _expected(op, base, n), torch.float64)
        assert hvd.poll(handle)


def check_compression(n: int, r: int) -> None:
    base = _base((6, 5), torch.float32) / 4
    out = hvd.allreduce(base + r, op=hvd.Average, compression=hvd.Compression.fp16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _expected(hvd.Average, base, n), rtol=1e-3, atol=1e-3)
    ints = torch.arange(4) + r  # fp16 leaves integer tensors alone
    _close(hvd.allreduce(ints, op=hvd.Sum, compression=hvd.Compression.fp16),
           _expected(hvd.Sum, torch.arange(4), n), torch.int64)


def check_grouped_allreduce(n: int, r: int) -> None:
    bases = [_base(s, d) for s, d in [((3,), torch.float32), ((2, 2), torch.float64), ((5,), torch.int64),
                                       ((4, 1), torch.float32)]]
    for op in (hvd.Sum, hvd.Max, hvd.Average):
        inputs = [b + r for b in bases]
        outs = hvd.grouped_allreduce(inputs, op=op, name="g")
        for out, b, x in zip(outs, bases, inputs, strict=True):
            _close(out, _expected(op, b, n), b.dtype)
            torch.testing.assert_close(x, b + r)
    inputs = [b + r for b in bases]
    assert hvd.grouped_allreduce_(inputs, op=hvd.Sum) == inputs
    for x, b in zip(inputs, bases, strict=True):
        _close(x, _expected(hvd.Sum, b, n), b.dtype)
    handle = hvd.grouped_allreduce_async([b + r for b in bases], op=hvd.Min)
    handle_ = hvd.grouped_allreduce_async_([b + r for b in bases], op=hvd.Product)
    for out, b in zip(hvd.synchronize(handle), bases, strict=True):
        _close(out, _expected(hvd.Min, b, n), b.dtype)
    for out, b in zip(hvd.synchronize(handle_), bases, strict=True):
        _close(out, _expected(hvd.Product, b, n), b.dtype)


def check_allgather(n: int, r: int) -> None:
    for dtype in DTYPES:
        for trailing in [(), (3,), (2, 2)]:
            mine = torch.full((r + 1, *trailing), r + 1).to(dtype)  # rank r sends r+1 rows of r+1
            expected = torch.cat([torch.full((s + 1, *trailing), s + 1) for s in range(n)]).to(dtype)
            _close(hvd.allgather(mine, name="ag"), expected, dtype)
            same = torch.full((2, *trailing), r).to(dtype)
            _close(hvd.allgather(same), torch.arange(n).repeat_interleave(2).reshape(-1, *[1] * len(trailing))
                   .expand(2 * n, *trailing).to(dtype), dtype)
    _close(hvd.allgather(torch.tensor(float(r))), torch.arange(n, dtype=torch.float32), torch.float32)
    empty_or_not = torch.ones(r % 2, 3)  # some ranks send no rows
    assert hvd.allgather(empty_or_not).shape == (sum(s % 2 for s in range(n)), 3)
    handle = hvd.allgather_async(torch.full((r + 2,), float(r)))
    expected = torch.cat([torch.full((s + 2,), float(s)) for s in range(n)])
    _close(hvd.synchronize(handle), expected, torch.float32)


def check_broadcast(n: int, r: int) -> None:
    root = n - 1
    for dtype in DTYPES:
        x = (_base((3, 2), dtype) * (r + 1)).to(dtype)
        out = hvd.broadcast(x, root_rank=root, name="b")
        _close(out, _base((3, 2), dtype).double() * n, dtype)
        torch.testing.assert_close(x, (_base((3, 2), dtype) * (r + 1)).to(dtype))
    y = torch.full((4,), float(r))
    assert hvd.broadcast_(y, 0) is y
    _close(y, torch.zeros(4), torch.float32)
    handle = hvd.broadcast_async(torch.full((5,), float(r)), 1)
    handle_ = hvd.broadcast_async_(torch.full((5,), float(r)), 0)
    _close(hvd.synchronize(handle), torch.ones(5), torch.float32)
    _close(hvd.synchronize(handle_), torch.zeros(5), torch.float32)


def check_alltoall(n: int, r: int) -> None:
    for dtype in (torch.float32, torch.int64, torch.bfloat16):
        # Row j of rank s holds 100 s + j; with even splits rank r receives rows 2r, 2r+1 of every rank.
        x = (100 * r + torch.arange(2 * n)).unsqueeze(1).repeat(1, 3).to(dtype)
        expected = torch.cat([100 * s + torch.arange(2 * r, 2 * r + 2) for s in range(n)]).unsqueeze(1)
        _close(hvd.alltoall(x, name="a2a"), expected.repeat(1, 3), dtype)
    # Uneven: rank s sends i + 1 rows to rank i, so rank r receives r + 1 rows from everyone.
    splits = [i + 1 for i in range(n)]
    x = 100 * r + torch.arange(sum(splits), dtype=torch.float32)
    out, received = hvd.alltoall(x, splits=splits)
    offset = r * (r + 1) // 2
    expected = torch.cat([100 * s + torch.arange(offset, offset + r + 1) for s in range(n)])
    _close(out, expected, torch.float32)
    assert received.tolist() == [r + 1] * n
    handle = hvd.alltoall_async(x, splits=torch.tensor(splits))
    out2, received2 = hvd.synchronize(handle)
    _close(out2, expected, torch.float32)
    assert received2.tolist() == [r + 1] * n


def check_reducescatter(n: int, r: int) -> None:
    for rows in (2 * n, 2 * n + 1, n - 1):  # even, one extra row, fewer rows than ranks
        base = _base((rows, 3), torch.float32)
        counts = [rows // n + (1 if s < rows % n else 0) for s in range(n)]
        start = sum(counts[:r])
        for op in (hvd.Sum, hvd.Average, hvd.Max):
            out = hvd.reducescatter(base + r, op=op, name="rs")
            _close(out, _expected(op, base, n)[start: start + counts[r]], torch.float32)
    base = _base((n, 2), torch.int64)
    handle = hvd.reducescatter_async(base + r, op=hvd.Sum)
    _close(hvd.synchronize(handle), _expected(hvd.Sum, base, n)[r: r + 1], torch.int64)


def check_autograd(n: int, r: int) -> None:
    """allreduce / allgather are differentiable: L_s = w_s . y_s with w_s = s + 1 on rank s; Horovod's rules
    give allreduce the gradient of sum_s L_s and allgather that of the mean (check_gradients does the rest)."""
    w_sum = n * (n + 1) / 2  # sum over ranks of the output-gradient weights
    for op, factor in ((hvd.Sum, 1.0), (hvd.Average, 1.0 / n)):
        x = torch.full((3,), float(r), requires_grad=True)
        y = hvd.allreduce(x, op=op, prescale_factor=2.0, name="ad")
        (y * (r + 1)).sum().backward()
        _close(x.grad, torch.full((3,), 2.0 * factor * w_sum), torch.float32)
    x = torch.full((r + 1, 2), float(r), requires_grad=True)  # rank r sends r + 1 rows
    y = hvd.allgather(x)
    (y * (r + 1)).sum().backward()
    _close(x.grad, torch.full((r + 1, 2), w_sum / n), torch.float32)


def check_objects(n: int, r: int) -> None:
    hvd.barrier()
    got = hvd.broadcast_object({"rank": r, "list": list(range(r))}, root_rank=n - 1)
    assert got == {"rank": n - 1, "list": list(range(n - 1))}
    assert hvd.allgather_object(("r", r)) == [("r", s) for s in range(n)]


def check_bad_inputs(n: int, r: int) -> None:
    # Validation happens before any communication, so every rank can raise without desynchronising.
    with pytest.raises(TypeError, match="torch.Tensor"):
        hvd.allreduce([1.0, 2.0])
    with pytest.raises(ValueError, match="splits"):
        hvd.alltoall(torch.zeros(n + 1), splits=[1] * n)
    with pytest.raises(ValueError, match="root_rank"):
        hvd.broadcast(torch.zeros(1), root_rank=n)
    with pytest.raises(ValueError, match="bool"):
        hvd.allreduce(torch.zeros(2, dtype=torch.bool), op=hvd.Average)
    with pytest.raises(ValueError, match="bool"):
        hvd.allreduce(torch.zeros(2, dtype=torch.bool), op=hvd.Sum, prescale_factor=2.0)
    with pytest.raises(TypeError, match="process_set"):
        hvd.allreduce(torch.zeros(2), process_set=[0, 1])


def _mismatch(n: int, r: int, call: Callable[[], object], *expected: str) -> None:
    """`call` differs on the last rank: every rank raises Horovod's exception type, naming both calls."""
    with pytest.raises(hvd.CollectiveMismatchError) as info:
        call()
    assert isinstance(info.value, hvd.HorovodInternalError)
    text = str(info.value)
    for piece in expected:
        assert piece in text, text
    # The group is still usable after a mismatch.
    _close(hvd.allreduce(torch.ones(2), op=hvd.Sum), torch.full((2,), float(n)), torch.float32)


def check_mismatch_kind(n: int, r: int) -> None:
    def call() -> object:
        if r == 0:
            return hvd.broadcast(torch.ones(2), 0, name="x")
        return hvd.allreduce(torch.ones(2), name="x")

    _mismatch(n, r, call, "rank 0 called broadcast(name='x'", "called allreduce(name='x'")


def check_mismatch_shape(n: int, r: int) -> None:
    last = r == n - 1
    _mismatch(n, r, lambda: hvd.allreduce(torch.ones((3, 5) if last else (3, 4)), name="layer.weight"),
              f"rank {n - 1} called allreduce(name='layer.weight', shape=(3, 5)", "shape=(3, 4)")
    # Same number of elements, different shapes: without the check gloo would return a silently wrong result.
    _mismatch(n, r, lambda: hvd.allreduce(torch.ones((4, 3) if last else (3, 4)), name="w"),
              f"rank {n - 1} called allreduce(name='w', shape=(4, 3)")
    _mismatch(n, r, lambda: hvd.allgather(torch.ones(2, 3 if last else 2)), "shape=(*, 3)", "shape=(*, 2)")


def check_mismatch_dtype(n: int, r: int) -> None:
    _mismatch(n, r, lambda: hvd.allgather(torch.ones(2, dtype=torch.float64 if r == n - 1 else torch.float32)),
              "dtype=float64", "dtype=float32")


def check_mismatch_op(n: int, r: int) -> None:
    _mismatch(n, r, lambda: hvd.allreduce(torch.ones(3), name="g", op=hvd.Max if r == n - 1 else hvd.Sum),
              f"rank {n - 1} called allreduce(name='g', shape=(3,), dtype=float32, op=max)", "op=sum")


def check_mismatch_root(n: int, r: int) -> None:
    _mismatch(n, r, lambda: hvd.broadcast(torch.ones(3), root_rank=1 if r == n - 1 else 0, name="p"),
              f"rank {n - 1} called broadcast(name='p', shape=(3,), dtype=float32, root_rank=1)", "root_rank=0")


def check_mismatch_name(n: int, r: int) -> None:
    _mismatch(n, r, lambda: hvd.allreduce(torch.ones(3), name="b" if r == n - 1 else "a"),
              f"rank {n - 1} called allreduce(name='b'", "allreduce(name='a'")


def check_mismatch_speculated(n: int, r: int) -> None:
    """An allreduce that repeats the previous verified call sends its data before the signatures arrive (and
    runs no exchange at all once that prediction came true); when another rank calls something else meanwhile,
    every rank still raises and the group stays usable."""
    last = r == n - 1
    taken: list[str] = []
    speculative = collectives._speculative

    def spy(call: object, group: object, sent: object) -> object:
        speculation = speculative(call, group, sent)
        taken.append(type(speculation).__name__.strip("_"))
        return speculation

    collectives._speculative = spy
    try:
        hvd.barrier()  # a call no allreduce repeats
        for i in range(3):  # repeated calls take the speculative path; results stay exact
            y = hvd.synchronize(hvd.allreduce_async(torch.full((3, 4), float(r + i)), name="rep", op=hvd.Sum))
            _close(y, torch.full((3, 4), float(n * i + n * (n - 1) // 2)), torch.float32)
        assert taken == ["NoneType", "Exchange", "Unexchanged"], taken
        taken.clear()
        hvd.barrier()
        for _ in range(3):  # a repeating sequence (a step's gradient buckets) is predicted from its 2nd round
            handles = [hvd.allreduce_async(torch.full((k,), float(r)), name=f"bucket{k}", op=hvd.Sum)
                       for k in (2, 3)]
            for k, handle in zip((2, 3), handles, strict=True):
                _close(hvd.synchronize(handle), torch.full((k,), float(n * (n - 1) // 2)), torch.float32)
        assert taken == ["NoneType"] * 3 + ["Exchange", "Exchange", "Unexchanged"], taken
    finally:
        collectives._speculative = speculative
    _mismatch(n, r, lambda: hvd.allreduce(torch.ones((4, 3) if last else (3, 4)), name="rep", op=hvd.Sum),
              f"rank {n - 1} called allreduce(name='rep', shape=(4, 3)", "shape=(3, 4)")
    hvd.allreduce(torch.ones(5), name="rep2", op=hvd.Sum)
    hvd.allreduce(torch.ones(5), name="rep2", op=hvd.Sum)
    _mismatch(n, r, lambda: hvd.allreduce(torch.ones(6 if last else 5), name="rep2", op=hvd.Sum),
              "shape=(6,)", "shape=(5,)")
    hvd.allreduce(torch.ones(5), name="rep3")
    _mismatch(n, r, lambda: hvd.broadcast(torch.ones(5), 0, name="rep3") if last else
              hvd.allreduce(torch.ones(5), name="rep3"), "called broadcast(name='rep3'", "called allreduce")


def _exchanges() -> int:
    """Signature exchanges this rank has posted so far."""
    return collectives._require().exchanges


def _grad_sum(r: int, name: str = "g") -> torch.Tensor:
    """The repeated call of the checks below: a float32 Sum allreduce of shape (3, 4), rank r sending r."""
    return hvd.allreduce(torch.full((3, 4), float(r)), name=name, op=hvd.Sum)


def _grad_sum_async(r: int) -> torch.Tensor:
    return hvd.synchronize(hvd.allreduce_async(torch.full((3, 4), float(r)), name="g", op=hvd.Sum))


def _make_confident(n: int, r: int) -> None:
    """Repeat `_grad_sum` until every rank predicts it with confidence: the third call runs no exchange."""
    for _ in range(2):
        _grad_sum(r)
    before = _exchanges()
    _close(_grad_sum(r), torch.full((3, 4), n * (n - 1) / 2), torch.float32)
    assert _exchanges() == before, "a confidently predicted allreduce ran a signature exchange"


def check_unexchanged_mismatch(n: int, r: int) -> None:
    """Ranks that run the confidently predicted allreduce without any exchange, against a rank that calls
    something else (every kind of difference in turn): every rank raises, and the group stays usable."""
    deviations: list[tuple[Callable[[], object], str]] = [
        (lambda: hvd.allreduce(torch.ones(4, 3), name="g", op=hvd.Sum), "shape=(4, 3)"),  # same numel
        (lambda: hvd.allreduce(torch.ones(7), name="g", op=hvd.Sum), "shape=(7,)"),
        (lambda: hvd.allreduce(torch.ones(3, 4, dtype=torch.float64), name="g", op=hvd.Sum), "dtype=float64"),
        (lambda: hvd.allreduce(torch.ones(3, 4, dtype=torch.int32), name="g", op=hvd.Sum), "dtype=int32"),
        (lambda: hvd.allreduce(torch.ones(3, 4), name="g", op=hvd.Sum, compression=hvd.Compression.fp16),
         "dtype=float16"),
        (lambda: hvd.allreduce(torch.ones(3, 4), name="g", op=hvd.Max), "op=max"),
        (lambda: hvd.allreduce(torch.ones(3, 4), name="g", op=hvd.Average), "op=average"),
        (lambda: hvd.allreduce(torch.ones(3, 4), name="h", op=hvd.Sum), "allreduce(name='h'"),
        (lambda: hvd.grouped_allreduce([torch.ones(3, 4)], name="g", op=hvd.Sum), "shape=[(3, 4)]"),
        (lambda: hvd.broadcast(torch.ones(3, 4), 0, name="g"), "called broadcast(name='g'"),
        (lambda: hvd.allgather(torch.ones(3, 4), name="g"), "called allgather(name='g'"),
        (lambda: hvd.alltoall(torch.ones(n, 4), name="g"), "called alltoall(name='g'"),
        (lambda: hvd.reducescatter(torch.ones(n, 4), name="g"), "called reducescatter(name='g'"),
        (hvd.barrier, "called barrier("),
        (lambda: hvd.broadcast_object(r, 0, name="g"), "called broadcast_object(name='g'"),
    ]
    if n & (n - 1) == 0:
        deviations.append((lambda: hvd.allreduce(torch.ones(3, 4), name="g", op=hvd.Adasum), "op=adasum"))
    for i, (deviation, text) in enumerate(deviations):
        deviant = n - 1 if i % 2 == 0 else 0  # the last rank, or the first
        _make_confident(n, r)
        ours = _grad_sum_async if i % 3 == 2 else _grad_sum  # async: the error comes from synchronize
        _mismatch(n, r, deviation if r == deviant else functools.partial(ours, r), f"rank {deviant} called", text,
                  "called allreduce(name='g', shape=(3, 4), dtype=float32, op=sum)")


def check_unexchanged_nan(n: int, r: int) -> None:
    """NaN in element 0 of the data (the deviation signal) costs one confirming exchange and is returned."""
    _make_confident(n, r)
    expected = torch.full((3, 4), n * (n - 1) / 2)
    for first in ([math.nan] + [0.0] * (n - 1), [math.inf, -math.inf] + [0.0] * (n - 2)):  # NaN, inf - inf
        x = torch.full((3, 4), float(r))
        x[0, 0] = first[r]
        before = _exchanges()
        out = hvd.allreduce(x, name="g", op=hvd.Sum)
        assert _exchanges() == before + 1
        assert math.isnan(out[0, 0])
        _close(out.reshape(-1)[1:], expected.reshape(-1)[1:], torch.float32)
    x = torch.full((3, 4), float(r))
    x[1, 2] = math.nan if r == 0 else 0.0  # NaN elsewhere is never looked at
    before = _exchanges()
    out = hvd.allreduce(x, name="g", op=hvd.Sum)
    assert _exchanges() == before and math.isnan(out[1, 2]) and out[0, 0] == expected[0, 0]
    _close(_grad_sum(r), expected, torch.float32)  # the calls matched: confidence stays
    assert _exchanges() == before


def check_unexchanged_confidence(n: int, r: int) -> None:
    """When every rank calls something else than the confident prediction, nobody errs: each signals, they
    confirm, the call runs; confidence is lost there and comes back once the prediction comes true again."""
    _make_confident(n, r)
    before = _exchanges()
    _close(hvd.allreduce(torch.full((5,), float(r)), name="other", op=hvd.Sum), torch.full((5,), n * (n - 1) / 2),
           torch.float32)
    assert _exchanges() == before + 1
    spent = []
    for _ in range(5):
        before = _exchanges()
        _close(_grad_sum(r), torch.full((3, 4), n * (n - 1) / 2), torch.float32)
        spent.append(_exchanges() - before)
    # after "other" the history predicts "other" again, then "other" after "g"; then "g" (not yet trusted)
    assert spent == [1, 1, 1, 0, 0], spent
    # A repeating pair of async calls, the second posted before the first is waited for: both unexchanged.
    for step in range(4):
        before = _exchanges()
        handles = [hvd.allreduce_async(torch.full((k,), float(r + step)), name=f"b{k}", op=hvd.Average)
                   for k in (2, 3)]
        for k, handle in zip((2, 3), handles, strict=True):
            _close(hvd.synchronize(handle), torch.full((k,), step + (n - 1) / 2), torch.float32)
        if step == 3:
            assert _exchanges() == before


def check_unexchanged_join(n: int, r: int) -> None:
    """A rank joins while the others run a confidently predicted allreduce without an exchange: its NaN signal
    costs element 0 only, which is redone; the results are Horovod's (joined ranks add zeros, Average divides
    by the full size)."""
    base = torch.arange(12.0).reshape(3, 4)
    for step in range(4 if r == 0 else 6):  # rank 0 runs out of data after 4 steps
        out = hvd.allreduce(base + r, name="grad", op=hvd.Average)
        active = range(n) if step < 4 else range(1, n)
        torch.testing.assert_close(out, (len(active) * base + sum(active)) / n)
    assert hvd.join() == n - 1
    _close(hvd.allreduce(torch.ones(1), op=hvd.Sum), torch.full((1,), float(n)), torch.float32)


UNEXCHANGED_CHECKS = [check_unexchanged_mismatch, check_unexchanged_nan, check_unexchanged_confidence,
                      check_unexchanged_join]


MISMATCH_CHECKS = [check_mismatch_kind, check_mismatch_shape, check_mismatch_dtype, check_mismatch_op,
                   check_mismatch_root, check_mismatch_name, check_mismatch_speculated]


def check_unchecked(n: int, r: int) -> None:
    """With the check off nothing is compared: same-size tensors of different shapes reduce as flat buffers."""
    x = torch.arange(12.0).reshape((4, 3) if r == n - 1 else (3, 4))
    out = hvd.allreduce(x, op=hvd.Sum, name="a" if r else "b")  # names differ too: nobody notices
    _close(out.reshape(-1), n * torch.arange(12.0), torch.float32)


def check_small_int_dtypes(n: int, r: int) -> None:
    """int16 (which gloo lacks), int8 and uint8 through every collective, with closed-form answers."""
    for dtype in (torch.int16, torch.int8, torch.uint8):
        base = _base((3, 2), dtype)
        for op in (hvd.Sum, hvd.Max, hvd.Min, hvd.Average):
            _close(hvd.allreduce(base + r, op=op), _expected(op, base, n), dtype)
        mine = torch.full((r + 1, 2), r + 1, dtype=dtype)
        _close(hvd.allgather(mine), torch.cat([torch.full((s + 1, 2), s + 1) for s in range(n)]), dtype)
        _close(hvd.broadcast(base * (r + 1), root_rank=n - 1), base.double() * n, dtype)
        x = (10 * r + torch.arange(2 * n)).to(dtype)  # rank r receives rows 2r, 2r+1 of every rank
        _close(hvd.alltoall(x), torch.cat([10 * s + torch.arange(2 * r, 2 * r + 2) for s in range(n)]), dtype)
        rows = _base((n, 2), dtype)
        _close(hvd.reducescatter(rows + r, op=hvd.Sum), _expected(hvd.Sum, rows, n)[r: r + 1], dtype)
        inplace = base + r
        assert hvd.allreduce_(inplace, op=hvd.Sum) is inplace
        _close(inplace, _expected(hvd.Sum, base, n), dtype)


def check_int_scale_factors(n: int, r: int) -> None:
    """Integer tensors with prescale/postscale: scaled in float64 and truncated, as Horovod does."""
    x = torch.tensor([7, -7, 100, 3], dtype=torch.int32) + r
    pre, post = 0.6, 1.7
    scaled = [torch.trunc((torch.tensor([7, -7, 100, 3]) + s).double() * pre) for s in range(n)]
    total = sum(scaled)
    out = hvd.allreduce(x, op=hvd.Sum, prescale_factor=pre, postscale_factor=post)
    _close(out, torch.trunc(total * post), torch.int32)
    avg = hvd.allreduce(x, op=hvd.Average, prescale_factor=pre, postscale_factor=post)
    _close(avg, torch.trunc(total * (post / n)), torch.int32)
    y = torch.arange(2 * n, dtype=torch.int64) + r
    block = hvd.reducescatter(y, op=hvd.Sum, prescale_factor=pre, postscale_factor=post)
    expected = torch.trunc(sum(torch.trunc((torch.arange(2 * n) + s).double() * pre) for s in range(n)) * post)
    _close(block, expected[2 * r: 2 * r + 2], torch.int64)


def check_names(n: int, r: int) -> None:
    """A name in flight cannot be reused until synchronized: ValueError before any communication."""
    first = hvd.allreduce_async(torch.ones(3), name="dup", op=hvd.Sum)
    for start in (lambda: hvd.allreduce_async(torch.ones(3), name="dup"),
                  lambda: hvd.allgather_async(torch.ones(1), name="dup"),
                  lambda: hvd.broadcast_async_(torch.ones(1), 0, name="dup")):
        with pytest.raises(ValueError, match="'dup' is still in flight"):
            start()
    _close(hvd.synchronize(first), torch.full((3,), float(n)), torch.float32)
    _close(hvd.allreduce(torch.ones(3), name="dup", op=hvd.Sum), torch.full((3,), float(n)), torch.float32)


def _randn(shape: tuple[int, ...], tag: int, s: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * tag + s)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _grad_case(n: int, r: int, tag: int, shapes: Callable[[int], list[tuple[int, ...]]],
               distributed: Callable[[list[torch.Tensor]], list[torch.Tensor]],
               reference: Callable[[list[list[torch.Tensor]]], list[list[torch.Tensor]]], scale: float) -> None:
    """Horovod's gradient rule = autograd of the single-process computation with loss scale * sum_s L_s.

    Rank s's inputs are x_s (shapes(s)) and its loss L_s = sum of w_s * y_s over its outputs; the single
    process holds every rank's inputs, computes every rank's outputs with `reference` and differentiates.
    """
    xs = [_randn(shape, tag, r).requires_grad_() for shape in shapes(r)]
    ys = distributed(xs)
    sum((_randn(tuple(y.shape), tag + 1, r) * y).sum() for y in ys).backward()
    all_xs = [[_randn(shape, tag, s).requires_grad_() for shape in shapes(s)] for s in range(n)]
    all_ys = reference(all_xs)
    total = sum((_randn(tuple(y.shape), tag + 1, s) * y).sum() for s in range(n) for y in all_ys[s])
    (scale * total).backward()
    for x, ref in zip(xs, all_xs[r], strict=True):
        expected = torch.zeros_like(ref) if ref.grad is None else ref.grad  # None: the loss ignores x
        torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-12)


def _blocks(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    return list(torch.split(x, [x.shape[0] // n + (1 if s < x.shape[0] % n else 0) for s in range(n)]))


def check_gradients(n: int, r: int) -> None:
    """Every differentiable collective against autograd of its single-process equivalent (Horovod's rules)."""
    one = lambda shape: lambda s: [shape]  # noqa: E731 - the same input shape on every rank
    for op, pre, post, tag in ((hvd.Sum, 2.0, 0.5, 1), (hvd.Average, 1.0, 3.0, 3)):
        def reduced(all_xs, op=op, pre=pre, post=post):
            y = post * sum(pre * xs[0] for xs in all_xs) / (n if op == hvd.Average else 1)
            return [[y] for _ in all_xs]

        _grad_case(n, r, tag, one((3, 2)), lambda xs, op=op, pre=pre, post=post: [
            hvd.allreduce(xs[0], op=op, prescale_factor=pre, postscale_factor=post)], reduced, 1.0)
    _grad_case(n, r, 5, lambda s: [(3,), (2, 2)], lambda xs: hvd.grouped_allreduce(xs, op=hvd.Sum),
               lambda all_xs: [[sum(xs[i] for xs in all_xs) for i in range(2)] for _ in all_xs], 1.0)
    # allgather and broadcast: Horovod averages the output gradients (the mean of the ranks' losses).
    _grad_case(n, r, 7, lambda s: [(s + 1, 2)], lambda xs: [hvd.allgather(xs[0])],
               lambda all_xs: [[torch.cat([xs[0] for xs in all_xs])] for _ in all_xs], 1.0 / n)
    _grad_case(n, r, 9, lambda s: [(s + 1, 2), (1, 3)], lambda xs: hvd.grouped_allgather(xs),
               lambda all_xs: [[torch.cat([xs[i] for xs in all_xs]) for i in range(2)] for _ in all_xs], 1.0 / n)
    _grad_case(n, r, 11, one((4,)), lambda xs: [hvd.broadcast(xs[0], root_rank=n - 1)],
               lambda all_xs: [[all_xs[n - 1][0]] for _ in all_xs], 1.0 / n)
    # alltoall: rank s sends i + 1 rows to rank i; the gradient flows back along the received splits.
    splits = [i + 1 for i in range(n)]
    offsets = [sum(splits[:i]) for i in range(n)]
    _grad_case(n, r, 13, one((sum(splits), 2)), lambda xs: [hvd.alltoall(xs[0], splits=splits)[0]],
               lambda all_xs: [[torch.cat([xs[0][offsets[i]: offsets[i] + splits[i]] for xs in all_xs])]
                               for i in range(n)], 1.0)
    # reducescatter: Horovod's gradient is the allgather of the output gradients times size (Sum) and the
    # scale factors: autograd's for size times the sum of the ranks' losses, for Sum and Average alike.
    rows = 2 * n + 1
    for op, pre, tag in ((hvd.Sum, 2.0, 15), (hvd.Average, 1.0, 17)):
        def scattered(all_xs, op=op, pre=pre):
            total = sum(pre * xs[0] for xs in all_xs) / (n if op == hvd.Average else 1)
            return [[block] for block in _blocks(total, n)]

        _grad_case(n, r, tag, one((rows, 2)), lambda xs, op=op, pre=pre: [
            hvd.reducescatter(xs[0], op=op, prescale_factor=pre)], scattered, float(n))
    _grad_case(n, r, 19, lambda s: [(rows, 2), (n, 1)], lambda xs: hvd.grouped_reducescatter(xs, op=hvd.Sum),
               lambda all_xs: [[_blocks(sum(xs[i] for xs in all_xs), n)[s] for i in range(2)] for s in range(n)],
               float(n))
    assert hvd.allreduce(torch.ones(1, requires_grad=True), op=hvd.Max).grad_fn is None


def check_join(n: int, r: int) -> None:
    """Horovod's join: rank r has r + 1 batches; the others keep reducing, Average divides by the full size,
    and allgather / broadcast raise while a rank has joined."""
    for step in range(r + 1):
        active = list(range(step, n))  # ranks that still have a batch at this step
        total = sum(s + 1 for s in active)
        _close(hvd.allreduce(torch.full((3,), float(r + 1)), op=hvd.Sum), torch.full((3,), float(total)),
               torch.float32)
        avg = hvd.allreduce(torch.full((3,), float(r + 1)), op=hvd.Average)  # scaled by 1 / n in float32
        torch.testing.assert_close(avg, torch.full((3,), total / n, dtype=torch.float32), rtol=1e-6, atol=0)
        _close(hvd.allreduce(torch.full((2,), r + 1), op=hvd.Min), torch.full((2,), step + 1), torch.int64)
        outs = hvd.grouped_allreduce([torch.ones(2), torch.ones(1, dtype=torch.int64)], op=hvd.Sum)
        _close(outs[0], torch.full((2,), float(len(active))), torch.float32)
        if step == 0:
            _close(hvd.allgather(torch.full((1, 2), r)), torch.arange(n).unsqueeze(1).expand(-1, 2), torch.int64)
        else:
            with pytest.raises(hvd.HorovodInternalError, match="join"):
                hvd.allgather(torch.full((1, 2), r))
            with pytest.raises(hvd.HorovodInternalError, match="join"):
                hvd.broadcast(torch.ones(2), root_rank=n - 1)
        hvd.barrier()
    assert hvd.join() == n - 1
    assert hvd.join() in range(n)  # everyone joins together: still returns a rank
    _close(hvd.allreduce(torch.ones(1), op=hvd.Sum), torch.full((1,), float(n)), torch.float32)


def check_process_sets(n: int, r: int) -> None:
    """Collectives over the even and the odd ranks at once, each set with its own closed form."""
    evens, odds = [s for s in range(n) if s % 2 == 0], [s for s in range(n) if s % 2 == 1]
    even_set = hvd.add_process_set(evens)
    odd_set = hvd.add_process_set(hvd.ProcessSet(odds))
    with pytest.raises(ValueError, match="duplicate"):
        hvd.add_process_set(evens)
    mine, ranks = (even_set, evens) if r % 2 == 0 else (odd_set, odds)
    assert mine.included() and mine.size() == len(ranks) and mine.rank() == ranks.index(r)
    assert hvd.global_process_set.size() == n and hvd.global_process_set.rank() == r
    _close(hvd.allreduce(torch.full((2,), float(r)), op=hvd.Sum, process_set=mine),
           torch.full((2,), float(sum(ranks))), torch.float32)
    _close(hvd.allreduce(torch.full((2,), float(r)), process_set=mine),
           torch.full((2,), sum(ranks) / len(ranks)), torch.float32)
    _close(hvd.allgather(torch.full((1,), r), process_set=mine), torch.tensor(ranks), torch.int64)
    _close(hvd.broadcast(torch.full((2,), r), root_rank=ranks[-1], process_set=mine),
           torch.full((2,), ranks[-1]), torch.int64)
    x = 10 * r + torch.arange(len(ranks))  # element i goes to the set's i-th rank
    _close(hvd.alltoall(x, process_set=mine), torch.tensor([10 * s + ranks.index(r) for s in ranks]),
           torch.int64)
    _close(hvd.reducescatter(torch.ones(len(ranks), 2), op=hvd.Sum, process_set=mine),
           torch.full((1, 2), float(len(ranks))), torch.float32)
    _close(hvd.grouped_allreduce([torch.ones(1), torch.ones(2)], op=hvd.Sum, process_set=mine)[1],
           torch.full((2,), float(len(ranks))), torch.float32)
    hvd.barrier(process_set=mine)
    assert hvd.allgather_object(r, process_set=mine) == ranks
    other = odd_set if mine is even_set else even_set
    if other.ranks:
        with pytest.raises(ValueError, match="not in"):
            hvd.allreduce(torch.ones(1), process_set=other)
    assert hvd.remove_process_set(odd_set) and hvd.remove_process_set(even_set)
    assert not hvd.remove_process_set(even_set)
    with pytest.raises(ValueError, match="not registered"):
        hvd.allreduce(torch.ones(1), process_set=even_set)


def check_adasum(n: int, r: int) -> None:
    if n & (n - 1):
        with pytest.raises(NotImplementedError, match="power of 2"):
            hvd.allreduce(torch.ones(3), op=hvd.Adasum)
        return
    gs = [_randn((7,), 21, s) for s in range(n)]  # 7 elements: the halving splits unevenly
    torch.testing.assert_close(hvd.allreduce(gs[r], op=hvd.Adasum), adasum_reference(gs), rtol=1e-12, atol=0)
    # Orthogonal gradients add up; identical gradients stay as they are.
    basis = torch.eye(n, dtype=torch.float64)
    _close(hvd.allreduce(3 * basis[r], op=hvd.Adasum), torch.full((n,), 3.0), torch.float64)
    _close(hvd.allreduce(torch.arange(5.0), op=hvd.Adasum), torch.arange(5.0), torch.float32)
    # Two ranks, closed form: g0 = (1, 0), g1 = (1, 1): dot 1, so (1 - 1/2) g0 + (1 - 1/4) g1 = (1.25, 0.75).
    if n == 2:
        g = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
        _close(hvd.allreduce(g[r], op=hvd.Adasum), torch.tensor([1.25, 0.75]), torch.float64)
    outs = hvd.grouped_allreduce([gs[r], 3 * basis[r]], op=hvd.Adasum)  # each tensor on its own
    torch.testing.assert_close(outs[0], adasum_reference(gs), rtol=1e-12, atol=0)
    _close(outs[1], torch.full((n,), 3.0), torch.float64)
    # One fused Adasum, tensors whose boundaries fall across the halving's splits, each on its own.
    parts = [[_randn((k,), 22 + i, s) for i, k in enumerate((1, 5, 2, 9))] for s in range(n)]
    for i, out in enumerate(hvd.grouped_allreduce(parts[r], op=hvd.Adasum)):
        torch.testing.assert_close(out, adasum_reference([p[i] for p in parts]), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="floating-point"):
        hvd.allreduce(torch.ones(2, dtype=torch.int64), op=hvd.Adasum)


def check_reinit(n: int, r: int) -> None:
    """shutdown() + init() inside a run joins a fresh group that works at once; init(process_sets=...)
    registers sets as Horovod's does, and shutdown() drops them."""
    for i in range(3):
        hvd.shutdown()
        hvd.init(timeout=30)
        _close(hvd.allreduce(torch.full((1,), float(i)), op=hvd.Sum), torch.full((1,), float(n * i)),
               torch.float32)
    hvd.shutdown()
    ranks = list(range(n - 1))  # not every rank: a set equal to the global one is a duplicate
    some = hvd.ProcessSet(ranks)
    hvd.init(timeout=30, process_sets=[some])
    assert some.process_set_id is not None
    if r in ranks:
        _close(hvd.allreduce(torch.ones(1), op=hvd.Sum, process_set=some), torch.full((1,), float(n - 1)),
               torch.float32)
    hvd.barrier()
    hvd.shutdown()
    assert some.process_set_id is None
    hvd.init(timeout=30)


def check_names_exist(n: int, r: int) -> None:
    """The Horovod names programs call exist and answer sensibly."""
    assert hvd.gloo_built() and hvd.gloo_enabled() and not hvd.mpi_enabled() and not hvd.ccl_built()
    assert not hvd.ddl_built() and not hvd.mpi_threads_supported() and isinstance(hvd.mpi_built(), bool)
    assert isinstance(hvd.nccl_built(), bool) and isinstance(hvd.cuda_built(), bool)
    assert not hvd.rocm_built()
    assert issubclass(hvd.HorovodInternalError, RuntimeError)
    sparse = torch.sparse_coo_tensor(torch.tensor([[r, n]]), torch.tensor([1.0, float(r)]), (n + 1,))
    handle = hvd.sparse_allreduce_async(sparse, name="emb", op=hvd.Sum)
    dense = handle().to_dense()  # Horovod returns a function to call
    expected = torch.cat([torch.ones(n), torch.tensor([float(sum(range(n)))])])
    _close(dense, expected, torch.float32)
    avg = hvd.synchronize(hvd.sparse_allreduce_async(sparse, name="emb2", op=hvd.Average)).to_dense()
    _close(avg, expected / n, torch.float32)


FAST_CHECKS: list[Callable[[int, int], None]] = [
    check_topology, check_allreduce, check_allreduce_async, check_compression, check_grouped_allreduce,
    check_allgather, check_broadcast, check_alltoall, check_reducescatter, check_autograd, check_objects,
    check_bad_inputs, check_small_int_dtypes, check_int_scale_factors, check_names,
]
CHECKED_ONLY = MISMATCH_CHECKS + UNEXCHANGED_CHECKS + [check_gradients, check_join, check_process_sets,
                                                       check_adasum, check_reinit, check_names_exist]
NO_ENV = {"LMFORGE_CHECK_COLLECTIVES": "", "LMFORGE_UNEVEN_INPUTS": ""}
PHASES = [
    Phase("default", FAST_CHECKS + CHECKED_ONLY, {"timeout": 30}, NO_ENV),
    Phase("unchecked", FAST_CHECKS + [check_unchecked, check_gradients, check_process_sets],
          {"check": False, "timeout": 30}, NO_ENV),
    Phase("env_on", MISMATCH_CHECKS, {"timeout": 30}, {"LMFORGE_CHECK_COLLECTIVES": "1"}),
    Phase("explicit", MISMATCH_CHECKS, {"check": True, "timeout": 30}, {"LMFORGE_CHECK_COLLECTIVES": "0"}),
    Phase("env_off", [check_unchecked], {"timeout": 30}, {"LMFORGE_CHECK_COLLECTIVES": "0"}),
    Phase("uneven", [check_join, check_unexchanged_join], {"check": False, "uneven_inputs": True, "timeout": 30},
          NO_ENV),
]


reports, test_collective = phase_tests(PHASES, WORLD_SIZES, timeout=300, local_size=LOCAL_SIZE)


def _cycles(count: int) -> float:
    """init / allreduce / shutdown, `count` times; returns the seconds it took."""
    start = time.monotonic()
    for i in range(count):
        hvd.init(timeout=20)
        out = hvd.allreduce(torch.full((4,), float(i + hvd.rank())), op=hvd.Sum)
        n = hvd.size()
        assert out.tolist() == [n * i + n * (n - 1) / 2] * 4, (i, out)
        hvd.shutdown()
    return time.monotonic() - start


@pytest.mark.parametrize("world", [2, 3])
def test_hundred_init_shutdown_cycles(world: int) -> None:
    """Each init talks through a fresh store prefix, so re-initialising never reads stale peer addresses."""
    seconds = run(_cycles, world, 100, timeout=240)
    assert all(s > 0 for s in seconds)


def test_single_process_without_launcher(monkeypatch) -> None:
    """No torchrun variables: init() runs as a world of one, where every collective is the identity."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    hvd.init()
    try:
        assert (hvd.size(), hvd.rank(), hvd.local_size(), hvd.cross_size()) == (1, 0, 1, 1)
        x = torch.arange(6.0).reshape(2, 3)
        torch.testing.assert_close(hvd.allreduce(x), x)
        torch.testing.assert_close(hvd.allgather(x), x)
        assert hvd.join() == 0
    finally:
        hvd.shutdown()
    with pytest.raises(ValueError, match="init"):
        hvd.size()


def _die_during_training(victim: int) -> tuple[str, float]:
    """All ranks allreduce; `victim` is killed mid-run; the others must raise CollectiveError, not hang."""
    hvd.init(timeout=10)
    hvd.barrier()
    start = time.monotonic()
    try:
        for step in range(1000):
            if hvd.rank() == victim and step == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            hvd.allreduce(torch.ones(1000), name="grad")
    except hvd.CollectiveError as err:
        return str(err), time.monotonic() - start
    return "finished without error", time.monotonic() - start


@pytest.mark.slow
def test_killed_rank_fails_the_others_cleanly() -> None:
    results = spawn(_die_during_training, 3, 2, timeout=45)
    assert "without a result" in results[2].error and results[2].exitcode == -signal.SIGKILL
    for res in results[:2]:
        assert res.ok, res.error
        message, seconds = res.value
        assert message.startswith(f"rank {res.rank}: allreduce(name='grad'"), message
        assert "a peer rank died, did not answer within 10 s" in message
        assert seconds < 30, seconds


def _silent_rank() -> tuple[str, float]:
    """Rank 1 is alive but never calls the collective: the others give up after the timeout."""
    hvd.init(timeout=2, check=True)
    hvd.barrier()
    if hvd.rank() == 1:
        time.sleep(5)
        return "slept", 0.0
    start = time.monotonic()
    try:
        hvd.allreduce(torch.ones(10), name="grad")
    except hvd.CollectiveError as err:
        return str(err), time.monotonic() - start
    return "finished without error", time.monotonic() - start


@pytest.mark.slow
def test_silent_rank_times_out() -> None:
    results = run(_silent_rank, 2, timeout=30)
    message, seconds = results[0]
    assert message.startswith("rank 0: allreduce(name='grad'") and "within 2 s" in message, message
    assert 1.5 < seconds < 10, seconds
