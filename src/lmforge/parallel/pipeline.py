"""Pipeline parallelism for the training loop, on torch.distributed.pipelining.

    strategy = PipelineStrategy(pp=2, schedule="1f1b", microbatches=8)     # dp = world size // pp
    result = run_training(model, CausalLM(), data, config, strategy)       # lmforge.parallel.strategy

The decoder's layer stack is cut into `pp` contiguous stages (`stage_layers`: balanced by parameter count, or a
given number of layers per stage), applied from outside the model: `DecoderStage` holds the model's own modules
for one stage (the embeddings on the first, the final norm and the LM head on the last), the rest of the model is
moved to the meta device on that rank (freed), and torch's `PipelineStage` + `ScheduleGPipe` / `Schedule1F1B` run
the micro-batches (or `ScheduleInterleaved1F1B` over several stages per rank). The loop's own data sharding,
logging and checkpoints stay the loop's: `PipelineStrategy.forward_backward` runs one schedule step per loop
micro-batch, `sync` reduces gradients once per optimizer step, `save_checkpoint` gathers the stages into the
single-process checkpoint format (so a run saved under a pipeline resumes in any layout), and `full_model` returns
the whole trained model on every rank.

Ranks form the (dp, pp, tp) DeviceMesh of `lmforge.parallel.mesh.Layout`: rank = (dp_index * pp + stage) * tp +
tp_index. PP x TP: `shard` applies tensor parallelism (`tensor_parallel.parallelize`, on the "tp" dimension) to
the whole model before it is cut, so each stage's modules are the tensor-parallel ones of its tp sub-mesh (the
vocabulary-parallel embedding on the first stage, the vocabulary-parallel head and the loss-parallel
cross-entropy on the last); activations between stages are ordinary (replicated) tensors; a vocabulary the
degree does not divide is padded as under TP alone, its padded rows cut off in checkpoints and `full_model` and
added again (zeros) when a PP x TP run loads a single-process checkpoint. Gradients are
averaged over "dp"; a head tied to the embedding is held by the first and the last stage, whose gradients of it
are summed (shard by shard: the ranks of the same tp index hold the same rows), so both copies take the same
optimizer steps. The loss is computed on the last stage with the objective's own loss, each schedule
micro-batch weighted by its share of the step's loss terms (scale_grads=False), so PP gives the gradient of
single-process training on the same global batch.

What torch does not provide and is written here: the stage module over lmforge's decoder, the balanced split,
the tied-weight and data-parallel gradient reductions (torch's schedules leave them to the user) and the
gathering of stage states into one checkpoint.

Evaluation (`eval_stats`) runs the stages one after another on whole batches (plain send / recv), the last
stage computing the objective's statistics.

Limits: decoders only (encoders are refused); batches without padding masks (packed LM blocks); no
torch.compile of the stages; no fp16 gradient scaler (bf16 autocast works); no PP x FSDP, no sequence
parallelism or activation checkpointing in a pipeline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel as tensor_parallel_loss
from torch.optim import Optimizer

from lmforge.models.blocks import ModelOutput, check_input_ids, rotary_cos_sin
from lmforge.parallel import mesh as meshes
from lmforge.parallel import sharded_checkpoint
from lmforge.parallel.plans import clip_grad_norm
from lmforge.parallel.strategy import Distributed
from lmforge.parallel.tensor_parallel import fused_rows, parallelize, vocab_rows
from lmforge.training import TrainConfig, load_checkpoint, save_checkpoint

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B}
_BATCH_KEYS = ("input_ids", "labels")  # what a pipelined batch may hold (no padding masks)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activations sent between stages when evaluating


def parse_split(text: str) -> list[int]:
    """"3,5" -> [3, 5]: layers per stage. Raises ValueError naming the text for anything else."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"pipeline split {text!r} must be positive layer counts per stage, e.g. '3,5'")
    return counts


