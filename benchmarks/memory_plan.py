"""The memory planner's predictions against measured peaks of real lmforge training steps on CPU.

    python benchmarks/memory_plan.py            # the validation table (about two minutes)
    python benchmarks/memory_plan.py --bert     # the planner's answer for BERT-base/large on 16 GB devices

Measurement: `lmforge.training.train` runs two optimizer steps (forward, backward, clipping, AdamW step,
zero_grad: the second step is the steady state, with the optimizer state already allocated) under
`torch.profiler.profile(profile_memory=True)`. The profiler records every allocation and free of torch's CPU
allocator, with sizes, including the ones inside kernels; the measured peak is the model's parameter bytes
(allocated before profiling starts) plus the maximum of the running sum of those records. This is what torch
allocates, not the process RSS (which adds the C allocator's caches, libraries and the data set).
Activation checkpointing wraps each block's forward in `torch.utils.checkpoint` (non-reentrant), as
`--activation-checkpointing` does. SGD runs swap the loop's AdamW for `torch.optim.SGD(momentum=0.9)`.

Generation: `Decoder.generate` (greedy) measured the same way, against `generation_plan` (weights, the KV cache
of prompt + new slots, the prefill's transients).

Multi-rank runs (gloo, launched with torchrun): the same measurement on every rank, the busiest rank's peak
against the planner's; "allreduce" is lmforge's `AllreduceStrategy` (DistributedOptimizer), "fsdp" torch's
`fully_shard` on every block and on the root (as `lmforge.parallel.plans.apply_fsdp` does), applied before
the loop builds its optimizer, without gradient clipping. Tensor parallelism (tp2, dp2 x tp2) is lmforge's
`MeshStrategy` as `lmforge train --strategy ddp --tp 2 [--dp 2]` builds it, the model sharded before the
profiler starts; pipelines (pp2, GPipe or 1F1B, m micro-batches) are its `PipelineStrategy`, which frees the
other stages' parameters inside the loop (frees of tensors allocated before the profiler starts are not
recorded, so the parameter bytes added to the running sum are those the rank still holds after the run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.utils.checkpoint import checkpoint

from lmforge import training
from lmforge.config import ModelConfig
from lmforge.data import MaskedBlocks, TokenBlocks
from lmforge.models import build_model
from lmforge.objectives import CausalLM, MaskedLM
from lmforge.parallel.planner import (
    Estimate,
    GiB,
    Hardware,
    Layout,
    Workload,
    estimate,
    generation_plan,
    max_batch,
)

try:
    from common import cpu_model  # run as a script: benchmarks/ is on sys.path
except ImportError:  # imported as benchmarks.memory_plan (tests/test_planner.py)
    from benchmarks.common import cpu_model


@dataclass(frozen=True)
class Case:
    """One single-process training configuration: a preset resized by `sizes`."""

    preset: str
    batch: int
    seq: int
    precision: str = "fp32"
    optimizer: str = "adam"
    checkpointing: bool = False
    grad_accum: int = 1
    sizes: tuple[tuple[str, Any], ...] = ()

    def config(self) -> ModelConfig:
        return ModelConfig.from_name(self.preset).replace(**dict(self.sizes))

    @property
    def name(self) -> str:
        c = self.config()
        return (f"{self.preset} L{c.n_layer} d{c.d_model} V{c.vocab_size} B{self.batch} T{self.seq} "
                f"{self.precision} {self.optimizer}{' +ac' if self.checkpointing else ''}"
                + (f" accum{self.grad_accum}" if self.grad_accum > 1 else "")
                + (f" dropout{c.dropout}" if c.dropout else ""))


_MID = (("n_layer", 4), ("d_model", 256), ("n_head", 8), ("d_ff", 1024), ("vocab_size", 4000),
        ("max_seq_len", 256))  # a large vocabulary: the loss's (N, V) tensors set the peak
_DEEP = (("n_layer", 6), ("d_model", 256), ("n_head", 8), ("d_ff", 1024), ("vocab_size", 512),
         ("max_seq_len", 256))  # a small one: the blocks' activations do
_WIDE = (("n_layer", 8), ("d_model", 512), ("n_head", 8), ("d_ff", 2048), ("vocab_size", 2000))  # the optimizer
CASES = [
    Case("tiny-gpt2", 8, 128, sizes=_MID),
    Case("tiny-gpt2", 8, 128, "bf16", sizes=_MID),
    Case("tiny-gpt2", 8, 128, checkpointing=True, sizes=_MID),
    Case("tiny-gpt2", 4, 128, grad_accum=2, sizes=_MID),
    Case("tiny-gpt2", 4, 256, sizes=_DEEP),
    Case("tiny-gpt2", 2, 64, sizes=_WIDE),
    Case("tiny-llama", 4, 256, sizes=(*_DEEP, ("n_kv_head", 2))),
    Case("tiny-llama", 4, 256, "bf16", checkpointing=True, sizes=(*_DEEP, ("n_kv_head", 2))),
    Case("tiny-bert", 8, 128, sizes=_MID),
    Case("tiny-bert", 4, 128, "bf16", sizes=_DEEP),
    Case("tiny-bert", 4, 128, sizes=(*_DEEP, ("dropout", 0.1))),
    Case("tiny-bert", 16, 64, optimizer="sgd", sizes=_MID),
    Case("tiny-roberta", 4, 128, "bf16", checkpointing=True,
         sizes=(("n_layer", 6), ("d_model", 384), ("n_head", 6), ("d_ff", 1536), ("vocab_size", 8000),
                ("max_seq_len", 130))),
]


@dataclass(frozen=True)
class Dist:
    """A multi-rank configuration: `case` (its batch is one data-parallel rank's: tensor-parallel ranks share
    it, a pipeline splits it into `microbatches`) on dp x tp x pp ranks; `strategy` is the data-parallel one
    ("allreduce" or "fsdp"; "single" for dp 1)."""

    strategy: str
    case: Case
    dp: int = 2
    tp: int = 1
    pp: int = 1
    schedule: str = "1f1b"
    microbatches: int = 1

    @property
    def ranks(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def name(self) -> str:
        return " x ".join(p for p in (f"dp{self.dp} {self.strategy}" if self.dp > 1 else "",
                                      f"tp{self.tp}" if self.tp > 1 else "",
                                      f"pp{self.pp} {self.schedule} m{self.microbatches}" if self.pp > 1 else "")
                          if p)

    def layout(self) -> Layout:
        """The planner's layout of this configuration."""
        return Layout(self.dp, self.tp, self.pp, self.strategy, self.schedule, self.microbatches,
                      self.case.checkpointing)


