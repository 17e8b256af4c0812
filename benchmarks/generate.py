"""Generation speed and memory: lmforge against transformers' `generate` and llama.cpp, alternating call by call.

    python benchmarks/generate.py                  # CPU: SmolLM2-135M; fp32, bf16, int8, the GGUF's Q4_1 kept
    python benchmarks/generate.py --skip-rss       # speed only
    python benchmarks/generate.py --no-compile     # CPU: eager lmforge only
    python benchmarks/generate.py --device cuda    # GPU: bf16 batch 1 and 64, compiled step vs transformers eager

Every case times whole generate calls (prefill included) of exactly --new-tokens tokens per row after a fixed
English prompt, lmforge and its reference called in turn for --rounds rounds, and prints tokens/s (medians) and
the per-round speed ratio lmforge / reference as median [min - max]. On the CPU lmforge runs eager, then with
`compile=True` (the first call's compile time is printed); against llama.cpp it runs its compiled step. Batch-1
cases also print lmforge's fraction of the bandwidth bound: a decode step reads every weight once, so tokens/s
<= read bandwidth / weight bytes, the bandwidth measured by a streaming `sum` over 512 MiB that takes its turn in
the same alternation (on the CPU; the host's memory speed drifts within a run), the fraction taken per round
(median printed). References: transformers
(the same weights, saved by lmforge as an HF folder and loaded by transformers, in the same dtype; int8 and Q4_1
against its float32) and, when llama-cpp-python is installed, llama.cpp on the same GGUF file (2 threads, greedy
and 10 samples one after the other, as its Python API generates them). Peak resident memory (VmHWM) of
`lmforge generate` and of the same generation with transformers, each in a fresh process.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import alternate, host, ratio_summary, read_bandwidth

from lmforge.generation import generate_ids
from lmforge.io import load_model, save_model
from lmforge.models import Decoder
from lmforge.registry import packaged_path
from lmforge.tokenizer import Tokenizer

PROMPT = "The old lighthouse keeper climbed the stairs each evening and"
MODEL = "smollm2-135m-instruct"


def weight_bytes(model: Decoder) -> int:
    """Bytes one decode step reads: every weight once (a tied head once; embedding rows are few)."""
    seen, total = set(), 0
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        if t.data_ptr() in seen or "kv_cache" in name or name.startswith("embed_positions"):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    if not model.config.tie_embeddings and hasattr(model.embed_tokens, "weight"):
        total -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def transformers_model(folder: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def lmforge_call(model: Decoder, ids: torch.Tensor, new: int, **kw):
    seed = {"seed": 0} if kw.get("do_sample") else {}
    return lambda: generate_ids(model, ids, max_new_tokens=new, min_new_tokens=new, **kw, **seed)


def transformers_call(hf, ids: torch.Tensor, new: int, **kw):
    mask = torch.ones_like(ids)

    def call():
        with torch.inference_mode():  # both sample with transformers' defaults (top_k 50) when sampling
            return hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **kw)
    return call


def llama_cpp_call(llm, ids: torch.Tensor, new: int, samples: int):
    prompt = ids[0].tolist()

    def call():
        for _ in range(samples):
            llm.reset()  # no reuse of the previous call's prompt: every call runs its prefill
            sampled = dict(temp=0.9, top_k=50, top_p=1.0) if samples > 1 else dict(temp=0.0, top_k=1)
            list(itertools.islice(llm.generate(prompt, reset=False, **sampled), new))
    return call


def report(name: str, rows: int, new: int, ours: list[float], theirs: list[float], ref: str,
           bounds: list[float] | None = None) -> None:
    """bounds: the bandwidth bound (tok/s) of each round, in the order of `ours`."""
    med, lo, hi = ratio_summary(ours, theirs)
    tps = [rows * new / sorted(t)[len(t) // 2] for t in (ours, theirs)]
    extra = ""
    if bounds:
        share = statistics.median(rows * new / t / b for t, b in zip(ours, bounds, strict=True))
        extra = f" | lmforge at {share:4.0%} of the bound ({statistics.median(bounds):.0f} tok/s)"
    print(f"{name:<34} lmforge {tps[0]:7.1f} tok/s | {ref} {tps[1]:7.1f} tok/s | "
          f"ratio {med:4.2f}x [{lo:.2f}-{hi:.2f}]{extra}", flush=True)


def peak_rss(argv: list[str]) -> float:
    """Peak resident memory (MB) of a fresh `python benchmarks/generate.py --rss-worker ...` process."""
    out = subprocess.run([sys.executable, __file__, "--rss-worker", *argv], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def rss_worker(side: str, dtype: str, folder: str) -> None:
    """Generate 8 tokens greedily from PROMPT as a user would, then print this process's peak RSS."""
    torch.set_num_threads(2)
    if side == "lmforge":
        from lmforge.cli import main

        flags = ["--keep-quantized"] if dtype == "keep-quantized" else ["--dtype", dtype]
        main(["generate", PROMPT, "--max-new-tokens", "8", "--temperature", "0", "--model", MODEL, *flags])
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
        with torch.inference_mode():
            ids = tok(PROMPT, return_tensors="pt")
            print(tok.decode(model.generate(**ids, max_new_tokens=8, do_sample=False)[0]))
    # VmHWM: this process image's peak (ru_maxrss would carry over the peak of the parent that forked it)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024}))