def stage_layers(model: nn.Module, n_stages: int, split: list[int] | None = None) -> list[range]:
    """The layer indices of each stage: `split` (layers per stage, summing to the model's n_layer), or the
    contiguous cut that minimises the largest stage's parameter count (embeddings counted on the first stage,
    final norm and head on the last; a tied head counted once more on the last, where its matmul runs).

    Raises ValueError for a model without a `layers` stack, fewer layers than stages, or a bad split.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(model, "lm_head"):
        raise ValueError(f"pipeline parallelism splits a decoder's layer stack; {type(model).__name__} has none")
    n = len(layers)
    if n_stages < 1 or n_stages > n:
        raise ValueError(f"cannot split {n} layers into {n_stages} pipeline stages (need 1 <= stages <= layers)")
    if split is not None:
        if len(split) != n_stages or sum(split) != n or min(split) < 1:
            raise ValueError(f"pipeline split {split} must give {n_stages} positive layer counts summing to "
                             f"{n} (the model's layers)")
        starts = [sum(split[:i]) for i in range(n_stages)]
        return [range(s, s + c) for s, c in zip(starts, split, strict=True)]
    cost = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    first = sum(p.numel() for m in (model.embed_tokens, getattr(model, "embed_positions", None)) if m is not None
                for p in m.parameters())
    last = sum(p.numel() for p in model.norm.parameters()) + model.lm_head.weight.numel()
    # best[s][j]: the smallest largest-stage cost of layers[:j] in s stages; cut[s][j]: where stage s starts.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for s in range(1, n_stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                load = sum(cost[i:j]) + (first if i == 0 else 0) + (last if s == n_stages and j == n else 0)
                value = max(best[s - 1][i], load)
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    bounds, j = [], n
    for s in range(n_stages, 0, -1):
        bounds.append(range(cut[s][j], j))
        j = cut[s][j]
    return bounds[::-1]


class DecoderStage(nn.Module):
    """One pipeline stage of an lmforge `Decoder`, made of the model's own modules (not copies).

    First stage: input_ids (B, T) -> hidden (B, T, C); middle: hidden -> hidden; last: hidden -> logits
    (B, T, vocab); a single stage: input_ids -> logits. Parameter names are the model's own
    ("layers.5.attn...", "lm_head.weight"). A plain causal forward over whole blocks (no cache, no padding),
    composed of the blocks the decoder's own forward uses. `autocast` is entered around the forward (the
    strategy sets it to the loop's precision), so the backward runs outside it, as in the loop.
    """

    def __init__(self, model: nn.Module, layers: range, is_first: bool, is_last: bool):
        super().__init__()
        self.config = model.config
        self.is_first, self.is_last = is_first, is_last
        self.autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        if is_first:
            self.embed_tokens = model.embed_tokens
            self.embed_positions = model.embed_positions
            self.dropout = model.dropout
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        if is_last:
            self.norm = model.norm
            self.lm_head = model.lm_head

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.config
        with self.autocast():
            B, T = x.shape[:2]
            positions = torch.arange(T, device=x.device).expand(B, T)
            if self.is_first:
                check_input_ids(x, cfg.vocab_size)
                if T > cfg.max_seq_len and cfg.position == "learned":
                    raise ValueError(f"sequence of {T} tokens exceeds the model context of {cfg.max_seq_len}")
                h = self.embed_tokens(x)  # (B, T, C)
                if self.embed_positions is not None:
                    h = h + self.embed_positions(positions)
                x = self.dropout(h)
            rotary = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype) \
                if cfg.position == "rotary" else None
            for layer in self.layers.values():
                x = layer(x, None, True, rotary, None, T, None)
            if self.is_last:
                x = self.lm_head(self.norm(x))  # (B, T, vocab)
        return x


def _replace_parameters(model: nn.Module, keep: set[int], make: Callable[[Tensor], Tensor]) -> None:
    """Replace every parameter whose id is not in `keep` by nn.Parameter(make(p)); shared stays shared."""
    memo: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or id(p) in keep:
                continue
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(make(p), requires_grad=p.requires_grad)
            module._parameters[name] = memo[id(p)]


def _local(tensor: Tensor) -> Tensor:
    """A DTensor's local shard (what this rank reduces in place), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _plain(value: Any) -> Any:
    """A loss or statistic as an ordinary tensor: loss-parallel cross-entropy gives replicated DTensors."""
    return value.full_tensor() if isinstance(value, DTensor) else value


class _Step:
    """What the loss function needs during one schedule step (set by forward_backward)."""

    def __init__(self, objective: Any, keys: list[str], n_targets: int, weight: float, scaler: Any):
        self.objective, self.keys, self.n_targets, self.weight, self.scaler = (objective, keys, n_targets,
                                                                               weight, scaler)
        self.records: list[tuple[Tensor, dict[str, Any], int]] = []  # (loss, metrics, n_targets) per call


