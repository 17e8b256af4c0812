"""Model-parallel layouts on CPU (gloo): bytes each rank sends per training step against the formula, and step
time against data parallelism on the same model.

    python benchmarks/model_parallel.py                  # 2 ranks: dp2, fsdp2, tp2, tp2+sp (1 thread each)
    python benchmarks/model_parallel.py --world 4        # 4 ranks: dp4, fsdp4, dp2 x tp2, tp4
    python benchmarks/model_parallel.py --steps 3 --seq 32

One `torchrun --standalone` launch builds every layout's copy of the same randomly initialised GPT-2-shape
decoder (default 4 layers, d 256, 8 heads, vocab 8,192, tied head; `--preset`/size options change it) in one
process group, and trains them in turn, one step each per round (the order rotating), so the machine's drift
hits every layout alike. Every layout sees the same global batch of `--batch` sequences of `--seq` tokens:
data-parallel ranks take their slice, tensor-parallel ranks the whole of their group's slice. A step is what
`lmforge.training.train` does: forward and loss (under loss_parallel with TP), backward, gradient averaging,
clipping, AdamW.

Bytes: every collective a step issues (torch.distributed's c10d ops, which DDP-style averaging and FSDP2 call,
and the functional collectives DTensor calls for tensor parallelism) is seen by a TorchDispatchMode
(`CollectiveCounter`) with its group size n and tensor size s, and charged what a ring algorithm sends per rank:
all-reduce 2(n-1)/n s, all-gather (n-1)/n of the gathered s, reduce-scatter (n-1)/n s, broadcast s. "wire" is
what the process wrote to its sockets (/proc/self/io wchar: gloo's own algorithms and headers included).
Formulas, with P the fp32 parameter bytes, P_tp a rank's tensor-parallel share of them, A = b*T*C*4 the bytes
of one activation (b sequences per tensor-parallel group), L layers:
  dp N:  2(N-1)/N P (gradient all-reduce)
  fsdp N: 3(N-1)/N P (all-gather in forward, again in backward, reduce-scatter of gradients), less the
          root unit's second all-gather ((N-1)/N P_root: embeddings, final norm, head stay gathered)
  tp t:  (4L + 2) x 2(t-1)/t A (two all-reduces per block forward, two in backward; embedding forward, head
         input backward), plus the loss-parallel reductions 3 x 2(t-1)/t x b*T*4; sequence parallelism swaps
         each all-reduce for an all-gather + reduce-scatter: the same bytes
  dp d x tp t: the tp formula at b = B/d, plus 2(d-1)/d P_tp
Step time: median over rounds of (DP's step / the layout's step), with min and max, beside `uptime`'s load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.common, as a script too

from benchmarks.common import cpu_model  # noqa: E402


def _sent_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["wchar"])


def _group_size(args: tuple, kwargs: dict) -> int:
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    for a in (*args, *kwargs.values()):
        if isinstance(a, dist.ProcessGroup):
            return a.size()
        if isinstance(a, torch.ScriptObject):  # how c10d ops carry their ProcessGroup
            return dist.ProcessGroup.unbox(a).size()
        if isinstance(a, str) and a:
            try:
                return _resolve_process_group(a).size()
            except (RuntimeError, ValueError, KeyError):
                continue
    raise ValueError(f"no process group among the arguments {[a for a in args if not isinstance(a, torch.Tensor)]}")


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


class CollectiveCounter(TorchDispatchMode):
    """Bytes a ring algorithm sends per rank for every collective run under it: {kind: bytes}."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: dict[str, float] = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if name.startswith(("c10d::", "_c10d_functional::")) and "wait" not in name and "wrap" not in name:
            n = _group_size(args, kwargs)
            first = _tensors(args[0])
            size = sum(t.numel() * t.element_size() for t in first)
            if "reduce_scatter" in name:
                inputs = _tensors(args[1]) if name.startswith("c10d::") else first
                s = sum(t.numel() * t.element_size() for t in inputs)
                self.sent["reduce_scatter"] += (n - 1) / n * s
            elif "allgather" in name or "all_gather" in name:
                out = first if name.startswith("c10d::") else [first[0]] * n  # functional: args[0] is the shard
                s = sum(t.numel() * t.element_size() for t in out)
                self.sent["all_gather"] += (n - 1) / n * s
            elif "allreduce" in name or "all_reduce" in name:
                self.sent["all_reduce"] += 2 * (n - 1) / n * size
            elif "broadcast" in name:
                self.sent["broadcast"] += size
            elif "barrier" not in name:
                self.sent[name] += size
        return func(*args, **kwargs)


