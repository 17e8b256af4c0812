"""DistributedOptimizer and the broadcast helpers under real processes (gloo, CPU).

The reference for data-parallel training is one process training on the concatenated batch: with equal shards,
the average over ranks of the shard-mean gradient is the full-batch mean gradient, so parameters must agree
(within 1e-5) after k steps. One run per world size goes through every check, each reported under its own test
id (parallel_helpers.run_checks).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from parallel_helpers import Phase, adasum_reference, phase_tests
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
                                          "gradient_predivide_factor", "sparse_as_dense", "num_groups", "groups")
               if k in kwargs}
    model = make_model()
    if callable(dist_kw.get("groups")):
        dist_kw["groups"] = dist_kw["groups"](model)
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


def check_explicit_groups(n: int, r: int) -> None:
    """Horovod's num_groups / groups instead of size-capped buckets: same training, one bucket per group."""
    _compare(_adam, n, r, num_groups=2)
    _compare(_sgd, n, r, groups=lambda m: [list(m[0].parameters()) + list(m[5].parameters())])
    model = _mlp()
    opt = hvd.DistributedOptimizer(_sgd(model), model.named_parameters(), groups=[list(model[3].parameters())])
    assert [len(b.params) for b in opt._buckets] == [1, 1, 2, 1, 1, 1, 1]  # the group, then one per parameter
    with pytest.raises(ValueError, match="not both"):
        hvd.DistributedOptimizer(_sgd(model), model.named_parameters(), num_groups=2, groups=2)


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
    with pytest.raises(ValueError, match="Average, Sum or Adasum"):
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
    if r == 0:  # only the root has state; the others create theirs first, as Horovod does
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


def check_broadcast_creates_empty_state(n: int, r: int) -> None:
    """A fresh optimizer gets Horovod's state (zero gradients, one step) on every rank; parameters, with
    weight decay, and gradients are left as they were."""
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, weight_decay=0.1)
    hvd.broadcast_optimizer_state(opt, root_rank=n - 1)
    assert len(opt.state) == len(before)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b) and p.grad is None
        st = opt.state[p]
        assert st["step"].item() == 1 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
    wrapped = hvd.DistributedOptimizer(torch.optim.Adam(model.parameters()), model.named_parameters())
    hvd.broadcast_optimizer_state(wrapped, root_rank=0)  # steps the base class: no allreduce to line up
    assert len(wrapped.state) == len(before)
    with pytest.raises(ValueError, match="LBFGS"):
        hvd.broadcast_optimizer_state(torch.optim.LBFGS(model.parameters()), root_rank=0)


def check_step_after_synchronize_warns(n: int, r: int) -> None:
    model = _mlp()
    opt = hvd.DistributedOptimizer(_sgd(model), model.named_parameters())
    x, y = _global_batch(0, n)
    _mse(model, x[r::n], y[r::n]).backward()
    opt.synchronize()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="skip_synchronize"):
        opt.step()
    opt.zero_grad()
    _mse(model, x[r::n], y[r::n]).backward()
    opt.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with opt.skip_synchronize():
            opt.step()
    assert all(g is not None for g in grads)
    opt.zero_grad()


def _embedding_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 4))


def _ids_batch(step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    return torch.randint(0, 10, (n * SHARD, 3), generator=g), torch.randn(n * SHARD, 4, generator=g)


def check_sparse_gradients(n: int, r: int) -> None:
    """nn.Embedding(sparse=True): Horovod's sparse allreduce, and sparse_as_dense, equal single-process SGD."""
    for as_dense in (False, True):
        model = _compare(lambda m: torch.optim.SGD(m.parameters(), lr=0.5), n, r, make_model=_embedding_model,
                         batch=_ids_batch, sparse_as_dense=as_dense)
        assert model[0].weight.grad is None  # zero_grad after the last step


def check_muon(n: int, r: int) -> None:
    """torch's Muon (2-D parameters only) wrapped as any other optimizer; its state broadcasts too."""
    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16, bias=False), nn.Tanh(), nn.Linear(16, 4, bias=False))

    _compare(lambda m: torch.optim.Muon(m.parameters(), lr=0.05), n, r, tol=1e-4, make_model=make_model)
    model = make_model()
    opt = torch.optim.Muon(model.parameters(), lr=0.05)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert len(opt.state) == 2


