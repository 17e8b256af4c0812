"""lmforge.parallel.elastic (Horovod's elastic API) under real processes (gloo, CPU), and under torchrun restarts.

Training is data parallel (each rank a shard of a deterministic global batch, SGD with momentum through the
DistributedOptimizer); its reference is one process training on the whole batch, which equal shards match
within 1e-5. A failure in the middle (simulated in-process, or a rank killed under torchrun --max-restarts)
must leave the same final parameters, resumed from the last commit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from parallel_helpers import Phase, phase_tests
from torch import nn

import lmforge.parallel as hvd

BATCHES = 6
SHARD = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))


def _batch(i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + i)
    return torch.randn(n * SHARD, 5, generator=g), torch.randn(n * SHARD, 2, generator=g)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _reference(n: int) -> nn.Module:
    model = _model()
    opt = _sgd(model)
    for i in range(BATCHES):
        x, y = _batch(i, n)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model


def _train(state: hvd.elastic.TorchState, fail: Callable[[int], None]) -> None:
    """The loop a Horovod program writes: one step per batch, a commit after each."""
    n, r = hvd.size(), hvd.rank()
    while state.batch < BATCHES:
        x, y = _batch(state.batch, n)
        F.mse_loss(state.model(x[r * SHARD: (r + 1) * SHARD]), y[r * SHARD: (r + 1) * SHARD]).backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        state.batch += 1
        state.commit()
        fail(state.batch)


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


# --- checks run inside every rank ---------------------------------------------------------------------------


def check_state(n: int, r: int) -> None:
    """commit / restore / sync of a model, an optimizer and plain attributes, as Horovod's TorchState."""
    torch.manual_seed(r)  # a different model on every rank
    model = nn.Linear(3, 2)
    opt = _sgd(model)
    state = hvd.elastic.TorchState(model, opt, epoch=r, names=["a"])
    state.sync()  # rank 0's everything
    assert state.epoch == 0 and hvd.allgather_object(model.weight.sum().item()) == [model.weight.sum().item()] * n
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state.epoch, state.names = 1, ["a", "b"]
    state.commit()
    committed = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state.epoch = 2
    state.names.append("c")
    state.restore()
    assert state.epoch == 1 and state.names == ["a", "b"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), committed, strict=True))
    momentum = opt.state[model.weight]["momentum_buffer"]
    assert momentum is not None and torch.isfinite(momentum).all()
    calls: list[int] = []
    state.register_reset_callbacks([lambda: calls.append(1)])
    state.on_reset()
    assert calls == [1]


def check_run_resets_on_internal_error(n: int, r: int) -> None:
    """A HorovodInternalError after the 3rd commit: run restores the commit, re-initializes, calls the reset
    callbacks and calls the function again; the result is the training without the failure."""
    model = _model()
    opt = hvd.DistributedOptimizer(_sgd(model), model.named_parameters())
    state = hvd.elastic.TorchState(model, opt, batch=0)
    resets: list[int] = []
    state.register_reset_callbacks([lambda: resets.append(hvd.size())])
    failed: list[int] = []

    def fail(batch: int) -> None:
        if batch == 3 and not failed:
            failed.append(batch)
            model[0].weight.data.add_(100.0)  # damage after the commit: restore() must undo it
            raise hvd.HorovodInternalError("simulated peer failure")

    hvd.elastic.run(_train)(state, fail)
    assert resets == [n] and state.batch == BATCHES and hvd.is_initialized()
    diff = _max_diff(model, _reference(n))
    assert diff <= 1e-5, f"max |elastic - single process| = {diff:.3g}"
    with pytest.raises(hvd.CollectiveMismatchError):  # a program bug is raised, not retried
        hvd.elastic.run(lambda s: hvd.allreduce(torch.ones(2 + r), name="x"))(state)
    with pytest.raises(TypeError, match="elastic State"):
        hvd.elastic.run(_train)(model)


def check_durable_commit_scope(n: int, r: int) -> None:
    """LMFORGE_ELASTIC_DIR is read only after a torchrun restart, and only for the same job."""
    folder = hvd.broadcast_object(tempfile.mkdtemp() if r == 0 else None)
    env = {"LMFORGE_ELASTIC_DIR": folder, "TORCHELASTIC_RUN_ID": "job1", "TORCHELASTIC_RESTART_COUNT": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        state = hvd.elastic.ObjectState(batch=0)
        state.batch = 5
        state.commit()
        hvd.barrier()  # the file is written
        start = hvd.elastic.run(lambda s: s.batch)
        assert start(hvd.elastic.ObjectState(batch=0)) == 0  # a first attempt never reads the folder
        os.environ["TORCHELASTIC_RESTART_COUNT"] = "1"
        assert start(hvd.elastic.ObjectState(batch=0)) == 5  # a restart of the same job resumes
        os.environ["TORCHELASTIC_RUN_ID"] = "job2"
        assert start(hvd.elastic.ObjectState(batch=0)) == 0  # another job's commit is ignored
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        hvd.barrier()
        if r == 0:
            shutil.rmtree(folder)


CHECKS: list[Callable[[int, int], None]] = [check_state, check_run_resets_on_internal_error,
                                            check_durable_commit_scope]
PHASES = [Phase("default", CHECKS, {"timeout": 30}, {"LMFORGE_CHECK_COLLECTIVES": "", "LMFORGE_ELASTIC_DIR": ""})]


reports, test_elastic = phase_tests(PHASES, [2, 3], timeout=120)


# --- torchrun --max-restarts: a killed rank, the job resumes from the last durable commit -------------------

RESTART_SCRIPT = """
import json, os, signal, sys
sys.path.insert(0, {tests!r})
import test_parallel_elastic as t
import lmforge.parallel as hvd

hvd.init(timeout=10)
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
model = t._model()
opt = hvd.DistributedOptimizer(t._sgd(model), model.named_parameters())
state = hvd.elastic.TorchState(model, opt, batch=0)
started = []

def fail(batch):
    if attempt == 0 and hvd.rank() == 1 and batch == 4:
        os.kill(os.getpid(), signal.SIGKILL)

@hvd.elastic.run
def train(state):
    started.append(state.batch)
    t._train(state, fail)

train(state)
if hvd.rank() == 0:
    out = os.path.join(sys.argv[1], f"attempt{{attempt}}")
    torch_params = [p.detach().tolist() for p in model.parameters()]
    with open(out + ".json", "w") as f:
        json.dump({{"started": started, "params": torch_params}}, f)
"""


@pytest.mark.slow
def test_torchrun_restart_resumes_from_the_last_commit(tmp_path: Path) -> None:
    script = tmp_path / "elastic_script.py"
    script.write_text(RESTART_SCRIPT.format(tests=str(Path(__file__).parent)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "2", str(script), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", LMFORGE_ELASTIC_DIR=str(tmp_path / "commits"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "attempt0.json").exists()  # rank 1 died after the 4th commit
    finished = sorted(tmp_path.glob("attempt*.json"))
    assert len(finished) == 1, finished
    result = json.loads(finished[0].read_text())
    assert result["started"] == [4], result["started"]  # resumed after the 4th batch, not from the start
    model = _model()
    with torch.no_grad():
        for p, values in zip(model.parameters(), result["params"], strict=True):
            p.copy_(torch.tensor(values))
    diff = _max_diff(model, _reference(2))
    assert diff <= 1e-5, f"max |restarted elastic run - single process| = {diff:.3g}"
