"""Memory planner: the peak memory per rank of each parallel layout, before the run.

    workload = Workload(ModelConfig.from_name("bert-base-uncased"), batch=32, seq=512, precision="bf16")
    estimates = plan(workload, Hardware(memory=16 * GiB), devices=4)   # every layout of 4 devices, ranked
    print(format_table(estimates))

Nothing here allocates a tensor: parameter counts come from the model built on the meta device
(`build_empty_model`), everything else is arithmetic over `ModelConfig`. torch has no planner for this (its
memory tools measure a run that already happens), hence this module.

What one rank holds, as lmforge allocates it (read off training.py, models/ and parallel/):

- parameters: float32 always. AMP (`--precision bf16|fp16`) is autocast: the float32 parameters are the master
  weights, and every linear's weight is cast to the low precision during forward; autocast caches those casts
  until its context exits and each linear saves its copy for backward (2 bytes per linear weight element, per
  micro-batch in flight).
- gradients: float32, from backward until `zero_grad(set_to_none=True)` after the step.
- optimizer: AdamW's two float32 moments; SGD with momentum one buffer. On CPU, AdamW's single-tensor path
  allocates two temporaries the size of the largest parameter (sqrt, then the division); CUDA uses the fused
  kernel (none).
- activations: the tensors autograd saves, per layer, derived from `models/blocks.py` (see
  `layer_activations`): norm inputs and statistics, each linear's input (in the compute dtype), the fused qkv
  output (q, k, v are views of it), SDPA's output and log-sum-exp (fused attention on CPU and CUDA; the math
  path, which saves the (T, T) probabilities, when CPU attention has dropout), the MLP's activations, dropout
  masks. The loss: `F.cross_entropy` over float32 logits saves the log-softmax (N, V); its backward holds three
  (N, V) float32 tensors at once (log-softmax, its gradient, the logits' gradient), the usual peak of an LM step.
- activation checkpointing (per block, non-reentrant): each block keeps its input only and recomputes one
  block at a time in backward.
- communication buffers: lmforge's DistributedOptimizer keeps one flat float32 buffer per bucket for every
  gradient (a second copy of the gradients), DDP its bucket views; data parallelism over tensor- or
  pipeline-parallel replicas one flat copy of the gradients after the last backward only; FSDP (torch
  `fully_shard` per block plus the root) all-gathers a block's parameters (two blocks at once with prefetching)
  and keeps the root's (embeddings, head) unsharded from forward to the end of backward; pipeline stages keep
  one micro-batch's activations and stage output (the last stage's logits) per micro-batch in flight (GPipe:
  all m, 1F1B: p - stage; one fewer after the step's first backward, which has no gradients yet) and torch's
  receive buffers, one per micro-batch for activations and one for their gradients.
- tensor parallelism (Megatron): linear weights, the vocabulary and the attention heads split over t ranks
  (a vocabulary t does not divide is padded to the next multiple of t, as `tensor_parallel` does); norms,
  residual stream and norm inputs replicated (no sequence parallelism); torch's `loss_parallel` holds one more
  (N, V / t) tensor than `F.cross_entropy` in forward and in backward.

Step time: FLOPs / (devices x peak), times the pipeline's (m + p - 1) / m, plus communication bytes / link
bandwidth (ring all-reduce 2 (d-1)/d, FSDP 3 (d-1)/d of the parameters, tensor-parallel activation all-reduces
4 per block), not overlapped: a simple model to rank layouts, not a promise.
"""

from __future__ import annotations

import dataclasses
import itertools
import shlex
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.config import ModelConfig

GiB = 2**30
Precision = Literal["fp32", "bf16", "fp16"]
STRATEGIES = ("single", "allreduce", "ddp", "fsdp")
SCHEDULES = ("gpipe", "1f1b")


def parse_bytes(text: str) -> int:
    """'16GB', '16GiB', '80G', '512MB', '1e9' -> bytes (GB and GiB both mean 2**30, as device specs do)."""
    units = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
             "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
    s = str(text).strip().lower().replace(" ", "")
    number = s.rstrip("kmgtib")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise ValueError(f"memory size {text!r}: expected a positive number with an optional unit, e.g. 16GB")
    return int(value * units[unit])


