"""The parameter server under real processes (gloo, CPU): sharding, consistency modes, traffic, failures.

Ranks 0..n_servers-1 serve, the rest are workers. Synchronous mode must equal single-process training on the
workers' concatenated batch (= allreduce training); the asynchronous and bounded-staleness modes must converge
on linear regression, and bounded staleness must keep every worker within tau steps of the slowest, as the
servers' records show.
"""

from __future__ import annotations

import datetime
import os
import signal
import time

import numpy as np
import pytest
import torch
from parallel_helpers import run, spawn

import lmforge.parallel as hvd
from lmforge.config import ModelConfig
from lmforge.models.decoder import Decoder
from lmforge.parallel.ps import (
    ParameterServer,
    PSWorker,
    ServerLog,
    check_mode,
    optimizer_params,
    shard_ranges,
)

TIMEOUT = datetime.timedelta(seconds=30)

# --- no processes -------------------------------------------------------------------------------------------


def test_shard_ranges_cover_the_vector_contiguously():
    for numel, n in [(10, 1), (10, 3), (7, 7), (1000, 4)]:
        ranges = shard_ranges(numel, n)
        assert len(ranges) == n and ranges[0][0] == 0 and ranges[-1][1] == numel
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        sizes = [hi - lo for lo, hi in ranges]
        assert max(sizes) - min(sizes) <= 1


def test_bad_inputs_name_what_is_wrong():
    with pytest.raises(ValueError, match="cannot shard 2 parameter elements across 3 servers"):
        shard_ranges(2, 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        check_mode("eventual", None)
    with pytest.raises(ValueError, match="needs tau >= 0"):
        check_mode("bounded", None)
    mixed = torch.optim.SGD([torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.float64,
                                                                            requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="one dtype and on one device"):
        optimizer_params(mixed)


# --- synchronous mode: equals single-process training on the concatenated batch ----------------------------

STEPS, BATCH = 3, 2
LRS = [1e-2, 5e-3, 2e-3]  # changes every step: the servers must use the learning rate the workers send


def _tiny_model() -> Decoder:
    torch.manual_seed(0)
    return Decoder(ModelConfig.from_name("tiny-gpt2"))


def _optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}])


def _batch(worker: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * step + worker)
    return torch.randint(0, 128, (BATCH, 12), generator=gen)  # (B, T)


def _loss(model: Decoder, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1]).logits  # (B, T-1, V)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def _numpy_state(state: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, np.ndarray]]:
    return {i: {k: v.numpy().copy() for k, v in s.items()} for i, s in state.items()}


def sync_rank(n_servers: int) -> dict:
    hvd.init()
    rank = hvd.rank()
    model = _tiny_model()
    if rank >= n_servers:  # workers start elsewhere: the servers' copy must win
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1.0)
    optimizer = _optimizer(model)
    if rank < n_servers:
        with pytest.raises(ValueError, match="is not a worker rank"):
            PSWorker(optimizer, n_servers)
        log = ParameterServer(optimizer, n_servers, "sync", timeout=TIMEOUT).serve()
        return {"log": log}
    with pytest.raises(ValueError, match="is a worker, not a server"):
        ParameterServer(optimizer, n_servers)
    worker = PSWorker(optimizer, n_servers, timeout=TIMEOUT)
    for step in range(STEPS):
        for g in optimizer.param_groups:
            g["lr"] = LRS[step]
        optimizer.zero_grad()
        _loss(model, _batch(rank - n_servers, step)).backward()
        worker.step()
    state = worker.optimizer_state()
    worker.close()
    params = [p.detach().numpy().copy() for p in optimizer_params(optimizer)]
    return {"params": params, "state": _numpy_state(state), "traffic": worker.traffic}