LAYOUTS = {2: [("dp2", "ddp", 2, 1, False), ("fsdp2", "fsdp", 2, 1, False), ("tp2", "ddp", 1, 2, False),
               ("tp2+sp", "ddp", 1, 2, True)],
           4: [("dp4", "ddp", 4, 1, False), ("fsdp4", "fsdp", 4, 1, False), ("dp2xtp2", "ddp", 2, 2, False),
               ("tp4", "ddp", 1, 4, False)]}


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from lmforge.config import ModelConfig
    from lmforge.models import build_model
    from lmforge.objectives import CausalLM
    from lmforge.parallel.strategy import make_strategy
    from lmforge.training import TrainConfig, make_optimizer

    cfg = ModelConfig.from_name(args.preset, n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
                                d_ff=4 * args.d_model, vocab_size=args.vocab, max_seq_len=max(64, args.seq))
    objective = CausalLM()
    runs = {}
    for name, strategy_name, dp, tp, sp in LAYOUTS[args.world]:
        strategy = make_strategy(strategy_name, dp=dp, tp=tp, sequence_parallel=sp, timeout=600.0)
        torch.manual_seed(0)
        model = strategy.shard(build_model(cfg))
        optimizer = make_optimizer(model, TrainConfig(lr=1e-4))
        b = args.batch // dp
        gen = torch.Generator().manual_seed(1 + strategy.rank)
        batch = {"input_ids": torch.randint(0, cfg.vocab_size, (b, args.seq), generator=gen)}
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
        runs[name] = dict(strategy=strategy, model=model, optimizer=optimizer, batch=batch, dp=dp, tp=tp, b=b,
                          sp=sp, local_params=local, times=[], counted=defaultdict(float), wire=0)

    def step(run: dict, count: bool) -> None:
        strategy, model, optimizer = run["strategy"], run["model"], run["optimizer"]
        counter = CollectiveCounter()
        dist.barrier()
        wchar, t0 = _sent_bytes(), time.perf_counter()
        with counter if count else _null():
            with strategy.sync(model, True), strategy.loss_parallel():
                loss, _ = objective(model, run["batch"])
                loss.backward()
            strategy.clip_grad_norm([p for g in optimizer.param_groups for p in g["params"]], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        run["times"].append(time.perf_counter() - t0)
        run["wire"] += _sent_bytes() - wchar
        for k, v in counter.sent.items():
            run["counted"][k] += v

    names = list(runs)
    for name in names:  # warm-up
        for _ in range(args.warmup):
            step(runs[name], False)
        runs[name]["times"].clear()
        runs[name]["wire"] = 0
    for r in range(args.steps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            step(runs[name], True)
    rank = dist.get_rank()
    P = 4 * sum(p.numel() for p in build_model(cfg).parameters())
    out = {"rank": rank, "P": P, "config": {"n_layer": cfg.n_layer, "d_model": cfg.d_model, "seq": args.seq,
                                            "batch": args.batch},
           "layouts": {name: {"times": run["times"], "counted": {k: v / args.steps for k, v in run["counted"].items()},
                              "wire": run["wire"] / args.steps, "dp": run["dp"], "tp": run["tp"], "b": run["b"],
                              "sp": run["sp"], "learned_positions": cfg.position == "learned",
                              "P_local": 4 * run["local_params"]}
                       for name, run in runs.items()}}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(out))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def formula(name: str, row: dict, P: float, cfg: dict, root_params: float) -> tuple[float, str]:
    """Bytes a rank sends per step by the module docstring's formulas."""
    dp, tp, b = row["dp"], row["tp"], row["b"]
    L, C, T = cfg["n_layer"], cfg["d_model"], cfg["seq"]
    A = b * T * C * 4
    sharded_positions = row["sp"] and row["learned_positions"]  # one more vocabulary-parallel embedding
    tp_bytes = ((4 * L + 2 + sharded_positions) * A + 3 * b * T * 4) * 2 * (tp - 1) / tp if tp > 1 else 0.0
    if name.startswith("fsdp"):
        return 3 * (dp - 1) / dp * P - (dp - 1) / dp * root_params, "3(N-1)/N P - (N-1)/N P_root"
    if tp == 1:
        return 2 * (dp - 1) / dp * P, "2(N-1)/N P"
    dp_bytes = 2 * (dp - 1) / dp * row["P_local"] if dp > 1 else 0.0
    text = f"(4L+{2 + sharded_positions}) 2(t-1)/t A + loss" + (" + 2(d-1)/d P_tp" if dp > 1 else "")
    return tp_bytes + dp_bytes, text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2, choices=[2, 4], help="ranks (default 2)")
    p.add_argument("--preset", default="gpt2", help="ModelConfig family preset (default gpt2)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8, help="global batch in sequences (default 8)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--steps", type=int, default=6, help="measured rounds (default 6)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{cpu_model()} | torch {torch.__version__} | {args.world} ranks x 1 thread | load before: {load}")
    with tempfile.TemporaryDirectory() as out:
        own = [str(Path(__file__).resolve()), "--worker", "--out", out]
        own += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "out")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.world),
               *own]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"run failed:\n{proc.stderr[-4000:]}")
        ranks = [json.loads(f.read_text()) for f in sorted(Path(out).glob("rank*.json"))]
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"ran in {time.perf_counter() - t0:.0f} s | load after: {load}")
    r0 = ranks[0]
    P, cfg = r0["P"], r0["config"]
    from lmforge.config import ModelConfig
    from lmforge.models import build_model

    model = build_model(ModelConfig.from_name(args.preset, n_layer=args.n_layer, d_model=args.d_model,
                                              n_head=args.n_head, d_ff=4 * args.d_model, vocab_size=args.vocab,
                                              max_seq_len=max(64, args.seq)))
    root = 4 * sum(p.numel() for n, p in model.named_parameters() if not n.startswith("layers."))
    print(f"model: {args.preset}-shape, {args.n_layer} layers, d {args.d_model}, {args.n_head} heads, vocab "
          f"{args.vocab}: P = {P / 1e6:.2f} MB fp32; global batch {args.batch} x {args.seq} tokens; "
          f"{args.steps} rounds")
    print(f"\n{'layout':<9} {'rank':>4} {'counted MB':>10} {'formula MB':>10} {'wire MB':>8}  "
          f"{'counted by kind (MB)':<44} formula")
    for name in r0["layouts"]:
        for r in ranks:
            row = r["layouts"][name]
            want, text = formula(name, row, P, cfg, root)
            counted = sum(row["counted"].values())
            kinds = ", ".join(f"{k} {v / 1e6:.3f}" for k, v in sorted(row["counted"].items()))
            print(f"{name:<9} {r['rank']:>4} {counted / 1e6:10.3f} {want / 1e6:10.3f} {row['wire'] / 1e6:8.3f}  "
                  f"{kinds:<44} {text}")
    base = next(iter(r0["layouts"]))
    print(f"\nstep time vs {base} (median of per-round ratios {base} step / layout step; > 1: faster; the "
          f"slowest rank's step per round)")
    slowest = {name: [max(r["layouts"][name]["times"][i] for r in ranks) for i in range(args.steps)]
               for name in r0["layouts"]}
    for name, times in slowest.items():
        ratios = [b / t for b, t in zip(slowest[base], times, strict=True)]
        print(f"{name:<9} step {statistics.median(times) * 1e3:8.1f} ms   ratio {statistics.median(ratios):5.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
