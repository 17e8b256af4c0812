"""One training step: lmforge's training loop vs the same model in transformers with a plain PyTorch loop.

    python benchmarks/train_step.py                       # CPU: DistilGPT2 shape, B=2, T=128, fp32
    python benchmarks/train_step.py --device cuda         # GPU: GPT-2-124M shape, B=16, T=1024, bf16, + MFU
    python benchmarks/train_step.py --device cuda --compile

Both sides get the same architecture (random weights), the same batch shape, dtype and autocast, AdamW with
the same hyperparameters (no decay on biases and norms), gradient clipping at 1.0 and a cosine schedule.
lmforge: `lmforge.training.train` with `CausalLM` (timed step to step through its `on_step` hook, which also
synchronises the GPU). transformers: `GPT2LMHeadModel(labels=input_ids)` with a hand-written loop doing the
same work. Rounds alternate between the two so that noise from other processes spreads over both; the first
step of every round (optimizer state creation, compilation) is dropped. Prints the median step time, tokens/s,
the ratio (transformers time / lmforge time: > 1 means lmforge is faster) and, on CUDA, the MFU against the
H100's dense bf16 peak (989 TFLOP/s), with 6 N + 12 L T d training FLOPs per token (PaLM appendix B; N counts
the token embedding once, as the tied LM head's matmul, and not the position table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

H100_BF16_DENSE_FLOPS = 989.4e12


def flops_per_token(n_params: int, n_layer: int, seq_len: int, d_model: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls (forward + backward) + 12 L T d for attention scores."""
    return 6 * n_params + 12 * n_layer * seq_len * d_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def lmforge_round(config, steps: int, batch: torch.Tensor, args) -> list[float]:
    """Step times of `steps` optimizer steps of lmforge's loop on a fresh model (first step dropped)."""
    from lmforge.data import TokenBlocks
    from lmforge.models import build_model
    from lmforge.objectives import CausalLM
    from lmforge.training import TrainConfig, train

    device = torch.device(args.device)
    model = build_model(config)
    data = TokenBlocks(batch.repeat(steps, 1))  # every step draws B of these rows: (B, T) like the other side
    cfg = TrainConfig(lr=3e-4, weight_decay=0.01, max_steps=steps, batch_size=batch.shape[0], clip_norm=1.0,
                      precision=args.precision, device=args.device, progress=False, log_every=10**9,
                      compile=args.compile)
    stamps: list[float] = []

    def on_step(step: int, record: dict) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    train(model, CausalLM(), data, cfg, on_step=on_step)
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def transformers_round(config, steps: int, batch: torch.Tensor, args) -> list[float]:
    """Step times of a plain PyTorch loop over transformers' GPT2LMHeadModel (first step dropped)."""
    import math

    from transformers import GPT2Config, GPT2LMHeadModel

    device = torch.device(args.device)
    hf_config = GPT2Config(vocab_size=config.vocab_size, n_positions=config.max_seq_len,
                           n_embd=config.d_model, n_layer=config.n_layer, n_head=config.n_head,
                           n_inner=config.d_ff, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           attn_implementation="sdpa")
    model = GPT2LMHeadModel(hf_config).to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=3e-4, fused=device.type == "cuda" or None)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    forward = torch.compile(model) if args.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    stamps = []
    for _ in range(steps):
        ids = batch.to(device, non_blocking=True)
        with autocast:
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        float(loss.detach())  # as lmforge's loop reads the loss for its log record
        sync(device)
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--preset", help="lmforge preset (default: distilgpt2 on CPU, gpt2 on CUDA)")
    parser.add_argument("--batch-size", type=int, help="default 2 on CPU, 16 on CUDA")
    parser.add_argument("--seq-len", type=int, help="default 128 on CPU, 1024 on CUDA")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--steps", type=int, default=4, help="steps per round (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per library")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.preset = args.preset or ("gpt2" if cuda else "distilgpt2")
    args.batch_size = args.batch_size or (16 if cuda else 2)
    args.seq_len = args.seq_len or (1024 if cuda else 128)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    from lmforge.config import ModelConfig

    config = ModelConfig.from_name(args.preset)
    if config.family != "gpt2":
        raise SystemExit(f"--preset must be a GPT-2 family preset (compared with GPT2LMHeadModel), "
                         f"got {args.preset}")
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len),
                          generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"lmforge": [], "transformers": []}
    for _ in range(args.rounds):
        times["lmforge"] += lmforge_round(config, args.steps, batch, args)
        times["transformers"] += transformers_round(config, args.steps, batch, args)

    tokens = args.batch_size * args.seq_len
    d = config.d_model
    n_params = config.vocab_size * d + config.n_layer * (4 * d * d + 2 * d * config.d_ff)  # matmul weights
    fpt = flops_per_token(n_params, config.n_layer, args.seq_len, config.d_model)
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "preset": args.preset,
               "batch": args.batch_size, "seq_len": args.seq_len, "precision": args.precision,
               "compile": args.compile, "threads": torch.get_num_threads()}
    print(f"training step, {args.preset} shape, B={args.batch_size}, T={args.seq_len}, {args.precision}"
          f"{', compiled' if args.compile else ''}, {results['device']}")
    for name, values in times.items():
        median = statistics.median(values)
        results[name] = {"median_s": median, "tokens_per_s": tokens / median, "steps": len(values)}
        line = f"  {name:<13} {median * 1000:9.1f} ms/step {tokens / median:9.0f} tok/s ({len(values)} steps)"
        if cuda:
            mfu = fpt * tokens / median / H100_BF16_DENSE_FLOPS
            results[name]["mfu"] = mfu
            line += f"  MFU {100 * mfu:.1f}% of H100 bf16 dense peak"
        print(line)
    results["ratio"] = results["transformers"]["median_s"] / results["lmforge"]["median_s"]
    print(f"  ratio (transformers / lmforge step time): {results['ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