_ODD = (("n_layer", 4), ("d_model", 256), ("n_head", 8), ("d_ff", 1024), ("vocab_size", 4001),
        ("max_seq_len", 256))  # a vocabulary tp 2 pads
DISTRIBUTED_CASES = [
    Dist("allreduce", Case("tiny-gpt2", 8, 128, sizes=_MID)),
    Dist("allreduce", Case("tiny-gpt2", 2, 64, sizes=_WIDE)),
    Dist("fsdp", Case("tiny-gpt2", 8, 128, sizes=_MID)),
    Dist("fsdp", Case("tiny-gpt2", 2, 64, sizes=_WIDE)),
    Dist("fsdp", Case("tiny-bert", 4, 128, "bf16", sizes=_DEEP)),
    Dist("single", Case("tiny-gpt2", 8, 128, sizes=_MID), dp=1, tp=2),
    Dist("single", Case("tiny-gpt2", 8, 128, sizes=_ODD), dp=1, tp=2),
    Dist("single", Case("tiny-gpt2", 2, 64, sizes=_WIDE), dp=1, tp=2),
    Dist("single", Case("tiny-llama", 4, 256, sizes=(*_DEEP, ("n_kv_head", 2))), dp=1, tp=2),
    Dist("single", Case("tiny-bert", 8, 128, "bf16", sizes=_MID), dp=1, tp=2),
    Dist("allreduce", Case("tiny-gpt2", 4, 128, sizes=_MID), dp=2, tp=2),
    Dist("allreduce", Case("tiny-llama", 2, 256, sizes=(*_DEEP, ("n_kv_head", 2))), dp=2, tp=2),
    Dist("single", Case("tiny-gpt2", 8, 128, sizes=_MID), dp=1, pp=2, schedule="gpipe", microbatches=2),
    Dist("single", Case("tiny-gpt2", 8, 128, sizes=_MID), dp=1, pp=2, schedule="gpipe", microbatches=8),
    Dist("single", Case("tiny-gpt2", 8, 128, sizes=_MID), dp=1, pp=2, schedule="1f1b", microbatches=2),
    Dist("single", Case("tiny-gpt2", 8, 128, sizes=_MID), dp=1, pp=2, schedule="1f1b", microbatches=8),
    Dist("single", Case("tiny-llama", 8, 256, sizes=(*_DEEP, ("n_kv_head", 2))), dp=1, pp=2, schedule="gpipe",
         microbatches=4),
    Dist("single", Case("tiny-llama", 8, 256, sizes=(*_DEEP, ("n_kv_head", 2))), dp=1, pp=2, schedule="1f1b",
         microbatches=4),
    Dist("single", Case("tiny-gpt2", 4, 64, "bf16", sizes=_WIDE), dp=1, pp=2, schedule="1f1b", microbatches=4),
]


