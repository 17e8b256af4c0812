"""Pipeline parallelism (lmforge.parallel.pipeline) against single-process training (real gloo processes).

PP=2 runs the same global batch as one process (every stage of a replica sees the replica's batch); DPxPP=2x2
shards it over 2 replicas as data parallelism does, so one process on the 2x batch is the reference. fp32,
dropout 0: losses and final weights agree to 1e-5.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from parallel_helpers import run
from test_parallel_training import _torchrun_cli, cli_run  # noqa: F401 (a fixture)
from torch.distributed.tensor import DTensor

from lmforge.config import ModelConfig
from lmforge.data import TokenBlocks
from lmforge.models.decoder import Decoder
from lmforge.models.encoder import Encoder
from lmforge.objectives import CausalLM
from lmforge.parallel.pipeline import PipelineStrategy, parse_split, stage_layers
from lmforge.parallel.strategy import run_training
from lmforge.training import TrainConfig, latest_checkpoint, load_checkpoint, read_metrics, train

BATCH, STEPS, MICRO = 4, 5, 4


def _model(name: str, vocab: int | None = None) -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(name).replace(n_layer=4)
    if vocab is not None:
        cfg = cfg.replace(vocab_size=vocab)
    if name == "tiny-llama":
        cfg = cfg.replace(tie_embeddings=False)  # GPT-2 covers the tied head, Llama the untied one
    return Decoder(cfg)


def _data() -> TokenBlocks:
    gen = torch.Generator().manual_seed(1)
    return TokenBlocks(torch.randint(0, 128, (40, 16), generator=gen))


def _config(batch_size: int, **kw) -> TrainConfig:
    kw = {"max_steps": STEPS, "clip_norm": 0.5, **kw}
    return TrainConfig(lr=3e-3, batch_size=batch_size, warmup_steps=1, schedule="linear", progress=False,
                       log_every=1, eval_batch_size=3, **kw)


def _eval_data() -> TokenBlocks:
    gen = torch.Generator().manual_seed(2)
    return TokenBlocks(torch.randint(0, 128, (7, 16), generator=gen))  # batches of 3: the last one shorter


def _reference(name: str, batch_size: int, vocab: int | None = None,
               **kw) -> tuple[list[float], dict[str, torch.Tensor], dict]:
    """One process, one thread (as the ranks), on the global batch; its losses, weights and evaluation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model(name, vocab)
        result = train(model, CausalLM(), _data(), _config(batch_size, **kw), eval_data=_eval_data())
    finally:
        torch.set_num_threads(threads)
    return [r["loss"] for r in result.history if r["split"] == "train"], model.state_dict(), result.eval_metrics


