"""DistributedOptimizer and the broadcast helpers under real processes (gloo, CPU).

The reference for data-parallel training is one process training on the concatenated batch: with equal shards,
the average over ranks of the shard-mean gradient is the full-batch mean gradient, so parameters must agree
(within 1e-5) after k steps. One process group per world size runs every check and reports each outcome.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from parallel_helpers import run
from torch import nn

import lmforge.parallel as hvd
from lmforge.config import ModelConfig
from lmforge.models.decoder import Decoder

WORLD_SIZES = [2, 3, 4]
STEPS = 4
SHARD = 6  # rows per rank per step


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4))


def _global_batch(step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n * SHARD, 8, generator=g), torch.randn(n * SHARD, 4, generator=g)


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


def _train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    rows: slice,
    n: int,
    micro: int = 1,
    clip: float | None = None,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = _mse,
    batch: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]] = _global_batch,
) -> None:
    """STEPS steps on rows `rows` of each global batch, in `micro` equal micro-batches (loss / micro each)."""
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for step in range(STEPS):
        x, y = batch(step, n)
        for xm, ym in zip(x[rows].chunk(micro), y[rows].chunk(micro), strict=True):
            (loss_fn(model, xm, ym) / micro).backward()
        if clip is not None:
            if hasattr(opt, "skip_synchronize"):
                opt.synchronize()
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                with opt.skip_synchronize():
                    opt.step()
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
        else:
            opt.step()
        sched.step()
        opt.zero_grad()


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _compare(make_opt: Callable[[nn.Module], torch.optim.Optimizer], n: int, r: int, tol: float = 1e-5,
             make_model: Callable[[], nn.Module] = _mlp, ref_lr_scale: float = 1.0, **kwargs) -> nn.Module:
    """Train distributed (this rank's shard) and single-process (whole batch); assert the parameters agree."""
    dist_kw = {k: kwargs.pop(k) for k in ("backward_passes_per_step", "compression", "op", "bucket_cap_mb",
                                          "gradient_predivide_factor") if k in kwargs}
    model = make_model()
    opt = hvd.DistributedOptimizer(make_opt(model), model.named_parameters(), **dist_kw)
    _train(model, opt, slice(r * SHARD, (r + 1) * SHARD), n, micro=dist_kw.get("backward_passes_per_step", 1),
           **kwargs)
    reference = make_model()
    ref_opt = make_opt(reference)
    for group in ref_opt.param_groups:
        group["lr"] *= ref_lr_scale
    _train(reference, ref_opt, slice(None), n, micro=1, **kwargs)
    diff = _max_diff(model, reference)
    assert diff <= tol, f"max |distributed - single process| = {diff:.3g} > {tol}"
    moved = _max_diff(model, make_model())
    assert moved > max(10 * tol, 1e-3), f"training barely moved the parameters ({moved:.3g}): vacuous test"
    return model


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=0.01)


# --- checks run inside every rank ---------------------------------------------------------------------------


def check_matches_single_process(n: int, r: int) -> None:
    _compare(_sgd, n, r)
    _compare(_adam, n, r)
    _compare(_adam, n, r, bucket_cap_mb=0.0005)  # ~500 bytes: many buckets
    _compare(_sgd, n, r, gradient_predivide_factor=2.0)
    _compare(_sgd, n, r, op=hvd.Sum, ref_lr_scale=n)  # summed gradients = n x the mean


def check_backward_passes_per_step(n: int, r: int) -> None:
    _compare(_sgd, n, r, backward_passes_per_step=2)
    _compare(_adam, n, r, backward_passes_per_step=3, bucket_cap_mb=0.0005)


def check_transformer(n: int, r: int) -> None:
    """A tiny GPT-2 from lmforge, AdamW, 2 local passes per step, in float64.

    In float32, Adam turns summation-order noise in near-zero gradients into ~1e-5 parameter differences; in
    float64 any real discrepancy would still show far above that noise.
    """
    config = ModelConfig.from_name("tiny-gpt2")

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return Decoder(config).double()

    def batch(step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, config.vocab_size, (n * SHARD, 9), generator=g)
        return ids[:, :-1], ids[:, 1:]

    def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x).logits  # (B, T, vocab)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    _compare(lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3), n, r, tol=1e-9, make_model=make_model,
             loss_fn=lm_loss, batch=batch, backward_passes_per_step=2, bucket_cap_mb=0.01)


def check_clipping(n: int, r: int) -> None:
    _compare(_sgd, n, r, clip=0.05)


def check_fp16_compression(n: int, r: int) -> None:
    _compare(_sgd, n, r, tol=1e-3, compression=hvd.Compression.fp16)


def check_overlap(n: int, r: int) -> None:
    """All buckets are launched by the gradient hooks, before backward() returns, not by step()."""
    model = _mlp()
    opt = hvd.DistributedOptimizer(_sgd(model), model.named_parameters(), bucket_cap_mb=0.0005)
    assert isinstance(opt, torch.optim.SGD) and len(opt._buckets) > 3
    x, y = _global_batch(0, n)
    _mse(model, x[r::n], y[r::n]).backward()
    assert all(b.handle is not None for b in opt._buckets)
    opt.step()
    assert all(b.handle is None for b in opt._buckets)


