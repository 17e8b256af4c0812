"""lmforge.parallel.SyncBatchNorm under real processes (gloo, CPU), against torch's BatchNorm in one process.

Rank s holds rows s of a global batch and the loss L_s = sum(y_s * w_s) with random w_s; the reference is one
process running torch.nn.BatchNorm on the concatenated batch with the loss sum_s L_s. Outputs, input gradients,
the sum over ranks of the weight and bias gradients, running statistics and eval outputs must agree.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from parallel_helpers import Phase, phase_tests
from torch import nn

import lmforge.parallel as hvd

WORLD_SIZES = [2, 3]
C = 4


def _rows(sizes: list[int], r: int) -> slice:
    return slice(sum(sizes[:r]), sum(sizes[: r + 1]))


def _compare(n: int, r: int, sizes: list[int], spatial: tuple[int, ...], dtype: torch.dtype, **kwargs) -> None:
    """Three training steps and one eval forward; `sizes` holds every rank's batch size."""
    reference = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[len(spatial)](C, **kwargs).to(dtype)
    sync = hvd.SyncBatchNorm(C, **kwargs).to(dtype)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    g = torch.Generator().manual_seed(7)
    if sync.affine:
        with torch.no_grad():
            for ours, theirs in ((sync.weight, reference.weight), (sync.bias, reference.bias)):
                ours.copy_(torch.randn(C, generator=g, dtype=dtype))
                theirs.copy_(ours)
    rows = _rows(sizes, r)
    for step in range(3):
        shape = (sum(sizes), C, *spatial)
        batch = (3.0 + 2 * torch.randn(shape, generator=g, dtype=dtype))  # mean far from 0 on purpose
        weights = torch.randn(shape, generator=g, dtype=dtype)  # the losses' random projections
        x = batch[rows].clone().requires_grad_()
        y = sync(x)
        (y * weights[rows]).sum().backward()
        big = batch.clone().requires_grad_()
        expected = reference(big)
        (expected * weights).sum().backward()
        torch.testing.assert_close(y, expected[rows], **tol)
        torch.testing.assert_close(x.grad, big.grad[rows], **tol)
        if sync.affine:  # each rank holds the gradient of its own loss; their sum is the reference's
            for ours, theirs in ((sync.weight, reference.weight), (sync.bias, reference.bias)):
                torch.testing.assert_close(hvd.allreduce(ours.grad, op=hvd.Sum), theirs.grad, **tol)
                ours.grad, theirs.grad = None, None
        if sync.track_running_stats:
            torch.testing.assert_close(sync.running_mean, reference.running_mean, **tol)
            torch.testing.assert_close(sync.running_var, reference.running_var, **tol)
            assert int(sync.num_batches_tracked) == step + 1
    sync.eval()
    reference.eval()
    batch = torch.randn((sum(sizes), C, *spatial), generator=g, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(sync(batch[rows]), reference(batch)[rows], **tol)


def check_matches_batchnorm(n: int, r: int) -> None:
    _compare(n, r, [s + 2 for s in range(n)], (), torch.float64)  # (N, C), uneven shards
    _compare(n, r, [3] * n, (2, 3), torch.float32)  # (N, C, H, W)
    _compare(n, r, [2] * n, (5,), torch.float64, momentum=None)  # (N, C, L), cumulative average
    _compare(n, r, [0] + [3] * (n - 1), (2, 2), torch.float64)  # an empty shard on rank 0
    _compare(n, r, [2] * n, (), torch.float64, affine=False, track_running_stats=False)  # batch stats in eval


def check_torch_refuses_cpu(n: int, r: int) -> None:
    """Why lmforge has its own: torch.nn.SyncBatchNorm refuses CPU tensors in a process group."""
    with pytest.raises(ValueError, match="GPU"):
        nn.SyncBatchNorm(C)(torch.randn(3, C))


def check_errors(n: int, r: int) -> None:
    layer = hvd.SyncBatchNorm(C)
    with pytest.raises(ValueError, match="shape \\(N, C, ...\\)"):
        layer(torch.randn(C))
    with pytest.raises(ValueError, match="3 channels"):
        layer(torch.randn(2, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # every rank raises together
        layer(torch.randn(1 if r == 0 else 0, C))


CHECKS: list[Callable[[int, int], None]] = [check_matches_batchnorm, check_torch_refuses_cpu, check_errors]
PHASES = [Phase("default", CHECKS, {"timeout": 30}, {"LMFORGE_CHECK_COLLECTIVES": ""})]


reports, test_sync_batch_norm = phase_tests(PHASES, WORLD_SIZES, timeout=120)
