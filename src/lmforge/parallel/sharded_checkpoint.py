"""Sharded, layout-independent checkpoints of a model-parallel run (torch.distributed.checkpoint, DCP).

    path = save(run_dir, step, model, optimizer, trainer_state, keep_last)   # every rank calls it
    trainer_state = load(path, model, optimizer)                             # any layout, any world size
    state = full_state_dict(model)                                           # the whole model, every rank

A checkpoint folder holds DCP's files (each rank writes the shards it owns; a tensor replicated over ranks is
written once) plus trainer.pt (scheduler, scaler, RNG states, step, data position) from rank 0. Entries are
named and shaped as in the unsharded model, so DCP re-shards them on load for whatever layout loads them
(tensor-parallel 2 -> data-parallel 2, FSDP -> one process, ...). The one thing DCP cannot see is the row
order `tensor_parallel.parallelize` gives fused projections: those are saved as their parts in the model's own
order (`<name>.part0`, `.part1`, ...), from views of each rank's shard, so loading writes them in place. A
vocabulary padded for tensor parallelism is saved without its padded rows (`tensor_parallel.real_rows`), so
the checkpoint holds the model's real vocabulary whatever the degree that wrote it.

Crash safety is training.py's: everything goes to a temporary folder, which rank 0 fsyncs and renames only
after every rank has written its part, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from lmforge.parallel.tensor_parallel import (
    _interleave_rows,
    canonical_pieces,
    fused_rows,
    is_tensor_parallel,
    real_rows,
    tp_degree,
    vocab_rows,
)
from lmforge.training import new_checkpoint_folder, publish_checkpoint

TRAINER_FILE = "trainer.pt"
DCP_METADATA = ".metadata"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True for a folder written by `save` (DCP metadata and trainer.pt)."""
    path = Path(path)
    return (path / DCP_METADATA).is_file() and (path / TRAINER_FILE).is_file()


def _canonical_entries(entries: dict[str, Any], fused: dict[str, list[int]], write_back: list[Callable[[], None]],
                 vocab: dict[str, int] | None = None) -> dict[str, Any]:
    """`entries` with every fused tensor replaced by its parts in the model's row order, and every
    vocabulary-padded tensor (`vocab`: name -> real rows) by its real rows. For a part that is a copy (FSDP
    shards, gathered), `write_back` gets a function that copies loaded values into the original."""
    out = {}
    vocab = vocab or {}
    for name, value in entries.items():
        parts = fused.get(name)
        if not isinstance(value, Tensor) or value.dim() == 0:  # an optimizer's step count
            out[name] = value
            continue
        if name in vocab:
            out[name] = real = real_rows(value, vocab[name])
            if isinstance(value, DTensor) and not isinstance(real, DTensor):  # a gathered copy (FSDP x TP)
                write_back.append(lambda value=value, real=real: value.to_local().copy_(local_shard(real, value)))
            continue
        if parts is None:
            out[name] = value
            continue
        pieces = canonical_pieces(value, parts)
        for i, piece in enumerate(pieces):
            out[f"{name}.part{i}"] = piece
        if isinstance(value, DTensor) and not is_tensor_parallel(value):
            write_back.append(lambda value=value, pieces=pieces: _copy_into(value, pieces))
    return out


@torch.no_grad()
def local_shard(full: Tensor, like: DTensor, parts: list[int] | None = None) -> Tensor:
    """This rank's local tensor of `full` (a whole tensor in the model's own row order; `parts`: its row counts
    when it is a fused projection) laid out as the DTensor `like` (tensor parallel, FSDP, both): the inverse of
    `full_tensor`, without communication. A `full` with fewer rows than `like` (the real rows of a vocabulary
    padded for tensor parallelism) gets zero rows up to `like`'s, as `parallelize` pads."""
    from torch.distributed.tensor import distribute_tensor

    if full.dim() > 0 and full.shape[0] < like.shape[0]:
        full = torch.cat([full, full.new_zeros((like.shape[0] - full.shape[0], *full.shape[1:]))])
    tp = tp_degree(like)
    if parts is not None and tp > 1:  # to `parallelize`'s row order
        full = full.clone()
        _interleave_rows(full, parts, tp)
    return distribute_tensor(full.detach(), like.device_mesh, like.placements, src_data_rank=None).to_local()


@torch.no_grad()
def _copy_into(sharded: DTensor, pieces: list[Tensor]) -> None:
    """Copy the whole tensor cat(pieces) (parts in the model's row order) into a DTensor's local shard."""
    sharded.to_local().copy_(local_shard(torch.cat(pieces), sharded, [len(p) for p in pieces]))