def check_misuse(n: int, r: int) -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="does not name"):
        hvd.DistributedOptimizer(_sgd(model), list(model.named_parameters())[:-1])
    with pytest.raises(ValueError, match="backward_passes_per_step"):
        hvd.DistributedOptimizer(_sgd(model), model.named_parameters(), backward_passes_per_step=0)
    with pytest.raises(ValueError, match="Average or Sum"):
        hvd.DistributedOptimizer(_sgd(model), model.named_parameters(), op=hvd.Max)
    opt = hvd.DistributedOptimizer(_sgd(model), model.named_parameters())
    x, y = _global_batch(0, n)
    _mse(model, x, y).backward()
    with pytest.raises(RuntimeError, match="before step"):
        opt.zero_grad()
    with pytest.raises(RuntimeError, match="more than backward_passes_per_step"):
        _mse(model, x, y).backward()
    opt.synchronize()  # every rank finishes the in-flight allreduces, keeping the ranks in step
    opt.zero_grad()


def check_broadcast_parameters(n: int, r: int) -> None:
    torch.manual_seed(100 + r)  # a different model on every rank
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    torch.manual_seed(100)
    root_model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    assert _max_diff(model, root_model) == 0.0
    torch.manual_seed(200 + r)
    other = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    hvd.broadcast_parameters(other.named_parameters(), root_rank=n - 1)
    gathered = hvd.allgather(torch.cat([p.detach().reshape(-1) for p in other.parameters()]).unsqueeze(0))
    assert (gathered - gathered[n - 1]).abs().max().item() == 0.0


def check_broadcast_optimizer_state(n: int, r: int) -> None:
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01 * (r + 1), betas=(0.8, 0.99))
    if r == 0:  # only the root has state
        for step in range(2):
            x, y = _global_batch(step, 1)
            _mse(model, x, y).backward()
            opt.step()
            opt.zero_grad()
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    state = opt.state_dict()
    assert state["param_groups"][0]["lr"] == 0.01 and state["param_groups"][0]["betas"] == (0.8, 0.99)
    flat = torch.cat([torch.cat([s["exp_avg"].reshape(-1), s["exp_avg_sq"].reshape(-1), s["step"].reshape(1)])
                      for _, s in sorted(state["state"].items())])
    gathered = hvd.allgather(flat.unsqueeze(0))
    assert len(state["state"]) == len(list(model.parameters()))
    assert (gathered - gathered[0]).abs().max().item() == 0.0
    # A root that has not stepped empties the others' state.
    fresh = torch.optim.Adam(model.parameters(), lr=0.5)
    hvd.broadcast_optimizer_state(fresh if r == 1 else opt, root_rank=1)
    assert (fresh if r == 1 else opt).state_dict()["state"] == {}


def check_join_uneven_batches(n: int, r: int) -> None:
    """uneven_inputs mode: rank r has r + 2 batches, then joins; the ranks still training average over
    themselves, so every step equals single-process training on the active ranks' shards."""
    model = _mlp()
    opt = hvd.DistributedOptimizer(_sgd(model), model.named_parameters(), bucket_cap_mb=0.0005)
    for step in range(r + 2):
        x, y = _global_batch(step, n)
        _mse(model, x[r * SHARD: (r + 1) * SHARD], y[r * SHARD: (r + 1) * SHARD]).backward()
        opt.step()
        opt.zero_grad()
    assert hvd.join() == n - 1
    if r == n - 1:  # the last rank took part in every step
        reference = _mlp()
        ref_opt = _sgd(reference)
        for step in range(n + 1):
            x, y = _global_batch(step, n)
            rows = torch.cat([torch.arange(s * SHARD, (s + 1) * SHARD) for s in range(n) if s + 2 > step])
            _mse(reference, x[rows], y[rows]).backward()
            ref_opt.step()
            ref_opt.zero_grad()
        diff = _max_diff(model, reference)
        assert diff <= 1e-5, f"max |distributed - single process| = {diff:.3g}"


CHECKS: list[Callable[[int, int], None]] = [
    check_matches_single_process, check_backward_passes_per_step, check_transformer, check_clipping,
    check_fp16_compression, check_overlap, check_misuse, check_broadcast_parameters,
    check_broadcast_optimizer_state,
]


UNEVEN_CHECKS = [check_join_uneven_batches]


def _suite() -> dict[str, str | None]:
    """Every check in one process group: CHECKS on the fast path, then UNEVEN_CHECKS in uneven_inputs mode."""
    n, r = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    dist.init_process_group("gloo")  # hvd.init() reuses it, so shutdown() + init() can switch modes
    report: dict[str, str | None] = {}
    for uneven, checks in ((False, CHECKS), (True, UNEVEN_CHECKS)):
        hvd.init(uneven_inputs=uneven, timeout=30)
        for check in checks:
            try:
                check(n, r)
                report[check.__name__] = None
            except Exception:
                report[check.__name__] = traceback.format_exc()
                hvd.barrier()
        hvd.shutdown()
    dist.destroy_process_group()
    return report


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"world{n}")
def reports(request) -> tuple[int, list[dict[str, str | None]]]:
    return request.param, run(_suite, request.param, timeout=150)


@pytest.mark.parametrize("check", [c.__name__ for c in CHECKS + UNEVEN_CHECKS])
def test_optimizer(reports, check: str) -> None:
    n, per_rank = reports
    failures = [f"rank {r}:\n{rep[check]}" for r, rep in enumerate(per_rank) if rep.get(check, "missing")]
    assert not failures, f"{check} failed at world size {n}:\n" + "\n".join(failures)


def test_requires_init() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="init"):
        hvd.DistributedOptimizer(_sgd(model), model.named_parameters())
