"""Generation speed: lmforge against transformers' `generate`, same weights, same dtype, in one run.

    python benchmarks/generate.py                # CPU: SmolLM2-135M, batch-1 greedy, 10 samples; fp32, bf16
    python benchmarks/generate.py --device cuda  # GPU: SmolLM2-135M and GPT-2-124M shape, batch 1 and 64

Each case times whole `generate` calls (prefill included) producing exactly --new-tokens tokens per row
(min_new_tokens keeps eos away) and prints the medians, tokens/s and the lmforge / transformers ratio. It also
prints tokens/s as a fraction of the memory-bandwidth bound: a decode step must read every weight once, so
tokens/s <= batch * read bandwidth / weight bytes, with the read bandwidth measured here (a large `sum`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from lmforge.config import ModelConfig
from lmforge.generation import DecodeStep, generate_ids
from lmforge.io import load_model, save_model
from lmforge.models import Decoder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up: builds lmforge's decode step / compiles CUDA graphs, fills allocator caches
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def read_bandwidth(device: torch.device) -> float:
    """Bytes/s of a streaming read (`sum` over 512 MiB of fp32), median of 5."""
    x = torch.ones(128 * 2**20, device=device)
    return x.numel() * 4 / median_seconds(lambda: x.sum(), 5, device)


def weight_bytes(model: Decoder) -> int:
    """Bytes one decode step reads: every matrix once (a tied head counts once; embedding rows are few)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen or name.startswith("embed_positions"):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    if not model.config.tie_embeddings:
        total -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def as_transformers(model: Decoder, dtype: torch.dtype, device: torch.device):
    """The same weights in transformers: saved by lmforge in Hugging Face layout, loaded back."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        save_model(model, folder)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def run_case(name: str, model: Decoder, hf, ids: torch.Tensor, new: int, repeats: int, bandwidth: float,
             **kw) -> None:
    device = ids.device
    rows = ids.shape[0] * kw.get("num_return_sequences", 1)
    kw = dict(max_new_tokens=new, min_new_tokens=new, **kw)
    seed = {"seed": 0} if kw.get("do_sample") else {}
    ours = median_seconds(lambda: generate_ids(model, ids, **kw, **seed), repeats, device)
    with torch.inference_mode():  # both sample with transformers' defaults (top_k 50) when sampling
        mask = torch.ones_like(ids)
        theirs = median_seconds(lambda: hf.generate(ids, attention_mask=mask, **kw), repeats, device)
    bound = rows * bandwidth / weight_bytes(model)
    tps_ours, tps_theirs = rows * new / ours, rows * new / theirs
    print(f"{name:<44} lmforge {tps_ours:8.1f} tok/s ({ours:6.3f} s) | transformers {tps_theirs:8.1f} tok/s "
          f"({theirs:6.3f} s) | ratio {tps_ours / tps_theirs:5.2f}x | bound {bound:8.0f} tok/s: lmforge "
          f"{tps_ours / bound:5.1%}, transformers {tps_theirs / bound:5.1%}")


def same_greedy_tokens(model: Decoder, hf, ids: torch.Tensor, new: int) -> bool:
    ours = generate_ids(model, ids, max_new_tokens=new)
    with torch.inference_mode():
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    return ours.shape == theirs.shape and bool(torch.equal(ours.cpu(), theirs.cpu()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth(device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"measured read bandwidth {bandwidth / 1e9:.1f} GB/s; prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    g = torch.Generator().manual_seed(0)

    if device.type == "cpu":
        cases = [("float32", [("batch-1 greedy", 1, {}), ("10 sampled sequences", 1,
                                                          dict(do_sample=True, num_return_sequences=10))]),
                 ("bfloat16", [("batch-1 greedy", 1, {}), ("10 sampled sequences", 1,
                                                           dict(do_sample=True, num_return_sequences=10))])]
        models = [("SmolLM2-135M", None)]
    else:
        cases = [("bfloat16", [("batch-1 greedy", 1, {}), ("batch-64 greedy", 64, {})])]
        models = [("SmolLM2-135M", None), ("GPT-2-124M shape (random)", "gpt2")]

    for model_name, preset in models:
        for dtype_name, dtype_cases in cases:
            dtype = getattr(torch, dtype_name)
            if preset is None:
                model = load_model("smollm2-135m-instruct", dtype=dtype, device=device)
            else:
                torch.manual_seed(0)
                model = Decoder(ModelConfig.from_name(preset)).to(device=device, dtype=dtype).eval()
            hf = as_transformers(model, dtype, device)
            t = time.perf_counter()
            DecodeStep.for_model(model)
            print(f"\n{model_name} {dtype_name}: {weight_bytes(model) / 1e6:.0f} MB of weights per token; "
                  f"decode step built in {time.perf_counter() - t:.2f} s")
            vocab = model.config.vocab_size
            if dtype == torch.float32:
                prompt = torch.randint(0, vocab, (1, args.prompt_tokens), generator=g).to(device)
                print(f"greedy tokens identical to transformers ({args.new_tokens} new): "
                      f"{same_greedy_tokens(model, hf, prompt, args.new_tokens)}")
            for case, batch, kw in dtype_cases:
                ids = torch.randint(0, vocab, (batch, args.prompt_tokens), generator=g).to(device)
                run_case(f"{case} {dtype_name}", model, hf, ids, args.new_tokens, args.repeats, bandwidth,
                         **kw)
            del model, hf


if __name__ == "__main__":
    main()