def _assert_same(actual: dict[str, np.ndarray], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for k in expected:
        torch.testing.assert_close(torch.from_numpy(actual[k]), expected[k], rtol=0, atol=1e-5,
                                   msg=lambda m, k=k: f"{what}: {k}: {m}")


# --- ranks ----------------------------------------------------------------------------------------------


def pipeline_rank(runs: list[tuple[str, str, dict]], pp: int, tp: int = 1) -> dict[str, dict]:
    """Train each (model, schedule, config overrides) under PipelineStrategy; return each run's losses, the
    whole model (`full_model`), and this rank's own stage parameters after the last step (tensor-parallel
    ones gathered over the stage's tp ranks)."""
    from lmforge.parallel.sharded_checkpoint import full_state_dict
    from lmforge.parallel.tensor_parallel import fused_rows

    out = {}
    for name, schedule, kw in runs:
        strategy = PipelineStrategy(pp=pp, tp=tp, schedule=schedule, microbatches=MICRO)
        model = _model(name)
        fused = fused_rows(model)
        own = {}

        def on_step(step: int, record: dict, strategy=strategy, own=own, fused=fused) -> None:
            if step == STEPS:
                own.update({k: v.numpy().copy() for stage in strategy.stages
                            for k, v in full_state_dict(stage, fused).items()})

        result = run_training(model, CausalLM(), _data(), _config(BATCH, **kw), strategy, on_step=on_step,
                              eval_data=_eval_data())
        # The rank holds only its stage: every other parameter of the model was moved to the meta device.
        held = sum(p.numel() for p in model.parameters() if p.device.type != "meta")
        assert held == sum(p.numel() for p in strategy.stage.parameters()) < sum(p.numel() for p in
                                                                                  model.parameters())
        out[f"{name}/{schedule}"] = {
            "losses": [r["loss"] for r in result.history if r["split"] == "train"], "own": own,
            "eval": result.eval_metrics,
            "model": {k: v.detach().numpy().copy() for k, v in strategy.full_model(model).state_dict().items()},
            "stage": strategy.stage_index, "dp": strategy.rank,
            "tensor_parallel": sum(isinstance(p, DTensor) for p in strategy.stage.parameters())}
    return out


def _check(results: list[dict], key: str, reference: tuple) -> None:
    """Every rank: the whole model (gathered) and its own stage's parameters equal the reference's, and so
    does the final evaluation (the stages run in turn); rank 0 logged the reference's losses."""
    losses, state, eval_metrics = reference
    np.testing.assert_allclose(results[0][key]["losses"], losses, rtol=0, atol=1e-5, err_msg=key)
    for r, res in enumerate(results):
        assert res[key]["eval"]["tokens"] == eval_metrics["tokens"] == 7 * 15, key
        assert res[key]["eval"]["loss"] == pytest.approx(eval_metrics["loss"], abs=1e-5), key
        _assert_same(res[key]["model"], state, f"{key} rank {r}")
        own = res[key]["own"]  # this stage's blocks only; a tied head's copy is checked on both stages
        assert own and len(own) < len(state), key
        for k in own:
            torch.testing.assert_close(torch.from_numpy(own[k]), state[k], rtol=0, atol=1e-5,
                                       msg=lambda m, k=k, r=r: f"{key} rank {r} own {k}: {m}")


# --- tests ----------------------------------------------------------------------------------------------


def test_pipeline_pp2_gpipe_1f1b_and_interleaved_equal_single_process():
    """GPT-2 (tied head) and Llama (untied), every schedule (interleaved: 4 stages, 2 per rank); gradient
    accumulation in some."""
    runs = [("tiny-gpt2", "gpipe", {}), ("tiny-gpt2", "1f1b", {"grad_accum": 2}),
            ("tiny-llama", "gpipe", {"grad_accum": 2}), ("tiny-llama", "1f1b", {}),
            ("tiny-gpt2", "interleaved-1f1b", {})]
    results = run(pipeline_rank, 2, runs, 2, timeout=180)
    assert [results[r]["tiny-gpt2/gpipe"]["stage"] for r in range(2)] == [0, 1]
    for name, schedule, kw in runs:
        _check(results, f"{name}/{schedule}", _reference(name, BATCH, **kw))


def test_dp_x_pp_2x2_equals_single_process_on_the_global_batch():
    runs = [("tiny-gpt2", "1f1b", {}), ("tiny-llama", "gpipe", {}), ("tiny-llama", "interleaved-1f1b", {})]
    results = run(pipeline_rank, 4, runs, 2, timeout=180)
    assert [(results[r]["tiny-gpt2/1f1b"]["dp"], results[r]["tiny-gpt2/1f1b"]["stage"]) for r in range(4)] == \
        [(0, 0), (0, 1), (1, 0), (1, 1)]
    for name, schedule, kw in runs:
        _check(results, f"{name}/{schedule}", _reference(name, 2 * BATCH, **kw))


def test_pp_x_tp_2x2_equals_single_process():
    """PP x TP: each stage's modules tensor-parallel over its 2 ranks (the vocabulary-parallel embedding on the
    first stage, head and loss on the last; GPT-2's tied embedding and head summed shard by shard)."""
    runs = [("tiny-gpt2", "1f1b", {"grad_accum": 2}), ("tiny-llama", "gpipe", {})]
    results = run(pipeline_rank, 4, runs, 2, 2, timeout=240)
    assert [(results[r]["tiny-gpt2/1f1b"]["stage"], results[r]["tiny-gpt2/1f1b"]["dp"]) for r in range(4)] == \
        [(0, 0), (0, 0), (1, 0), (1, 0)]
    assert all(res["tiny-gpt2/1f1b"]["tensor_parallel"] > 0 for res in results)
    for name, schedule, kw in runs:
        _check(results, f"{name}/{schedule}", _reference(name, BATCH, **kw))


@pytest.mark.slow
def test_dp_x_pp_x_tp_2x2x2_equals_single_process_on_the_global_batch():
    """8 ranks (about 30 s on 2 busy cores): 2 replicas of a 2-stage pipeline whose stages are tensor-parallel
    over 2 ranks; GPT-2's tied head makes every reduction run (tie over the stage ends, tp shards, dp)."""
    runs = [("tiny-gpt2", "1f1b", {})]
    results = run(pipeline_rank, 8, runs, 2, 2, timeout=300)
    assert [(res["tiny-gpt2/1f1b"]["dp"], res["tiny-gpt2/1f1b"]["stage"]) for res in results] == \
        [(0, 0), (0, 0), (0, 1), (0, 1), (1, 0), (1, 0), (1, 1), (1, 1)]
    _check(results, "tiny-gpt2/1f1b", _reference("tiny-gpt2", 2 * BATCH))


def checkpoint_rank(run_dir: str, precision: str, tp: int = 1, resume: bool = False, vocab: int | None = None) -> dict:
    """pp2 (x tp) 1f1b training with checkpoints every 3 steps (resumed from the latest one with `resume`);
    the logged losses and the whole trained model (`vocab`: the model's vocabulary size)."""
    strategy = PipelineStrategy(pp=2, tp=tp, schedule="1f1b", microbatches=2)
    config = _config(BATCH, max_steps=STEPS if precision == "fp32" else 3, run_dir=run_dir, precision=precision,
                     save_every=3, keep_last=3)
    model = _model("tiny-gpt2", vocab)
    result = run_training(model, CausalLM(), _data(), config, strategy, resume=resume)
    return {"losses": [r["loss"] for r in result.history],
            "model": {k: v.numpy().copy() for k, v in strategy.full_model(model).state_dict().items()}}


@pytest.mark.parametrize("tp", [1, 2])
def test_a_pipeline_checkpoint_resumes_in_one_process_on_the_same_curve(tmp_path, tp):
    """The pipeline's checkpoint is the single-process format (model and optimizer state gathered from the
    stages, tensor-parallel shards gathered in the model's row order): one process resumes its step-3
    checkpoint and ends where 5 uninterrupted single-process steps end. pp2 x tp2, on a vocabulary of 129 that
    tp 2 pads to 130 rows (the checkpoint holds the 129 real ones), also resumes it itself (the single-process
    tensors padded and sharded again, optimizer state included)."""
    vocab = 129 if tp > 1 else None
    run(checkpoint_rank, 2 * tp, str(tmp_path / "run"), "fp32", tp, False, vocab, timeout=180)
    shutil.rmtree(latest_checkpoint(tmp_path / "run"))  # as if killed after step 3's checkpoint
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"
    model_state, _ = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert model_state["embed_tokens.weight"].shape[0] == (vocab or 128)
    losses, state, _ = _reference("tiny-gpt2", BATCH, vocab)
    if tp > 1:
        for res in run(checkpoint_rank, 2 * tp, str(tmp_path / "run"), "fp32", tp, True, vocab, timeout=180):
            _assert_same(res["model"], state, "pp2 x tp2 resumed")
        np.testing.assert_allclose(res["losses"], losses[3:], rtol=0, atol=1e-5)  # (logged on every rank)
        shutil.rmtree(latest_checkpoint(tmp_path / "run"))
    torch.set_num_threads(1)
    model = _model("tiny-gpt2", vocab)
    result = train(model, CausalLM(), _data(), _config(BATCH, run_dir=str(tmp_path / "run")), resume=True)
    np.testing.assert_allclose([r["loss"] for r in result.history], losses[3:], rtol=0, atol=1e-5)
    _assert_same({k: v.numpy() for k, v in model.state_dict().items()}, state, "resumed")


def test_pipeline_bf16_autocast_follows_single_process_bf16(tmp_path):
    losses = run(checkpoint_rank, 2, str(tmp_path / "run"), "bf16", timeout=120)[0]["losses"]
    expected = _reference("tiny-gpt2", BATCH, max_steps=3, precision="bf16")[0]
    # bf16 rounding of activations sent between stages matches the single process's (same ops, same casts);
    # what remains is the order of bf16 accumulation across micro-batches.
    np.testing.assert_allclose(losses, expected, rtol=0, atol=5e-4)  # measured: 8.3e-5


def _assert_same_but_key_bias(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    """1e-5, but 1e-4 for the attention key bias: its gradient is zero in exact arithmetic (softmax ignores a
    shift shared by every key), so Adam turns rounding noise, which differs between one process and two
    stages, into steps of up to lr = 1e-2 (the same allowance as the tensor-parallel CLI test)."""
    got = dict(got)
    d = ModelConfig.from_name("tiny-gpt2").d_model  # key rows of qkv: [d, 2d) (multi-head attention)
    for name in [k for k in want if k.endswith("attn.qkv.bias")]:
        torch.testing.assert_close(got[name][d:2 * d], want[name][d:2 * d], rtol=0, atol=1e-4)
        got[name] = torch.cat([got[name][:d], want[name][d:2 * d], got[name][2 * d:]])
    _assert_same({k: v.numpy() for k, v in got.items()}, want, what)


@pytest.mark.slow
def test_cli_train_pipeline_under_torchrun_equals_the_single_process_run(cli_run, tmp_path):  # noqa: F811
    """`torchrun --nproc-per-node 2 -m lmforge.cli train --strategy ddp --pp 2 --pp-schedule gpipe
    --microbatches 2`: the checkpoint (model and optimizer state gathered from the stages, evaluation run
    through the stages) and the HF folder rank 0 saves equal the single-process run's."""
    from lmforge.io import load_model

    arguments, single = cli_run
    _torchrun_cli([*arguments(4, tmp_path / "pp"), "--strategy", "ddp", "--pp", "2", "--pp-schedule", "gpipe",
                   "--microbatches", "2"])
    got_model, got = load_checkpoint(latest_checkpoint(tmp_path / "pp"))
    want_model, want = load_checkpoint(latest_checkpoint(single))
    _assert_same_but_key_bias(got_model, want_model, "checkpoint")
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
    for i, state in want["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(got["optimizer"]["state"][i][k], state[k], rtol=0, atol=1e-6)
    _assert_same_but_key_bias(load_model(str(tmp_path / "pp" / "model")).state_dict(),
                              load_model(str(single / "model")).state_dict(), "HF folder")
    pp_eval = [r for r in read_metrics(tmp_path / "pp") if r["split"] == "eval"]
    one_eval = [r for r in read_metrics(single) if r["split"] == "eval"]
    assert pp_eval[-1]["tokens"] == one_eval[-1]["tokens"]
    assert pp_eval[-1]["loss"] == pytest.approx(one_eval[-1]["loss"], abs=1e-5)


# --- the split and bad input (no processes) ----------------------------------------------------------------


def test_stage_layers_balances_parameters_and_takes_a_given_split():
    model = Decoder(ModelConfig.from_name("tiny-gpt2").replace(n_layer=8, vocab_size=4096))
    # A large embedding (and head, tied) weigh on the first and last stage: the middle takes more layers.
    ranges = stage_layers(model, 3)
    assert [len(r) for r in ranges] == [1, 6, 1], ranges
    assert [len(r) for r in stage_layers(Decoder(ModelConfig.from_name("tiny-gpt2").replace(n_layer=8)), 2)] \
        == [4, 4]
    assert stage_layers(model, 2, [3, 5]) == [range(0, 3), range(3, 8)]
    assert parse_split("3,5") == [3, 5]


@pytest.mark.parametrize("text", ["3,x", "0,8", ""])
def test_parse_split_names_the_bad_text(text):
    with pytest.raises(ValueError, match="pipeline split"):
        parse_split(text)


def test_bad_splits_and_models_are_refused_with_clear_errors():
    model = _model("tiny-gpt2")
    with pytest.raises(ValueError, match="must give 2 positive layer counts summing to 4"):
        stage_layers(model, 2, [1, 2])
    with pytest.raises(ValueError, match="cannot split 4 layers into 5"):
        stage_layers(model, 5)
    with pytest.raises(ValueError, match="Encoder has none"):
        stage_layers(Encoder(ModelConfig.from_name("tiny-bert")), 2)


def test_check_run_refuses_what_the_pipeline_cannot_run():
    strategy = PipelineStrategy.__new__(PipelineStrategy)  # check_run reads only the micro-batch count
    strategy.microbatches = 4
    for kw, match in [({"batch_size": 6}, "batch_size 6 must be a multiple of the pipeline's 4"),
                      ({"compile": True}, "torch.compile"), ({"precision": "fp16"}, "use bf16")]:
        with pytest.raises(ValueError, match=match):
            strategy.check_run(_config(**{"batch_size": 4, **kw}), has_eval=False)


@pytest.mark.parametrize(("kw", "match"), [({"schedule": "zb"}, "unknown pipeline schedule 'zb'"),
                                           ({"microbatches": 0}, "microbatches must be >= 1"),
                                           ({"microbatches": 1}, "1f1b schedule needs at least as many"),
                                           ({"schedule": "interleaved-1f1b", "microbatches": 5},
                                            "a multiple of max"),
                                           ({"schedule": "interleaved-1f1b", "stages_per_rank": 1},
                                            "stages_per_rank >= 2")])
def test_bad_schedules_are_refused_before_joining_a_group(kw, match):
    with pytest.raises(ValueError, match=match):
        PipelineStrategy(**{"pp": 2, "schedule": "1f1b", "microbatches": 4, **kw})
