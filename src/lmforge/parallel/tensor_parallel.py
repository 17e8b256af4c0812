"""Megatron-style tensor parallelism for lmforge's Decoder and Encoder, applied from outside the model.

    parallelize(model, tp_mesh, sequence_parallel=False, loss_parallel=True)

torch's DTensor styles do the work (torch.distributed.tensor.parallel); this module only says which module gets
which style, in torchtitan's `parallelize_*` shape:

- attn.qkv and mlp.up: column-parallel (output features sharded); attn.out and mlp.down: row-parallel (input
  features sharded, outputs summed by one all-reduce, or reduce-scattered over the sequence with sequence
  parallelism). Two all-reduces per block forward, two in backward.
- embed_tokens: vocabulary-parallel (rows sharded; each rank looks up the ids in its range, the partial
  embeddings are summed). The LM head (lm_head / mlm_head.decoder): vocabulary-parallel columns; with
  `loss_parallel` its logits stay sharded over the vocabulary (a DTensor) and the objective's cross-entropy
  runs under `torch.distributed.tensor.parallel.loss_parallel()` (the strategy enters it), so no rank ever
  holds full (B, T, V) logits. Without it the logits are gathered (generation).
- sequence_parallel: norms (and dropout) run on sequence shards (B, T/tp, C); the column-parallel inputs
  all-gather the sequence and the row-parallel outputs reduce-scatter it.

Vocabulary padding (Megatron's, what torch does not provide): a vocabulary the degree does not divide (GPT-2's
50,257 at tp 2) is padded at shard time with zero rows of the embedding and the head (and the MLM decoder's
bias) to the next multiple of the degree, so that every rank holds the same number of rows. No id reaches a
padded row of the embedding, and the head's padded logits are -inf on the ranks that hold them (sharded logits
under `loss_parallel`: the cross-entropy, its gradient and argmax are those of the real vocabulary; their rows
get zero gradients) or cut off (gathered logits: generation sees exactly `config.vocab_size` columns).
`config.vocab_size` stays the real size, and `vocab_rows` / `real_rows` give checkpoints and exports the real
rows only, so nothing padded leaves the run. With the chunking torch's Shard(0) uses for uneven sizes, rank
r's real rows are exactly those of an unpadded tensor sharded over the same ranks.

Fused projections (what torch does not provide): `qkv.weight` holds the query rows, then the key rows, then the
value rows; a plain column split would give rank 0 all queries and rank 1 the keys and values. `parallelize`
permutes those rows in place once, to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], before sharding, so each rank's
contiguous shard holds whole heads of each (and likewise gate/up rows of a gated MLP). Each attention module
gets a config with its local head counts. `canonical_pieces` turns a sharded tensor of that order back into
pieces of the original order for checkpoints, so a checkpoint never depends on the layout that wrote it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

__all__ = ["canonical_pieces", "check_divisible", "fused_rows", "is_tensor_parallel", "padded_vocab", "parallelize",
           "real_rows", "tp_degree", "vocab_rows"]


def check_divisible(config, tp: int) -> None:
    """Raise ValueError naming the size that tensor parallelism of degree `tp` cannot split evenly."""
    sizes = {"n_head": config.n_head, "n_kv_head": config.n_kv_head, "d_ff": config.d_ff}
    bad = {k: v for k, v in sizes.items() if v % tp}
    if bad:
        detail = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise ValueError(f"tensor parallelism of degree {tp} needs n_head, n_kv_head and d_ff divisible by {tp} "
                         f"(the vocabulary is padded); this model has {detail}")


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The vocabulary rows a model holds under tensor parallelism of degree `tp`: the next multiple of `tp`."""
    return -(-vocab_size // tp) * tp


def fused_rows(model: nn.Module) -> dict[str, list[int]]:
    """State-dict name of every fused projection parameter -> the row counts of its parts, in order
    ([queries, keys, values] for attn.qkv, [gate, up] for a gated mlp.up)."""
    cfg = model.config
    qkv = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    out: dict[str, list[int]] = {}
    for i, layer in enumerate(model.layers):
        for name in ("weight", "bias"):
            if getattr(layer.attn.qkv, name) is not None:
                out[f"layers.{i}.attn.qkv.{name}"] = qkv
            if cfg.gated_mlp and getattr(layer.mlp.up, name) is not None:
                out[f"layers.{i}.mlp.up.{name}"] = [cfg.d_ff, cfg.d_ff]
    return out


@torch.no_grad()
def _interleave_rows(param: Tensor, parts: list[int], tp: int) -> None:
    """Permute rows in place from [part_0 | part_1 | ...] to [part_0[r] part_1[r] ... for each rank r]."""
    pieces = [p.chunk(tp) for p in param.split(parts)]
    param.copy_(torch.cat([pieces[j][r] for r in range(tp) for j in range(len(parts))]))


def is_tensor_parallel(tensor: Tensor) -> bool:
    """True for a DTensor sharded over a 1-D mesh named "tp" (tensor parallelism alone: its local tensor is
    one contiguous block of rows)."""
    return (isinstance(tensor, DTensor) and tensor.device_mesh.mesh_dim_names == ("tp",)
            and tensor.device_mesh.size() > 1)


def tp_degree(tensor: Tensor) -> int:
    """The size of the "tp" dimension of a DTensor's mesh (1 for anything else): the rows of a fused
    parameter are in `parallelize`'s order when it is > 1, also under 2-D FSDP x TP."""
    if not isinstance(tensor, DTensor) or "tp" not in (tensor.device_mesh.mesh_dim_names or ()):
        return 1
    return tensor.device_mesh.size(tensor.device_mesh.mesh_dim_names.index("tp"))


def canonical_pieces(tensor: Tensor, parts: list[int]) -> list[Tensor]:
    """The parts of a fused parameter (or its optimizer state) in the model's own row order.

    A tensor-parallel DTensor (rows in the order `parallelize` made) gives one DTensor per part, each row-sharded
    over the same mesh, whose local tensors are views of this rank's shard (loading into them writes the
    parameter in place). Any other tensor (plain, or sharded by FSDP over the data-parallel mesh, with or
    without tensor parallelism) gives plain tensors: gathered, put back in the model's row order and split, so
    they are copies for a sharded one.
    """
    if is_tensor_parallel(tensor):
        tp = tensor.device_mesh.size()
        local = tensor.to_local()
        return [DTensor.from_local(piece, tensor.device_mesh, [Shard(0)], run_check=False)
                for piece in local.split([n // tp for n in parts])]
    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    tp = tp_degree(tensor)
    if tp == 1:
        return list(full.split(parts))
    shards = [chunk.split([n // tp for n in parts]) for chunk in full.chunk(tp)]  # [q_r k_r v_r] per rank r
    return [torch.cat([shard[j] for shard in shards]) for j in range(len(parts))]


def _vocab_head(model: nn.Module) -> nn.Linear | None:
    """The module that projects onto the vocabulary (a decoder's lm_head, an encoder's MLM decoder), or None."""
    if getattr(model, "lm_head", None) is not None:
        return model.lm_head
    mlm = getattr(model, "mlm_head", None)
    return mlm.decoder if mlm is not None else None


def vocab_rows(model: nn.Module) -> dict[str, int]:
    """State-dict name of every parameter padded beyond the vocabulary (see the module docs) -> its real row
    count, `config.vocab_size`. Empty for a model that is not padded. `model` may also be a pipeline stage
    (which holds the embedding, the head, or neither)."""
    rows = model.config.vocab_size
    embed = getattr(model, "embed_tokens", None)
    out = {"embed_tokens.weight": embed.weight} if embed is not None else {}
    head = _vocab_head(model)
    if head is not None:
        prefix = "lm_head" if head is getattr(model, "lm_head", None) else "mlm_head.decoder"
        out |= {f"{prefix}.{name}": t for name, t in (("weight", head.weight), ("bias", head.bias)) if t is not None}
    return {name: rows for name, t in out.items() if t.shape[0] != rows}


def real_rows(tensor: Tensor, rows: int) -> Tensor:
    """The first `rows` rows of a vocabulary-padded tensor (a parameter or its optimizer state).

    A tensor-parallel DTensor (Shard(0) over the 1-D "tp" mesh) gives a DTensor of global shape (rows, ...)
    whose local tensor is a view of this rank's real rows (torch's uneven Shard(0) places exactly those rows on
    this rank), so loading into it writes the parameter in place; a plain tensor gives the view of its first
    rows; any other DTensor (2-D FSDP x TP shards) a gathered copy (the padded rows are the last rows of the
    gathered tensor: tensor parallelism pads the whole vocabulary once, FSDP shards the padded shards).
    """
    if tensor.shape[0] == rows:
        return tensor
    if is_tensor_parallel(tensor) and tuple(tensor.placements) == (Shard(0),):
        per_rank = tensor.shape[0] // tensor.device_mesh.size()
        start = tensor.device_mesh.get_local_rank() * per_rank
        local = tensor.to_local()[:max(0, min(per_rank, rows - start))]
        shape = torch.Size((rows, *tensor.shape[1:]))
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, tensor.device_mesh, [Shard(0)], run_check=False, shape=shape,
                                  stride=stride)
    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return full[:rows]


@torch.no_grad()
def _pad_vocabulary(model: nn.Module, tp: int) -> None:
    """Pad the token embedding and the vocabulary head (weight and bias, a tied weight once) with zero rows to
    `padded_vocab` rows, in place, before sharding."""
    rows = padded_vocab(model.config.vocab_size, tp)
    extra = rows - model.config.vocab_size
    if extra == 0:
        return

    def padded(param: nn.Parameter) -> nn.Parameter:
        zeros = param.new_zeros((extra, *param.shape[1:]))
        return nn.Parameter(torch.cat([param.detach(), zeros]), requires_grad=param.requires_grad)

    embed, head = model.embed_tokens, _vocab_head(model)
    old = embed.weight
    embed.weight, embed.num_embeddings = padded(old), rows
    if head is not None:
        head.weight = embed.weight if head.weight is old else padded(head.weight)
        if head.bias is not None:
            head.bias = padded(head.bias)
        head.out_features = rows


def _hide_padded_logits(vocab_size: int):
    """A forward hook for the vocabulary head of a padded model: sharded logits (a DTensor, Shard(-1)) get -inf
    in the padded columns this rank holds; gathered logits lose their padded columns."""

    def hook(module: nn.Module, inputs: Any, logits: Tensor) -> Tensor:
        if not isinstance(logits, DTensor):
            return logits[..., :vocab_size]
        local = logits.to_local()
        per_rank = local.shape[-1]
        real = vocab_size - logits.device_mesh.get_local_rank() * per_rank
        if real >= per_rank:
            return logits
        padded = torch.arange(per_rank, device=local.device) >= real
        local = local.masked_fill(padded, float("-inf"))
        return DTensor.from_local(local, logits.device_mesh, logits.placements, run_check=False,
                                  shape=logits.shape, stride=logits.stride())

    return hook


def _local_config(config, tp: int):
    """The config an attention module computes with: its shard's head counts, the same head size."""
    return dataclasses.replace(config, n_head=config.n_head // tp, n_kv_head=config.n_kv_head // tp,
                               head_dim=config.head_dim)


def parallelize(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False,
                loss_parallel: bool = True) -> nn.Module:
    """Shard `model` (a lmforge Decoder or Encoder, on its device) over the 1-D mesh `tp_mesh`, in place.

    loss_parallel: keep the LM head's logits sharded over the vocabulary (a DTensor (B, T, V) with Shard(2));
        the caller computes cross-entropy inside `torch.distributed.tensor.parallel.loss_parallel()`. False
        gathers them into an ordinary tensor (generation, any other use of the logits).
    sequence_parallel: norms and the residual stream sharded over the sequence (T must be divisible by the
        degree). Not for an encoder with a classification head (it reads the first token of every row).
    Raises ValueError for sizes the degree does not divide, or a mesh that is not 1-D.
    Returns the model (its parameters are now DTensors or, for norms without sequence parallelism and
    position embeddings, ordinary tensors replicated on every rank).
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"parallelize needs a 1-D tensor-parallel mesh, got {tp_mesh.ndim} dimensions")
    tp = tp_mesh.size()
    cfg = model.config
    check_divisible(cfg, tp)
    if sequence_parallel and cfg.arch == "encoder" and cfg.head == "classify":
        raise ValueError("sequence parallelism does not fit an encoder with a classification head (it reads "
                         "each row's first token, which only one rank holds); leave it off")
    sp = sequence_parallel
    residual = Shard(1) if sp else Replicate()  # the layout of the stream between blocks

    for name, parts in fused_rows(model).items():
        _interleave_rows(model.get_parameter(name), parts, tp)
    _pad_vocabulary(model, tp)
    block_plan = {
        "attn.qkv": ColwiseParallel(),
        "attn.out": RowwiseParallel(output_layouts=residual),
        "mlp.up": ColwiseParallel(input_layouts=residual),
        "mlp.down": RowwiseParallel(output_layouts=residual),
    }
    if sp:
        # Attention reads its input's sequence length: it gets the whole sequence (one all-gather), as a
        # DTensor, so that qkv's column-parallel backward hands a partial gradient straight back to this
        # redistribution, which reduce-scatters it (an ordinary tensor here would cost a full all-reduce).
        rest = (None,) * 6  # mask, is_causal, rotary, input_pos, kv_len, cache_rows
        block_plan["attn"] = PrepareModuleInput(input_layouts=(Shard(1), *rest),
                                                desired_input_layouts=(Replicate(), *rest))
        block_plan["attn_norm"] = SequenceParallel(use_local_output=True)
        block_plan["mlp_norm"] = SequenceParallel(use_local_output=True)
    for layer in model.layers:
        parallelize_module(layer, tp_mesh, block_plan)
        layer.attn.config = _local_config(cfg, tp)

    embeddings = ["embed_tokens"] + ([n for n in ("embed_positions", "embed_types")
                                      if getattr(model, n, None) is not None] if sp else [])
    plan = {name: RowwiseParallel(input_layouts=Replicate(), output_layouts=residual) for name in embeddings}
    logits = Shard(-1) if loss_parallel else Replicate()
    if cfg.arch == "decoder":
        if sp:
            plan["norm"] = SequenceParallel(use_local_output=True)
        plan["lm_head"] = ColwiseParallel(input_layouts=residual, output_layouts=logits,
                                          use_local_output=not loss_parallel)
        head, head_name = model.lm_head, "lm_head"
    else:
        if sp and cfg.embed_norm:
            plan["embed_norm"] = SequenceParallel(use_local_output=True)
        if model.mlm_head is not None:
            if sp:  # the head's dense and norm run on the whole sequence, replicated
                plan["mlm_head"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                                      use_local_output=True)
            plan["mlm_head.decoder"] = ColwiseParallel(output_layouts=logits, use_local_output=not loss_parallel)
        head, head_name = (model.mlm_head.decoder, "mlm_head.decoder") if model.mlm_head is not None else (None, "")
    tied = cfg.tie_embeddings and head is not None and head.weight is model.embed_tokens.weight
    parallelize_module(model, tp_mesh, plan)
    if tied:  # both modules shard the same (vocab, C) matrix by rows: share the embedding's DTensor again
        model.get_submodule(head_name).weight = model.embed_tokens.weight
    if head is not None and vocab_rows(model):
        head.register_forward_hook(_hide_padded_logits(cfg.vocab_size))
    return model
