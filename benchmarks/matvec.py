"""The decode step's matrix products: lmforge's kernel against `F.linear` (what transformers runs), one run.

    python benchmarks/matvec.py             # SmolLM2-135M shapes, 1 and 10 rows, fp32 and bf16

For each shape, 30 distinct weights (one per layer, as in a decode step, so that they stream from memory
rather than sit in cache) are multiplied by x (rows, in); the script prints the weight bytes read per second
by both and the ratio (F.linear time / lmforge time: > 1 means lmforge is faster), medians of --repeats.
On CPU lmforge's kernel is oneDNN's inner product over weights reordered once into its blocked layout.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from generate import median_seconds, read_bandwidth  # benchmarks/generate.py: the same timing and bandwidth

from lmforge.generation import _MatVec

# SmolLM2-135M: fused q/k/v, o, fused gate/up, down, and the 49152-token LM head (out, in)
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate/up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    bandwidth = read_bandwidth(cpu)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, streaming read (sum) "
          f"{bandwidth / 1e9:.1f} GB/s; GB/s = weight bytes read per second, median of {args.repeats}")
    ratios = []
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            for name, (out, inn) in SHAPES.items():
                count = 1 if name == "lm_head" else 30
                weights = [torch.randn(out, inn, dtype=dtype) for _ in range(count)]
                ours = [_MatVec(w, None) for w in weights]
                nbytes = count * out * inn * weights[0].element_size()
                for rows in (1, 10):
                    x = torch.randn(rows, inn, dtype=dtype)
                    torch.testing.assert_close(ours[0](x), F.linear(x, weights[0]), rtol=2e-2, atol=2e-2)
                    theirs_s = median_seconds(lambda x=x, ws=weights: [F.linear(x, w) for w in ws], args.repeats, cpu)
                    ours_s = median_seconds(lambda x=x, ms=ours: [m(x) for m in ms], args.repeats, cpu)
                    ratios.append(theirs_s / ours_s)
                    print(f"{str(dtype)[6:]:<9} {name:<8} {out:>5}x{inn:<5} rows {rows:>2}: lmforge "
                          f"{nbytes / ours_s / 1e9:5.1f} GB/s | F.linear {nbytes / theirs_s / 1e9:5.1f} GB/s | "
                          f"ratio {theirs_s / ours_s:4.2f}x")
    print(f"ratio: median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}x - {max(ratios):.2f}x")


if __name__ == "__main__":
    main()
