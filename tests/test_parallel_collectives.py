"""lmforge.parallel collectives under real processes (gloo, CPU), against closed-form answers.

One process group per world size runs every check (fast path, then coordinated mode) and reports each check's
outcome; the tests below read those reports. Rank r contributes `base + r`, so Sum = N*base + N(N-1)/2,
Min = base, Max = base + N - 1, Product = prod_r (base + r).
"""

from __future__ import annotations

import math
import os
import signal
import time
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from parallel_helpers import run, spawn

import lmforge.parallel as hvd

WORLD_SIZES = [2, 3, 4]
LOCAL_SIZE = {2: 2, 3: 3, 4: 2}  # world size 4 runs as 2 "nodes" x 2 processes
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64]
SHAPES = [(), (5,), (3, 4), (2, 3, 4)]


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
            for op in hvd.ReduceOp:
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
    handles = [hvd.allreduce_async(base + r, op=op, name=f"a{op.value}") for op in hvd.ReduceOp]
    x = base + r
    inplace = hvd.allreduce_async_(x, op=hvd.Sum)
    while not hvd.poll(inplace):
        time.sleep(0.001)
    assert hvd.synchronize(inplace) is x
    _close(x, _expected(hvd.Sum, base, n), torch.float64)
    for op, handle in zip(hvd.ReduceOp, handles, strict=True):
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
    """allreduce / allgather are differentiable: L = sum_s w_s . y_s with w_s = s + 1 on rank s."""
    w_sum = n * (n + 1) / 2  # sum over ranks of the output-gradient weights
    for op, factor in ((hvd.Sum, 1.0), (hvd.Average, 1.0 / n)):
        x = torch.full((3,), float(r), requires_grad=True)
        y = hvd.allreduce(x, op=op, prescale_factor=2.0, name="ad")
        (y * (r + 1)).sum().backward()
        _close(x.grad, torch.full((3,), 2.0 * factor * w_sum), torch.float32)
    x = torch.full((r + 1, 2), float(r), requires_grad=True)  # rank r sends r + 1 rows
    y = hvd.allgather(x)
    (y * (r + 1)).sum().backward()
    _close(x.grad, torch.full((r + 1, 2), w_sum), torch.float32)
    assert hvd.allreduce(torch.ones(1, requires_grad=True), op=hvd.Max).grad_fn is None


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
    with pytest.raises(ValueError, match="floating-point"):
        hvd.allreduce(torch.zeros(2, dtype=torch.int64), prescale_factor=2.0)


def check_mismatch(n: int, r: int) -> None:
    """Coordinated mode: a wrong shape or a different collective raises a named error on every rank."""
    shape = (3, 5) if r == n - 1 else (3, 4)
    with pytest.raises(hvd.CollectiveMismatchError) as info:
        hvd.allreduce(torch.ones(shape), name="layer.weight")
    text = str(info.value)
    assert f"rank {n - 1} called allreduce(name='layer.weight', shape=(3, 5)" in text, text
    assert "'layer.weight'" in text and "shape=(3, 4)" in text
    with pytest.raises(hvd.CollectiveMismatchError, match="broadcast") as info:
        if r == 0:
            hvd.broadcast(torch.ones(2), 0, name="x")
        else:
            hvd.allreduce(torch.ones(2), name="x")
    assert "rank 0 called broadcast(name='x'" in str(info.value)
    with pytest.raises(hvd.CollectiveMismatchError, match="dtype"):
        hvd.allgather(torch.ones(2, dtype=torch.float64 if r == 0 else torch.float32))
    # The group is still usable after a mismatch.
    _close(hvd.allreduce(torch.ones(2), op=hvd.Sum), torch.full((2,), float(n)), torch.float32)


def check_join(n: int, r: int) -> None:
    """Rank r has r + 1 batches; ranks that run out join and the others carry on."""
    for step in range(r + 1):
        active = list(range(step, n))  # ranks that still have a batch at this step
        total = sum(s + 1 for s in active)
        _close(hvd.allreduce(torch.full((3,), float(r + 1)), op=hvd.Sum), torch.full((3,), float(total)),
               torch.float32)
        _close(hvd.allreduce(torch.full((3,), float(r + 1)), op=hvd.Average),
               torch.full((3,), total / len(active)), torch.float32)
        _close(hvd.allreduce(torch.full((2,), r + 1), op=hvd.Min), torch.full((2,), step + 1), torch.int64)
        gathered = torch.tensor(active).unsqueeze(1).expand(-1, 2)
        _close(hvd.allgather(torch.full((1, 2), r)), gathered, torch.int64)
        _close(hvd.broadcast(torch.full((2,), float(r)), root_rank=n - 1), torch.full((2,), float(n - 1)),
               torch.float32)
        hvd.barrier()
    assert hvd.join() == n - 1
    assert hvd.join() in range(n)  # everyone joins together: still returns a rank
    _close(hvd.allreduce(torch.ones(1), op=hvd.Sum), torch.full((1,), float(n)), torch.float32)


FAST_CHECKS: list[Callable[[int, int], None]] = [
    check_topology, check_allreduce, check_allreduce_async, check_compression, check_grouped_allreduce,
    check_allgather, check_broadcast, check_alltoall, check_reducescatter, check_autograd, check_objects,
    check_bad_inputs,
]
COORDINATED_CHECKS = [check_allreduce, check_allreduce_async, check_grouped_allreduce, check_allgather,
                      check_broadcast, check_alltoall, check_reducescatter, check_autograd, check_objects,
                      check_mismatch, check_join]


def _suite() -> dict[str, str | None]:
    """Every check, fast path then coordinated mode, in one process group; name -> traceback or None."""
    n, r = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    dist.init_process_group("gloo")  # hvd.init() reuses it, so shutdown() + init() can switch modes
    report: dict[str, str | None] = {}
    for mode, checks in (("fast", FAST_CHECKS), ("coordinated", COORDINATED_CHECKS)):
        hvd.init(uneven_inputs=mode == "coordinated", timeout=30)
        for check in checks:
            try:
                check(n, r)
                report[f"{mode}:{check.__name__}"] = None
            except Exception:
                report[f"{mode}:{check.__name__}"] = traceback.format_exc()
                hvd.barrier()  # a failed check on one rank may leave others mid-check: best-effort resync
        hvd.shutdown()
    dist.destroy_process_group()
    return report


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"world{n}")
def reports(request) -> tuple[int, list[dict[str, str | None]]]:
    n = request.param
    return n, run(_suite, n, timeout=120, local_size=LOCAL_SIZE[n])


CHECK_IDS = [f"fast:{c.__name__}" for c in FAST_CHECKS]
CHECK_IDS += [f"coordinated:{c.__name__}" for c in COORDINATED_CHECKS]


@pytest.mark.parametrize("check", CHECK_IDS)
def test_collective(reports, check: str) -> None:
    n, per_rank = reports
    failures = [f"rank {r}:\n{rep[check]}" for r, rep in enumerate(per_rank) if rep.get(check, "missing")]
    assert not failures, f"{check} failed at world size {n}:\n" + "\n".join(failures)


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