class PipelineStrategy(Distributed):
    """Pipeline (x data, x tensor) parallelism: `pp` stages per replica, each over `tp` ranks, world size //
    (pp x tp) replicas on a (dp, pp, tp) mesh.

    rank / world_size are the data-parallel index and degree (the loop shards data over replicas); every stage
    of a replica gets the same batch (only the first stage reads its input_ids, only the last its targets).
    schedule: "gpipe", "1f1b" or "interleaved-1f1b" (Megatron's: `stages_per_rank` stages per rank, rank r
    holding stages r, r + pp, ...; a smaller bubble for the same micro-batches); microbatches: schedule
    micro-batches per loop micro-batch (the loop's batch_size must be a multiple); split: layers per stage
    (pp x stages_per_rank counts; default: balanced by parameter count); tp: tensor-parallel ranks per stage
    (PP x TP; world size // (pp x tp) replicas).
    """

    def __init__(self, pp: int, dp: int | None = None, schedule: str = "1f1b", microbatches: int = 4,
                 split: list[int] | None = None, timeout: float = 60.0, backend: str | None = None,
                 stages_per_rank: int = 2, tp: int = 1):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if microbatches < 1:
            raise ValueError(f"microbatches must be >= 1, got {microbatches}")
        if schedule == "1f1b" and microbatches < pp:
            raise ValueError(f"the 1f1b schedule needs at least as many micro-batches as stages: "
                             f"microbatches={microbatches} < pp={pp} (use gpipe, or more micro-batches)")
        rounds = max(1, microbatches // max(pp, 1))
        if schedule == "interleaved-1f1b" and (microbatches % rounds or stages_per_rank < 2):
            raise ValueError(f"the interleaved-1f1b schedule needs stages_per_rank >= 2 (got {stages_per_rank}) "
                             f"and microbatches a multiple of max(1, microbatches // pp) = {rounds} (got "
                             f"{microbatches})")
        super().__init__(timeout, backend)
        self.layout = meshes.Layout.parse(dp=dp, pp=pp, tp=tp)
        self.pp, self.dp, self.tp = self.layout.pp, self.layout.dp, self.layout.tp
        self.schedule_name, self.microbatches, self.split = schedule, microbatches, split
        self.virtual = stages_per_rank if schedule == "interleaved-1f1b" else 1
        self.mesh = self.layout.build(self.device.type)
        self.pp_group, self.dp_group = meshes.group(self.mesh, "pp"), meshes.group(self.mesh, "dp")
        self.stage_index = meshes.coordinate(self.mesh, "pp")
        self.rank, self.world_size = meshes.coordinate(self.mesh, "dp"), self.dp
        self.is_first, self.is_last = self.stage_index == 0, self.stage_index == pp - 1
        tp_index = meshes.coordinate(self.mesh, "tp")
        self.reports = self.is_last and tp_index == 0  # the one rank per replica whose loss and statistics count
        pp, tp = self.pp, self.tp
        # the first and the last stage of each replica, for each tp index (they hold the same rows of a tie)
        ends = [[(d * pp) * tp + t, (d * pp + pp - 1) * tp + t] for d in range(self.dp) for t in range(tp)]
        tied_groups = [dist.new_group(ranks) for ranks in ends] if pp > 1 else []  # every rank creates all
        self.tied_group = tied_groups[self.rank * tp + tp_index] if tied_groups else None
        self.stage: nn.ModuleList | None = None  # this rank's DecoderStages
        self._step: _Step | None = None
        self._metric_names: list[str] | None = None

    # --- set-up ---------------------------------------------------------------------------------------------

    def check_run(self, config: TrainConfig, has_eval: bool) -> None:
        """Refuse settings the pipeline cannot run, before any work."""
        if config.batch_size % self.microbatches:
            raise ValueError(f"batch_size {config.batch_size} must be a multiple of the pipeline's "
                             f"{self.microbatches} micro-batches")
        if config.compile:
            raise ValueError("torch.compile is not supported with pipeline parallelism")
        if config.precision == "fp16":
            raise ValueError("precision fp16 (a gradient scaler) is not supported with pipeline parallelism: each "
                             "stage would decide alone to skip a step on overflow; use bf16")

    def shard(self, model: nn.Module) -> nn.Module:
        """PP x TP: tensor parallelism over the "tp" dimension, on the whole model (before the loop builds the
        optimizer; `prepare` cuts it into stages). Raises ValueError for a model the pipeline cannot split."""
        stage_layers(model, self.pp * self.virtual, self.split)
        if self.tp > 1:
            parallelize(model, meshes.sub_mesh(self.mesh, "tp"), loss_parallel=True)
        return model

    def loss_parallel(self) -> contextlib.AbstractContextManager:
        return tensor_parallel_loss() if self.tp > 1 else contextlib.nullcontext()

    def load_checkpoint(self, path: Any, model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
        """A checkpoint of any layout into the (tensor-parallel) whole model, before `prepare` cuts it: the
        single-process format (what pipelines write) is sharded rank by rank, without communication."""
        if self.tp == 1 or sharded_checkpoint.is_sharded_checkpoint(path):
            return super().load_checkpoint(path, model, optimizer)
        model_state, state = load_checkpoint(path)
        fused = fused_rows(model)
        with torch.no_grad():
            for name, value in model.state_dict().items():
                if isinstance(value, DTensor):
                    value.to_local().copy_(sharded_checkpoint.local_shard(model_state[name], value, fused.get(name)))
                else:
                    value.copy_(model_state[name])
        optimizer.load_state_dict(state["optimizer"])
        names, vocab = {id(p): n for n, p in model.named_parameters()}, vocab_rows(model)
        for p, st in optimizer.state.items():
            rows = vocab.get(names[id(p)], p.shape[0] if p.dim() else None)  # a padded vocabulary: its real rows
            for key, v in st.items():
                if isinstance(p, DTensor) and isinstance(v, Tensor) and v.shape == (rows, *p.shape[1:]):
                    local = sharded_checkpoint.local_shard(v, p, fused.get(names[id(p)]))
                    st[key] = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False)
        return state

    def prepare(self, model: nn.Module, optimizer: Optimizer) -> tuple[nn.Module, Optimizer]:
        """Cut `model` into this rank's stages, free the other stages' parameters (meta device), keep only
        these stages' parameters (and their state) in `optimizer`, in place, and build the schedule."""
        n_stages = self.pp * self.virtual
        ranges = stage_layers(model, n_stages, self.split)
        names = {id(p): n for n, p in model.named_parameters()}  # the first name of a tied tensor
        self.model, self.vocab = model, vocab_rows(model)  # (before the other stages' parameters go)
        self.order = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        self.indices = [self.stage_index + k * self.pp for k in range(self.virtual)]  # stages held here
        self.stages = [DecoderStage(model, ranges[i], i == 0, i == n_stages - 1) for i in self.indices]
        self.stage = nn.ModuleList(self.stages)
        keep = {id(p) for p in self.stage.parameters()}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) in keep]
        for p in [p for p in optimizer.state if id(p) not in keep]:
            del optimizer.state[p]
        _replace_parameters(model, keep, lambda p: torch.empty_like(p.to_local() if isinstance(p, DTensor) else p,
                                                               device="meta"))
        self.names = {id(p): names[id(p)] for p in self.stage.parameters()}
        tied = getattr(model.config, "tie_embeddings", False) and self.pp > 1
        self.tied = (self.stages[0].embed_tokens.weight if self.is_first else self.stages[-1].lm_head.weight) \
            if tied and (self.is_first or self.is_last) else None
        pipe = [PipelineStage(st, i, n_stages, self.device, group=self.pp_group)
                for st, i in zip(self.stages, self.indices, strict=True)]
        self.schedule = SCHEDULES[self.schedule_name](pipe if self.virtual > 1 else pipe[0], self.microbatches,
                                                      loss_fn=self._loss, scale_grads=False)
        return self.stage, optimizer

    # --- one step -------------------------------------------------------------------------------------------

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """One schedule micro-batch's share of the loop micro-batch's weighted loss (last stage only)."""
        step = self._step
        batch = dict(zip(step.keys, target.unbind(1), strict=True))  # target: (b, n_keys, T)
        with self.stages[-1].autocast():
            loss, metrics = step.objective(lambda *a, **k: ModelOutput(logits=logits, last_hidden_state=None),
                                           batch)
        n = step.objective.n_targets(batch)
        step.records.append((_plain(loss.detach()), {k: _plain(v) for k, v in metrics.items()}, n))
        return step.scaler.scale(loss * (n / max(1, step.n_targets) * step.weight))

    def forward_backward(self, model: nn.Module, objective: Any, batch: dict[str, Tensor], weight: float,
                         autocast: Callable[[], contextlib.AbstractContextManager],
                         scaler: torch.amp.GradScaler) -> tuple[Tensor, dict[str, Any]]:
        """Run the schedule over one loop micro-batch; the loss and metrics are the last stage's (zeros on the
        other stages and the last stage's other tp ranks, so that the loop's sum over ranks divided by dp is the
        mean over replicas)."""
        self._check_batch(batch)
        rows = batch["input_ids"].shape[0]
        if rows % self.microbatches:
            raise ValueError(f"a batch of {rows} rows does not split into {self.microbatches} micro-batches")
        keys = [k for k in _BATCH_KEYS if k in batch]
        for stage in self.stages:
            stage.autocast = autocast
        self._step = _Step(objective, keys, objective.n_targets(batch), weight, scaler)
        target = torch.stack([batch[k] for k in keys], dim=1) if self.is_last else None  # (B, n_keys, T)
        args = (batch["input_ids"],) if self.is_first else ()
        # return_outputs=False: else the last stage keeps every micro-batch's logits to the next step and
        # concatenates them into (B, T, V), which the loop never reads (benchmarks/memory_plan.py measured it)
        self.schedule.step(*args, target=target, return_outputs=False)
        names = self._names()
        if not self.reports:
            zero = torch.zeros((), device=self.device)
            return zero, {k: zero for k in names}
        records = self._step.records[-self.microbatches:]  # the first step also ran a shape-inference call
        n = max(1, sum(r[2] for r in records))
        loss = sum(r[0] * r[2] for r in records) / n
        metrics = {k: sum(torch.as_tensor(r[1][k], device=self.device).float() * r[2] for r in records) / n
                   for k in names}
        return loss, metrics

    @staticmethod
    def _check_batch(batch: dict[str, Tensor]) -> None:
        extra = sorted(set(batch) - set(_BATCH_KEYS))
        if extra:
            raise ValueError(f"pipeline parallelism runs on packed blocks; the batch has {extra} (padding masks "
                             f"and token types are not supported)")

    def _names(self) -> list[str]:
        """The objective's metric names, sent once from the last stage to the others (the loop reduces them)."""
        if self._metric_names is None:
            names = [sorted(self._step.records[-1][1]) if self.is_last else None]
            dist.broadcast_object_list(names, src=self._global(self.pp - 1), group=self.pp_group)
            self._metric_names = names[0]
        return self._metric_names

    def eval_stats(self, model: nn.Module, objective: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The objective's statistics of one evaluation batch, the stages run one after another (no
        micro-batches: any batch size); zeros of the same shapes on all but the last stage, so that the sum over
        ranks counts each replica's batch once."""
        self._check_batch(batch)
        x, stats, last = batch["input_ids"], None, self.pp * self.virtual - 1
        for index, stage in zip(self.indices, self.stages, strict=True):
            if index > 0:
                x = self._recv(index - 1)
            x = stage(x)  # under the loop's autocast
            if index < last:
                self._send(x, index + 1)
        if self.is_last:  # x: the last stage's logits
            stats = objective.eval_stats(lambda *a, **k: ModelOutput(logits=x, last_hidden_state=None), batch)
            stats = {k: _plain(v) for k, v in stats.items()}
        holder = [{k: (v.shape, v.dtype) for k, v in stats.items()} if stats is not None else None]
        dist.broadcast_object_list(holder, src=self._global(self.pp - 1), group=self.pp_group)
        if self.reports:
            return stats
        return {k: torch.zeros(shape, dtype=dtype, device=self.device) for k, (shape, dtype) in holder[0].items()}

    def _global(self, stage: int) -> int:
        """The global rank that holds pipeline stage `stage`."""
        return dist.get_global_rank(self.pp_group, stage % self.pp)

    def _send(self, x: Tensor, stage: int) -> None:
        header = torch.tensor([*x.shape, _DTYPES.index(x.dtype)], dtype=torch.int64)
        dist.send(header.to(self.device), self._global(stage), group=self.pp_group)
        dist.send(x.contiguous(), self._global(stage), group=self.pp_group)

    def _recv(self, stage: int) -> Tensor:
        header = torch.empty(4, dtype=torch.int64, device=self.device)  # (B, T, C, dtype index)
        dist.recv(header, self._global(stage), group=self.pp_group)
        *shape, dtype = header.tolist()
        x = torch.empty(shape, dtype=_DTYPES[dtype], device=self.device)
        dist.recv(x, self._global(stage), group=self.pp_group)
        return x

    def sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        return self._reduce_after() if sync else contextlib.nullcontext()

    @contextlib.contextmanager
    def _reduce_after(self) -> Iterator[None]:
        yield
        params = list(self.stage.parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(placements=p.placements)  # a vocabulary-parallel embedding's
                # gradient comes out replicated: keep this rank's rows, as the tie's other copy has them
        if self.tied is not None:  # first + last stage's gradient of the tie
            dist.all_reduce(_local(self.tied.grad), group=self.tied_group)
        if self.dp > 1:
            grads = [_local(p.grad) for p in params]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.dp_group)
            flat /= self.dp
            for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
                g.copy_(reduced)

    def clip_grad_norm(self, parameters: list[Tensor], max_norm: float) -> Tensor:
        """Clip by the norm over every stage's gradients (a tied tensor counted once; tensor-parallel shards
        summed over tp)."""
        skip = (self.tied,) if self.is_last and self.tied is not None else ()
        return clip_grad_norm(parameters, max_norm, sum_group=self.pp_group, skip=skip)

    def gather_object(self, obj: Any) -> list[Any]:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered

    # --- whole-model state ----------------------------------------------------------------------------------

    def _gather_stages(self, optimizer: Optimizer | None) -> list[dict[str, Any]]:
        """Every stage's parameters (and optimizer state) by model name, on CPU, from this rank's replica."""
        fused = fused_rows(self.model)  # tensor-parallel tensors are gathered (over tp) in the model's row order
        cpu = {k: v.cpu() for stage in self.stages  # (and a padded vocabulary cut to its real rows)
               for k, v in sharded_checkpoint.full_state_dict(stage, fused, self.vocab).items()}
        if self.tied is not None and self.is_last:
            cpu["embed_tokens.weight"] = cpu["lm_head.weight"]
        state = {}
        if optimizer is not None:
            for p, st in optimizer.state.items():
                name = self.names[id(p)]
                state[name] = {k: sharded_checkpoint.full_tensor(v, fused.get(name), self.vocab.get(name)).cpu()
                               if isinstance(v, Tensor) else v for k, v in st.items()}
        gathered: list[Any] = [None] * self.pp
        dist.all_gather_object(gathered, {"model": cpu, "optimizer": state}, group=self.pp_group)
        return gathered

    def save_checkpoint(self, run_dir: Any, step: int, model: nn.Module, optimizer: Optimizer,
                        trainer_state: dict[str, Any], keep_last: int) -> Any:
        """The loop's checkpoint in the single-process format (the whole model's state dict and the optimizer's,
        gathered from the stages; every rank calls it, the main rank writes), so any layout resumes it."""
        stages = self._gather_stages(optimizer)
        if not self.is_main:
            return None
        model_state = {k: v for s in stages for k, v in s["model"].items()}
        by_name = {k: v for s in stages for k, v in s["optimizer"].items()}
        state, groups, index = {}, [], 0
        for names, param_group in zip(self.order, optimizer.param_groups, strict=True):
            ids = []
            for name in names:
                if name in by_name:
                    state[index] = by_name[name]
                ids.append(index)
                index += 1
            groups.append({**{k: v for k, v in param_group.items() if k != "params"}, "params": ids})
        ordered = {k: model_state[k] for k in self.model.state_dict()}  # the model's own key order
        return save_checkpoint(run_dir, step, ordered, {**trainer_state, "optimizer": {"state": state,
                                                                                         "param_groups": groups}},
                               keep_last)

    def full_model(self, model: nn.Module) -> nn.Module:
        """The whole trained model as an ordinary module on every rank (a collective over each replica's
        stages); the model given to `prepare` keeps only this rank's stage (the rest is on the meta device)."""
        from lmforge.models import build_model

        stages = self._gather_stages(None)
        plain = build_model(self.model.config)
        plain.load_state_dict({k: v for s in stages for k, v in s["model"].items()})
        return plain
