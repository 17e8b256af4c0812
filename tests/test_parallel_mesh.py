"""Layouts dp x pp x tp: degree validation, rank coordinates, and the DeviceMesh over real gloo ranks."""

from __future__ import annotations

import pytest
from parallel_helpers import run

from lmforge.parallel.mesh import Layout


@pytest.mark.parametrize(("kw", "world", "want"), [
    ({"tp": 2}, 4, Layout(dp=2, pp=1, tp=2)),
    ({}, 4, Layout(dp=4)),
    ({"dp": 1, "pp": 2, "tp": 2}, 4, Layout(dp=1, pp=2, tp=2)),
    ({"pp": 2}, 2, Layout(dp=1, pp=2)),
])
def test_parse_fills_in_the_data_parallel_degree(kw, world, want):
    assert Layout.parse(**kw, world_size=world) == want


@pytest.mark.parametrize(("kw", "world", "message"), [
    ({"tp": 3}, 4, "does not divide the world size 4"),
    ({"dp": 2, "tp": 4}, 4, "2 x 1 x 4 = 8 ranks, but the world has 4"),
    ({"tp": 0}, 4, "--tp must be a positive integer, got 0"),
    ({"pp": 1.5}, 4, "--pp must be a positive integer"),
    ({"tp": 2}, 0, "world size must be a positive integer"),
])
def test_parse_names_the_bad_degree(kw, world, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Layout.parse(**kw, world_size=world)


def test_coordinates_put_tensor_parallel_ranks_next_to_each_other():
    layout = Layout(dp=2, pp=2, tp=2)
    assert [tuple(layout.coordinates(r).values()) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert layout.ranks_along("tp", 5) == [4, 5]
    assert layout.ranks_along("pp", 5) == [5, 7]
    assert layout.ranks_along("dp", 5) == [1, 5]
    with pytest.raises(ValueError, match="unknown mesh dimension 'ep'"):
        layout.degree("ep")


def mesh_rank(dp: int, tp: int) -> dict:
    import torch
    import torch.distributed as dist

    import lmforge.parallel as hvd
    from lmforge.parallel.mesh import coordinate, group, sub_mesh

    hvd.init()
    layout = Layout.parse(dp=dp, tp=tp)
    mesh = layout.build()
    rank = dist.get_rank()
    out = {"names": mesh.mesh_dim_names, "coords": {d: coordinate(mesh, d) for d in ("dp", "pp", "tp")}}
    for dim in ("dp", "tp"):  # a sum over the group is the sum of the ranks the layout says are in it
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=group(mesh, dim))
        out[f"sum_{dim}"] = float(t)
        out[f"members_{dim}"] = layout.ranks_along(dim, rank)
    out["tp_mesh"] = sub_mesh(mesh, "tp").mesh.tolist()
    hvd.shutdown()
    return out


def test_device_mesh_groups_match_the_layout_on_four_ranks():
    results = run(mesh_rank, 4, 2, 2, timeout=60)
    layout = Layout(dp=2, tp=2)
    for rank, res in enumerate(results):
        assert res["names"] == ("dp", "pp", "tp")
        assert res["coords"] == layout.coordinates(rank)
        for dim in ("dp", "tp"):
            assert res[f"sum_{dim}"] == sum(res[f"members_{dim}"])
        assert res["tp_mesh"] == layout.ranks_along("tp", rank)