def _checkpoint_blocks(model: torch.nn.Module) -> None:
    """Per-block non-reentrant activation checkpointing, on the block instances."""
    for block in model.layers:
        block.forward = (lambda *args, _f=block.forward, **kw: checkpoint(_f, *args, use_reentrant=False, **kw))


def _sgd(model: torch.nn.Module, config: training.TrainConfig, extra: Any = None) -> torch.optim.SGD:
    return torch.optim.SGD(training.param_groups(model, config.weight_decay, extra), lr=config.lr, momentum=0.9)


def measure(case: Case, steps: int = 2, run: Dist | None = None) -> int:
    """Peak bytes torch's CPU allocator holds during `steps` steps of `lmforge.training.train` on `case`
    (see the module docstring); `run`: this rank's part of a multi-rank configuration, inside a
    torchrun-launched process."""
    cfg = case.config()
    torch.manual_seed(0)
    model = build_model(cfg.replace(head="lm"))
    strategy = run.strategy if run is not None else None
    if case.checkpointing and (run is None or run.tp == 1):
        _checkpoint_blocks(model)
    runner = None
    if run is not None and run.tp > 1:  # MeshStrategy, sharded before the profiler starts
        from lmforge.parallel.strategy import make_strategy

        runner = make_strategy("ddp", dp=run.dp, tp=run.tp, activation_checkpointing=case.checkpointing)
        model = runner.shard(model)
        runner.shard = lambda m: m  # the loop's call: already done
    elif run is not None and run.pp > 1:
        from lmforge.parallel.pipeline import PipelineStrategy

        runner = PipelineStrategy(pp=run.pp, dp=run.dp, schedule=run.schedule, microbatches=run.microbatches)
    elif strategy == "allreduce":
        from lmforge.parallel.strategy import AllreduceStrategy

        runner = AllreduceStrategy(grad_accum=case.grad_accum)
    elif strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from lmforge.parallel.strategy import Distributed

        runner = Distributed()
        mesh = init_device_mesh("cpu", (runner.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    world = runner.world_size if runner is not None else 1
    ids = torch.randint(5, cfg.vocab_size, (case.batch * case.grad_accum * steps * world, case.seq))
    if cfg.arch == "decoder":
        data, objective = TokenBlocks(ids), CausalLM()
    else:
        data, objective = MaskedBlocks(ids, mask_id=4, vocab_size=cfg.vocab_size, special_ids=[0, 1, 2, 3, 4]), \
            MaskedLM()
    config = training.TrainConfig(max_steps=steps, batch_size=case.batch, precision=case.precision,
                                  grad_accum=case.grad_accum, clip_norm=None if strategy == "fsdp" else 1.0,
                                  progress=False, log_every=steps)
    sgd = mock.patch.object(training, "make_optimizer", _sgd) if case.optimizer == "sgd" else nullcontext()
    with sgd:
        peak = peak_allocated(partial(training.train, model, objective, data, config, strategy=runner))
    local = [getattr(p, "_local_tensor", p) for p in {id(p): p for p in model.parameters()}.values()]
    return peak + sum(p.numel() * p.element_size() for p in local if not p.is_meta)  # + what the rank holds


def peak_allocated(run: Any) -> int:
    """The most bytes torch's CPU allocator held at once during `run()` beyond what was held before it: the
    maximum running sum of the allocation and free records of `torch.profiler` (profile_memory=True)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    sizes: list[tuple[int, int]] = []

    def walk(events: list) -> None:
        for e in events:
            if e.tag == _EventType.Allocation and str(e.extra_fields.device) == "cpu":
                sizes.append((e.start_time_ns, e.extra_fields.alloc_size))
            walk(e.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    sizes.sort()
    return max(0, *itertools.accumulate(size for _, size in sizes))


# (preset, sizes, batch, prompt tokens, new tokens): greedy generation, float32
GENERATION_CASES = [
    ("tiny-llama", (("n_layer", 6), ("d_model", 256), ("n_head", 8), ("n_kv_head", 2), ("d_ff", 1024),
                    ("vocab_size", 4000), ("max_seq_len", 1024)), 4, 240, 16),
    ("tiny-gpt2", (("n_layer", 4), ("d_model", 256), ("n_head", 8), ("d_ff", 1024), ("vocab_size", 4000),
                   ("max_seq_len", 512)), 8, 112, 16),
]


def validate_generation() -> list[dict[str, Any]]:
    """`Decoder.generate` (greedy, KV cache of prompt + new slots) measured as training is, against
    `generation_plan` for prompt + new tokens."""
    rows = []
    for preset, sizes, batch, prompt, new in GENERATION_CASES:
        t0 = time.perf_counter()
        cfg = ModelConfig.from_name(preset).replace(**dict(sizes))
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        ids = torch.randint(5, cfg.vocab_size, (batch, prompt))
        params = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
        with torch.no_grad():
            run = partial(model.generate, ids, max_new_tokens=new, do_sample=False)
            measured = params + peak_allocated(run)
        predicted = generation_plan(cfg, batch, prompt + new, "fp32", Hardware(device="cpu"), 1)[0].peak
        rows.append({"case": f"generate {preset} L{cfg.n_layer} d{cfg.d_model} V{cfg.vocab_size} B{batch} "
                             f"prompt {prompt} + {new}", "predicted_mib": predicted / 2**20,
                     "measured_mib": measured / 2**20, "ratio": predicted / measured, "peak_at": "prefill",
                     "seconds": time.perf_counter() - t0})
    return rows


def predict(case: Case, run: Dist | None = None) -> Estimate:
    """The planner's estimate for `case` on this CPU, in one process or as `run` (the case's batch per
    data-parallel rank)."""
    dp = run.dp if run is not None else 1
    workload = Workload(case.config().replace(head="lm"), case.batch * case.grad_accum * dp, case.seq,
                        case.precision, case.optimizer, case.grad_accum)
    layout = run.layout() if run is not None else Layout(activation_checkpointing=case.checkpointing)
    return estimate(workload, layout, Hardware(device="cpu"))


def measure_distributed(case_index: int, timeout: float = 300) -> int:
    """The busiest rank's peak over a torchrun run of DISTRIBUTED_CASES[case_index]."""
    ranks = DISTRIBUTED_CASES[case_index].ranks
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(port), __file__, "--worker", str(case_index), "--out", out]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        peaks = [json.loads(f.read_text())["peak"] for f in Path(out).glob("rank*.json")]
    if done.returncode or len(peaks) != ranks:
        raise RuntimeError(f"{DISTRIBUTED_CASES[case_index].name} run failed (exit {done.returncode}): "
                           f"{done.stderr[-2000:]}")
    return max(peaks)