@dataclass(frozen=True)
class Hardware:
    """One device and its links. Defaults: a 16 GB accelerator of 100 TFLOP/s (low precision; float32 a
    quarter of it) with 50 GB/s links per device.

    headroom: the share of `memory` a layout must leave free. The planner predicts what torch allocates
    (`torch.cuda.max_memory_allocated`); a CUDA device also holds the CUDA context and the caching allocator's
    fragmentation, hence 10% by default there (0 on CPU).
    """

    memory: int = 16 * GiB
    device: Literal["cuda", "cpu"] = "cuda"
    tflops: float = 100.0  # peak dense matmul TFLOP/s in bf16/fp16
    fp32_tflops: float | None = None  # None: tflops / 4
    link_gbs: float = 50.0  # GB/s each device sends and receives
    headroom: float | None = None  # None: 0.1 on cuda, 0 on cpu

    def __post_init__(self) -> None:
        if self.memory <= 0 or self.tflops <= 0 or self.link_gbs <= 0:
            raise ValueError("Hardware memory, tflops and link_gbs must be positive")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"Hardware.device must be 'cuda' or 'cpu', got {self.device!r}")
        if self.headroom is not None and not 0 <= self.headroom < 1:
            raise ValueError(f"Hardware.headroom must be in [0, 1), got {self.headroom}")

    @property
    def usable(self) -> int:
        """Bytes a layout may allocate: memory less the headroom."""
        headroom = self.headroom if self.headroom is not None else (0.1 if self.device == "cuda" else 0.0)
        return int(self.memory * (1 - headroom))

    def flops(self, precision: str) -> float:
        """Peak FLOP/s for matmuls in `precision`."""
        if precision == "fp32":
            return (self.fp32_tflops or self.tflops / 4) * 1e12
        return self.tflops * 1e12


