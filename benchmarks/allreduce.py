"""Allreduce: lmforge.parallel, checked (the default) and unchecked, vs raw torch.distributed, 2 and 4 ranks.

    python benchmarks/allreduce.py                          # 2 and 4 ranks, 1 KB .. 256 MB, gloo on CPU
    python benchmarks/allreduce.py --min-bytes 1M --max-bytes 64M --json allreduce.json

Launches itself under torchrun (`python -m torch.distributed.run --nproc-per-node N`) once per rank count.
For every size (float32, powers of 4) it alternates, repetition by repetition, raw `dist.all_reduce(t)`,
`hvd.allreduce_(t, op=hvd.Sum)` with the collective check on (the default) and with it off
(`init(check=False)`), each after a barrier; a repetition's time is the slowest rank's; the order of the
paths rotates from one repetition to the next. The check is timed three ways, each in a fresh init:
"checked" times the third call of a repeated allreduce (as a training step's calls repeat the last
step's): the prediction made on the second call came true, so it runs no signature exchange at all;
"predicted" times the second call, which sends its data at once while its signature all-gather runs;
"new sig." times the first call, which waits for the all-gather (9 int64 per rank) before sending data. The
signature exchanges each timed call made are counted too (a fact that does not depend on the load). Reports
median
times, algbw = bytes / time and busbw = algbw x 2(N-1)/N (nccl-tests' definitions), each path's overhead over
raw torch.distributed as the median [quartiles] of per-repetition ratios, and the median over sizes >= 1 MB
and rank counts of those per-size medians (target: <= 5% for the checked path).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from common import cpu_model  # benchmarks/common.py

import lmforge.parallel as hvd

UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


def parse_bytes(text: str) -> int:
    """'1K' -> 1024, '256M' -> 268435456, '4096' -> 4096."""
    text = text.strip().upper()
    scale = UNITS.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in UNITS else text
    if not number.isdigit() or int(number) * scale < 4:
        raise argparse.ArgumentTypeError(f"size must look like 1K, 16M or 4096 (bytes >= 4), got {text!r}")
    return int(number) * scale


def human(nbytes: float) -> str:
    for unit in ("G", "M", "K"):
        if nbytes >= UNITS[unit]:
            return f"{nbytes / UNITS[unit]:g}{unit}B"
    return f"{nbytes:g}B"


def sizes(lo: int, hi: int) -> list[int]:
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= 4
    return out


def repetitions(nbytes: int) -> int:
    return 50 if nbytes <= 2**20 else 12 if nbytes <= 16 * 2**20 else 6


def timed(fn) -> float:
    """Seconds for fn() on the slowest rank, after a barrier."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def worker(args: argparse.Namespace) -> None:
    """Runs in every rank under torchrun."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    n = dist.get_world_size()
    signature, table_out = torch.zeros(8, dtype=torch.int64), torch.empty(8 * n, dtype=torch.int64)
    round_trip = statistics.median(timed(lambda: dist.all_gather_into_tensor(table_out, signature))
                                   for _ in range(50))  # what the check adds: one such all-gather
    rows = []
    for nbytes in sizes(args.min_bytes, args.max_bytes):
        tensor = torch.ones(nbytes // 4)
        times: dict[str, list[float]] = {"torch": [], "unchecked": [], "checked": [], "predicted": [],
                                         "checked_new": []}
        exchanges: dict[str, set[int]] = {"checked": set(), "predicted": set(), "checked_new": set()}

        def raw(tensor: torch.Tensor = tensor) -> None:
            dist.all_reduce(tensor)

        def ours(tensor: torch.Tensor = tensor) -> None:
            hvd.allreduce_(tensor, op=hvd.Sum)

        def checked_after(path: str, untimed: int, exchanges: dict[str, set[int]] = exchanges) -> float:
            """The call after `untimed` identical ones, in a fresh init (checked: the default)."""
            hvd.init()  # reuses the process group; the mode is a local flag
            try:
                for _ in range(untimed):
                    ours()
                before = hvd.runtime._require().exchanges
                seconds = timed(ours)
                exchanges[path].add(hvd.runtime._require().exchanges - before)
                return seconds
            finally:
                hvd.shutdown()

        def unchecked() -> float:
            hvd.init(check=False)
            try:
                return timed(ours)
            finally:
                hvd.shutdown()

        paths = {"torch": lambda: timed(raw), "unchecked": unchecked,
                 "checked": lambda: checked_after("checked", 2),  # the prediction came true: no exchange
                 "predicted": lambda: checked_after("predicted", 1),  # data at once, exchange alongside
                 "checked_new": lambda: checked_after("checked_new", 0)}  # nothing verified: full round trip
        for rep in range(repetitions(nbytes) + 1):  # the first round warms up and is dropped
            shift = rep % len(paths)
            order = list(paths)[shift:] + list(paths)[:shift]  # rotate: no path always goes first
            measured = {name: paths[name]() for name in order}
            if rep:
                for name, seconds in measured.items():
                    times[name].append(seconds)
        row = {"ranks": n, "bytes": nbytes, "signature_s": round_trip,
               **{f"{k}_s": statistics.median(v) for k, v in times.items()},
               **{f"{k}_exchanges": sorted(v) for k, v in exchanges.items()}}
        for path in ("checked", "predicted", "checked_new", "unchecked"):  # per-repetition ratios, quartiles
            q1, q2, q3 = statistics.quantiles([a / b for a, b in zip(times[path], times["torch"], strict=True)],
                                              n=4)
            row[f"{path}_ratio"], row[f"{path}_q1"], row[f"{path}_q3"] = q2, q1, q3
        rows.append(row)
    if dist.get_rank() == 0:
        print(json.dumps(rows))
    dist.destroy_process_group()


def table(rows: list[dict]) -> str:
    n = rows[0]["ranks"]
    factor = 2 * (n - 1) / n
    lines = [
        f"ranks={n}  (gloo, CPU, float32, Sum; busbw = algbw x {factor:.2f}; overhead vs torch.distributed; "
        f"the check's all-gather of 8 int64 alone: {rows[0]['signature_s'] * 1e6:.0f} us)",
        f"{'size':>8} | {'torch us':>10} {'algbw GB/s':>10} {'busbw':>7} | {'checked us':>10} {'busbw':>7} "
        f"{'overhead [q1, q3]':>22} | {'predicted us':>12} {'overhead [q1, q3]':>22} | {'new sig. us':>11} "
        f"{'overhead [q1, q3]':>22} | {'unchecked us':>12} {'overhead [q1, q3]':>22} | "
        "exchanges per call (checked / predicted / new)",
    ]

    def overhead(row: dict, path: str) -> str:
        pct = [(row[f"{path}_{k}"] - 1) * 100 for k in ("ratio", "q1", "q3")]
        return f"{pct[0]:6.1f}% [{pct[1]:5.1f}, {pct[2]:5.1f}]"

    for row in rows:
        raw, checked, unchecked = row["torch_s"], row["checked_s"], row["unchecked_s"]
        algbw = row["bytes"] / raw / 1e9
        lines.append(
            f"{human(row['bytes']):>8} | {raw * 1e6:10.1f} {algbw:10.3f} {algbw * factor:7.3f} | "
            f"{checked * 1e6:10.1f} {row['bytes'] / checked / 1e9 * factor:7.3f} {overhead(row, 'checked'):>22} | "
            f"{row['predicted_s'] * 1e6:12.1f} {overhead(row, 'predicted'):>22} | "
            f"{row['checked_new_s'] * 1e6:11.1f} {overhead(row, 'checked_new'):>22} | "
            f"{unchecked * 1e6:12.1f} {overhead(row, 'unchecked'):>22} | "
            f"{row['checked_exchanges']} / {row['predicted_exchanges']} / {row['checked_new_exchanges']}"
        )
    return "\n".join(lines)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--min-bytes", type=parse_bytes, default=parse_bytes("1K"))
    parser.add_argument("--max-bytes", type=parse_bytes, default=parse_bytes("256M"))
    parser.add_argument("--json", help="also write every measured row to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; gloo", flush=True)
    all_rows = []
    for n in args.ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               __file__, "--worker", "--min-bytes", str(args.min_bytes), "--max-bytes", str(args.max_bytes)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        rows = json.loads(out.strip().splitlines()[-1])
        print(table(rows), end="\n\n", flush=True)
        all_rows += rows
    big = [r for r in all_rows if r["bytes"] >= 2**20]
    for path, target in (("checked", " (target <= 5%)"), ("predicted", ""), ("checked_new", ""),
                         ("unchecked", "")):
        overheads = sorted((r[f"{path}_ratio"] - 1) * 100 for r in big)
        if overheads:
            print(f"{path} overhead at >= 1 MB over {len(overheads)} (size, ranks) pairs: median "
                  f"{statistics.median(overheads):.1f}%, range {overheads[0]:.1f}% .. {overheads[-1]:.1f}%{target}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=1)


if __name__ == "__main__":
    main()