def test_sync_mode_equals_single_process_training_on_the_concatenated_batch():
    n_servers, n_workers = 2, 2
    out = run(sync_rank, n_servers + n_workers, n_servers, timeout=120)

    model = _tiny_model()
    optimizer = _optimizer(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same reduction order. Adam turns rounding noise in the
    # (theoretically zero) gradient of the attention key bias into full-size steps.
    for step in range(STEPS):  # allreduce training: every worker's gradient, averaged in rank order
        for g in optimizer.param_groups:
            g["lr"] = LRS[step]
        grads = []
        for w in range(n_workers):
            optimizer.zero_grad()
            _loss(model, _batch(w, step)).backward()
            grads.append([p.grad.clone() for p in optimizer_params(optimizer)])
        for i, p in enumerate(optimizer_params(optimizer)):
            p.grad = grads[0][i].clone()
            for g in grads[1:]:
                p.grad.add_(g[i])
            p.grad.div_(n_workers)
        optimizer.step()
    torch.set_num_threads(threads)
    expected = optimizer_params(optimizer)
    expected_state = optimizer.state_dict()["state"]

    for res in out[n_servers:]:
        for got, want in zip(res["params"], expected, strict=True):
            torch.testing.assert_close(torch.from_numpy(got), want.detach(), rtol=0, atol=1e-5)
    got_state = out[n_servers]["state"]  # reassembled from both servers' shards
    assert got_state.keys() == expected_state.keys()
    for i, want in expected_state.items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            got = torch.from_numpy(np.asarray(got_state[i][k]))
            torch.testing.assert_close(got, want[k], rtol=0, atol=1e-6)

    # Traffic, exactly: a worker pushes S bytes of gradient (+ one header per server) and pulls S per step;
    # a server sends its shard to every worker per step.
    numel = sum(p.numel() for p in expected)
    S, header = 4 * numel, 8 * (2 + len(optimizer.param_groups))
    for res in out[n_servers:]:
        t = res["traffic"]
        assert t.steps == STEPS
        assert t.bytes_received == S * (STEPS + 1)  # + the initial pull
        assert t.bytes_sent == STEPS * (S + n_servers * header) + 2 * n_servers * header  # + STATE, DONE
    logs: list[ServerLog] = [res["log"] for res in out[:n_servers]]
    for s, log in enumerate(logs):
        lo, hi = shard_ranges(numel, n_servers)[s]
        assert [u.version for u in log.updates] == list(range(1, STEPS + 1))
        assert all(u.workers == list(range(n_servers, n_servers + n_workers)) for u in log.updates)
        assert log.max_staleness() == 0
        assert log.traffic.bytes_sent == 4 * (hi - lo) * n_workers * (STEPS + 1)


# --- asynchronous and bounded-staleness modes on linear regression ------------------------------------------

W_TRUE = torch.arange(1.0, 9.0)  # y = x . W_TRUE + 0.5
LINREG_STEPS = 40


def _linreg_loss(model: torch.nn.Linear, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(16, 8, generator=gen)
    return ((model(x).squeeze(-1) - (x @ W_TRUE + 0.5)) ** 2).mean()


def linreg_rank(n_servers: int, mode: str, tau: int | None) -> dict:
    hvd.init()
    rank = hvd.rank()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03)
    if rank < n_servers:
        return {"log": ParameterServer(optimizer, n_servers, mode, tau, timeout=TIMEOUT).serve()}
    worker = PSWorker(optimizer, n_servers, timeout=TIMEOUT)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(LINREG_STEPS):
        optimizer.zero_grad()
        _linreg_loss(model, gen).backward()
        if rank == n_servers:
            time.sleep(0.02)  # the first worker is slow: the others run ahead as far as the mode lets them
        worker.step()
    worker.close()
    with torch.no_grad():
        final = float(_linreg_loss(model, torch.Generator().manual_seed(999)))
    return {"final_loss": final}


@pytest.mark.parametrize("mode, tau", [("bounded", 2), ("async", None)])
def test_async_and_bounded_staleness_converge_and_bounded_respects_tau(mode, tau):
    n_servers, n_workers = 1, 3
    out = run(linreg_rank, n_servers + n_workers, n_servers, mode, tau, timeout=120)
    torch.manual_seed(0)
    with torch.no_grad():
        initial = float(_linreg_loss(torch.nn.Linear(8, 1), torch.Generator().manual_seed(999)))
    for res in out[n_servers:]:
        assert res["final_loss"] < 1e-4 * initial, (res["final_loss"], initial)
    log: ServerLog = out[0]["log"]
    assert len(log.updates) == n_workers * LINREG_STEPS  # every gradient applied, one step each
    assert [u.version for u in log.updates] == list(range(1, n_workers * LINREG_STEPS + 1))
    if mode == "bounded":
        assert log.max_gap() == tau  # never more than tau steps ahead of the slowest, and the bound was hit
        # Hence a gradient misses at most 2 tau + 1 steps of each other worker.
        assert log.max_staleness() <= (n_workers - 1) * (2 * tau + 1)
    else:
        assert log.max_gap() > 2  # without the bound, the fast workers drift ahead of the slow one


# --- failures ----------------------------------------------------------------------------------------------


def dying_worker_rank(n_servers: int, victim: int) -> None:
    hvd.init()
    rank = hvd.rank()
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    timeout = datetime.timedelta(seconds=3)
    if rank < n_servers:
        ParameterServer(optimizer, n_servers, "sync", timeout=timeout).serve()
        return
    worker = PSWorker(optimizer, n_servers, timeout=timeout)
    for step in range(1000):
        if rank == victim and step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        model(torch.randn(2, 4)).sum().backward()
        worker.step()


def test_a_dead_worker_makes_server_and_workers_fail_with_a_clear_error_in_bounded_time():
    n_servers, victim = 1, 2
    results = spawn(dying_worker_rank, 3, n_servers, victim, timeout=60)
    assert "exited with code -9" in results[victim].error
    server, survivor = results[0], results[1]
    assert "ParameterServerError" in server.error
    assert "waiting for a message from workers [1, 2]" in server.error
    assert "ParameterServerError" in survivor.error and "worker rank 1" in survivor.error
    assert max(server.seconds, survivor.seconds) < results[victim].seconds + 15
