"""Adasum, Horovod's adaptive summation, by vector halving and distance doubling over 2^k ranks.

For two vectors a and b:

    adasum(a, b) = (1 - a.b / (2 |a|^2)) a + (1 - a.b / (2 |b|^2)) b

(a coefficient is 1 when its vector's squared norm is below sqrt(DBL_MIN)): equal vectors give the vector,
orthogonal vectors their sum. Over 2^k ranks the blocks are combined level by level, first ranks r and r ^ 1,
then the pairs r ^ 2, and so on: with 4 ranks, adasum(adasum(g0, g1), adasum(g2, g3)). At each level a rank
keeps half of the part it holds and sends the other half to its partner, so no rank moves more than about
twice the tensor; the dot product and norms of the whole vectors are the sums of the halves' over the ranks of
the merged block (one allreduce of 3 float64 per block, segment and level). Distance halving then gathers the
result back onto every rank. Coefficients are computed in float64, as Horovod does.

A flat buffer may hold several tensors (`segments`, their lengths): each is combined on its own (its own dot
products and coefficients), as Horovod's fused Adasum does, with the messages of one combination.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist
from torch import Tensor

_SQRT_DBL_MIN = math.sqrt(sys.float_info.min)


def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, 8, ..."""
    return n > 0 and n & (n - 1) == 0


def _swap(send: Tensor, recv: Tensor, partner: int) -> None:
    """Send `send` to `partner` and receive its message into `recv` (either may be empty: then it is skipped)."""
    works = []
    if send.numel():
        works.append(dist.isend(send.contiguous(), dst=partner))
    if recv.numel():
        works.append(dist.irecv(recv, src=partner))
    for work in works:
        work.wait()


def _pieces(lo: int, hi: int, bounds: list[int]) -> list[tuple[int, int, int]]:
    """(segment, start, end) of every segment that overlaps [lo, hi), clipped to it."""
    return [(j, max(lo, bounds[j]), min(hi, bounds[j + 1])) for j in range(len(bounds) - 1)
            if bounds[j] < hi and bounds[j + 1] > lo]


def adasum_(flat: Tensor, rank: int, size: int, segments: list[int] | None = None) -> Tensor:
    """Replace `flat` (1-D, floating point, same length on every rank) with the Adasum over every rank's.

    segments: lengths of the tensors laid end to end in `flat` (default: one), each combined on its own.
    Every rank of the default process group calls it; `size` must be a power of two.
    """
    if size == 1:
        return flat
    segments = [flat.numel()] if segments is None else segments
    bounds = [0]
    for length in segments:
        bounds.append(bounds[-1] + length)
    lo, hi = 0, flat.numel()
    given: list[tuple[int, int]] = []  # the range handed to the partner at each level, for the way back
    level = 1
    while level < size:
        partner = rank ^ level
        mid = lo + (hi - lo) // 2
        left = rank & level == 0
        keep, give = ((lo, mid), (mid, hi)) if left else ((mid, hi), (lo, mid))
        received = torch.empty(keep[1] - keep[0], dtype=flat.dtype, device=flat.device)
        _swap(flat[give[0]: give[1]], received, partner)
        mine = flat[keep[0]: keep[1]]
        a, b = (mine.double(), received.double()) if left else (received.double(), mine.double())
        # Per merged block of 2 * level ranks and per segment: (a.b, |a|^2, |b|^2) summed over the halves.
        sums = torch.zeros(size // (2 * level), len(segments), 3, dtype=torch.float64, device=flat.device)
        pieces = _pieces(keep[0], keep[1], bounds)
        for j, start, end in pieces:
            pa, pb = a[start - keep[0]: end - keep[0]], b[start - keep[0]: end - keep[0]]
            sums[rank // (2 * level), j] = torch.stack([pa @ pb, pa @ pa, pb @ pb])
        dist.all_reduce(sums)
        totals = sums[rank // (2 * level)].tolist()  # (segments, 3)
        for j, start, end in pieces:
            dot, aa, bb = totals[j]
            ca = 1.0 - dot / aa * 0.5 if aa >= _SQRT_DBL_MIN else 1.0
            cb = 1.0 - dot / bb * 0.5 if bb >= _SQRT_DBL_MIN else 1.0
            pa, pb = a[start - keep[0]: end - keep[0]], b[start - keep[0]: end - keep[0]]
            mine[start - keep[0]: end - keep[0]].copy_(ca * pa + cb * pb)
        given.append(give)
        lo, hi = keep
        level *= 2
    level = size // 2
    while level >= 1:
        give = given.pop()
        _swap(flat[lo:hi], flat[give[0]: give[1]], rank ^ level)
        lo, hi = min(lo, give[0]), max(hi, give[1])
        level //= 2
    return flat
