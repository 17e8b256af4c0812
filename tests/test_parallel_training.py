"""The training loop under the distributed strategies (real processes, gloo, CPU).

Data-parallel training with N ranks of batch b is single-process training on the concatenated batch N*b: the
loop's sampler gives rank r the r-th of every N consecutive batch-sized slices of one seeded permutation, so
the single process sees exactly the ranks' batches side by side.
"""

from __future__ import annotations

import numpy as np
import torch
from parallel_helpers import run

from lmforge.config import ModelConfig
from lmforge.data import TokenBlocks
from lmforge.models.decoder import Decoder
from lmforge.objectives import CausalLM
from lmforge.parallel.strategy import PSStrategy, make_strategy, run_training
from lmforge.training import TrainConfig, train

BATCH, STEPS = 2, 4


def _model() -> Decoder:
    torch.manual_seed(0)
    return Decoder(ModelConfig.from_name("tiny-gpt2"))


def _data() -> TokenBlocks:
    gen = torch.Generator().manual_seed(1)
    return TokenBlocks(torch.randint(0, 128, (24, 16), generator=gen))


def _config(batch_size: int, clip: float | None, **kw) -> TrainConfig:
    return TrainConfig(lr=3e-3, max_steps=STEPS, batch_size=batch_size, warmup_steps=1, schedule="linear",
                       clip_norm=clip, progress=False, log_every=1, **kw)


def _reference(world: int, clip: float | None) -> dict[str, torch.Tensor]:
    """Single-process training on the concatenated batch, on one thread as the ranks (the same rounding: Adam
    turns noise in the theoretically zero gradient of the attention key bias into full-size steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        train(model, CausalLM(), _data(), _config(BATCH * world, clip))
    finally:
        torch.set_num_threads(threads)
    return model.state_dict()


def _plain(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors as numpy arrays: what a rank returns through the launcher's queue (no shared memory)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def _assert_same(actual: dict[str, np.ndarray], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(torch.from_numpy(actual[k]), expected[k], rtol=0, atol=1e-5,
                                   msg=lambda m, k=k: f"{k}: {m}")


# --- ranks ----------------------------------------------------------------------------------------------


def data_parallel_rank(names: list[str], clip: float | None) -> dict[str, dict[str, np.ndarray]]:
    """Train once per strategy name in one process group; return each run's final weights."""
    out = {}
    for name in names:
        strategy = make_strategy(name)
        model = _model()
        if strategy.rank == 1:
            with torch.no_grad():  # a different start on rank 1: the strategy must broadcast rank 0's
                for p in model.parameters():
                    p.add_(1.0)
        run_training(model, CausalLM(), _data(), _config(BATCH, clip), strategy)
        out[name] = _plain(model.state_dict())
    return out


def ps_rank(n_servers: int) -> dict[str, np.ndarray] | None:
    strategy = PSStrategy(n_servers=n_servers, mode="sync")
    model = _model()
    if strategy.is_server:
        log = run_training(model, CausalLM(), _data(), _config(BATCH, None), strategy)
        assert len(log.updates) == STEPS and log.max_staleness() == 0
        return None
    with torch.no_grad():  # workers start elsewhere: the servers' parameters must win
        for p in model.parameters():
            p.mul_(0.5)
    run_training(model, CausalLM(), _data(), _config(BATCH, None), strategy)
    return _plain(model.state_dict())


# --- tests ----------------------------------------------------------------------------------------------


def test_allreduce_and_ddp_equal_single_process_on_the_concatenated_batch():
    world = 2
    results = run(data_parallel_rank, world, ["allreduce", "ddp"], 0.5, timeout=120)
    expected = _reference(world, 0.5)
    for name in ("allreduce", "ddp"):
        for r in range(world):
            _assert_same(results[r][name], expected)


def test_parameter_server_sync_equals_allreduce_training():
    n_servers, n_workers = 1, 2
    results = run(ps_rank, n_servers + n_workers, n_servers, timeout=120)
    assert results[0] is None
    expected = _reference(n_workers, None)
    for state in results[n_servers:]:
        _assert_same(state, expected)
