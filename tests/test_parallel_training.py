"""The training loop under the distributed strategies (real processes, gloo, CPU).

Data-parallel training with N ranks of batch b is single-process training on the concatenated batch N*b: the
loop's sampler gives rank r the r-th of every N consecutive batch-sized slices of one seeded permutation, so
the single process sees exactly the ranks' batches side by side.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from parallel_helpers import run, spawn

from lmforge.config import ModelConfig
from lmforge.data import TokenBlocks
from lmforge.models.decoder import Decoder
from lmforge.objectives import CausalLM
from lmforge.parallel.strategy import PSStrategy, make_strategy, run_training
from lmforge.training import TrainConfig, latest_checkpoint, load_checkpoint, read_metrics, train

BATCH, STEPS = 2, 4


def _model() -> Decoder:
    torch.manual_seed(0)
    return Decoder(ModelConfig.from_name("tiny-gpt2"))


def _data() -> TokenBlocks:
    gen = torch.Generator().manual_seed(1)
    return TokenBlocks(torch.randint(0, 128, (24, 16), generator=gen))


def _config(batch_size: int, clip: float | None, **kw) -> TrainConfig:
    kw = {"max_steps": STEPS, **kw}
    return TrainConfig(lr=3e-3, batch_size=batch_size, warmup_steps=1, schedule="linear", clip_norm=clip,
                       progress=False, log_every=1, **kw)


def _reference(world: int, clip: float | None, grad_accum: int = 1) -> dict[str, torch.Tensor]:
    """Single-process training on the concatenated batch, on one thread as the ranks (the same rounding: Adam
    turns noise in the theoretically zero gradient of the attention key bias into full-size steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        train(model, CausalLM(), _data(), _config(BATCH * world, clip, grad_accum=grad_accum))
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
        run_training(model, CausalLM(), _data(), _config(BATCH, clip, grad_accum=2), strategy)
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
    """With gradient clipping (of the averaged gradient) and 2 micro-batches per step (one reduction)."""
    world = 2
    results = run(data_parallel_rank, world, ["allreduce", "ddp"], 0.5, timeout=120)
    expected = _reference(world, 0.5, grad_accum=2)
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


# --- failures: a dead rank, and torchrun --max-restarts resuming from the checkpoint ------------------------


def dying_rank(victim: int, kill_at: int) -> None:
    strategy = make_strategy("allreduce", timeout=10.0)

    def on_step(step: int, record: dict) -> None:
        if strategy.rank == victim and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    run_training(_model(), CausalLM(), _data(), _config(BATCH, 0.5, max_steps=50), strategy, on_step=on_step)


def test_a_dead_rank_makes_the_others_fail_with_a_clear_error_in_bounded_time():
    results = spawn(dying_rank, 2, 1, 2, timeout=60)
    assert "exited with code -9" in results[1].error
    assert "CollectiveError" in results[0].error and "rank" in results[0].error, results[0].error
    assert results[0].seconds < results[1].seconds + 15


RESTART_SCRIPT = """
import json, os, signal, sys
sys.path.insert(0, {tests!r})
import test_parallel_training as t
from lmforge.objectives import CausalLM
from lmforge.parallel.strategy import make_strategy, restart_count, run_training

run_dir, kill_at = sys.argv[1], int(sys.argv[2])
strategy = make_strategy("allreduce")

def on_step(step, record):
    if restart_count() == 0 and strategy.rank == 1 and step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

config = t._config(t.BATCH, 0.5, run_dir=run_dir, save_every=2)
result = run_training(t._model(), CausalLM(), t._data(), config, strategy, on_step=on_step)
if strategy.is_main:
    first = result.history[0]["step"]
    with open(os.path.join(run_dir, f"attempt{{restart_count()}}.json"), "w") as f:
        json.dump({{"first_step": first, "last_step": result.step}}, f)
"""


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_from_the_last_checkpoint(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(RESTART_SCRIPT.format(tests=str(Path(__file__).parent)))
    run_dir = tmp_path / "run"
    # Two restarts allowed: gloo occasionally aborts a rank while the first restart re-forms the group (seen
    # once in 7 runs this session); the property tested is that the run that finishes resumes after step 2.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "2", str(script), str(run_dir), "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The first attempt died at step 3 (rank 1 killed) and wrote nothing; the restart resumed after step 2.
    assert not (run_dir / "attempt0.json").exists()
    finished = sorted(run_dir.glob("attempt*.json"))
    assert len(finished) == 1, finished
    assert json.loads(finished[0].read_text()) == {"first_step": 3, "last_step": STEPS}
    steps = [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert steps == list(range(1, STEPS + 1))  # one record per step: the dead attempt's step 3 was dropped
    model_state, _ = load_checkpoint(latest_checkpoint(run_dir))
    _assert_same(_plain(model_state), _reference(2, 0.5))


# --- the command line under torchrun ------------------------------------------------------------------------


def _cli_fixtures(root: Path) -> tuple[Path, Path]:
    """A tiny GPT-2 folder (random weights, a letter-level WordPiece vocabulary of 57 tokens, the model's: a
    vocabulary that tensor parallelism of degree 2 pads) and a small corpus."""
    import random
    import string

    from lmforge.io import save_model

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *("##" + c for c in string.ascii_lowercase)]
    torch.manual_seed(0)
    save_model(Decoder(ModelConfig.from_name("tiny-gpt2", vocab_size=len(vocab))), root / "tiny-gpt2")
    (root / "tiny-gpt2" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away"]
    (root / "corpus").mkdir()
    for i in range(4):
        (root / "corpus" / f"{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(60)))
    return root / "tiny-gpt2", root / "corpus"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The CLI's `train` arguments for a batch size and run folder, and the single-process run with batch 4."""
    from lmforge.cli import main

    root = tmp_path_factory.mktemp("cli")
    model_dir, corpus = _cli_fixtures(root)

    def arguments(batch_size: int, run_dir: Path) -> list[str]:
        return ["train", "--model", str(model_dir), "--data", str(corpus), "--batch-size", str(batch_size),
                "--block-size", "16", "--steps", "4", "--save-every", "2", "--log-every", "1", "--lr", "1e-2",
                "--run-dir", str(run_dir)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (see _reference)
    try:
        assert main(arguments(4, root / "one")) == 0
    finally:
        torch.set_num_threads(threads)
    return arguments, root / "one"


def _torchrun_cli(arguments: list[str], nproc: int = 2) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
           "lmforge.cli", *arguments]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 4


def _assert_same_checkpoint(got_dir: Path, want_dir: Path) -> None:
    got_model, got = load_checkpoint(latest_checkpoint(got_dir))
    want_model, want = load_checkpoint(latest_checkpoint(want_dir))
    _assert_same(_plain(got_model), want_model)
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
    for i, state in want["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(got["optimizer"]["state"][i][k], state[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_cli_train_strategy_ps_under_torchrun_equals_the_single_process_run(cli_run, tmp_path):
    """`torchrun --nproc-per-node 2 -m lmforge.cli train --strategy ps`: one server, one worker, checkpoints
    whose optimizer state the worker gathers from the server; the same run in one process gives the same."""
    arguments, single = cli_run
    _torchrun_cli([*arguments(4, tmp_path / "ps"), "--strategy", "ps"])
    _assert_same_checkpoint(tmp_path / "ps", single)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["allreduce", "ddp"])
def test_cli_train_data_parallel_under_torchrun_equals_the_single_process_run(strategy, cli_run, tmp_path):
    """`torchrun --nproc-per-node 2 -m lmforge.cli train --strategy allreduce|ddp --batch-size 2`: two ranks of
    batch 2 end with the weights and optimizer state of one process with batch 4 (the ranks' batches side by
    side)."""
    arguments, single = cli_run
    _torchrun_cli([*arguments(2, tmp_path / strategy), "--strategy", strategy])
    _assert_same_checkpoint(tmp_path / strategy, single)


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "batch_size", "layout"),
                         [(2, 4, ["--strategy", "ddp", "--tp", "2", "--activation-checkpointing"]),
                          (4, 2, ["--strategy", "fsdp", "--tp", "2"])], ids=["tp2", "fsdp2xtp2"])
def test_cli_train_tensor_parallel_under_torchrun_saves_the_single_process_model(cli_run, tmp_path, nproc,
                                                                                 batch_size, layout):
    """`torchrun --nproc-per-node 2 -m lmforge.cli train --strategy ddp --tp 2 --activation-checkpointing`, and
    2-D FSDP x TP on 4 ranks (`--strategy fsdp --tp 2`, batch 2 per data-parallel rank), on a vocabulary of 57
    (padded to 58 rows while sharded): the HF folder rank 0 gathers and saves at the end holds the
    single-process run's weights, 57 rows, and loads in transformers with the same logits; `lmforge export` of
    the last sharded checkpoint gives the same folder."""
    import transformers

    from lmforge.cli import main
    from lmforge.io import load_model

    arguments, single = cli_run
    _torchrun_cli([*arguments(batch_size, tmp_path / "tp"), *layout], nproc)
    trained = load_model(str(tmp_path / "tp" / "model"))
    got = trained.state_dict()
    want = load_model(str(single / "model")).state_dict()
    assert got["embed_tokens.weight"].shape == (57, 32)
    assert main(["export", str(latest_checkpoint(tmp_path / "tp")), str(tmp_path / "export")]) == 0
    exported = load_model(str(tmp_path / "export")).state_dict()
    assert exported.keys() == got.keys() and all(torch.equal(exported[k], got[k]) for k in got)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tp" / "model").eval()
    assert hf.config.vocab_size == 57
    ids = torch.randint(0, 57, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, trained.eval()(ids).logits, rtol=0, atol=1e-4)
    # The key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by every key), so
    # Adam turns its rounding noise, which differs between one process and two shards, into steps of up to
    # lr = 1e-2: those rows are held to 1e-4, everything else to 1e-5.
    d = _model().config.d_model  # key rows of qkv: [d, 2d) (multi-head attention)
    for name in [k for k in want if k.endswith("attn.qkv.bias")]:
        torch.testing.assert_close(got[name][d:2 * d], want[name][d:2 * d], rtol=0, atol=1e-4)
        got[name][d:2 * d] = want[name][d:2 * d]
    _assert_same(_plain(got), want)
