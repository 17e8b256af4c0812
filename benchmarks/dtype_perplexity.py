"""Held-out perplexity of SmolLM2-135M-Instruct in each generation dtype against float32: the measurement
behind `lmforge generate`'s default dtype (float32 unless a dtype stays within 1% of fp32's perplexity).

    python benchmarks/dtype_perplexity.py                 # BBC News test split, first 4,096 tokens
    python benchmarks/dtype_perplexity.py --tokens 1024 --dtypes float32 bfloat16

The text is the BBC News test split joined with the tokenizer's eos between articles, cut to --tokens tokens
and scored in non-overlapping blocks of --block tokens (every token after a block's first is predicted), in
two ways: `forward`, each block in one forward (what training and `evaluate` run), and `decode`, teacher-forced
one token at a time through the key/value cache (`lmforge.generation.Decoding`: what `generate` runs, with its
decode-step kernels). Prints per dtype and mode the perplexity and its ratio to the first dtype's.
"""

from __future__ import annotations

import argparse
import math

import torch
from common import host

from lmforge.data import bbc_news
from lmforge.generation import Decoding, preferred_dtype
from lmforge.io import load_model
from lmforge.tokenizer import Tokenizer

MODEL = "smollm2-135m-instruct"


def held_out_tokens(tokenizer: Tokenizer, n: int) -> torch.Tensor:
    ids: list[int] = []
    for text in bbc_news("test").texts:
        ids += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        if len(ids) >= n:
            break
    return torch.tensor(ids[:n])


def decode_logits(model, chunk: torch.Tensor) -> torch.Tensor:
    """Logits (T, V) of chunk (1, T), the first token prefilled and every later one fed as a decode step."""
    run = Decoding(model, chunk[:, :1], torch.ones_like(chunk[:, :1]), chunk.shape[1] - 1, use_compile=False)
    rows = [run.prefill(chunk[:, :1])]
    rows += [run.step(chunk[:, t]) for t in range(1, chunk.shape[1])]
    return torch.cat(rows)


def perplexity(model, ids: torch.Tensor, block: int, mode: str) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids), block):
            chunk = ids[start:start + block][None]
            if chunk.shape[1] < 2:
                continue
            logits = model(chunk).logits.float() if mode == "forward" else decode_logits(model, chunk)[None]
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
            nll, count = nll + float(loss), count + chunk.shape[1] - 1
    return math.exp(nll / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8"])
    p.add_argument("--modes", nargs="+", choices=["forward", "decode"], default=["forward", "decode"])
    args = p.parse_args()
    print(host())
    print("native bf16 (oneDNN):", torch.ops.mkldnn._is_mkldnn_bf16_supported())
    tokenizer = Tokenizer.for_model(MODEL)
    ids = held_out_tokens(tokenizer, args.tokens)
    base: dict[str, float] = {}
    for name in args.dtypes:
        quantize = name if name in ("int8", "int4") else None
        dtype = preferred_dtype("cpu") if quantize else name
        model = load_model(MODEL, dtype=dtype, quantize=quantize)
        for mode in args.modes:
            ppl = perplexity(model, ids, args.block, mode)
            base.setdefault(mode, ppl)
            print(f"{name:9s} {mode:8s} perplexity {ppl:.4f}  ratio to {args.dtypes[0]} {ppl / base[mode]:.4f} "
                  f"({len(ids)} BBC test tokens, blocks of {args.block})", flush=True)


if __name__ == "__main__":
    main()
