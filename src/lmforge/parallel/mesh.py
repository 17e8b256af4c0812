"""The layout of a model-parallel run: degrees dp x pp x tp, validated against the world, on one DeviceMesh.

    layout = Layout.parse(dp=2, pp=1, tp=2, world_size=4)     # ValueError naming the bad degree
    mesh = layout.build()                                      # torch DeviceMesh, dims ("dp", "pp", "tp")
    layout.group("tp")                                         # this rank's process group along a dim
    layout.coordinate("dp")                                    # this rank's index along a dim

Rank order follows torchtitan's and Megatron's: tp is the fastest-varying dimension (neighbouring ranks, which
share a node and its fast links, hold one tensor-parallel group), then pp, then dp. Rank r has the coordinates
dp = r // (pp * tp), pp = (r // tp) % pp, tp = r % tp. Every dimension is in the mesh, degree 1 included, so
code asks for `mesh["tp"]` whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DIMS = ("dp", "pp", "tp")


@dataclass(frozen=True)
class Layout:
    """Degrees of data (dp), pipeline (pp) and tensor (tp) parallelism; dp * pp * tp is the world size."""

    dp: int = 1
    pp: int = 1
    tp: int = 1

    @classmethod
    def parse(cls, dp: int | None = None, pp: int | None = None, tp: int | None = None,
              world_size: int | None = None) -> Layout:
        """The layout for these degrees; a degree left None takes what the others leave of the world size.

        world_size: default the running process group's (1 without one). At most one degree may be None
        (dp is inferred when several are: `--tp 2` on 4 ranks is dp 2 x tp 2). Raises ValueError for a degree
        that is not a positive integer, or degrees whose product is not the world size.
        """
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world size must be a positive integer, got {world_size!r}")
        degrees = {"dp": dp, "pp": pp, "tp": tp}
        for name, value in degrees.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")
        if pp is None:
            degrees["pp"] = 1
        if tp is None:
            degrees["tp"] = 1
        if dp is None:
            known = degrees["pp"] * degrees["tp"]
            if world_size % known:
                raise ValueError(f"pp x tp = {degrees['pp']} x {degrees['tp']} = {known} does not divide the "
                                 f"world size {world_size}; the data-parallel degree would not be whole")
            degrees["dp"] = world_size // known
        product = degrees["dp"] * degrees["pp"] * degrees["tp"]
        if product != world_size:
            raise ValueError(f"dp x pp x tp = {degrees['dp']} x {degrees['pp']} x {degrees['tp']} = {product} "
                             f"ranks, but the world has {world_size} (torchrun --nproc-per-node x nodes)")
        return cls(**degrees)

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    def degree(self, dim: str) -> int:
        """The degree of dimension `dim` ("dp", "pp" or "tp")."""
        if dim not in DIMS:
            raise ValueError(f"unknown mesh dimension {dim!r}; expected one of {', '.join(DIMS)}")
        return getattr(self, dim)

    def coordinates(self, rank: int) -> dict[str, int]:
        """{"dp": i, "pp": j, "tp": k} of global rank `rank` (tp fastest-varying)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the layout's {self.world_size} ranks")
        return {"dp": rank // (self.pp * self.tp), "pp": (rank // self.tp) % self.pp, "tp": rank % self.tp}

    def ranks_along(self, dim: str, rank: int) -> list[int]:
        """The global ranks that share every coordinate of `rank` except `dim` (its group along `dim`)."""
        coords = self.coordinates(rank)
        strides = {"dp": self.pp * self.tp, "pp": self.tp, "tp": 1}
        base = rank - coords[dim] * strides[dim]
        return [base + i * strides[dim] for i in range(self.degree(dim))]

    def describe(self) -> str:
        return f"dp{self.dp} x pp{self.pp} x tp{self.tp}"

    def build(self, device_type: str | None = None) -> DeviceMesh:
        """torch's DeviceMesh of shape (dp, pp, tp) with those dimension names, over the running group.

        device_type: "cuda" with NCCL, else "cpu" (default: by the group's backend). Raises ValueError when the
        running world size is not the layout's.
        """
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world != self.world_size:
            raise ValueError(f"layout {self.describe()} needs {self.world_size} ranks, the process group has "
                             f"{world}")
        if device_type is None:
            device_type = "cuda" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"
        return init_device_mesh(device_type, (self.dp, self.pp, self.tp), mesh_dim_names=DIMS)


def group(mesh: DeviceMesh, dim: str) -> Any:
    """This rank's process group along mesh dimension `dim` (for plain torch.distributed collectives)."""
    if dim not in (mesh.mesh_dim_names or ()):
        raise ValueError(f"mesh has no dimension {dim!r}; it has {mesh.mesh_dim_names}")
    return mesh.get_group(dim)


def coordinate(mesh: DeviceMesh, dim: str) -> int:
    """This rank's index along mesh dimension `dim`."""
    if dim not in (mesh.mesh_dim_names or ()):
        raise ValueError(f"mesh has no dimension {dim!r}; it has {mesh.mesh_dim_names}")
    return mesh.get_local_rank(dim)


def sub_mesh(mesh: DeviceMesh, *dims: str) -> DeviceMesh:
    """The mesh over `dims` only (e.g. sub_mesh(mesh, "tp") for a tensor-parallel plan), through this rank."""
    for dim in dims:
        if dim not in (mesh.mesh_dim_names or ()):
            raise ValueError(f"mesh has no dimension {dim!r}; it has {mesh.mesh_dim_names}")
    return mesh[dims[0]] if len(dims) == 1 else mesh[tuple(dims)]


def device_of(mesh: DeviceMesh) -> torch.device:
    """The device this rank computes on for `mesh` (cuda:current for a CUDA mesh, else cpu)."""
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)
