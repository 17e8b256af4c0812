"""Data-parallel training throughput and traffic: allreduce vs ddp vs parameter server, on CPU (gloo).

    python benchmarks/data_parallel.py                       # DistilGPT2 shape, 2 ranks x 1 thread vs 1 x 1
    python benchmarks/data_parallel.py --seq 32 --steps 3    # quicker

One run trains a randomly initialised DistilGPT2-shape decoder (6 layers, d 768, 12 heads, vocab 50,257; 81.9M
parameters, tied head) with AdamW on random tokens:
- single: 1 process x 1 thread, batch B (the baseline);
- allreduce: 2 ranks x 1 thread under torchrun, lmforge's DistributedOptimizer, batch B per rank;
- ddp: the same with torch's DistributedDataParallel (the reference);
- ps: 1 parameter server + 2 workers x 1 thread, synchronous mode, batch B per worker.
Each configuration runs in fresh processes launched with `torchrun --standalone`; every rank times its steps
(median over the measured steps after warm-up) and counts the bytes it sent: gloo writes to its sockets with
writev, which /proc/self/io counts as wchar; the parameter server also counts its own messages exactly.

Reported: tokens/s over all workers, speed-up and scaling efficiency against the single process
(efficiency = throughput_N / (N x throughput_1)), and bytes sent per rank per step against theory, with S the
gradient size in bytes and N the number of ranks: ring allreduce sends 2(N-1)/N x S per rank (and receives as
much); a parameter-server worker pushes S and pulls S (2 x S through its link); a server sends and receives
n_workers x S / n_servers. With 2 cores shared by 3 processes, ps runs its server on the workers' cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from common import run_ranks, sent_bytes  # benchmarks/common.py


def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration: train, time, count, and write rank<r>.json into args.out."""
    torch.set_num_threads(1)
    from lmforge.config import ModelConfig
    from lmforge.models.decoder import Decoder
    from lmforge.objectives import CausalLM
    from lmforge.training import SingleProcess, TrainConfig, make_optimizer

    if args.strategy == "single":
        strategy = SingleProcess("cpu")
    else:
        from lmforge.parallel.strategy import make_strategy

        strategy = make_strategy(args.strategy, n_servers=args.ps_servers, timeout=600.0)
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    model = Decoder(ModelConfig.from_name(args.model))
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4))
    size = 4 * sum(p.numel() for p in model.parameters())  # S: fp32 gradient bytes
    result: dict = {"rank": rank, "strategy": args.strategy, "gradient_bytes": size}
    if getattr(strategy, "is_server", False):
        before = sent_bytes()
        log = strategy.serve(optimizer)
        from lmforge.parallel.ps import shard_ranges

        lo, hi = shard_ranges(size // 4, args.ps_servers)[rank]
        initial = 4 * (hi - lo) * strategy.world_size  # the version-0 parameters sent to every worker
        result.update(role="server", steps=log.traffic.steps, counted_sent=log.traffic.bytes_sent,
                      initial_sent=initial,
                      counted_received=log.traffic.bytes_received, wchar=sent_bytes() - before)
    else:
        model, optimizer = strategy.prepare(model, optimizer)
        objective = CausalLM()
        gen = torch.Generator().manual_seed(1 + rank)
        batch = {"input_ids": torch.randint(0, model_vocab(model), (args.batch, args.seq), generator=gen)}
        times, sent = [], 0
        traffic0 = None
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                sent = sent_bytes()
                traffic0 = _ps_traffic(strategy)
            t0 = time.perf_counter()
            loss, _ = objective(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        sent = sent_bytes() - sent
        result.update(role="worker", step_s=statistics.median(times[args.warmup:]),
                      tokens_per_step=args.batch * args.seq, wchar_per_step=sent / args.steps)
        traffic1 = _ps_traffic(strategy)
        if traffic0 is not None and traffic1 is not None:
            result["counted_sent_per_step"] = (traffic1[0] - traffic0[0]) / args.steps
            result["counted_received_per_step"] = (traffic1[1] - traffic0[1]) / args.steps
        strategy_finish = getattr(strategy, "finish", None)
        if strategy_finish is not None:
            strategy_finish()
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))


def model_vocab(model: torch.nn.Module) -> int:
    return getattr(model, "module", model).config.vocab_size


def _ps_traffic(strategy) -> tuple[int, int] | None:
    w = getattr(strategy, "worker", None)
    return (w.traffic.bytes_sent, w.traffic.bytes_received) if w is not None else None