def compile_seconds(model: Decoder, ids: torch.Tensor, **kw) -> float:
    """Wall seconds of the first `compile=True` call (tracing and compiling, or reading inductor's disk cache)."""
    t = time.perf_counter()
    generate_ids(model, ids, max_new_tokens=2, min_new_tokens=2, compile=True, **kw)
    return time.perf_counter() - t


class ReadProbe:
    """A streaming read of 512 MiB (`sum`), a candidate of `alternate` beside the generate calls."""

    def __init__(self):
        self.x = torch.ones(128 * 2**20)
        self.bytes = self.x.numel() * 4

    def __call__(self):
        return self.x.sum()


def cpu_cases(args: argparse.Namespace, folder: Path, ids: torch.Tensor) -> None:
    cpu = torch.device("cpu")
    probe = ReadProbe()
    new, rounds = args.new_tokens, args.rounds
    sampled = dict(do_sample=True, num_return_sequences=10)
    hf = {name: transformers_model(folder, getattr(torch, name), cpu) for name in ("float32", "bfloat16")}
    fp32 = load_model(MODEL, dtype=torch.float32)
    same = torch.equal(generate_ids(fp32, ids, max_new_tokens=new),
                       hf["float32"].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                              do_sample=False))
    print(f"greedy tokens identical to transformers in float32 ({new} new): {same}")

    models = {"float32": fp32, "bfloat16": load_model(MODEL, dtype=torch.bfloat16),
              "int8": load_model(MODEL, dtype=torch.bfloat16, quantize="int8"),
              "Q4_1 kept": load_model(MODEL, keep_quantized=True)}
    models = {name: model for name, model in models.items() if not args.only or name in args.only}
    for name, model in models.items():
        print(f"  {name}: {weight_bytes(model) / 1e6:.0f} MB of weights read per token")
    modes = [False] if args.no_compile else [False, True]
    for name, model in models.items():
        ref_name = name if name in hf else "float32"
        for compiled in modes if name != "Q4_1 kept" else [False]:
            label = f"{name}{' compiled' if compiled else ''}"
            if compiled:
                print(f"  {label}: first call {compile_seconds(model, ids):.0f} s (compiling), batch of 10 "
                      f"{compile_seconds(model, ids, **sampled):.0f} s", flush=True)
            kw = {"compile": True} if compiled else {}
            ours, theirs, reads = alternate([lmforge_call(model, ids, new, **kw),
                                             transformers_call(hf[ref_name], ids, new), probe], rounds)
            bounds = [probe.bytes / t / weight_bytes(model) for t in reads]
            report(f"batch-1 greedy, {label}", 1, new, ours, theirs, f"transformers {ref_name}", bounds)
            if name in ("float32", "bfloat16"):
                ours, theirs = alternate([lmforge_call(model, ids, new, **sampled, **kw),
                                          transformers_call(hf[name], ids, new, **sampled)], rounds)
                report(f"10 sampled, {label}", 10, new, ours, theirs, f"transformers {name}")
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python); skipped")
        return
    llm = Llama(model_path=str(packaged_path(MODEL)), n_threads=2, n_threads_batch=2, n_ctx=256, verbose=False)
    best = {} if args.no_compile else {"compile": True}  # lmforge's fastest paths against llama.cpp
    for name in [name for name in ("Q4_1 kept", "int8", "bfloat16") if name in models]:
        kw = best if name != "Q4_1 kept" else {}
        ours, theirs = alternate([lmforge_call(models[name], ids, new, **kw), llama_cpp_call(llm, ids, new, 1)],
                                 rounds)
        report(f"batch-1 greedy, {name}{' compiled' if kw else ''}", 1, new, ours, theirs, "llama.cpp Q4_1")
    for name in [name for name in ("int8", "bfloat16") if name in models]:
        ours, theirs = alternate([lmforge_call(models[name], ids, new, **sampled, **best),
                                  llama_cpp_call(llm, ids, new, 10)], max(2, rounds // 2))
        report(f"10 sampled, {name}{' compiled' if best else ''}", 10, new, ours, theirs, "llama.cpp Q4_1")


def cuda_cases(args: argparse.Namespace, folder: Path, ids: torch.Tensor, bandwidth: float) -> None:
    cuda = torch.device(args.device)
    model = load_model(MODEL, dtype=torch.bfloat16, device=cuda)
    hf = transformers_model(folder, torch.bfloat16, cuda)
    for batch in (1, 64):
        rows = ids.to(cuda).expand(batch, -1).contiguous()
        ours, theirs = alternate([lmforge_call(model, rows, args.new_tokens),
                                  transformers_call(hf, rows, args.new_tokens)], args.rounds, cuda)
        report(f"batch-{batch} greedy, bfloat16 (compiled)", batch, args.new_tokens, ours, theirs,
               "transformers eager", [bandwidth * batch / weight_bytes(model)] * len(ours))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--skip-rss", action="store_true", help="no peak-memory measurements")
    parser.add_argument("--no-compile", action="store_true", help="CPU: eager lmforge only (no compile=True cases)")
    parser.add_argument("--only", nargs="+", choices=["float32", "bfloat16", "int8", "Q4_1 kept"],
                        help="CPU: only these weight formats (llama.cpp cases included)")
    parser.add_argument("--rss-only", action="store_true", help="only the peak-memory measurements")
    parser.add_argument("--rss-worker", nargs=3, metavar=("SIDE", "DTYPE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_worker:
        return rss_worker(*args.rss_worker)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(host())
    bandwidth = read_bandwidth(device)
    tokenizer = Tokenizer.for_model(MODEL)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    print(f"{MODEL}; prompt of {ids.shape[1]} tokens, {args.new_tokens} new tokens, {args.rounds} alternating "
          f"rounds; streaming read {bandwidth / 1e9:.1f} GB/s")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_model(load_model(MODEL, dtype=torch.float32), folder)
        tokenizer.save(folder)
        if device.type == "cuda":
            cuda_cases(args, folder, ids, bandwidth)
            return None
        if not args.rss_only:
            cpu_cases(args, folder, ids)
        if not args.skip_rss:
            rss = {(side, dtype): peak_rss([side, dtype, str(folder)])
                   for side, dtypes in (("lmforge", ("float32", "bfloat16", "int8", "keep-quantized")),
                                        ("transformers", ("float32", "bfloat16")))
                   for dtype in dtypes}
            print("peak resident memory, `generate` of 8 tokens in a fresh process: " + ", ".join(
                f"{side} {dtype} {mb:.0f} MB" for (side, dtype), mb in rss.items()))
            for dtype in ("float32", "bfloat16"):
                print(f"  lmforge / transformers, {dtype}: {rss['lmforge', dtype] / rss['transformers', dtype]:.2f}x")
            for dtype in ("int8", "keep-quantized"):
                print(f"  lmforge {dtype} / lmforge float32: {rss['lmforge', dtype] / rss['lmforge', 'float32']:.2f}x")
    return None


if __name__ == "__main__":
    main()
