"""Model parallelism on real gloo ranks: tensor parallel, FSDP and DP x TP training equal one process.

Every layout trains the same tiny GPT-2- or Llama-shaped model on the same global batch of 4 sequences for 5
steps (fp32, gradient clipping, 2 micro-batches per step) and must give one process's losses and final weights
(1e-5). Tensor-parallel ranks see the whole batch; data-parallel ranks see their slice of it.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from parallel_helpers import run, spawn

from lmforge.config import ModelConfig
from lmforge.data import MaskedBlocks, TokenBlocks
from lmforge.models import build_model
from lmforge.objectives import CausalLM, MaskedLM
from lmforge.training import TrainConfig, train

GLOBAL_BATCH, STEPS = 4, 5


def _model(name: str, sizes: dict | None = None):
    torch.manual_seed(0)
    return build_model(ModelConfig.from_name(name, **(sizes or {})))


def _data(name: str = "tiny-gpt2", vocab: int = 128) -> TokenBlocks | MaskedBlocks:
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(5, vocab, (40, 16), generator=gen)
    return MaskedBlocks(blocks, mask_id=4, vocab_size=vocab, special_ids=[0, 1, 2, 3, 4]) if "bert" in name \
        else TokenBlocks(blocks)


def _objective(name: str) -> CausalLM | MaskedLM:
    return MaskedLM() if "bert" in name else CausalLM()


def _config(batch_size: int, **kw) -> TrainConfig:
    kw = {"max_steps": STEPS, "grad_accum": 2, **kw}
    return TrainConfig(lr=1e-3, batch_size=batch_size, warmup_steps=1, schedule="linear", clip_norm=0.5,
                       progress=False, log_every=1, **kw)


def _plain(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def _reference(name: str, sizes: dict | None = None, model_out: list | None = None,
               **kw) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, one thread (as the ranks), the global batch (`model_out` receives the trained model)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model(name, sizes)
        data = _data(name, model.config.vocab_size)
        result = train(model, _objective(name), data, _config(GLOBAL_BATCH // 2, **kw))
    finally:
        torch.set_num_threads(threads)
    if model_out is not None:
        model_out.append(model)
    return [r["loss"] for r in result.history], model.state_dict()


def _assert_same(losses: list[float], state: dict[str, np.ndarray], want_losses: list[float],
                 want_state: dict[str, torch.Tensor]) -> None:
    np.testing.assert_allclose(losses, want_losses, rtol=0, atol=1e-5)
    assert state.keys() == want_state.keys()
    for k, want in want_state.items():
        torch.testing.assert_close(torch.from_numpy(state[k]), want, rtol=0, atol=1e-5,
                                   msg=lambda m, k=k: f"{k}: {m}")


# --- ranks ----------------------------------------------------------------------------------------------


def layout_rank(name: str, layouts: list[tuple[str, int, int, bool, bool]], precision: str = "fp32",
                sizes: dict | None = None) -> dict:
    """Train once per (strategy, dp, tp, sequence_parallel, activation_checkpointing) in one process group;
    return each run's logged losses and the gathered final weights. A padded vocabulary's padded rows are
    poisoned (`_poison_padding`)."""
    from lmforge.parallel.strategy import make_strategy, run_training

    out = {}
    for strategy_name, dp, tp, sp, ac in layouts:
        strategy = make_strategy(strategy_name, dp=dp, tp=tp, sequence_parallel=sp, activation_checkpointing=ac)
        shard = strategy.shard
        strategy.shard = lambda model, shard=shard: _poison_padding(shard(model))
        model = _model(name, sizes)
        if strategy.global_rank == 1:
            with torch.no_grad():  # another start on rank 1: the strategy must start every rank from rank 0's
                for p in model.parameters():
                    p.add_(1.0)
        config = _config(GLOBAL_BATCH // 2 // dp, precision=precision)
        result = run_training(model, _objective(name), _data(name, model.config.vocab_size), config, strategy)
        out[(strategy_name, dp, tp, sp, ac)] = ([r["loss"] for r in result.history],
                                                _plain(strategy.full_model(model).state_dict()))
    return out


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_tensor_parallel_and_fsdp_on_two_ranks_equal_one_process(name):
    layouts = [("ddp", 1, 2, False, False), ("ddp", 1, 2, True, True), ("fsdp", 2, 1, False, False),
               ("fsdp", 2, 1, False, True)]
    results = run(layout_rank, 2, name, layouts, timeout=240)
    want_losses, want_state = _reference(name)
    for layout in layouts:
        for rank in range(2):
            _assert_same(*results[rank][layout], want_losses, want_state)


def test_tensor_parallel_bert_masked_lm_on_two_ranks_equals_one_process():
    """The encoder family: post-norm blocks, token types, the MLM head's vocabulary-parallel decoder (tied, with
    a bias), on a vocabulary of 127 that tp 2 pads (the padded weight row and bias poisoned)."""
    layouts = [("ddp", 1, 2, False, False), ("ddp", 1, 2, True, False)]
    results = run(layout_rank, 2, "tiny-bert", layouts, "fp32", {"vocab_size": 127}, timeout=240)
    want_losses, want_state = _reference("tiny-bert", {"vocab_size": 127})
    for layout in layouts:
        for rank in range(2):
            _assert_same(*results[rank][layout], want_losses, want_state)


def test_bf16_autocast_in_every_layout_follows_the_single_process_bf16_run():
    """TP + sequence parallelism and FSDP + activation checkpointing train under bf16 autocast (with gradient
    accumulation) along one process's bf16 loss curve: 8.5e-5 apart at most when measured, held to 5e-4.

    Only the losses are compared: bf16 products split over ranks round differently, and Adam turns those
    differences into weight differences of ~1e-3 here, as large as between one process's bf16 and fp32 runs.
    """
    layouts = [("ddp", 1, 2, True, False), ("fsdp", 2, 1, False, True)]
    results = run(layout_rank, 2, "tiny-llama", layouts, "bf16", timeout=240)
    want_losses, _ = _reference("tiny-llama", precision="bf16")
    for layout in layouts:
        for rank in range(2):
            np.testing.assert_allclose(results[rank][layout][0], want_losses, rtol=0, atol=5e-4)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_data_times_tensor_parallel_on_four_ranks_equals_one_process(name):
    """DP x TP (replicas averaged over dp) and 2-D FSDP x TP (each tensor-parallel shard sharded again over
    dp by FSDP2; also with sequence parallelism and activation checkpointing), 2 x 2."""
    layouts = [("ddp", 2, 2, False, False), ("fsdp", 2, 2, False, False), ("fsdp", 2, 2, True, True)]
    results = run(layout_rank, 4, name, layouts, timeout=240)
    want_losses, want_state = _reference(name)
    for layout in layouts:
        for rank in range(4):
            _assert_same(*results[rank][layout], want_losses, want_state)


# --- generation, a layout-changing resume, a killed rank ---------------------------------------------------


def generate_rank(name: str) -> list[list[int]]:
    import lmforge.parallel as hvd
    from lmforge.parallel.mesh import Layout, sub_mesh
    from lmforge.parallel.tensor_parallel import parallelize

    hvd.init()
    model = _model(name).eval()
    parallelize(model, sub_mesh(Layout.parse(tp=2).build(), "tp"), loss_parallel=False)
    prompt = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    return model.generate(prompt, max_new_tokens=12, do_sample=False).tolist()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_tensor_parallel_greedy_generation_equals_one_process(name):
    """Prefill and one-token decode steps through the KV cache (each rank caches its own heads)."""
    results = run(generate_rank, 2, name, timeout=120)
    prompt = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    want = _model(name).eval().generate(prompt, max_new_tokens=12, do_sample=False).tolist()
    assert len(want[0]) == 17
    assert results[0] == results[1] == want


# --- a vocabulary the tensor-parallel degree does not divide (padded at shard time) ---------------------------

# GPT-2: tied head (its own 50,257 is odd too); 999, because at 1,001 one weight's step-1 gradient is two
# micro-batches' +-1.29e-3 cancelling to 1e-8, which Adam (eps 1e-8) turns into a step set by rounding noise
# (1.6e-5 from one process, with the padded rows poisoned or not). Llama: untied head, GQA (4 heads, 2 kv).
ODD_VOCAB = {"tiny-gpt2": {"vocab_size": 999}, "tiny-llama": {"vocab_size": 1001, "tie_embeddings": False}}
PROMPT = torch.randint(3, 999, (2, 5), generator=torch.Generator().manual_seed(4))


def _poison_padding(model: torch.nn.Module) -> torch.nn.Module:
    """Give the padded rows of a tensor-parallel model large random values: unhidden, their logits (hundreds,
    against real ones near 0) would take most of every softmax and win about half of the argmaxes."""
    from lmforge.parallel.tensor_parallel import vocab_rows

    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, rows in vocab_rows(model).items():
            param = model.get_parameter(name)
            local = param.to_local()
            real = rows - param.device_mesh.get_local_rank() * local.shape[0]
            if real < local.shape[0]:
                local[real:] = 100.0 * torch.randn(local[real:].shape, generator=gen)
    return model


def padded_vocab_rank(name: str, run_dir: str, hf_dir: str) -> dict:
    """tp2 on a model whose vocabulary 2 does not divide: 3 steps with a checkpoint at step 2, resumed (the
    checkpoint loaded back into the padded shards) to step 5; the gathered model saved as an HF folder; greedy and
    sampled generation. The padded rows are poisoned after every sharding."""
    from lmforge.io import save_model
    from lmforge.parallel.mesh import sub_mesh
    from lmforge.parallel.strategy import make_strategy, run_training
    from lmforge.parallel.tensor_parallel import parallelize, vocab_rows

    sizes = ODD_VOCAB[name]
    vocab = sizes["vocab_size"]
    config = _config(GLOBAL_BATCH // 2, run_dir=run_dir, save_every=2)
    padded = []

    def strategy_for_run():
        strategy = make_strategy("ddp", tp=2)
        shard = strategy.shard
        strategy.shard = lambda model: _poison_padding(shard(model))
        return strategy

    def stop(step: int, record: dict) -> None:
        if step == 3:
            raise _Stop

    strategy = strategy_for_run()
    with pytest.raises(_Stop):
        run_training(_model(name, sizes), CausalLM(), _data(name, vocab), config, strategy, on_step=stop)
    strategy = strategy_for_run()
    model = _model(name, sizes)
    result = run_training(model, CausalLM(), _data(name, vocab), config, strategy, resume=True)
    padded.append({k: tuple(model.get_parameter(k).shape) for k in vocab_rows(model)})
    full = strategy.full_model(model)
    if strategy.global_rank == 0:
        save_model(full, hf_dir)

    generator = _model(name, sizes).eval()
    generator.load_state_dict(full.state_dict())
    _poison_padding(parallelize(generator, sub_mesh(strategy.mesh, "tp"), loss_parallel=False))
    greedy = generator.generate(PROMPT, max_new_tokens=12, do_sample=False).tolist()
    torch.manual_seed(5)
    sampled = generator.generate(PROMPT, max_new_tokens=12, do_sample=True, temperature=1.5).tolist()
    return {"first_step": result.history[0]["step"], "padded": padded[0], "state": _plain(full.state_dict()),
            "greedy": greedy, "sampled": sampled}


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_tensor_parallel_pads_a_vocabulary_the_degree_does_not_divide(name, tmp_path):
    """An odd vocabulary at tp 2 (padded by one row, poisoned): the loss curve of steps 1-5 and the final weights
    are one process's (fp32, 1e-5), through a sharded checkpoint written and read back by the padded shards; the
    HF folder loads in transformers with the real vocabulary and one process's logits; greedy and sampled
    generation give one process's tokens."""
    import transformers

    from lmforge.training import read_metrics

    run_dir, hf_dir = tmp_path / "run", tmp_path / "hf"
    results = run(padded_vocab_rank, 2, name, str(run_dir), str(hf_dir), timeout=240)
    trained = []
    want_losses, want_state = _reference(name, ODD_VOCAB[name], trained)
    losses = [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]
    vocab = ODD_VOCAB[name]["vocab_size"]
    for res in results:
        assert res["first_step"] == 3
        assert res["padded"] == dict.fromkeys(("embed_tokens.weight", "lm_head.weight"), (vocab + 1, 32))
        _assert_same(losses, res["state"], want_losses, want_state)

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert hf.config.vocab_size == vocab and hf.get_output_embeddings().weight.shape == (vocab, 32)
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, trained[0](ids).logits, rtol=0, atol=1e-4)

    model = trained[0].eval()
    want_greedy = model.generate(PROMPT, max_new_tokens=12, do_sample=False).tolist()
    torch.manual_seed(5)
    want_sampled = model.generate(PROMPT, max_new_tokens=12, do_sample=True, temperature=1.5).tolist()
    for res in results:
        assert res["greedy"] == want_greedy
        assert res["sampled"] == want_sampled


