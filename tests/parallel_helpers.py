"""Run a function in N real processes that form a process group, as torchrun would, for distributed tests.

    results = spawn(my_worker, 4, arg1, timeout=60)   # list[RankResult], one per rank; never raises
    values = run(my_worker, 4, arg1)                  # list of return values; raises if any rank failed

Each rank gets the environment torchrun sets (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, GROUP_RANK, GROUP_WORLD_SIZE, ROLE_RANK, ROLE_WORLD_SIZE) plus OMP_NUM_THREADS=1 and `env`
(a dict, or a function rank -> dict). `local_size` ranks share a "node" (GROUP_RANK), so
`spawn(fn, 4, local_size=2)` looks like 2 nodes x 2 processes. The worker calls `lmforge.parallel.init()`.

Workers must be module-level functions (they are pickled by name) and return picklable values. Processes start
from a forkserver that has already imported torch, so a spawn costs a fork, not a fresh interpreter.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# torch._dynamo is imported lazily by the first optimizer step (seconds); the forkserver pays for it once.
_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "lmforge.parallel"]


@dataclass
class RankResult:
    """What one rank did: its return value, or the traceback text of what it raised, or how it exited."""

    rank: int
    value: Any = None
    error: str | None = None  # traceback when the worker raised, or why no result came back
    exitcode: int | None = None
    seconds: float = 0.0  # from the start of spawn() to the rank's result (or death)

    @property
    def ok(self) -> bool:
        return self.error is None


def free_port() -> int:
    """A TCP port that was free a moment ago, for MASTER_PORT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable[..., Any], rank: int, env: dict[str, str], results: Any, args: tuple) -> None:
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    try:
        results.put((rank, fn(*args), None))
    except BaseException:  # noqa: B036 - report everything, including SystemExit, to the parent
        results.put((rank, None, traceback.format_exc()))


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    env: dict[str, str] | Callable[[int], dict[str, str]] | None = None,
    local_size: int | None = None,
) -> list[RankResult]:
    """Run fn(*args) in `world_size` processes; wait at most `timeout` s, kill stragglers."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    local_size = local_size or world_size
    if world_size % local_size:
        raise ValueError(f"local_size {local_size} must divide world_size {world_size}")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    results = ctx.Queue()
    port = free_port()
    procs = []
    start = time.monotonic()
    for rank in range(world_size):
        rank_env = {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank % local_size),
            "LOCAL_WORLD_SIZE": str(local_size),
            "GROUP_RANK": str(rank // local_size),
            "GROUP_WORLD_SIZE": str(world_size // local_size),
            "ROLE_RANK": str(rank),
            "ROLE_WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": "1",
        }
        rank_env.update((env(rank) if callable(env) else env) or {})
        proc = ctx.Process(target=_child, args=(fn, rank, rank_env, results, args), daemon=True)
        proc.start()
        procs.append(proc)

    done: dict[int, RankResult] = {}
    deadline = start + timeout
    dead_since: dict[int, float] = {}
    while len(done) < world_size and time.monotonic() < deadline:
        try:
            rank, value, error = results.get(timeout=0.1)
            done[rank] = RankResult(rank, value, error, seconds=time.monotonic() - start)
            continue
        except queue.Empty:
            pass
        now = time.monotonic()
        for rank, proc in enumerate(procs):
            if rank in done or proc.exitcode is None:
                continue
            # A rank that exited may still have a result in the pipe: give it a moment before calling it lost.
            first_seen = dead_since.setdefault(rank, now)
            if now - first_seen > 1.0:
                error = f"rank {rank} exited with code {proc.exitcode} without a result"
                done[rank] = RankResult(rank, error=error, seconds=first_seen - start)
    for rank, proc in enumerate(procs):
        if rank not in done:
            done[rank] = RankResult(rank, error=f"rank {rank} did not finish within {timeout:g} s",
                                    seconds=time.monotonic() - start)
        proc.join(timeout=2.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
        done[rank].exitcode = proc.exitcode
    results.close()
    return [done[r] for r in range(world_size)]


def run(fn: Callable[..., Any], world_size: int, *args: Any, **kwargs: Any) -> list[Any]:
    """Like spawn(), but return the values in rank order; raise AssertionError naming the failed ranks."""
    out = spawn(fn, world_size, *args, **kwargs)
    failed = [r for r in out if not r.ok]
    if failed:
        text = "\n".join(f"--- rank {r.rank} (exit code {r.exitcode}):\n{r.error}" for r in failed)
        raise AssertionError(text)
    return [r.value for r in out]


# --- many checks in one process group, each reported under its own name -----------------------------------


@dataclass
class Phase:
    """Checks that run one after another in one mode: `env` is set and `init` passed to hvd.init()."""

    name: str
    checks: list[Callable[[int, int], None]]
    init: dict[str, Any]
    env: dict[str, str]

    def ids(self) -> list[str]:
        return [f"{self.name}:{check.__name__}" for check in self.checks]


def _run_phases(phases: list[Phase], report_port: int, boundary_s: float) -> None:
    """In every rank: run each check, post its outcome to the parent's store, and agree before the next one.

    A rank whose check raised leaves the process group at once, so peers blocked in a collective with it fail
    fast instead of hanging; after any failure every rank joins a fresh group, so the next check starts clean.
    """
    import datetime

    import torch.distributed as dist

    import lmforge.parallel as hvd

    n, r = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    store = dist.TCPStore("127.0.0.1", report_port, is_master=False,
                          timeout=datetime.timedelta(seconds=boundary_s))
    for phase in phases:
        os.environ.update(phase.env)
        hvd.init(**phase.init)
        for check, key in zip(phase.checks, phase.ids(), strict=True):
            try:
                check(n, r)
                error = ""
            except BaseException as err:  # pytest.fail / pytest.raises raise a BaseException (Failed)
                if isinstance(err, KeyboardInterrupt):
                    raise
                error = traceback.format_exc()
                hvd.shutdown()
            store.set(f"{key}/{r}", error or "ok")
            keys = [f"{key}/{s}" for s in range(n)]
            store.wait(keys)
            if any(store.get(k) != b"ok" for k in keys):
                hvd.shutdown()
                hvd.init(**phase.init)
        hvd.shutdown()
        for var in phase.env:
            os.environ.pop(var, None)


def run_checks(phases: list[Phase], world_size: int, timeout: float = 240.0,
               local_size: int | None = None) -> dict[str, list[str | None]]:
    """Run every phase's checks in `world_size` ranks; return check id -> per-rank traceback (None: passed).

    Outcomes travel through a store this process hosts, so they survive a rank that dies or hangs: its
    unfinished checks read "no report" plus why the rank ended, and every other check keeps its own result.
    """
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    results = spawn(_run_phases, world_size, phases, store.port, timeout, timeout=timeout,
                    local_size=local_size)
    report: dict[str, list[str | None]] = {}
    for phase in phases:
        for key in phase.ids():
            per_rank: list[str | None] = []
            for res in results:
                if store.check([f"{key}/{res.rank}"]):
                    text = store.get(f"{key}/{res.rank}").decode()
                    per_rank.append(None if text == "ok" else text)
                else:
                    per_rank.append(f"no report from rank {res.rank}: {res.error or 'it finished without one'}")
            report[key] = per_rank
    return report


def assert_check_passed(report: dict[str, list[str | None]], key: str, world_size: int) -> None:
    """Fail with every rank's traceback when `key` failed on any rank."""
    failures = [f"--- rank {r}:\n{text}" for r, text in enumerate(report[key]) if text is not None]
    assert not failures, f"{key} failed at world size {world_size}:\n" + "\n".join(failures)


