"""How a layout is applied to a model, from outside, in torchtitan's order: tensor parallel -> activation
checkpointing -> FSDP. Each step is a function over the model's own modules on the run's DeviceMesh; FSDP over
"dp" after TP over "tp" is 2-D FSDP x TP (FSDP2 shards the tensor-parallel DTensors further over dp).

    parallelize_model(model, mesh, data_parallel="fsdp", sequence_parallel=False, activation_checkpointing=True)
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.utils.checkpoint import checkpoint

from lmforge.parallel.mesh import sub_mesh
from lmforge.parallel.tensor_parallel import parallelize

DataParallel = Literal["ddp", "fsdp"]


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward instead of keeping them (torch.utils.checkpoint, non
    reentrant), in place. Only the blocks' inputs stay in memory between forward and backward.

    The block's own `forward` is wrapped on the instance, so module names (and so checkpoints) stay the same
    and hooks that others put on the block (FSDP's unshard before forward and before backward) still run
    around the recomputation.
    """
    for layer in model.layers:
        forward = layer.forward

        def checkpointed(*args: Any, _forward=forward, **kwargs: Any) -> Any:
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed
    return model


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    """FSDP2 (`fully_shard`, ZeRO-3) over the 1-D data-parallel mesh: every block one unit (its parameters
    gathered just before its forward and backward, freed after), the rest (embeddings, final norm, head) the
    root unit. Gradients are reduce-scattered and averaged over the mesh."""
    for layer in model.layers:
        fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model


def check_plan(dp: int, tp: int, data_parallel: str, sequence_parallel: bool) -> None:
    """Raise ValueError for a combination `parallelize_model` does not apply (before any work is done)."""
    if data_parallel not in ("ddp", "fsdp"):
        raise ValueError(f"data_parallel must be 'ddp' or 'fsdp', got {data_parallel!r}")
    if sequence_parallel and tp == 1:
        raise ValueError("sequence parallelism shards the sequence over tensor-parallel ranks: it needs --tp > 1")


def parallelize_model(model: nn.Module, mesh: DeviceMesh, data_parallel: DataParallel = "ddp",
                      sequence_parallel: bool = False, activation_checkpointing: bool = False,
                      loss_parallel: bool = True) -> nn.Module:
    """Apply the layout of `mesh` (dims "dp", "pp", "tp") to `model` in place and return it.

    tp > 1: `tensor_parallel.parallelize` on the "tp" dim. activation_checkpointing: per block.
    data_parallel "fsdp" with dp > 1: `apply_fsdp` on the "dp" dim (after TP: 2-D FSDP x TP, each
    tensor-parallel shard sharded again over dp). "ddp" leaves the data-parallel reduction to the caller
    (replicas whose gradients are averaged like DDP's).
    Raises ValueError for an unknown data_parallel or sequence parallelism without tp.
    """
    tp, dp = mesh["tp"].size(), mesh["dp"].size()
    check_plan(dp, tp, data_parallel, sequence_parallel)
    if tp > 1:
        parallelize(model, sub_mesh(mesh, "tp"), sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if data_parallel == "fsdp" and dp > 1:
        apply_fsdp(model, sub_mesh(mesh, "dp"))
    return model


@torch.no_grad()
def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float, sum_group: Any = None,
                   skip: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """Clip gradients to a total L2 norm of `max_norm` and return the norm before clipping.

    Gradients may be DTensors on any mesh (tensor parallel over "tp", FSDP over "dp", both): a gradient's
    local squares are summed over every mesh dimension its placements shard (one all-reduce per such
    dimension and kind of gradient), a replicated one or an ordinary tensor counts once. sum_group: the total
    is then summed over this group too (pipeline stages, each holding other parameters); skip: parameters
    whose gradients are scaled but not counted (a tied copy another stage counts). torch's clip_grad_norm_
    cannot mix DTensor and ordinary gradients, which tensor parallelism without sequence parallelism has.
    """
    from torch.distributed.tensor import DTensor

    skipped = {id(p) for p in skip}
    with_grad = [p for p in parameters if p.grad is not None]
    locals_ = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in with_grad]
    device = locals_[0].device if locals_ else torch.device("cpu")
    sums: dict[tuple[str, ...], torch.Tensor] = {}  # the mesh dimensions a gradient is sharded over -> squares
    meshes: dict[tuple[str, ...], Any] = {}
    for p, local in zip(with_grad, locals_, strict=True):
        if id(p) in skipped:
            continue
        dims: tuple[str, ...] = ()
        if isinstance(p.grad, DTensor):
            names = p.grad.device_mesh.mesh_dim_names
            dims = tuple(names[i] for i, pl in enumerate(p.grad.placements)
                         if not (pl.is_replicate() or pl.is_partial()))  # Shard, FSDP's _StridedShard
            meshes[dims] = p.grad.device_mesh
        squares = local.float().pow(2).sum(dtype=torch.float64)  # (no float64 copy of the gradient)
        sums[dims] = sums[dims] + squares if dims in sums else squares
    total = torch.zeros((), dtype=torch.float64, device=device)
    for dims in sorted(sums):  # the same kinds, in the same order, on every rank of a group
        for dim in dims:
            torch.distributed.all_reduce(sums[dims], group=meshes[dims].get_group(dim))
        total = total + sums[dims]
    if sum_group is not None:
        torch.distributed.all_reduce(total, group=sum_group)
    total = total.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for local in locals_:
        local.mul_(coef.to(local.dtype))
    return total.float()
