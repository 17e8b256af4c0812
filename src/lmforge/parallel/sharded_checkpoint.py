"""Sharded, layout-independent checkpoints of a model-parallel run (torch.distributed.checkpoint, DCP).

    path = save(run_dir, step, model, optimizer, trainer_state, keep_last)   # every rank calls it
    trainer_state = load(path, model, optimizer)                             # any layout, any world size
    state = full_state_dict(model)                                           # the whole model, every rank

A checkpoint folder holds DCP's files (each rank writes the shards it owns; a tensor replicated over ranks is
written once) plus trainer.pt (scheduler, scaler, RNG states, step, data position) from rank 0. Entries are
named and shaped as in the unsharded model, so DCP re-shards them on load for whatever layout loads them
(tensor-parallel 2 -> data-parallel 2, FSDP -> one process, ...). The one thing DCP cannot see is the row
order `tensor_parallel.parallelize` gives fused projections: those are saved as their parts in the model's own
order (`<name>.part0`, `.part1`, ...), from views of each rank's shard, so loading writes them in place.

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
    tp_degree,
)
from lmforge.training import new_checkpoint_folder, publish_checkpoint

TRAINER_FILE = "trainer.pt"
DCP_METADATA = ".metadata"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True for a folder written by `save` (DCP metadata and trainer.pt)."""
    path = Path(path)
    return (path / DCP_METADATA).is_file() and (path / TRAINER_FILE).is_file()


def _split_fused(entries: dict[str, Any], fused: dict[str, list[int]],
                 write_back: list[Callable[[], None]]) -> dict[str, Any]:
    """`entries` with every fused tensor replaced by its parts in the model's row order. For a part that is a
    copy (FSDP shards, gathered), `write_back` gets a function that copies loaded values into the original."""
    out = {}
    for name, value in entries.items():
        parts = fused.get(name)
        if parts is None or not isinstance(value, Tensor) or value.dim() == 0:  # an optimizer's step count
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
    `full_tensor`, without communication."""
    from torch.distributed.tensor import distribute_tensor

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
    fused = fused_rows(model)
    model_sd = get_model_state_dict(model)
    optim_sd = get_optimizer_state_dict(model, optimizer)
    saved = {"model": _split_fused(model_sd, fused, write_back),
             "optimizer": {"state": {name: _split_fused(state, {k: fused[name] for k in state}, write_back)
                                     if name in fused else state
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
        loaded = saved["optimizer"]["state"][name]
        state.update({key: loaded[key] for key in state if key in loaded})
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
    dcp.load({"model": _split_fused(model.state_dict(), fused_rows(model), [])}, checkpoint_id=Path(path))
    return model


@torch.no_grad()
def full_tensor(value: Tensor, parts: list[int] | None = None) -> Tensor:
    """The whole tensor of a (possibly sharded) parameter or optimizer state in the model's own row order
    (`parts`: its row counts when it is a fused projection); a collective over the mesh of a DTensor."""
    if parts is not None and value.dim() > 0:
        return torch.cat([p.full_tensor() if isinstance(p, DTensor) else p for p in canonical_pieces(value, parts)])
    return value.full_tensor() if isinstance(value, DTensor) else value


@torch.no_grad()
def full_state_dict(model: nn.Module, fused: dict[str, list[int]] | None = None) -> dict[str, Tensor]:
    """The whole model's state dict as ordinary tensors in the model's own layout, on every rank (a collective
    when the model is sharded): what `io.save_model` writes as an HF folder. fused: the fused projections'
    row counts by name (default `fused_rows(model)`; a pipeline stage passes its whole model's)."""
    fused = fused_rows(model) if fused is None else fused
    return {name: full_tensor(value, fused.get(name)).detach().clone() for name, value in model.state_dict().items()}
