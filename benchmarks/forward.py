"""Forward throughput (tokens/s) of lmforge vs transformers with the same weights and dtype.

Models: SmolLM2-135M-Instruct (lmforge loads the packaged GGUF; transformers loads the folder lmforge's
`save_model` writes from it) and a BERT-base-shape encoder with random weights (saved the same way, read with
`AutoModel`). Each forward is a full (B, 128) batch under `torch.inference_mode`; lmforge and transformers
runs alternate so machine noise hits both alike. Prints the median tokens/s of each and lmforge/transformers.

    .venv/bin/python benchmarks/forward.py                      # fp32, batch 1 and 8, seq 128, 2 threads
    .venv/bin/python benchmarks/forward.py --dtype bfloat16 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from lmforge.config import ModelConfig
from lmforge.io import load_model, resolve_dtype, save_model
from lmforge.models import build_model


def time_forward(run: Callable[[], object], repeats: int) -> list[float]:
    """Seconds per call of `run`, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def compare(name: str, ours: torch.nn.Module, theirs: torch.nn.Module, batches: list[int], seq: int,
            repeats: int) -> list[tuple[str, int, float, float]]:
    """Check both models agree, then time them on (batch, seq) random ids; rows of (name, batch, ours, theirs)
    in tokens/s."""
    rows = []
    extra = {"use_cache": False} if ours.config.arch == "decoder" else {}  # no KV cache on either side
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, ours.config.vocab_size, (batch, seq), generator=g)
        with torch.inference_mode():
            a, b = ours(ids), theirs(input_ids=ids, **extra)
            got = a.logits if a.logits is not None else a.last_hidden_state
            want = b.logits if hasattr(b, "logits") else b.last_hidden_state
            diff = (got.float() - want.float()).abs().max().item()
            ours_t: list[float] = []
            theirs_t: list[float] = []
            for _ in range(repeats):  # alternate, one timed call each per round
                ours_t += time_forward(lambda ids=ids: ours(ids), 1)
                theirs_t += time_forward(lambda ids=ids: theirs(input_ids=ids, **extra), 1)
        tokens = batch * seq
        rows.append((name, batch, tokens / statistics.median(ours_t), tokens / statistics.median(theirs_t)))
        print(f"  {name} batch {batch}: max |logit diff| {diff:.2e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="smollm2,bert-base")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # no load report for the BERT pooler lmforge does not keep
    dtype = resolve_dtype(args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "smollm2" in args.models:
            ours = load_model("smollm2-135m-instruct", dtype=dtype)
            save_model(ours, Path(tmp) / "smollm2")
            auto = transformers.AutoModelForCausalLM
            theirs = auto.from_pretrained(Path(tmp) / "smollm2", dtype=dtype).eval()
            rows += compare("SmolLM2-135M", ours, theirs, batches, args.seq, args.repeats)
            del ours, theirs
        if "bert-base" in args.models:
            torch.manual_seed(0)
            random = build_model(ModelConfig.from_name("bert-base-uncased", head="none")).to(dtype).eval()
            save_model(random, Path(tmp) / "bert")
            ours = load_model(Path(tmp) / "bert")
            theirs = transformers.AutoModel.from_pretrained(Path(tmp) / "bert", dtype=dtype).eval()
            rows += compare("BERT-base", ours, theirs, batches, args.seq, args.repeats)
    print(f"\nforward throughput, seq {args.seq}, {args.dtype}, {args.threads} threads, "
          f"median of {args.repeats} (torch {torch.__version__}, transformers {transformers.__version__})")
    print(f"{'model':<14} {'batch':>5} {'lmforge tok/s':>14} {'transformers tok/s':>19} {'ratio':>6}")
    for name, batch, ours_tps, theirs_tps in rows:
        print(f"{name:<14} {batch:>5} {ours_tps:>14,.0f} {theirs_tps:>19,.0f} {ours_tps / theirs_tps:>6.2f}")


if __name__ == "__main__":
    main()