def validate(cases: list[Case], distributed: list[int] | None = None) -> list[dict[str, Any]]:
    """Predicted and measured peaks of every case (one process) and of DISTRIBUTED_CASES[i] for i in
    `distributed` (default all; [] for none)."""
    indices = range(len(DISTRIBUTED_CASES)) if distributed is None else distributed
    runs = [(case, None) for case in cases] + [(DISTRIBUTED_CASES[i].case, i) for i in indices]
    rows = []
    for case, index in runs:
        t0 = time.perf_counter()
        run = DISTRIBUTED_CASES[index] if index is not None else None
        measured = measure(case) if run is None else measure_distributed(index)
        predicted = predict(case, run)
        name = case.name if run is None else f"{case.name} {run.name}"
        rows.append({"case": name, "predicted_mib": predicted.peak / 2**20, "measured_mib": measured / 2**20,
                     "ratio": predicted.peak / measured, "peak_at": predicted.phase
                     + (f", stage {predicted.stage}" if run is not None and run.pp > 1 else ""),
                     "seconds": time.perf_counter() - t0})
    return rows


def bert_answer(memory: int = 16 * GiB) -> list[dict[str, Any]]:
    """The largest batch per device that fits BERT-base and BERT-large MLM pre-training at seq 512 with Adam
    on `memory`-byte GPUs (10% headroom): fp32 and AMP (bf16 autocast), on one device, with activation
    checkpointing, with FSDP over 4 devices; lmforge's presets (dropout 0) and with BERT's dropout of 0.1."""
    hw = Hardware(memory=memory)
    layouts = {"one device": Layout(), "+ checkpointing": Layout(activation_checkpointing=True),
               "allreduce x4": Layout(dp=4, strategy="allreduce"), "FSDP x4": Layout(dp=4, strategy="fsdp"),
               "FSDP x4 + checkpointing": Layout(dp=4, strategy="fsdp", activation_checkpointing=True)}
    rows = []
    for name, dropout, precision in itertools.product(("bert-base-uncased", "bert-large-uncased"), (0.0, 0.1),
                                                      ("fp32", "bf16")):
        cfg = ModelConfig.from_name(name, dropout=dropout)
        row = {"model": name, "dropout": dropout, "precision": precision}
        for label, layout in layouts.items():
            row[label] = max_batch(Workload(cfg, layout.dp, 512, precision), layout, hw)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bert", action="store_true", help="print the BERT 16 GB answer instead")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    parser.add_argument("--single", action="store_true", help="one-process cases only (no torchrun runs)")
    parser.add_argument("--distributed", help="only these DISTRIBUTED_CASES (comma-separated indices; "
                        "no one-process cases), e.g. 5,6,7")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # a torchrun rank of a distributed case
    parser.add_argument("--out", help=argparse.SUPPRESS)  # where a worker writes rank<R>.json
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker is not None:
        run = DISTRIBUTED_CASES[args.worker]
        peak = measure(run.case, run=run)
        Path(args.out, f"rank{os.environ['RANK']}.json").write_text(json.dumps({"peak": peak}))
        return 0
    if args.bert:
        rows = bert_answer()
        print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
        for r in rows:
            print(json.dumps(r) if args.json else "| " + " | ".join(str(v) for v in r.values()) + " |")
        return 0
    print(f"CPU: {cpu_model()} | torch {torch.__version__} | 1 thread")
    print(f"{'configuration':96s} {'predicted MiB':>13s} {'measured MiB':>12s} {'ratio':>6s}  predicted peak at")
    worst = 0.0
    if args.distributed:
        rows = validate([], [int(i) for i in args.distributed.split(",")])
    else:
        rows = validate(CASES, [] if args.single else None) + validate_generation()
    for r in rows:
        worst = max(worst, abs(r["ratio"] - 1))
        print(json.dumps(r) if args.json else
              f"{r['case']:96s} {r['predicted_mib']:13.1f} {r['measured_mib']:12.1f} {r['ratio']:6.3f}  "
              f"{r['peak_at']}")
    print(f"largest deviation: {worst:.1%} over {len(rows)} configurations")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
