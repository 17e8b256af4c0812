"""Held-out perplexity of SmolLM2-135M-Instruct in each generation dtype against float32: the measurement
behind `lmforge generate`'s default dtype (float32 unless a dtype stays within 1% of fp32's perplexity).

    python benchmarks/dtype_perplexity.py                 # BBC News test split, first 4,096 tokens
    python benchmarks/dtype_perplexity.py --tokens 1024 --dtypes float32 bfloat16

The text is the BBC News test split joined with the tokenizer's eos between articles, cut to --tokens tokens
and scored in non-overlapping blocks of --block tokens (every token after a block's first is predicted), in
two ways: `forward`, each block in one forward (what training and `evaluate` run), and `decode`, teacher-forced
one token at a time through the key/value cache (`lmforge.generation.Decoding`: what `generate` runs, with its
decode-step kernels). Prints per dtype and mode the perplexity and its ratio to the first dtype's.

    python benchmarks/dtype_perplexity.py --greedy "The Lord is my shepherd"

`--greedy` also prints each dtype's 30-token greedy continuation beside transformers' in bfloat16, loaded two
ways: with `dtype=torch.bfloat16` (its rotary frequencies stay float32, as lmforge's) and as float32 then
`.to(torch.bfloat16)` (which also rounds the rotary frequencies to bf16), with the tokens each shares with
lmforge's: whether a bf16 continuation stays coherent turns on such roundings, not on the library.
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
    p.add_argument("--greedy", metavar="PROMPT", help="also compare greedy continuations of PROMPT")
    args = p.parse_args()
    print(host())
    print("native bf16 (oneDNN):", torch.ops.mkldnn._is_mkldnn_bf16_supported())
    tokenizer = Tokenizer.for_model(MODEL)
    ids = held_out_tokens(tokenizer, args.tokens)
    base: dict[str, float] = {}
    greedy: dict[str, torch.Tensor] = {}
    for name in args.dtypes:
        quantize = name if name in ("int8", "int4") else None
        dtype = preferred_dtype("cpu") if quantize else name
        model = load_model(MODEL, dtype=dtype, quantize=quantize)
        for mode in args.modes:
            ppl = perplexity(model, ids, args.block, mode)
            base.setdefault(mode, ppl)
            print(f"{name:9s} {mode:8s} perplexity {ppl:.4f}  ratio to {args.dtypes[0]} {ppl / base[mode]:.4f} "
                  f"({len(ids)} BBC test tokens, blocks of {args.block})", flush=True)
        if args.greedy:
            greedy[name] = model.generate(prompt_ids(tokenizer, args.greedy), max_new_tokens=30, do_sample=False)[0]
    if args.greedy:
        compare_greedy(tokenizer, args.greedy, greedy)


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])


def compare_greedy(tokenizer: Tokenizer, prompt: str, ours: dict[str, torch.Tensor]) -> None:
    """Print lmforge's greedy continuations and transformers' bf16 ones, with the tokens each shares with
    lmforge's bf16 (or first) continuation."""
    from transformers import AutoModelForCausalLM

    from lmforge.registry import packaged_path

    path = packaged_path(MODEL)
    ids = prompt_ids(tokenizer, prompt)
    runs = {f"lmforge {name}": out for name, out in ours.items()}
    for label, load in (("transformers bf16 (dtype=bfloat16)", torch.bfloat16),
                        ("transformers bf16 (float32 .to(bfloat16))", torch.float32)):
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=load)
        if load != torch.bfloat16:
            hf = hf.to(torch.bfloat16)  # casts every floating buffer, the rotary frequencies too
        with torch.no_grad():
            runs[label] = hf.generate(ids, max_new_tokens=30, do_sample=False)[0]
    ref = ours.get("bfloat16", next(iter(ours.values())))
    for label, out in runs.items():
        same = int((out[:len(ref)] == ref[:len(out)]).cumprod(0).sum()) - ids.shape[1]
        print(f"{label:42s} {same:2d} tokens as lmforge's: {tokenizer.decode(out.tolist())!r}")


if __name__ == "__main__":
    main()