def check_adasum_optimizer(n: int, r: int) -> None:
    """op=Adasum, Horovod's delta-based Adasum optimizer: every rank steps its own optimizer (its own state) on
    its own shard, and the parameter changes are combined by Adasum's closed form, tensor by tensor. Reference:
    one process playing every rank's optimizer, combining the changes with `adasum_reference`."""
    model = _mlp()
    if n & (n - 1):
        with pytest.raises(NotImplementedError, match="power of 2"):
            hvd.DistributedOptimizer(_adam(model), model.named_parameters(), op=hvd.Adasum)
        return
    for make_opt in (_sgd, _adam):
        model = _mlp()
        opt = hvd.DistributedOptimizer(make_opt(model), model.named_parameters(), op=hvd.Adasum)
        assert isinstance(opt, type(make_opt(_mlp())))
        combined, averaged = _mlp(), _mlp()  # the reference, and the same changes averaged instead
        replicas = [_mlp() for _ in range(n)]
        replica_opts = [make_opt(m) for m in replicas]
        for step in range(STEPS):
            x, y = _global_batch(step, n)
            _mse(model, x[r * SHARD: (r + 1) * SHARD], y[r * SHARD: (r + 1) * SHARD]).backward()
            opt.synchronize()  # nothing to do, as in Horovod
            opt.step()
            opt.zero_grad()
            deltas = []
            for s, (replica, replica_opt) in enumerate(zip(replicas, replica_opts, strict=True)):
                replica.load_state_dict(combined.state_dict())  # in place: the optimizer keeps its state
                _mse(replica, x[s * SHARD: (s + 1) * SHARD], y[s * SHARD: (s + 1) * SHARD]).backward()
                replica_opt.step()
                replica_opt.zero_grad()
                deltas.append([p.detach() - q.detach() for p, q in zip(replica.parameters(),
                                                                        combined.parameters(), strict=True)])
            with torch.no_grad():
                for i, (q, q_avg) in enumerate(zip(combined.parameters(), averaged.parameters(), strict=True)):
                    changes = [d[i].double() for d in deltas]
                    q_avg.add_((sum(changes) / n).float())
                    q.add_(adasum_reference(changes).float())
        diff = _max_diff(model, combined)
        assert diff <= 1e-5, f"{make_opt.__name__}: max |Adasum optimizer - closed form| = {diff:.3g}"
        apart = _max_diff(combined, averaged)
        assert apart > 1e-3, f"{make_opt.__name__}: Adasum indistinguishable from averaging ({apart:.3g})"
    with pytest.raises(AssertionError, match="not supported when using Adasum"):
        opt.skip_synchronize()
    with pytest.raises(ValueError, match="gradient_predivide_factor"):
        hvd.DistributedOptimizer(_sgd(model), model.named_parameters(), op=hvd.Adasum,
                                 gradient_predivide_factor=2.0)
    with pytest.raises(NotImplementedError, match="process sets"):
        hvd.DistributedOptimizer(_sgd(model), model.named_parameters(), op=hvd.Adasum,
                                 process_set=hvd.ProcessSet([0]))
    fresh = hvd.DistributedOptimizer(_adam(model), model.named_parameters(), op=hvd.Adasum)
    hvd.broadcast_optimizer_state(fresh, root_rank=0)  # creates the state with a local step, no Adasum
    assert len(fresh.state) == len(list(model.parameters()))


def check_join_uneven_batches(n: int, r: int) -> None:
    """Horovod's join: rank r has r + 2 batches, then joins and contributes zero gradients; Average still
    divides by n, so every step equals single-process training on (sum of the active shards' losses) / n."""
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
            active = [s for s in range(n) if s + 2 > step]
            loss = sum(_mse(reference, x[s * SHARD: (s + 1) * SHARD], y[s * SHARD: (s + 1) * SHARD])
                       for s in active) / n
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
        diff = _max_diff(model, reference)
        assert diff <= 1e-5, f"max |distributed - single process| = {diff:.3g}"


CHECKS: list[Callable[[int, int], None]] = [
    check_matches_single_process, check_explicit_groups, check_backward_passes_per_step, check_transformer,
    check_clipping,
    check_fp16_compression, check_overlap, check_misuse, check_broadcast_parameters,
    check_broadcast_optimizer_state, check_broadcast_creates_empty_state, check_step_after_synchronize_warns,
    check_sparse_gradients, check_muon, check_join_uneven_batches, check_adasum_optimizer,
]
PHASES = [
    Phase("default", CHECKS, {"timeout": 30}, {"LMFORGE_CHECK_COLLECTIVES": ""}),
    Phase("unchecked", [check_matches_single_process, check_sparse_gradients], {"check": False, "timeout": 30},
          {"LMFORGE_CHECK_COLLECTIVES": ""}),
]


reports, test_optimizer = phase_tests(PHASES, WORLD_SIZES, timeout=300)


def test_requires_init() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="init"):
        hvd.DistributedOptimizer(_sgd(model), model.named_parameters())
