"""Shared by the benchmarks: the host's description, alternating timings, per-pair ratios, read bandwidth.

A shared machine drifts (other jobs, frequency, the host itself changes between sessions), so a benchmark
never times all of one side and then all of the other: `alternate` calls the candidates in turn, one call
each per round, and `ratio_summary` reports the median of the per-round ratios with their min and max.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512_fp16", "amx_bf16", "amx_int8")


def _cpuinfo(field: str) -> str | None:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    m = re.search(rf"^{field}\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else None


def cpu_model() -> str:
    """The CPU's model name (benchmarks print where they ran)."""
    return _cpuinfo("model name") or platform.processor() or "unknown CPU"


def host() -> str:
    """CPU model, ISA flags that matter to the kernels, cores, torch version and threads."""
    model, flags = cpu_model(), set((_cpuinfo("flags") or "").split())
    isa = " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + ", ".join(ISA_FLAGS)
    return (f"{model} | ISA: {isa} | torch {torch.__version__} "
            f"(CPU capability {torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device = CPU) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def alternate(fns: Sequence[Callable[[], object]], rounds: int,
              device: torch.device = CPU) -> list[list[float]]:
    """Seconds per call: times[i][r] for candidate i in round r; one warm-up call each first, then every round
    calls each candidate once, in turn (the order rotates each round so no side always goes first)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        order = list(range(len(fns)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            times[i].append(timed(fns[i], device))
    return times


def ratio_summary(ours: Sequence[float], theirs: Sequence[float]) -> tuple[float, float, float]:
    """Per-round speed ratios theirs_time / ours_time (> 1: ours faster): (median, min, max)."""
    ratios = [t / o for o, t in zip(ours, theirs, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def read_bandwidth(device: torch.device = CPU) -> float:
    """Bytes/s of a streaming read (`sum` over 512 MiB of fp32), median of 5."""
    x = torch.ones(128 * 2**20, device=device)
    x.sum()
    return x.numel() * 4 / statistics.median(timed(lambda: x.sum(), device) for _ in range(5))


def sent_bytes() -> int:
    """Bytes this process has written through write-family system calls (gloo writes its socket messages with
    writev, which /proc/self/io's wchar counts)."""
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["wchar"])


def run_ranks(argv: list[str], nproc: int | None, what: str) -> list[dict]:
    """Run `python *argv --out DIR` in one process (nproc None) or under `torchrun --standalone` with `nproc`
    processes, one thread each, src/ on PYTHONPATH; return the rank*.json records they wrote into DIR, in rank
    order. Raises RuntimeError with the tail of stderr, naming `what`, when the run fails."""
    with tempfile.TemporaryDirectory() as out:
        own = [*argv, "--out", out]
        cmd = [sys.executable, *own] if nproc is None else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *own]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{what} run failed:\n{proc.stderr[-4000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"), key=lambda p: int(p.stem[4:]))]