def _state(model: nn.Module, optimizer: Optimizer,
           write_back: list[Callable[[], None]]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(what DCP saves or loads into, the model state dict, the optimizer state dict) of a sharded model."""
    fused, vocab = fused_rows(model), vocab_rows(model)
    model_sd = get_model_state_dict(model)
    optim_sd = get_optimizer_state_dict(model, optimizer)

    def each(name: str) -> dict[str, int]:  # an optimizer state's tensors, by the rule of their parameter
        return dict.fromkeys(optim_sd["state"][name], vocab[name]) if name in vocab else {}

    saved = {"model": _canonical_entries(model_sd, fused, write_back, vocab),
             "optimizer": {"state": {name: _canonical_entries(state, {k: fused[name] for k in state}, write_back)
                                     if name in fused else _canonical_entries(state, {}, write_back, each(name))
                                     for name, state in optim_sd["state"].items()},
                           "param_groups": optim_sd["param_groups"]}}
    return saved, model_sd, optim_sd


def save(run_dir: str | Path, step: int, model: nn.Module, optimizer: Optimizer, trainer_state: dict[str, Any],
         keep_last: int) -> Path:
    """Write checkpoint step_<step> of `run_dir` from every rank (a collective); returns its path."""
    tag = "sharded"
    rank = dist.get_rank()
    tmp = Path(run_dir) / "checkpoints" / f".tmp-step_{step:08d}-{tag}"
    if rank == 0:
        tmp = new_checkpoint_folder(run_dir, step, tag=tag)
    dist.barrier()
    saved, _, _ = _state(model, optimizer, [])
    dcp.save(saved, checkpoint_id=tmp)
    final = tmp.parent / f"step_{step:08d}"
    if rank == 0:
        with open(tmp / TRAINER_FILE, "wb") as f:
            torch.save(trainer_state, f)
        final = publish_checkpoint(tmp, step, keep_last)
    dist.barrier()
    return final


def load(path: str | Path, model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """Load checkpoint `path` into the (sharded) model and its optimizer on every rank; return the trainer state.

    Raises FileNotFoundError for a folder that is not a sharded checkpoint (a single-process or data-parallel
    run's model.pt checkpoint among them: resume those with the strategy that wrote them).
    """
    path = Path(path)
    if not is_sharded_checkpoint(path):
        hint = " (it holds model.pt: a single-process, allreduce, ddp or ps checkpoint)" \
            if (path / "model.pt").is_file() else ""
        raise FileNotFoundError(f"{str(path)!r} is not a sharded checkpoint (expected DCP's {DCP_METADATA} and "
                                f"{TRAINER_FILE}){hint}")
    write_back: list[Callable[[], None]] = []
    saved, model_sd, optim_sd = _state(model, optimizer, write_back)
    dcp.load(saved, checkpoint_id=path)
    for fn in write_back:
        fn()
    for name, state in optim_sd["state"].items():  # what DCP may have replaced rather than filled in place
        loaded = saved["optimizer"]["state"][name]  # (real rows of a padded tensor were loaded into it)
        state.update({key: loaded[key] for key in state if key in loaded
                      and getattr(loaded[key], "shape", None) == getattr(state[key], "shape", None)})
    optim_sd["param_groups"] = saved["optimizer"]["param_groups"]
    set_model_state_dict(model, model_sd)
    set_optimizer_state_dict(model, optimizer, optim_sd)
    return torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)


@torch.no_grad()
def load_model_weights(path: str | Path, model: nn.Module) -> nn.Module:
    """Fill an ordinary (unsharded) model with the weights of sharded checkpoint `path`, in one process (no
    process group needed): what `lmforge export` and `load_model` do with a model-parallel run's checkpoint."""
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{str(path)!r} is not a sharded checkpoint (expected DCP's {DCP_METADATA} and "
                                f"{TRAINER_FILE})")
    dcp.load({"model": _canonical_entries(model.state_dict(), fused_rows(model), [])}, checkpoint_id=Path(path))
    return model


@torch.no_grad()
def full_tensor(value: Tensor, parts: list[int] | None = None, rows: int | None = None) -> Tensor:
    """The whole tensor of a (possibly sharded) parameter or optimizer state in the model's own row order
    (`parts`: its row counts when it is a fused projection; `rows`: its real rows when it is vocabulary-padded,
    the padded ones cut off); a collective over the mesh of a DTensor."""
    if parts is not None and value.dim() > 0:
        value = torch.cat([p.full_tensor() if isinstance(p, DTensor) else p for p in canonical_pieces(value, parts)])
    elif isinstance(value, DTensor):
        value = value.full_tensor()
    return value if rows is None or value.dim() == 0 else value[:rows]  # (an optimizer's step count: 0-d)


@torch.no_grad()
def full_state_dict(model: nn.Module, fused: dict[str, list[int]] | None = None,
                    vocab: dict[str, int] | None = None) -> dict[str, Tensor]:
    """The whole model's state dict as ordinary tensors in the model's own layout (a padded vocabulary cut to its
    real rows), on every rank (a collective when the model is sharded): what `io.save_model` writes as an HF
    folder. fused, vocab: the fused projections' row counts and the padded tensors' real rows by name (default
    `fused_rows(model)`, `vocab_rows(model)`; a pipeline stage passes its whole model's)."""
    fused = fused_rows(model) if fused is None else fused
    vocab = vocab_rows(model) if vocab is None else vocab
    return {name: full_tensor(value, fused.get(name), vocab.get(name)).detach().clone()
            for name, value in model.state_dict().items()}
