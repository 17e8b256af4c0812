"""Pipeline parallelism on CPU (gloo): bubble fraction, bytes sent per rank, step time against data parallelism.

    python benchmarks/pipeline.py          # m in 1,2,4,8; gpipe, 1f1b, interleaved-1f1b; pp2 vs dp2 vs one process
    python benchmarks/pipeline.py --micro 1,8 --schedules 1f1b --steps 2      # quicker

The model is a GPT-2-shape decoder made compute-heavy and balanced between 2 stages: 4 layers, d 256, d_ff 1024,
4 heads, a 256-token vocabulary (so the embedding and the head are small against the layers; untied), sequences
of 128 tokens, `--rows` rows per schedule micro-batch (default 4). A micro-batch's activation message is
rows x 128 x 256 x 4 B = 0.5 MB; its forward + backward on one stage is ~0.1 s on one core, so communication
(loopback) is a small share.

Bubble: every stage times each of its forward and backward chunk computations (PipelineStage.forward_one_chunk
/ backward_one_chunk, wrapped with perf_counter; the waits for messages happen outside them) and the wall time
of the step (between barriers). Measured bubble = 1 - busy / wall per rank (median over measured steps); the
ideal fill-drain bubble with p equal stages and m micro-batches is (p - 1) / (m + p - 1). Both GPipe and 1F1B
have that bubble (1F1B differs in memory: at most p micro-batches' activations live at once); interleaved 1F1B
with v stages per rank has (p - 1) / (v m + p - 1) (here v = 2, one layer per stage).

Bytes: /proc/self/io wchar per rank per step (gloo writes its socket messages with writev, which wchar counts).
Formula for p = 2: the first stage sends m activations, the second m activation gradients, each rows x T x C x 4 B
(interleaved, v = 2: each rank sends 3 m: the 2 v - 1 forward hops and as many backward hops, halved); the
clip-norm reduction adds a few bytes. Data parallelism (ddp, 2 ranks): ring allreduce 2(N-1)/N x S per rank.

Step time: the same global batch (m x rows sequences) on pp2 (1F1B, m micro-batches), on ddp with 2 ranks
(m x rows / 2 sequences each) and on one process; ratios of the medians. Processes run one thread each on a
shared 2-core machine: the load (uptime) is printed with the figures, which move with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch
from common import cpu_model, run_ranks, sent_bytes  # benchmarks/common.py

SEQ, D_MODEL = 128, 256


def _model():
    from lmforge.config import ModelConfig
    from lmforge.models.decoder import Decoder

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-gpt2").replace(vocab_size=256, n_layer=4, n_head=4, d_model=D_MODEL,
                                                      d_ff=4 * D_MODEL, max_seq_len=SEQ, tie_embeddings=False)
    return Decoder(cfg)


def _timed(fn, spans: list[float]):
    def wrapper(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        spans.append(time.perf_counter() - t)
        return out
    return wrapper


def worker(args: argparse.Namespace) -> None:
    """One rank: `args.steps` measured steps after `args.warmup`; writes rank<r>.json into args.out."""
    import torch.distributed as dist

    from lmforge.objectives import CausalLM
    from lmforge.training import SingleProcess, TrainConfig, make_optimizer

    torch.set_num_threads(1)
    rows = args.n_micro * args.rows  # the global batch
    if args.layout == "pp2":
        from lmforge.parallel.pipeline import PipelineStrategy

        strategy = PipelineStrategy(pp=2, schedule=args.schedule, microbatches=args.n_micro, timeout=600.0)
    elif args.layout == "dp2":
        from lmforge.parallel.strategy import make_strategy

        strategy = make_strategy("ddp", timeout=600.0)
        rows //= 2
    else:
        strategy = SingleProcess("cpu")
    model = _model()
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4))
    size = 4 * sum(p.numel() for p in model.parameters())
    model, optimizer = strategy.prepare(model, optimizer)
    spans: list[float] = []
    if args.layout == "pp2":
        schedule = strategy.schedule
        for stage in getattr(schedule, "_stages", None) or [schedule._stage]:
            stage.forward_one_chunk = _timed(stage.forward_one_chunk, spans)
            stage.backward_one_chunk = _timed(stage.backward_one_chunk, spans)
    gen = torch.Generator().manual_seed(1 + strategy.rank)
    batch = {"input_ids": torch.randint(0, 256, (rows, SEQ), generator=gen)}
    objective, scaler = CausalLM(), torch.amp.GradScaler("cpu", enabled=False)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    walls, busys, sent = [], [], 0
    for step in range(args.warmup + args.steps):
        if dist.is_initialized():
            dist.barrier()
        if step == args.warmup:
            sent = sent_bytes()
        spans.clear()
        t0 = time.perf_counter()
        with strategy.sync(model, True):
            strategy.forward_backward(model, objective, batch, 1.0, contextlib.nullcontext, scaler)
        strategy.clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        walls.append(time.perf_counter() - t0)
        busys.append(sum(spans))
    if dist.is_initialized():
        dist.barrier()
    sent = sent_bytes() - sent
    w, b = walls[args.warmup:], busys[args.warmup:]
    rank = int(os.environ.get("RANK", "0"))
    result = {"rank": rank, "step_s": statistics.median(w), "gradient_bytes": size,
              "wchar_per_step": sent / args.steps,
              "bubble": statistics.median(1 - bi / wi for bi, wi in zip(b, w, strict=True))}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))


def launch(args: argparse.Namespace, layout: str, m: int, schedule: str = "1f1b") -> list[dict]:
    """Every rank's record of one configuration, run in fresh processes."""
    argv = [str(Path(__file__).resolve()), "--worker", "--layout", layout, "--n-micro", str(m), "--schedule",
            schedule, "--rows", str(args.rows), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    return run_ranks(argv, None if layout == "single" else 2, f"{layout} {schedule} m={m}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro", default="1,2,4,8", help="micro-batch counts m (default 1,2,4,8)")
    p.add_argument("--schedules", default="gpipe,1f1b,interleaved-1f1b", help="comma-separated (default: all 3)")
    p.add_argument("--rows", type=int, default=4, help="sequences per micro-batch (default 4)")
    p.add_argument("--steps", type=int, default=3, help="measured steps (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="steps before measuring (default 2)")
    p.add_argument("--compare-m", type=int, default=8, help="m of the step-time comparison (default 8)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout", help=argparse.SUPPRESS)
    p.add_argument("--n-micro", type=int, help=argparse.SUPPRESS)
    p.add_argument("--schedule", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    load = os.getloadavg()
    print(f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread per process; load "
          f"average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start")
    print(f"model: 4 layers, d {D_MODEL}, vocab 256, untied; {args.rows} x {SEQ} tokens per micro-batch; "
          f"{args.warmup} warm-up + {args.steps} measured steps\n")
    act = args.rows * SEQ * D_MODEL * 4  # one micro-batch's activation (or its gradient) in bytes
    pp = 2
    print("bubble fraction (1 - busy/wall per rank, median over steps) and bytes sent per rank per step")
    print(f"{'schedule':<16} {'m':>2} {'theory':>7} {'rank0':>7} {'rank1':>7} {'step s':>7} "
          f"{'sent0 MB':>9} {'sent1 MB':>9} {'formula MB':>10}")
    pp_rows = {}
    for schedule in args.schedules.split(","):
        for m in [int(x) for x in args.micro.split(",")]:
            if schedule == "1f1b" and m < pp:
                print(f"{schedule:<16} {m:>2}  (1F1B needs m >= p)")
                continue
            ranks = launch(args, "pp2", m, schedule)
            pp_rows[(schedule, m)] = ranks
            v = 2 if schedule == "interleaved-1f1b" else 1
            theory = (pp - 1) / (v * m + pp - 1)
            step = max(r["step_s"] for r in ranks)
            print(f"{schedule:<16} {m:>2} {theory:7.3f} {ranks[0]['bubble']:7.3f} {ranks[1]['bubble']:7.3f} "
                  f"{step:7.3f} {ranks[0]['wchar_per_step'] / 1e6:9.2f} {ranks[1]['wchar_per_step'] / 1e6:9.2f} "
                  f"{(2 * v - 1) * m * act / 1e6:10.2f}", flush=True)
    m = args.compare_m
    key = ("1f1b", m) if ("1f1b", m) in pp_rows else next(iter(pp_rows))
    pp_step = max(r["step_s"] for r in pp_rows[key])
    dp = launch(args, "dp2", m)
    single = launch(args, "single", m)
    dp_step, one_step = max(r["step_s"] for r in dp), single[0]["step_s"]
    S = dp[0]["gradient_bytes"]
    print(f"\nstep time, global batch {m * args.rows} x {SEQ} tokens ({key[0]}, m={key[1]} for pp2):")
    print(f"  one process {one_step:.3f} s | dp2 (ddp) {dp_step:.3f} s | pp2 {pp_step:.3f} s")
    print(f"  pp2 / dp2 = {pp_step / dp_step:.2f}   pp2 / one = {pp_step / one_step:.2f}   "
          f"dp2 / one = {dp_step / one_step:.2f}")
    print(f"  bytes per rank per step: dp2 {dp[0]['wchar_per_step'] / 1e6:.2f} MB measured vs ring "
          f"2(N-1)/N x S = {S / 1e6:.2f} MB; pp2 {pp_rows[key][0]['wchar_per_step'] / 1e6:.2f} MB vs "
          f"m x act = {m * act / 1e6:.2f} MB")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end")


if __name__ == "__main__":
    main()
