"""The decode step's matrix products in each weight format of `lmforge.models.linear`, against `F.linear` in
float32 (what transformers runs), on SmolLM2-135M's shapes, alternating call by call.

    python benchmarks/matvec.py             # 1 and 10 rows: F.linear bf16, lmforge's matvec kernel fp32/bf16,
                                            # packed fp32/bf16, int8 (its matvec kernel for <= 16 rows), int4

For each shape, 30 distinct weights (one per layer, as in a decode step, so that they stream from memory
rather than sit in cache) are multiplied by x (rows, in). Printed: the weight bytes each format reads per
second and its speed relative to fp32 `F.linear` (median of the per-round ratios, with min and max).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import alternate, host, ratio_summary, read_bandwidth

from lmforge.models.linear import Int4Linear, Int8Linear, PackedLinear
from lmforge.models.matvec import matvec

# SmolLM2-135M: fused q/k/v, o, fused gate/up, down, and the 49152-token LM head (out, in)
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate/up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def formats(weights: list[torch.Tensor]) -> dict[str, tuple[list, torch.dtype, int]]:
    """name -> (callables over x, activation dtype, bytes read)."""
    n = sum(w.numel() for w in weights)
    bf16 = [w.bfloat16() for w in weights]
    return {
        "F.linear fp32": ([lambda x, w=w: F.linear(x, w) for w in weights], torch.float32, 4 * n),
        "F.linear bf16": ([lambda x, w=w: F.linear(x, w) for w in bf16], torch.bfloat16, 2 * n),
        "matvec fp32": ([lambda x, w=w: matvec(x, w) for w in weights], torch.float32, 4 * n),
        "matvec bf16": ([lambda x, w=w: matvec(x, w) for w in bf16], torch.bfloat16, 2 * n),
        "packed fp32": ([PackedLinear(w) for w in weights], torch.float32, 4 * n),
        "packed bf16": ([PackedLinear(w) for w in bf16], torch.bfloat16, 2 * n),
        "int8 fp32": ([Int8Linear.from_float(w) for w in weights], torch.float32, n),
        "int8 bf16": ([Int8Linear.from_float(w) for w in bf16], torch.bfloat16, n),
        "int4 (bf16)": ([Int4Linear.from_float(w) for w in weights], torch.float32, n // 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 10], help="activation rows (default 1 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(host())
    print(f"streaming read (sum): {read_bandwidth() / 1e9:.1f} GB/s; {args.rounds} alternating rounds")
    with torch.inference_mode():
        for name, (out, inn) in SHAPES.items():
            count = 1 if name == "lm_head" else 30
            weights = [torch.randn(out, inn) * 0.02 for _ in range(count)]
            fmts = formats(weights)
            for rows in args.rows:
                x = torch.randn(rows, inn)
                inputs = [x.to(dt) for _, dt, _ in fmts.values()]
                pairs = zip(fmts.values(), inputs, strict=True)
                calls = [lambda fs=fs, x=xi: [f(x) for f in fs] for (fs, _, _), xi in pairs]
                times = alternate(calls, args.rounds)
                base = times[0]
                cells = []
                for (fmt, (_, _, nbytes)), t in zip(fmts.items(), times, strict=True):
                    med, lo, hi = ratio_summary(t, base)
                    gbs = nbytes / sorted(t)[len(t) // 2] / 1e9
                    cells.append(f"{fmt} {gbs:5.1f} GB/s {med:4.2f}x [{lo:.2f}-{hi:.2f}]")
                print(f"{name:<8} {out:>5}x{inn:<5} rows {rows:>2}: " + " | ".join(cells[1:]) +
                      f" | (F.linear fp32 {fmts['F.linear fp32'][2] / sorted(base)[len(base) // 2] / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    main()