def phase_tests(phases: list[Phase], world_sizes: list[int], timeout: float,
                local_size: dict[int, int] | None = None) -> tuple[Callable[..., Any], Callable[..., None]]:
    """A test module's fixture and test that run `phases` once per world size and report every check as a
    test id of its own (`world2-default:check_join`). In the module: `reports, test_x = phase_tests(...)`."""
    import pytest

    @pytest.fixture(scope="module", params=world_sizes, ids=lambda n: f"world{n}")
    def reports(request: Any) -> tuple[int, dict[str, list[str | None]]]:
        n = request.param
        return n, run_checks(phases, n, timeout=timeout, local_size=(local_size or {}).get(n))

    @pytest.mark.parametrize("check", [key for phase in phases for key in phase.ids()])
    def test(reports: tuple[int, dict[str, list[str | None]]], check: str) -> None:
        n, report = reports
        assert_check_passed(report, check, n)

    return reports, test


# --- closed forms shared by the collective and optimizer tests ----------------------------------------------


def adasum_pair(a: Any, b: Any) -> Any:
    """Adasum's closed form for two vectors: (1 - a.b / 2|a|^2) a + (1 - a.b / 2|b|^2) b."""
    dot = a @ b
    return (1 - dot / (2 * (a @ a))) * a + (1 - dot / (2 * (b @ b))) * b


def adasum_reference(gs: list[Any]) -> Any:
    """Adasum of 2^k tensors (any shape, combined as flat vectors): pairs (0, 1), (2, 3), ... first, then pairs
    of pairs, Horovod's recursive halving order."""
    shape = gs[0].shape
    gs = [g.reshape(-1) for g in gs]
    while len(gs) > 1:
        gs = [adasum_pair(gs[i], gs[i + 1]) for i in range(0, len(gs), 2)]
    return gs[0].reshape(shape)