@dataclass(frozen=True)
class Workload:
    """What is trained: `batch` sequences of `seq` tokens per optimizer step (all ranks together).

    objective: "clm" for decoders (no attention mask: packed blocks), "mlm" for encoders (lmforge's masked
    batches carry labels and an attention mask). grad_accum: micro-batches a data-parallel rank runs one after
    the other per step (pipelines split a rank's batch into their own micro-batches instead).
    """

    config: ModelConfig
    batch: int
    seq: int
    precision: Precision = "fp32"
    optimizer: Literal["adam", "sgd"] = "adam"
    grad_accum: int = 1

    def __post_init__(self) -> None:
        for name in ("batch", "seq", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Workload.{name} must be a positive integer, got {getattr(self, name)!r}")
        limit = self.config.max_seq_len - self.config.position_offset
        if self.config.position == "learned" and self.seq > limit:
            raise ValueError(f"seq {self.seq} exceeds the model context of {limit}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be adam or sgd, got {self.optimizer!r}")

    @property
    def objective(self) -> str:
        return "clm" if self.config.arch == "decoder" else "mlm"


@dataclass(frozen=True)
class Layout:
    """How the devices are used: dp x tp x pp ranks; `strategy` on the data-parallel dimension."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    strategy: str = "single"  # single (dp = 1), allreduce, ddp or fsdp
    schedule: str = "1f1b"  # pipelines only
    microbatches: int = 1  # pipelines only
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if min(self.dp, self.tp, self.pp, self.microbatches) < 1:
            raise ValueError(f"layout degrees must be >= 1, got {self}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if (self.strategy == "single") != (self.dp == 1):
            raise ValueError(f"strategy 'single' goes with dp = 1 and only then, got dp={self.dp} "
                             f"strategy={self.strategy!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def name(self) -> str:
        parts = []
        if self.dp > 1:
            parts.append(f"dp{self.dp}-{self.strategy}")
        if self.tp > 1:
            parts.append(f"tp{self.tp}")
        if self.pp > 1:
            parts.append(f"pp{self.pp}-{self.schedule}-m{self.microbatches}")
        text = " x ".join(parts) or "single"
        return text + (" +ac" if self.activation_checkpointing else "")


@dataclass
class Estimate:
    """The predicted peak of one rank (the busiest one) and the step time of a layout. Bytes at the peak's
    moment: parameters, gradients, optimizer states, activations (saved tensors and the transients of that
    moment), buffers (communication buffers, the batch, the optimizer's temporaries)."""

    layout: Layout
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    buffers: int
    phase: str  # when the peak happens
    fits: bool = False
    step_time: float = 0.0
    compute_time: float = 0.0
    comm_time: float = 0.0
    bubble: float = 0.0
    command: str = ""
    stage: int = 0  # the pipeline stage whose rank peaks highest

    @property
    def peak(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.buffers

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layout"] = dataclasses.asdict(self.layout) | {"name": self.layout.name}
        d["peak"] = self.peak
        return d


# --- parameters ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter elements by place, from the model built on the meta device (tied tensors counted once).

    embed: token, position and type embeddings and the embedding norm; layer: one block; layer_linear: the
    weights of one block's linears (what autocast casts); head: the final norm and the output head (an LM
    head tied to the token embedding counts in `embed`); head_linear: the weights of the head's linears, a
    tied one included (autocast casts it again); vocab_table: the token embedding (vocab x d_model);
    head_vocab: head elements with a vocabulary dimension (an untied head, the MLM decoder's bias);
    largest: the largest tensor.
    """

    embed: int
    layer: int
    layer_linear: int
    head: int
    head_linear: int
    vocab_table: int
    head_vocab: int
    largest: int
    n_layer: int

    @property
    def total(self) -> int:
        return self.embed + self.layer * self.n_layer + self.head


_EMBED_MODULES = ("embed_tokens", "embed_positions", "embed_types", "embed_norm")


def count_parameters(config: ModelConfig) -> ParameterCounts:
    """Count the parameters of `config`'s model without allocating them (see `ParameterCounts`)."""
    from torch import nn

    from lmforge.models import build_empty_model

    model = build_empty_model(config)
    embed_ids = {id(p) for n in _EMBED_MODULES if getattr(model, n, None) is not None
                 for p in getattr(model, n).parameters()}
    layer_ids = {id(p) for p in model.layers.parameters()} - embed_ids
    head = [p for p in {id(p): p for p in model.parameters()}.values()
            if id(p) not in embed_ids and id(p) not in layer_ids]

    def linear_weights(module: nn.Module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))

    heads = [m for n, m in model.named_children() if n not in (*_EMBED_MODULES, "layers")]
    return ParameterCounts(
        embed=sum(p.numel() for p in {id(p): p for n in _EMBED_MODULES if getattr(model, n, None) is not None
                                      for p in getattr(model, n).parameters()}.values()),
        layer=sum(p.numel() for p in model.layers[0].parameters()),
        layer_linear=linear_weights(model.layers[0]),
        head=sum(p.numel() for p in head),
        head_linear=sum(linear_weights(m) for m in heads),
        vocab_table=model.embed_tokens.weight.numel(),
        head_vocab=sum(p.numel() for p in head if p.shape and p.shape[0] == config.vocab_size),
        largest=max(p.numel() for p in model.parameters()),
        n_layer=config.n_layer)


# --- activations ---------------------------------------------------------------------------------------------


def _dropout_bytes(elements: int, dtype_bytes: int, p: float, device: str) -> int:
    """What a dropout site saves: CPU's `_dropout` keeps its scaled noise (the input's dtype), CUDA's fused
    kernel a bool mask; p = 0 returns the input itself."""
    if p <= 0:
        return 0
    return elements * (dtype_bytes if device == "cpu" else 1)


def layer_activations(config: ModelConfig, batch: int, seq: int, precision: str, device: str = "cuda",
                      tp: int = 1, mask: bool = False) -> dict[str, int]:
    """Bytes autograd saves for one block's backward, by tensor (micro-batch `batch` x `seq` tokens).

    Derived from `models/blocks.py`: a pre-norm block saves its input (the norm's), the norm's statistics,
    each linear's input in the compute dtype (a cast copy under autocast), the fused qkv output (q, k, v are
    views of it; rotary makes new q, k), SDPA's output and log-sum-exp, the residual, the MLP's
    pre-activation and activation (SwiGLU: the gate/up output, act(gate) and the product). A post-norm block
    (BERT) saves its input only as the qkv linear's input. Tensor parallelism divides the per-head and
    per-d_ff tensors by `tp`. `mask`: an attention mask of (B, 1, 1, T) booleans (encoders' batches).
    """
    c = config
    n = batch * seq
    e = 4 if precision == "fp32" else 2  # compute dtype bytes
    amp = precision != "fp32"
    h, hkv, d = c.n_head // tp, c.n_kv_head // tp, c.head_dim
    qkv_out = (h + 2 * hkv) * d
    f = c.d_ff // tp
    stats = 1 if c.norm == "rmsnorm" else 2  # rstd, or mean and rstd (float32 per token)
    # RMSNorm's float32 formula keeps x * rstd as well; under autocast its low-precision branch also does
    norm_extra = n * c.d_model * 4 if c.norm == "rmsnorm" else 0
    fused = not (device == "cpu" and c.dropout > 0)  # CPU flash attention refuses dropout: math path
    saved: dict[str, int] = {}
    if c.norm_position == "pre":
        saved["input (attn norm)"] = n * c.d_model * 4 + n * stats * 4 + norm_extra
        saved["attn norm out (qkv input)"] = n * c.d_model * e
    else:
        saved["input (qkv input)"] = n * c.d_model * e
    saved["qkv output"] = n * qkv_out * e
    if c.position == "rotary":
        if amp:  # q, k rotated in float32 (the cos/sin tables follow the float32 stream), cast for SDPA
            saved["rotated q, k"] = n * (h + hkv) * d * 2
        else:
            saved["rotated q, k"] = n * (h + hkv) * d * 4
    if fused:
        saved["attention output + lse"] = n * h * d * e + batch * h * seq * 4
    else:  # math SDPA: scaled q, probabilities, dropout noise, dropped probabilities, output
        probs = batch * h * seq * seq * e
        saved["attention (math path)"] = n * h * d * e + probs * 2 + _dropout_bytes(probs // e, e, c.dropout,
                                                                                     device)
    saved["residual 1"] = n * c.d_model * 4 + n * stats * 4 + norm_extra
    saved["mlp norm out (up input)"] = n * c.d_model * e
    if c.gated_mlp:
        saved["gate/up output"] = n * 2 * f * e
        saved["act(gate), product"] = n * f * e * 2
    else:
        saved["up output"] = n * f * e
        saved["activation (down input)"] = n * f * e
    if c.norm_position == "post":
        saved["residual 2"] = n * c.d_model * 4 + n * stats * 4
    drops = _dropout_bytes(n * c.d_model, e, c.dropout, device) * 2  # on the attention and MLP outputs
    if drops:
        saved["dropout masks"] = drops
    return saved


def _layer_transient(config: ModelConfig, batch: int, seq: int, precision: str, tp: int) -> int:
    """Gradients in flight inside one block's backward beyond its saved tensors and parameter gradients: the
    incoming float32 gradient and one of the block's widest intermediates (while the block's saved tensors
    are released node by node, its activation gradients appear; measured, this is their excess)."""
    e = 4 if precision == "fp32" else 2
    n = batch * seq
    widest = max(config.d_ff * (2 if config.gated_mlp else 1),
                 (config.n_head + 2 * config.n_kv_head) * config.head_dim) // tp
    return n * config.d_model * 4 + n * widest * e


def _embed_activations(config: ModelConfig, batch: int, seq: int, mask: bool, device: str) -> int:
    """The embeddings' saved tensors: indices, the embedding norm's input and statistics, mask, rotary tables."""
    n = batch * seq
    total = n * 8 * (2 if config.type_vocab_size else 1)
    if config.embed_norm:
        total += n * config.d_model * 4 + n * 2 * 4
    if mask:
        total += n  # (B, 1, 1, T) booleans
    if config.position == "rotary":
        total += 2 * n * config.head_dim * 4  # cos and sin tables (B, 1, T, D), float32 stream
    total += _dropout_bytes(n * config.d_model, 4, config.dropout, device)
    return total


def _head_activations(config: ModelConfig, batch: int, seq: int, precision: str) -> int:
    """Saved tensors of the head before the loss: the final norm (decoders) or the MLM head's dense, act and
    norm, and the output projection's input."""
    n = batch * seq
    e = 4 if precision == "fp32" else 2
    if config.arch == "decoder":
        return n * config.d_model * 4 + n * 2 * 4 + n * config.d_model * e
    return n * config.d_model * e * 4 + n * 2 * 4  # dense input, act input, norm input, decoder input


def _vocab_share(elements: int, vocab: int, tp: int) -> int:
    """One tensor-parallel rank's share of `elements` laid out over a vocabulary of `vocab` rows: the vocabulary
    is padded to a multiple of tp, so every rank holds ceil(vocab / tp) rows."""
    return elements // vocab * -(-vocab // tp)


def _loss_bytes(config: ModelConfig, batch: int, seq: int, tp: int) -> tuple[int, int]:
    """(saved, peak extra) of the loss: cross-entropy saves the float32 log-softmax (N, V); its backward holds
    log-softmax, its gradient and the logits' gradient at once (plus the low-precision logits' gradient under
    autocast right after). Under tensor parallelism torch's loss_parallel backward computes
    (zeros with -1 at the targets + exp(log-softmax)) * grad: log-softmax, the zeros, the exp and their sum at
    once, four (N, V / t) tensors."""
    nv = _vocab_share(batch * seq * config.vocab_size, config.vocab_size, tp)
    return nv * 4, nv * 4 * (4 if tp > 1 else 3)


# --- the step's timeline -------------------------------------------------------------------------------------


def _stage_layers(n_layer: int, pp: int) -> list[int]:
    """Layers per pipeline stage, balanced (the first stages take the remainder)."""
    return [n_layer // pp + (1 if s < n_layer % pp else 0) for s in range(pp)]


def _stage_parameters(cfg: ModelConfig, counts: ParameterCounts, layers: int, first: bool, last: bool,
                      tp: int) -> tuple[int, int]:
    """(parameters, root parameters) of one pipeline stage's rank: its blocks, the embeddings on the first
    stage, the head on the last one (with its own copy of a tied table when the stages differ); tensor
    parallelism splits the linears and the vocabulary (norms and biases of row-parallel linears stay whole).
    The root is what lies outside the blocks (FSDP keeps it unsharded through the step)."""
    root = 0
    if first:
        root += counts.embed - counts.vocab_table + _vocab_share(counts.vocab_table, cfg.vocab_size, tp)
    if last:
        root += counts.head - counts.head_vocab + _vocab_share(counts.head_vocab, cfg.vocab_size, tp)
        if cfg.tie_embeddings and not first:
            root += _vocab_share(counts.vocab_table, cfg.vocab_size, tp)
    block = counts.layer - counts.layer_linear * (tp - 1) // tp
    return root + block * layers, root


def estimate(workload: Workload, layout: Layout, hardware: Hardware = Hardware(),
             counts: ParameterCounts | None = None) -> Estimate:
    """The peak memory of the busiest rank of `layout` and the layout's predicted step time.

    The peak is the largest of the step's moments on every pipeline stage: the forward's end (the loss), the
    loss's backward, each block's backward, the embeddings' backward and the optimizer step (with the
    optimizer state of the steady state, i.e. the second step on). Raises ValueError when the layout cannot
    run the workload (degrees that do not divide the heads, the layers or the batch).
    """
    cfg, w, lay = workload.config, workload, layout
    counts = counts or count_parameters(cfg)
    _check_layout(w, lay)
    t, d = lay.tp, lay.dp
    mb = w.batch // (d * w.grad_accum * lay.microbatches)  # sequences per micro-batch
    n = mb * w.seq
    amp = w.precision != "fp32"
    mask = w.objective == "mlm"
    ac = lay.activation_checkpointing
    shard = d if lay.strategy == "fsdp" else 1
    state_bytes = {"adam": 8, "sgd": 4}[w.optimizer]
    block_params = counts.layer - counts.layer_linear * (t - 1) // t
    saved = sum(layer_activations(cfg, mb, w.seq, w.precision, hardware.device, t, mask).values())
    per_layer = n * cfg.d_model * 4 if ac else saved  # a checkpointed block keeps its input only
    trans = _layer_transient(cfg, mb, w.seq, w.precision, t)
    copies_layer = counts.layer_linear // t * 2 if amp else 0  # autocast's cast weights of one block
    results = []
    layers_per_stage = _stage_layers(cfg.n_layer, lay.pp)
    for stage, n_layers in enumerate(layers_per_stage):
        first, last = stage == 0, stage == lay.pp - 1
        params, root = _stage_parameters(cfg, counts, n_layers, first, last, t)
        weights = params * 4 // shard
        grads = params * 4 // shard
        opt_state = params * state_bytes // shard
        # lmforge's DistributedOptimizer and DDP keep flat gradient buckets through the step; tensor- and
        # pipeline-parallel layouts (MeshStrategy, PipelineStrategy) average over dp with one flat copy of the
        # gradients after the step's last backward instead
        flat_after = lay.dp > 1 and (lay.tp > 1 or lay.pp > 1) and lay.strategy in ("allreduce", "ddp")
        dp_buffers = params * 4 if lay.strategy in ("allreduce", "ddp") and not flat_after else 0
        fsdp = lay.strategy == "fsdp"
        fsdp_root = root * 4 if fsdp else 0  # the root's parameters, all-gathered, beside its shard
        # FSDP's gathered blocks: forward holds the running block and the prefetched next one; backward the
        # running block, the prefetched one, the running block's gradients and the previous block's
        # reduce-scatter input. gloo (CPU) adds a copy of each all-gather's output and keeps clones of the
        # reduce-scatter inputs until their work objects go (3 to 4 outstanding, measured on 2 ranks).
        gloo_extra = 4 if hardware.device == "cpu" else 0
        fsdp_forward = (2 + gloo_extra // 4) * block_params * 4 if fsdp else 0
        fsdp_backward = (4 + gloo_extra) * block_params * 4 if fsdp else 0
        batches = n * 8 * (3 if mask else 1)
        # torch's PipelineStage keeps a receive buffer per micro-batch for the activations (all stages but the
        # first) and for their gradients (all but the last), allocated at the first step and kept
        stage_io = (0 if first else 1) + (0 if last else 1)
        buffers = dp_buffers + fsdp_root + lay.microbatches * n * cfg.d_model * 4 * stage_io
        emb = _embed_activations(cfg, mb, w.seq, mask, hardware.device) if first else 0  # else a receive buffer
        head = _head_activations(cfg, mb, w.seq, w.precision) if last else 0
        vocab = _vocab_share(cfg.vocab_size, cfg.vocab_size, t)
        loss_saved, loss_peak = _loss_bytes(cfg, mb, w.seq, t) if last else (0, 0)
        # a pipeline stage's output (the logits on the last stage, the hidden state on the others) stays in the
        # stage's cache from its micro-batch's forward to its backward
        output = 0 if lay.pp == 1 else n * vocab * (2 if amp else 4) if last else n * cfg.d_model * 4
        # the forward's end: the logits (+ their float32 copy under AMP; + loss_parallel's shifted logits under
        # tp), less a pipeline's output, counted apart
        logits = n * vocab * ((6 if amp else 4) + (4 if t > 1 else 0)) - output if last else 0
        copies_head = counts.head_linear // t * 2 if amp and last else 0
        copies_all = copies_layer * n_layers + copies_head  # autocast's cache, until the forward ends
        copies_kept = copies_head + (0 if ac else copies_layer * n_layers)  # saved for backward
        head_grads = root * 4 if last else 0  # the head's (and a tied table's) gradients, unsharded until
        if last and first and cfg.tie_embeddings:  # the end of backward under FSDP as well
            head_grads = (counts.head + _vocab_share(counts.vocab_table, cfg.vocab_size, t)) * 4
        tied_grad = _vocab_share(counts.vocab_table, cfg.vocab_size, t) * 4 if first and cfg.tie_embeddings else 0
        # The micro-batches whose activations are alive at a backward: at the step's first backward (no
        # gradients yet, unless an earlier loop micro-batch left them) and at the later ones (GPipe: one fewer
        # each time; 1F1B: a forward follows each backward, p - stage at most)
        m = lay.microbatches
        warmup = m if lay.schedule == "gpipe" else min(m, lay.pp - stage)
        phases = [(warmup, grads if w.grad_accum > 1 else 0)]
        if m > 1:
            phases.append((warmup - 1 if lay.schedule == "gpipe" else min(m - 1, warmup), grads))
        points = []  # (moment, parameters, gradients, optimizer, activations, buffers)
        for in_flight, grads_before in phases:
            waiting = (in_flight - 1) * (emb + per_layer * n_layers + head + loss_saved + copies_kept + output)
            activations = waiting + emb + per_layer * n_layers + head + output
            io = buffers + batches * in_flight
            points += [
                ("forward (loss)", weights, grads_before, opt_state, activations + copies_all + loss_saved + logits,
                 io + fsdp_forward),
                ("backward (loss)", weights, grads_before, opt_state, activations + copies_kept + loss_peak,
                 io + fsdp_forward),
            ]
            for k in range(n_layers, 0, -1):  # backward through the stage's blocks, last first
                kept = waiting + emb + per_layer * (k - 1) + saved + trans + output
                copies = copies_layer * (1 if ac else k)
                done = head_grads + block_params * 4 * (n_layers - k + 1) // shard
                points.append((f"backward (block {k - 1})", weights, max(grads_before, done), opt_state,
                               kept + copies, io + fsdp_backward))
            points.append(("backward (embeddings)", weights, grads, opt_state, waiting + tied_grad, io))
        if flat_after:
            points.append(("gradient all-reduce", weights, grads, opt_state, 0, buffers + grads))
        cpu_adam = hardware.device == "cpu" and w.optimizer == "adam"  # single-tensor AdamW's temporaries
        points.append(("optimizer step", weights, grads, opt_state, 0,
                       buffers - fsdp_root + (2 * counts.largest * 4 // shard if cpu_adam else 0)))
        top = max(points, key=lambda q: sum(q[1:]))
        results.append((sum(top[1:]), stage, top))
    _, stage, top = max(results)
    est = Estimate(lay, *top[1:], phase=top[0], stage=stage)
    est.compute_time, est.comm_time, est.bubble = step_time(w, lay, hardware, counts)
    est.step_time = est.compute_time / (1 - est.bubble) + est.comm_time
    est.fits = est.peak <= hardware.usable
    return est


def _check_layout(w: Workload, lay: Layout) -> None:
    cfg = w.config
    if cfg.n_head % lay.tp or cfg.n_kv_head % lay.tp or cfg.d_ff % lay.tp:
        raise ValueError(f"tp={lay.tp} must divide the heads ({cfg.n_head}, kv {cfg.n_kv_head}) and d_ff "
                         f"({cfg.d_ff}); the vocabulary is padded")
    if lay.pp > cfg.n_layer:
        raise ValueError(f"pp={lay.pp} exceeds the {cfg.n_layer} layers")
    if lay.pp == 1 and lay.microbatches != 1:
        raise ValueError("microbatches > 1 needs a pipeline (pp > 1); use grad_accum for data parallelism")
    split = lay.dp * w.grad_accum * (lay.microbatches if lay.pp > 1 else 1)
    if w.batch % split:
        raise ValueError(f"batch {w.batch} is not divisible by dp x grad_accum x microbatches = {split}")


def step_flops(w: Workload) -> float:
    """Matmul FLOPs of one training step (forward 2 per multiply-add, backward twice the forward): the
    linears, attention's two (T, T) products (halved when causal) and the output projection."""
    cfg = w.config
    n = w.batch * w.seq
    qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    ff = cfg.d_ff * (3 if cfg.gated_mlp else 2)
    per_token_layer = 2 * (cfg.d_model * qkv_out + cfg.n_head * cfg.head_dim * cfg.d_model + cfg.d_model * ff)
    attention = 4 * w.seq * cfg.n_head * cfg.head_dim * (0.5 if cfg.arch == "decoder" else 1.0)
    head = 2 * cfg.d_model * cfg.vocab_size + (2 * cfg.d_model * cfg.d_model if cfg.arch == "encoder" else 0)
    forward = n * (cfg.n_layer * (per_token_layer + attention) + head)
    return 3 * forward


def step_time(w: Workload, lay: Layout, hw: Hardware,
              counts: ParameterCounts | None = None) -> tuple[float, float, float]:
    """(compute seconds, communication seconds, pipeline bubble fraction) of one step (see module docs)."""
    cfg = w.config
    counts = counts or count_parameters(cfg)
    flops = step_flops(w)
    if lay.activation_checkpointing:  # one more forward (of the blocks; the head is not recomputed)
        flops *= 4 / 3
    compute = flops / lay.devices / hw.flops(w.precision)
    bubble = (lay.pp - 1) / (lay.microbatches + lay.pp - 1) if lay.pp > 1 else 0.0
    bw = hw.link_gbs * 1e9
    params_rank = counts.total * 4 / (lay.tp * lay.pp)
    comm = 0.0
    if lay.dp > 1:
        ring = (lay.dp - 1) / lay.dp
        comm += (3 if lay.strategy == "fsdp" else 2) * ring * params_rank / bw
    e = 4 if w.precision == "fp32" else 2
    tokens_rank = w.batch * w.seq / lay.dp
    if lay.tp > 1:  # two all-reduces of (tokens, d_model) forward, two backward, per block
        ring = 2 * (lay.tp - 1) / lay.tp
        comm += 4 * cfg.n_layer / lay.pp * ring * tokens_rank * cfg.d_model * e / bw
    if lay.pp > 1:  # activation forward, its gradient backward, per stage boundary crossed
        comm += 2 * tokens_rank * cfg.d_model * e / lay.tp / bw
    return compute, comm, bubble


# --- layouts and the plan ------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def layouts(workload: Workload, devices: int, checkpointing: bool | None = None) -> list[Layout]:
    """Every layout of exactly `devices` ranks the workload allows and lmforge train runs: dp x tp x pp
    factorizations, allreduce or FSDP (with tp: 2-D FSDP x TP) on dp, GPipe or 1F1B with m in {p, 2p, 4p, 8p}
    on pp (decoders only, without FSDP or checkpointing), with and without activation checkpointing (only with
    when `checkpointing` is True, only without when False)."""
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    out = []
    acs = [False, True] if checkpointing is None else [checkpointing]
    for dp, tp in itertools.product(_divisors(devices), repeat=2):
        if devices % (dp * tp):
            continue
        pp = devices // (dp * tp)
        strategies = ["single"] if dp == 1 else ["allreduce", "fsdp"]  # FSDP with tp > 1: 2-D FSDP x TP
        pipes = [("1f1b", 1)] if pp == 1 else [(s, m * pp) for s in SCHEDULES for m in (1, 2, 4, 8)]
        for strategy, (schedule, m), ac in itertools.product(strategies, pipes, acs):
            if pp > 1 and (workload.config.arch != "decoder" or strategy == "fsdp" or ac):
                continue  # lmforge train's pipelines run decoders (with TP or without), without FSDP or checkpointing
            lay = Layout(dp, tp, pp, strategy, schedule, m, ac)
            try:
                _check_layout(workload, lay)
            except ValueError:
                continue
            out.append(lay)
    return out


def plan(workload: Workload, hardware: Hardware, devices: int, checkpointing: bool | None = None,
         model: str = "MODEL", data: str = "DATA") -> list[Estimate]:
    """Estimates of every layout (see `layouts`): those that fit first, by predicted step time (equal times:
    less memory first), then the others by peak; each with the command that runs it (`model` and `data` go
    into the command)."""
    counts = count_parameters(workload.config)
    estimates = [estimate(workload, lay, hardware, counts) for lay in layouts(workload, devices, checkpointing)]
    for est in estimates:
        est.command = train_command(workload, est.layout, model, data)
    return sorted(estimates, key=lambda e: (not e.fits, e.step_time if e.fits else e.peak, e.peak))


def is_preset_only(name: str) -> bool:
    """True for an architecture preset name (`ModelConfig.from_name`) that is not also a packaged model."""
    from lmforge.config import PRESETS
    from lmforge.registry import ALIASES, PACKAGED

    key = name.lower()
    return key in PRESETS and ALIASES.get(key, key) not in PACKAGED


def train_command(w: Workload, lay: Layout, model: str = "MODEL", data: str = "DATA",
                  run_dir: str = "runs/planned") -> str:
    """The `lmforge train` command line of a layout (under torchrun when it spans several devices), with the
    layout options of `lmforge train`: --strategy, --dp/--tp/--pp, --pp-schedule, --microbatches (per
    data-parallel rank's --batch-size), --activation-checkpointing."""
    args = ["lmforge", "train", "--model", model]
    if is_preset_only(model):
        args.append("--from-scratch")  # an architecture preset; a packaged model trains on from its weights
    args += ["--data", data, "--run-dir", run_dir, "--block-size", str(w.seq),
             "--batch-size", str(w.batch // (lay.dp * w.grad_accum))]
    if w.grad_accum > 1:
        args += ["--grad-accum", str(w.grad_accum)]
    if w.precision != "fp32":
        args += ["--precision", w.precision]
    if lay.devices > 1:  # a layout goes with a strategy, allreduce on a data-parallel dimension of 1
        args += ["--strategy", lay.strategy if lay.dp > 1 else "allreduce",
                 "--dp", str(lay.dp), "--tp", str(lay.tp), "--pp", str(lay.pp)]
    if lay.pp > 1:  # (--schedule is the learning rate's)
        args += ["--pp-schedule", lay.schedule, "--microbatches", str(lay.microbatches)]
    if lay.activation_checkpointing:
        args.append("--activation-checkpointing")
    if lay.devices > 1:
        args = ["torchrun", "--nproc-per-node", str(lay.devices), "-m", "lmforge", *args[1:]]
    return shlex.join(args)


def max_batch(workload: Workload, layout: Layout, hardware: Hardware, limit: int = 4096) -> int:
    """The largest batch per data-parallel rank (a multiple of the pipeline's micro-batches) that fits, 0 if
    none does."""
    counts = count_parameters(workload.config)
    unit = layout.microbatches if layout.pp > 1 else 1
    best, lo, hi = 0, 1, limit // unit
    while lo <= hi:
        mid = (lo + hi) // 2
        w = dataclasses.replace(workload, batch=mid * unit * layout.dp * workload.grad_accum)
        if estimate(w, layout, hardware, counts).fits:
            best, lo = mid * unit, mid + 1
        else:
            hi = mid - 1
    return best


# --- generation ----------------------------------------------------------------------------------------------


@dataclass
class GenerationEstimate:
    """Peak memory of one rank generating: weights in `dtype`, the KV cache of batch x seq slots, and the
    prefill's transients (one block's widest tensors and the last position's logits)."""

    tp: int
    pp: int
    weights: int
    kv_cache: int
    transient: int
    fits: bool = False

    @property
    def peak(self) -> int:
        return self.weights + self.kv_cache + self.transient

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"peak": self.peak}


def generation_plan(config: ModelConfig, batch: int, seq: int, dtype: str, hardware: Hardware,
                    devices: int) -> list[GenerationEstimate]:
    """Memory of generating `batch` sequences of up to `seq` tokens on tp x pp = `devices` ranks
    (`Decoder.setup_cache` gives every layer (batch, n_kv_head, seq, head_dim) keys and values)."""
    if config.arch != "decoder":
        raise ValueError("generation needs a decoder model; this is an encoder")
    counts = count_parameters(config)
    e = 4 if dtype == "fp32" else 2
    out = []
    for tp in _divisors(devices):
        pp = devices // tp
        if config.n_kv_head % tp or config.n_head % tp or pp > config.n_layer:
            continue
        layers = max(_stage_layers(config.n_layer, pp))
        weights = max(_stage_parameters(config, counts, k, s == 0, s == pp - 1, tp)[0]
                      for s, k in enumerate(_stage_layers(config.n_layer, pp))) * e
        kv = 2 * layers * batch * (config.n_kv_head // tp) * seq * config.head_dim * e
        n = batch * seq
        widest = max(config.d_ff * (2 if config.gated_mlp else 1), (config.n_head + 2 * config.n_kv_head)
                     * config.head_dim) // tp
        transient = n * (config.d_model * 3 + widest * 2) * e + batch * config.vocab_size * 4
        est = GenerationEstimate(tp, pp, weights, kv, transient)
        est.fits = est.peak <= hardware.usable
        out.append(est)
    return sorted(out, key=lambda g: (not g.fits, g.peak))


# --- output --------------------------------------------------------------------------------------------------


def _gib(b: int) -> str:
    return f"{b / GiB:6.2f}"


def format_table(estimates: list[Estimate], limit: int | None = None) -> str:
    """A text table: layout, peak per rank and its parts (GiB), fits, predicted step time."""
    rows = [f"{'layout':38s} {'peak':>6s} {'param':>6s} {'grad':>6s} {'optim':>6s} {'activ':>6s} "
            f"{'buffer':>6s}  {'fits':4s} {'step s':>8s}  peak at"]
    for est in estimates[:limit]:
        rows.append(f"{est.layout.name:38s} {_gib(est.peak)} {_gib(est.parameters)} {_gib(est.gradients)} "
                    f"{_gib(est.optimizer)} {_gib(est.activations)} {_gib(est.buffers)}  "
                    f"{'yes' if est.fits else 'no':4s} {est.step_time:8.3f}  {est.phase}"
                    + (f", stage {est.stage}" if est.layout.pp > 1 else ""))
    return "\n".join(rows)


def format_generation_table(estimates: list[GenerationEstimate]) -> str:
    """A text table of generation layouts: weights, KV cache, transients and peak per rank (GiB)."""
    rows = [f"{'layout':12s} {'peak':>6s} {'weights':>7s} {'kv':>6s} {'other':>6s}  fits"]
    for est in estimates:
        name = " x ".join(p for p in (f"tp{est.tp}" if est.tp > 1 else "", f"pp{est.pp}" if est.pp > 1 else "")
                          if p) or "single"
        rows.append(f"{name:12s} {_gib(est.peak)} {_gib(est.weights):>7s} {_gib(est.kv_cache)} "
                    f"{_gib(est.transient)}  {'yes' if est.fits else 'no'}")
    return "\n".join(rows)


__all__ = ["GiB", "Estimate", "GenerationEstimate", "Hardware", "Layout", "ParameterCounts", "Workload",
           "count_parameters", "estimate", "format_generation_table", "format_table", "generation_plan",
           "is_preset_only", "layer_activations", "layouts", "max_batch", "parse_bytes", "plan", "step_flops",
           "step_time", "train_command"]