def launch(args: argparse.Namespace, strategy: str, nproc: int) -> list[dict]:
    """Run one configuration in fresh processes; return every rank's record."""
    argv = [str(Path(__file__).resolve()), "--worker", "--strategy", strategy, "--model", args.model,
            "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--ps-servers", str(args.ps_servers)]
    return run_ranks(argv, None if strategy == "single" else nproc, strategy)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="distilgpt2", help="ModelConfig preset (default distilgpt2)")
    p.add_argument("--batch", type=int, default=2, help="sequences per worker per step (default 2)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--steps", type=int, default=5, help="measured steps (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="steps before measuring (default 2)")
    p.add_argument("--workers", type=int, default=2, help="data-parallel workers (default 2)")
    p.add_argument("--ps-servers", type=int, default=1, help="parameter servers for ps (default 1)")
    p.add_argument("--strategies", default="single,allreduce,ddp,ps", help="comma-separated subset")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    n = args.workers
    print(f"model {args.model}, batch {args.batch} x {args.seq} tokens per worker, {args.warmup} warm-up + "
          f"{args.steps} measured steps, 1 thread per process, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")
    rows = {}
    for name in args.strategies.split(","):
        nproc = 1 if name == "single" else n + (args.ps_servers if name == "ps" else 0)
        t0 = time.perf_counter()
        rows[name] = launch(args, name, nproc)
        print(f"  ran {name} on {nproc} process(es) in {time.perf_counter() - t0:.0f} s", flush=True)

    S = rows[next(iter(rows))][0]["gradient_bytes"]
    base = None
    if "single" in rows:
        w = rows["single"][0]
        base = w["tokens_per_step"] / w["step_s"]
    print(f"\nS = {S / 1e6:.1f} MB of fp32 gradients; N = {n} workers")
    print(f"{'strategy':<10} {'workers':>7} {'step s':>8} {'tokens/s':>9} {'speed-up':>8} {'efficiency':>10}")
    for name, ranks in rows.items():
        workers = [r for r in ranks if r["role"] == "worker"]
        step = max(r["step_s"] for r in workers)  # the slowest worker sets the pace
        tput = sum(r["tokens_per_step"] for r in workers) / step
        speed = f"{tput / base:8.2f}" if base else f"{'-':>8}"
        eff = f"{tput / (len(workers) * base):10.1%}" if base else f"{'-':>10}"
        print(f"{name:<10} {len(workers):>7} {step:8.3f} {tput:9.1f} {speed} {eff}")
    if "allreduce" in rows and "ddp" in rows and base:
        def eff_of(name: str) -> float:
            ws = [r for r in rows[name] if r["role"] == "worker"]
            return sum(r["tokens_per_step"] for r in ws) / max(r["step_s"] for r in ws) / (len(ws) * base)

        print(f"allreduce efficiency - ddp efficiency: {100 * (eff_of('allreduce') - eff_of('ddp')):+.1f} "
              f"points (target: within 10)")

    print("\nbytes sent per rank per step (MB; measured = wchar of gloo's socket writes)")
    print(f"{'strategy':<10} {'rank':>4} {'role':<7} {'measured':>9} {'counted':>9} {'theory':>9}  "
          "theory formula")
    ring = 2 * (n - 1) / n * S
    for name, ranks in rows.items():
        if name == "single":
            continue
        for r in ranks:
            if name in ("allreduce", "ddp"):
                measured, counted, theory, formula = r["wchar_per_step"], None, ring, "2(N-1)/N x S"
            elif r["role"] == "worker":
                measured, counted = r["wchar_per_step"], r.get("counted_sent_per_step")
                theory, formula = S, "S pushed (+ S pulled = 2 x S through the link)"
            else:  # a server's first send (the initial parameters to every worker) is not a step's
                steps, first = max(r["steps"], 1), r["initial_sent"]
                measured, counted = (r["wchar"] - first) / steps, (r["counted_sent"] - first) / steps
                theory, formula = n * S / args.ps_servers, "n_workers x S / n_servers"
            counted_text = f"{counted / 1e6:9.1f}" if counted is not None else f"{'-':>9}"
            print(f"{name:<10} {r['rank']:>4} {r['role']:<7} {measured / 1e6:9.1f} {counted_text} "
                  f"{theory / 1e6:9.1f}  {formula}")
    print(f"\nper worker through its link (sent + received): allreduce 4(N-1)/N x S = "
          f"{2 * ring / 1e6:.1f} MB, parameter server 2 x S = {2 * S / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
