"""Sequence-to-sequence decode speed: lmforge's T5 against transformers' `generate`, alternating call by call.

    python benchmarks/generate_seq2seq.py                        # t5-small shape (v1.0), float32
    python benchmarks/generate_seq2seq.py --version v1.1         # flan-t5-small shape (gated GELU, untied head)
    python benchmarks/generate_seq2seq.py --rounds 5 --new-tokens 32 --source-len 64

No T5 weights exist in any registry, so both sides run the same random weights: a transformers T5 of the
published shape, seeded, saved with `save_pretrained` and loaded by lmforge from that folder. Cases: batch 1
greedy, and batch 8 (source lengths from source_len/2 to source_len, right-padded) with 4 beams. Every call
generates exactly --new-tokens decoder tokens per row (min_new_tokens = max_new_tokens, so eos never ends a
call early), encoder included. Prints tokens/s (medians over rounds) and the per-round speed ratio
transformers_time / lmforge_time as median [min - max] (> 1: lmforge faster), and whether the tokens are
identical. Say the machine's load (`uptime`) beside any figure taken from here.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from common import alternate, host, ratio_summary

from lmforge.io import load_model

SHAPES = {  # transformers T5Config fields of the published small models
    "v1.0": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                 feed_forward_proj="relu"),
    "v1.1": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def sources(rows: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random source ids (rows, length), ids in [2, 32000), row i with length - i * length // (2 * rows) real
    tokens (right padding, 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 32000, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(rows):
        mask[i, length - i * length // (2 * rows):] = 0
    return ids.masked_fill(mask == 0, 0), mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", choices=sorted(SHAPES), default="v1.0")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--source-len", type=int, default=64)
    args = parser.parse_args()
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(**SHAPES[args.version], decoder_start_token_id=0)  # as published configs say
    hf = transformers.T5ForConditionalGeneration(config).eval()
    if args.version == "v1.1":  # transformers 5 ties every T5 head unless the file holds a different one
        hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight))
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        model = load_model(Path(folder))
    print(host())
    print(f"load: {os.getloadavg()}")
    params = sum(p.numel() for p in model.parameters())
    print(f"T5 {args.version} shape, random weights, {params / 1e6:.1f}M parameters, float32; source "
          f"{args.source_len} tokens, {args.new_tokens} new tokens per row, {args.rounds} rounds")
    new = args.new_tokens
    for name, rows, kw in (("batch 1, greedy", 1, {}), ("batch 8, 4 beams", 8, dict(num_beams=4))):
        ids, mask = sources(rows, args.source_len)
        settings = dict(max_new_tokens=new, min_new_tokens=new, **kw)

        def ours(ids=ids, mask=mask, settings=settings):
            return model.generate(ids, mask, **settings)

        def theirs(ids=ids, mask=mask, settings=settings):
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=mask, do_sample=False, **settings)

        same = torch.equal(ours(), theirs())
        times = alternate([ours, theirs], args.rounds)
        med, lo, hi = ratio_summary(times[0], times[1])
        tps = [rows * new / sorted(t)[len(t) // 2] for t in times]
        print(f"{name:<18} lmforge {tps[0]:7.1f} tok/s | transformers {tps[1]:7.1f} tok/s | ratio {med:4.2f}x "
              f"[{lo:.2f}-{hi:.2f}] | tokens identical: {same}", flush=True)


if __name__ == "__main__":
    main()