class _Stop(Exception):
    """Raised from on_step on every rank to end a run after its step-2 checkpoint (a planned interruption)."""


def resume_rank(run_dir: str, first: tuple[str, int, int], second: tuple[str, int, int, int] | None,
                sizes: dict | None = None) -> dict:
    """Train in layout `first` (strategy, dp, tp) until its step-2 checkpoint, then resume the run in layout
    `second` (strategy, dp, tp[, pp]: a pipeline of 2 micro-batches per batch); `sizes`: the model's."""
    from lmforge.parallel.strategy import make_strategy, run_training

    def stop(step: int, record: dict) -> None:
        if step == 3:
            raise _Stop

    name, dp, tp = first
    strategy = make_strategy(name, dp=dp, tp=tp)
    data = _data("tiny-gpt2", _model("tiny-gpt2", sizes).config.vocab_size)
    with pytest.raises(_Stop):
        run_training(_model("tiny-gpt2", sizes), CausalLM(), data,
                     _config(GLOBAL_BATCH // 2 // dp, run_dir=run_dir, save_every=2), strategy, on_step=stop)
    if second is None:
        return {}
    name, dp, tp, *pp = second
    strategy = make_strategy(name, dp=dp, tp=tp, pp=pp[0] if pp else 1, microbatches=2)
    model = _model("tiny-gpt2", sizes)
    result = run_training(model, CausalLM(), data, _config(GLOBAL_BATCH // 2 // dp, run_dir=run_dir, save_every=2),
                          strategy, resume=True)
    return {"first_step": result.history[0]["step"], "state": _plain(strategy.full_model(model).state_dict())}


@pytest.mark.parametrize(("first", "second", "sizes"),
                         [(("ddp", 1, 2), ("fsdp", 2, 1), None),
                          (("ddp", 2, 2), ("fsdp", 2, 2), ODD_VOCAB["tiny-gpt2"]),
                          (("ddp", 2, 2), ("ddp", 1, 2, 2), ODD_VOCAB["tiny-gpt2"])],
                         ids=["tp2-fsdp2", "dp2xtp2-fsdp2xtp2-vocab999", "dp2xtp2-pp2xtp2-vocab999"])
def test_a_tensor_parallel_run_resumes_in_another_layout_on_the_same_loss_curve(tmp_path, first, second, sizes):
    """tp2 (one data-parallel rank of batch 2) writes a sharded checkpoint at step 2; FSDP over 2 ranks (batch 1
    each) resumes it: the loss curve of steps 1-5 and the final weights are one process's. Likewise dp2 x tp2
    resumed as 2-D FSDP x TP (the fused rows loaded into shards of shards) and as pp2 x tp2 (the sharded
    checkpoint loaded into the tensor-parallel model before the pipeline cuts it), both on GPT-2's odd
    vocabulary of 999 (padded to 1,000 rows by tp 2: its real rows loaded into the 2-D shards, and gathered
    from the pipeline's stages)."""
    from lmforge.training import read_metrics

    results = run(resume_rank, first[1] * first[2], str(tmp_path), first, second, sizes, timeout=240)
    want_losses, want_state = _reference("tiny-gpt2", sizes)
    records = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for res in results:
        assert res["first_step"] == 3
        _assert_same([r["loss"] for r in records], res["state"], want_losses, want_state)


def killed_rank(run_dir: str, kill_at: int | None, resume: bool) -> dict:
    """tp2 training; rank 1 SIGKILLs itself in the middle of step `kill_at`'s forward (between its blocks)."""
    from lmforge.parallel.strategy import make_strategy, run_training

    strategy = make_strategy("ddp", tp=2, timeout=10.0)
    done = [0]

    def on_step(step: int, record: dict) -> None:
        done[0] = step

    def die(module, inputs) -> None:
        if strategy.global_rank == 1 and done[0] + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    model = _model("tiny-gpt2")
    model.layers[1].register_forward_pre_hook(die)
    result = run_training(model, CausalLM(), _data(), _config(GLOBAL_BATCH // 2, run_dir=run_dir, save_every=2),
                          strategy, resume=resume, on_step=on_step)
    return {"first_step": result.history[0]["step"], "losses": [r["loss"] for r in result.history],
            "state": _plain(strategy.full_model(model).state_dict())}


def test_a_killed_rank_ends_the_job_with_a_clear_error_and_resume_continues(tmp_path):
    results = spawn(killed_rank, 2, str(tmp_path), 3, False, timeout=90)
    assert "exited with code -9" in results[1].error
    error = results[0].error
    assert error is not None and "rank" in error and "--resume" in error, error
    assert results[0].seconds < 60
    resumed = run(killed_rank, 2, str(tmp_path), None, True, timeout=120)
    want_losses, want_state = _reference("tiny-gpt2")
    for res in resumed:
        assert res["first_step"] == 3
        _assert_same(res["losses"], res["state"], want_losses[2:], want_state)


@pytest.mark.parametrize("layout", [("ddp", 1, 2), ("fsdp", 2, 2)])
def test_a_sharded_checkpoint_resumes_in_one_process_and_loads_as_a_model(tmp_path, layout):
    """dp1 x tp2, or 2-D FSDP x TP 2 x 2 (fused rows sharded over tp, then over dp), stops after its step-2
    checkpoint; one process (no process group) resumes it to step 5 with one process's loss curve and weights;
    `load_model` (what `lmforge export` uses) reads a sharded checkpoint."""
    from lmforge.io import load_model
    from lmforge.io.hf import write_config
    from lmforge.training import latest_checkpoint, read_metrics

    run(resume_rank, layout[1] * layout[2], str(tmp_path), layout, None, timeout=240)
    step2 = latest_checkpoint(tmp_path)
    assert step2.name == "step_00000002" and (step2 / ".metadata").is_file()
    write_config(_model("tiny-gpt2").config, tmp_path)  # as `lmforge train` records its run
    exported = _plain(load_model(str(step2)).state_dict())
    model = _model("tiny-gpt2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(model, CausalLM(), _data(), _config(GLOBAL_BATCH // 2, run_dir=str(tmp_path), save_every=2),
                       resume=True)
        want_losses, want_state = _reference("tiny-gpt2")
        want_step2 = _model("tiny-gpt2")
        train(want_step2, CausalLM(), _data(), _config(GLOBAL_BATCH // 2, max_steps=2))
    finally:
        torch.set_num_threads(threads)
    assert result.history[0]["step"] == 3
    losses = [r["loss"] for r in read_metrics(tmp_path) if r["split"] == "train"]
    _assert_same(losses, _plain(model.state_dict()), want_losses, want_state)
    # the step-2 weights read back from the sharded files: a 2-step run's (its learning rates are the 5-step
    # run's for those steps: warm-up, then the first decayed step at factor 1)
    assert exported.keys() == want_step2.state_dict().keys()
    for k, want in want_step2.state_dict().items():
        torch.testing.assert_close(torch.from_numpy(exported[k]), want, rtol=0, atol=1e-5)


def test_a_kill_while_writing_a_sharded_checkpoint_keeps_the_previous_one(tmp_path):
    """Rank 0 dies after every rank wrote its shards of step 4 and before the folder is renamed: step 2 stays the
    last checkpoint, the half-written one is not taken for one, and --resume continues from step 2."""
    from lmforge.training import KILL_IN_CHECKPOINT_ENV, checkpoint_dirs

    results = spawn(killed_rank, 2, str(tmp_path), None, False, timeout=90,
                    env=lambda rank: {KILL_IN_CHECKPOINT_ENV: "4"} if rank == 0 else {})
    assert "exited with code -9" in results[0].error and results[1].error is not None
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000002"]
    assert list((tmp_path / "checkpoints").glob(".tmp-step_00000004-*"))  # the unfinished write, left aside
    resumed = run(killed_rank, 2, str(tmp_path), None, True, timeout=120)
    want_losses, want_state = _reference("tiny-gpt2")
    for res in resumed:
        assert res["first_step"] == 3
        _assert_same(res["losses"], res["state"], want_losses[2:], want_state)


def evaluate_rank(name: str, kind: str, dp: int, tp: int) -> dict[str, float]:
    from lmforge.parallel.strategy import make_strategy
    from lmforge.training import evaluate

    strategy = make_strategy(kind, dp=dp, tp=tp)
    model = strategy.shard(_model(name))
    return evaluate(model, _objective(name), _data(name), batch_size=4, strategy=strategy, max_batches=5)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert"])
def test_evaluation_under_tensor_parallelism_equals_one_process(name):
    """Loss and perplexity (and masked-LM accuracy) from vocabulary-sharded logits, batches split over dp; 5
    batches over 2 FSDP ranks, whose forwards are collective: the rank with fewer batches pads with one weighted
    by 0 instead of leaving the other waiting."""
    from lmforge.training import evaluate

    want = evaluate(_model(name), _objective(name), _data(name), batch_size=4, max_batches=5)
    for kind, dp, tp in (("ddp", 1, 2), ("ddp", 2, 1), ("fsdp", 2, 1)):
        for got in run(evaluate_rank, 2, name, kind, dp, tp, timeout=120):
            assert got.keys() == want.keys()
            for k in want:
                assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-6), (kind, dp, tp, k)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_activation_checkpointing_keeps_names_and_gradients_and_recomputes(name):
    """One process: the same state-dict names, the same loss and gradients, and each block's forward run twice
    (once more during backward)."""
    from lmforge.parallel.plans import apply_activation_checkpointing

    plain, checkpointed = _model(name), _model(name)
    calls = [0]
    for layer in checkpointed.layers:  # count the blocks' own forward runs, below the checkpoint
        def counted(*args, _forward=layer.forward, **kwargs):
            calls[0] += 1
            return _forward(*args, **kwargs)
        layer.forward = counted
    apply_activation_checkpointing(checkpointed)
    assert list(plain.state_dict()) == list(checkpointed.state_dict())
    batch = _data(name).collate([_data(name)[i] for i in range(4)])
    for model in (plain, checkpointed):
        loss, _ = _objective(name)(model, batch)
        loss.backward()
    assert calls[0] == 2 * len(checkpointed.layers)
    for (k, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=k)
