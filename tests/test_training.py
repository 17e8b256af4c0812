"""lmforge.training and lmforge.objectives: schedule, parameter groups, overfitting, accumulation, evaluation
metrics, checkpoints, and kill-and-resume with real SIGKILLs ending bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.data import EncodedTexts, LabelledTexts, MaskedBlocks, TokenBlocks
from lmforge.models import ModelOutput, build_model
from lmforge.objectives import CausalLM, Classification, MaskedLM, confusion_matrix, macro_f1
from lmforge.training import (
    KILL_IN_CHECKPOINT_ENV,
    TrainConfig,
    checkpoint_dirs,
    evaluate,
    latest_checkpoint,
    load_checkpoint,
    lr_factor,
    param_groups,
    plot_run,
    read_metrics,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig.from_name(name, **overrides))


def blocks(n: int = 16, T: int = 16, seed: int = 1) -> TokenBlocks:
    return TokenBlocks(torch.randint(0, 128, (n, T), generator=torch.Generator().manual_seed(seed)))


def quiet(**kw) -> TrainConfig:
    return TrainConfig(progress=False, **kw)


# --- schedule and optimizer ---------------------------------------------------------------------------------


def test_lr_schedule_closed_form():
    lin = quiet(warmup_steps=4, max_steps=14, schedule="linear")
    assert [lr_factor(s, lin) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert lr_factor(4, lin) == 1.0 and lr_factor(9, lin) == pytest.approx(0.5) and lr_factor(14, lin) == 0.0
    cos = quiet(warmup_steps=0, max_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cos) == 1.0
    assert lr_factor(5, cos) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(10, cos) == pytest.approx(0.1)
    assert lr_factor(2, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_factor(7, quiet(max_steps=10, schedule="constant", warmup_steps=1)) == 1.0
    assert lr_factor(20, lin) == 0.0 and lr_factor(30, cos) == pytest.approx(0.1)  # past max_steps: the floor
    one = quiet(warmup_steps=3, max_steps=4, schedule="linear")  # a single decay step
    assert [lr_factor(s, one) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 0.0]


def test_train_follows_schedule():
    lrs = {}
    cfg = quiet(lr=1e-3, warmup_steps=2, max_steps=6, schedule="cosine", batch_size=4)
    train(tiny("tiny-gpt2"), CausalLM(), blocks(8), cfg, on_step=lambda s, r: lrs.setdefault(s, r["lr"]))
    assert [lrs[s] for s in range(1, 7)] == pytest.approx([1e-3 * lr_factor(s, cfg) for s in range(6)])


def test_param_groups_no_decay_on_biases_and_norms():
    model = tiny("tiny-gpt2")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}  # tied lm_head appears once, as embed_tokens
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith(".bias") or "norm" in n for n in no_decay_names)
    assert "norm.weight" in no_decay_names and "layers.0.attn_norm.weight" in no_decay_names
    assert "layers.0.attn.qkv.bias" in no_decay_names
    assert {"embed_tokens.weight", "embed_positions.weight", "layers.1.mlp.up.weight"} <= decay_names
    assert not any(n.endswith(".bias") or "norm" in n for n in decay_names)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_param_groups_skip_frozen_parameters_and_list_shared_ones_once():
    model = tiny("tiny-gpt2")
    frozen, shared = model.layers[0].attn_norm.weight, model.layers[1].attn_norm.weight
    frozen.requires_grad_(False)
    extra = torch.nn.Linear(2, 3)  # an objective's own module, here also holding one of the model's weights
    extra.register_parameter("shared", shared)
    decay, no_decay = param_groups(model, 0.1, extra)
    ids = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters())) - 1 + 2  # + extra's weight and bias
    assert id(frozen) not in ids and {id(shared), id(extra.weight), id(extra.bias)} <= set(ids)


# --- learning -----------------------------------------------------------------------------------------------


def test_tiny_decoder_overfits_a_small_batch():
    data = blocks(4, 16)
    model = tiny("tiny-gpt2")
    before = evaluate(model, CausalLM(), data, batch_size=4)["loss"]
    result = train(model, CausalLM(), data, quiet(lr=1e-2, max_steps=80, batch_size=4, schedule="constant",
                                                  weight_decay=0.0), eval_data=data)
    assert before > 4.0 and result.eval_metrics["loss"] < 0.1 and result.eval_metrics["perplexity"] < 1.1


def test_tiny_encoder_classifier_overfits():
    texts = [f"text {i}" for i in range(12)]
    data = LabelledTexts(texts, [i % 3 for i in range(12)], ["a", "b", "c"])
    ds = EncodedTexts(data, lambda s: [2] + [5 + (ord(c) % 100) for c in s] + [3], max_len=16, pad_id=0)
    model = tiny("tiny-bert", head="classify", n_labels=3)
    cfg = quiet(lr=5e-3, max_steps=60, batch_size=6, schedule="constant")
    result = train(model, Classification(3), ds, cfg, eval_data=ds)
    assert result.eval_metrics["accuracy"] == 1.0 and result.eval_metrics["macro_f1"] == 1.0


@pytest.mark.parametrize("kind", ["clm", "mlm"])
def test_accumulation_equals_one_large_batch(kind):
    """k micro-batches of b give the update of one batch of k*b (MLM: unequal masked counts per micro)."""
    if kind == "clm":
        name, objective = "tiny-llama", CausalLM()
        data = blocks(16, 12)
    else:
        name, objective = "tiny-bert", MaskedLM()
        seqs = torch.randint(5, 128, (16, 12), generator=torch.Generator().manual_seed(2))
        data = MaskedBlocks(seqs, mask_id=4, vocab_size=128, special_ids=[0, 1, 2, 3], prob=0.3)
    states = []
    for batch_size, accum in ((8, 1), (2, 4)):
        model = tiny(name)
        # betas=(0, 0) and eps=1 make the AdamW update g / (|g| + 1): smooth in the gradient, so that float
        # rounding stays tiny (Adam's usual g / |g| turns rounding of near-zero gradients into +-lr jumps).
        cfg = quiet(lr=0.1, max_steps=2, betas=(0.0, 0.0), eps=1.0, weight_decay=0.0, batch_size=batch_size,
                    grad_accum=accum)
        train(model, objective, data, cfg)
        states.append(model.state_dict())
    for key in states[0]:  # a wrong micro-batch weighting gives differences of ~1e-3 here
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=5e-7, msg=key)


def test_mixed_precision_runs_and_learns(tmp_path):
    data = blocks(4, 16)
    for precision in ("bf16", "fp16"):
        model = tiny("tiny-gpt2")
        cfg = quiet(lr=1e-2, max_steps=25, batch_size=4, precision=precision,
                    run_dir=str(tmp_path / precision))
        result = train(model, CausalLM(), data, cfg, eval_data=data)
        assert result.eval_metrics["loss"] < 3.0, precision
        _, state = load_checkpoint(result.checkpoint)
        if precision == "fp16":
            assert state["scaler"]["scale"] > 0  # the gradient scaler's state is checkpointed


class ScaledLM(torch.nn.Module):
    """An objective with a parameter of its own (as a distillation projection): a learned logit scale."""

    def __init__(self):
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.zeros(()))
        self.base = CausalLM()

    def forward(self, model, batch):
        def scaled(input_ids, **kwargs):
            out = model(input_ids, **kwargs)
            return ModelOutput(out.logits * self.log_scale.exp(), out.last_hidden_state)

        return self.base(scaled, batch)

    def n_targets(self, batch):
        return self.base.n_targets(batch)


def test_objective_parameters_are_trained_and_checkpointed(tmp_path):
    objective = ScaledLM()
    train(tiny("tiny-gpt2"), objective, blocks(4), quiet(lr=1e-2, max_steps=5, batch_size=4,
                                                          run_dir=str(tmp_path)))
    assert objective.log_scale.item() != 0.0
    _, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert torch.equal(state["objective"]["log_scale"], objective.log_scale.detach())


# --- evaluation metrics -------------------------------------------------------------------------------------


def test_macro_f1_and_confusion_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    preds = torch.tensor([0, 1, 1, 1, 0, 0])
    cm = confusion_matrix(labels, preds, 4)
    assert cm[:3, :3].tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 0]]
    assert cm[3].sum() == 0 and cm[:, 3].sum() == 0
    # class 0: P=1/3 R=1/2 F1=0.4; class 1: P=2/3 R=2/3 F1=2/3; class 2: F1=0; class 3 absent (not averaged)
    assert macro_f1(cm) == pytest.approx((0.4 + 2 / 3 + 0.0) / 3)


def test_evaluate_perplexity_matches_direct_computation_and_batching():
    model, data = tiny("tiny-gpt2"), blocks(7, 10)
    with torch.no_grad():
        logits = model(data.blocks).logits[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, 128), data.blocks[:, 1:].reshape(-1))
    for bs in (3, 7):  # a partial last batch still counts every token once
        m = evaluate(model, CausalLM(), data, batch_size=bs)
        assert m["loss"] == pytest.approx(float(ce), rel=1e-6)
        assert m["perplexity"] == pytest.approx(math.exp(ce), rel=1e-6)
        assert m["tokens"] == 7 * 9


def test_causal_lm_skips_padding():
    batch = {"input_ids": torch.tensor([[5, 6, 7, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    assert CausalLM().n_targets(batch) == 2
    assert CausalLM().targets(batch).tolist() == [[6, 7, -100, -100]]


def test_causal_lm_targets_counts_and_loss_by_hand():
    """Targets come from "labels" when given (IGNORE_INDEX skipped, with or without a mask); a batch of B rows of
    T tokens has B * (T - 1) targets; a single target's loss is its cross-entropy (not halved or clamped)."""
    assert CausalLM().n_targets({"input_ids": torch.zeros(3, 5, dtype=torch.long)}) == 3 * 4
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[5, -100, 9, 10]])}
    assert CausalLM().targets(batch).tolist() == [[-100, 9, 10, -100]]
    assert CausalLM().n_targets(batch) == 2
    model = tiny("tiny-gpt2")
    one = {"input_ids": torch.tensor([[5, 6]])}
    loss, metrics = CausalLM()(model, one)
    with torch.no_grad():
        want = F.cross_entropy(model(one["input_ids"]).logits[0, :1], torch.tensor([6]))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6) and metrics.keys() == {"loss"}
    assert evaluate(model, CausalLM(), TokenBlocks(one["input_ids"]))["loss"] == pytest.approx(want.item(), rel=1e-6)


# --- checkpoints, resume, errors ----------------------------------------------------------------------------


def test_crash_and_resume_in_process_is_bit_identical(tmp_path):
    data = blocks(12, 16)
    cfg = dict(lr=1e-2, max_steps=8, batch_size=4, grad_accum=2, save_every=2, keep_last=2, log_every=1,
               seed=4)
    ref = tiny("tiny-gpt2", dropout=0.1)
    train(ref, CausalLM(), data, quiet(**cfg))

    def crash(step, record):
        if step == 5:
            raise KeyboardInterrupt  # after step 5, before its (absent) checkpoint: resumes from step 4

    with pytest.raises(KeyboardInterrupt):
        train(tiny("tiny-gpt2", dropout=0.1), CausalLM(), data, quiet(run_dir=str(tmp_path), **cfg),
              on_step=crash)
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    model = tiny("tiny-gpt2", dropout=0.1)
    result = train(model, CausalLM(), data, quiet(run_dir=str(tmp_path), **cfg), resume=True)
    assert result.step == 8
    for key, value in ref.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    steps = [r["step"] for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert steps == list(range(1, 9))  # the log reads as one run: step 5 of the crashed run was dropped
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000006", "step_00000008"]  # keep_last=2


def test_bad_inputs(tmp_path):
    model, data = tiny("tiny-gpt2"), blocks(4)
    with pytest.raises(FileNotFoundError, match="run directory .*nowhere.* does not exist"):
        train(model, CausalLM(), data, quiet(run_dir=str(tmp_path / "nowhere")), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(model, CausalLM(), data, quiet(run_dir=str(tmp_path)), resume=True)
    train(model, CausalLM(), data, quiet(max_steps=1, batch_size=4, run_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="holds checkpoints"):
        train(model, CausalLM(), data, quiet(max_steps=1, batch_size=4, run_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="different data order .*batch_size: 4 in the checkpoint, 2 now"):
        train(model, CausalLM(), data, quiet(max_steps=2, batch_size=2, run_dir=str(tmp_path)), resume=True)
    with pytest.raises(ValueError, match="resume=True needs config.run_dir"):
        train(model, CausalLM(), data, quiet(), resume=True)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="cannot fill one batch"):
        train(model, CausalLM(), data, quiet(batch_size=8))
    with pytest.raises(TypeError, match="map-style dataset"):
        train(model, CausalLM(), [torch.zeros(3)], quiet())
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match=r"classifier logits must be \(B, 2\)"):
        Classification(2)(model, batch)
    with pytest.raises(ValueError, match="labels"):
        MaskedLM()(model, {"input_ids": batch["input_ids"]})
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path / "nowhere")


def test_metrics_log_and_plot(tmp_path):
    data = blocks(8)
    train(tiny("tiny-gpt2"), CausalLM(), data,
          quiet(max_steps=6, batch_size=4, log_every=2, eval_every=3, run_dir=str(tmp_path)), eval_data=data)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6]
    assert [r["step"] for r in records if r["split"] == "eval"] == [3, 6]
    assert set(records[0]) == {"step", "split", "loss", "lr", "grad_norm", "tokens_per_s"}
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "spl')  # a torn line from a kill is skipped
    assert len(read_metrics(tmp_path)) == len(records)
    png = plot_run(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- kill -9 and resume in real subprocesses ----------------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from lmforge.config import ModelConfig
    from lmforge.data import TokenBlocks
    from lmforge.models import ModelOutput, build_model
    from lmforge.objectives import CausalLM
    from lmforge.training import TrainConfig, train
    run_dir, resume, delay = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny-gpt2", dropout=0.1))  # dropout: the RNG state matters
    data = TokenBlocks(torch.randint(0, 128, (24, 16), generator=torch.Generator().manual_seed(1)))
    cfg = TrainConfig(lr=1e-2, max_steps=12, warmup_steps=2, batch_size=4, grad_accum=2, save_every=2,
                      keep_last=2, log_every=1, seed=3, run_dir=run_dir, progress=False)
    train(model, CausalLM(), data, cfg, resume=resume, on_step=lambda step, record: time.sleep(delay))
""")


@pytest.mark.slow
def test_sigkill_and_resume_bit_identical(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != KILL_IN_CHECKPOINT_ENV}
    env["OMP_NUM_THREADS"] = "1"

    def start(run, resume, delay, extra_env=None):
        return subprocess.Popen([sys.executable, str(script), str(run), "1" if resume else "0", str(delay)],
                                env={**env, **(extra_env or {})}, stderr=subprocess.PIPE, text=True)

    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    reference = start(ref_dir, False, 0.0)
    # 1) SIGKILL from outside in the middle of the run, once a checkpoint exists
    first = start(run_dir, False, 0.5)  # slow steps: the kill lands well before step 8
    deadline = time.time() + 120
    while (latest_checkpoint(run_dir) is None or latest_checkpoint(run_dir).name < "step_00000004") \
            and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL
    killed_at = latest_checkpoint(run_dir)
    assert killed_at is not None and killed_at.name < "step_00000008"
    load_checkpoint(killed_at)  # the last good checkpoint loads
    # 2) resume, and SIGKILL inside the checkpoint writer of step 8 (temp folder written, not yet renamed)
    second = start(run_dir, True, 0.0, {KILL_IN_CHECKPOINT_ENV: "8"})
    second.wait(timeout=120)
    assert second.returncode == -signal.SIGKILL, second.stderr.read()
    partial = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-step_00000008")]
    assert partial and latest_checkpoint(run_dir).name == "step_00000006"
    # 3) resume to the end
    third = start(run_dir, True, 0.0)
    assert third.wait(timeout=120) == 0, third.stderr.read()
    assert reference.wait(timeout=120) == 0, reference.stderr.read()

    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step_00000010", "step_00000012"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # cleaned up
    ref_model, ref_state = load_checkpoint(latest_checkpoint(ref_dir))
    got_model, got_state = load_checkpoint(latest_checkpoint(run_dir))
    for key, value in ref_model.items():
        assert torch.equal(value, got_model[key]), key
    ref_opt, got_opt = ref_state["optimizer"]["state"], got_state["optimizer"]["state"]
    for ref_p, got_p in zip(ref_opt.values(), got_opt.values(), strict=True):
        assert all(torch.equal(ref_p[k], got_p[k]) for k in ref_p)
    ref_losses = [(r["step"], r["loss"]) for r in read_metrics(ref_dir) if r["split"] == "train"]
    got_losses = [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["split"] == "train"]
    assert got_losses == ref_losses and len(ref_losses) == 12
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 12


# --- command line (fixtures cli_fixtures and run_cli in conftest.py) -------------------------------------------


def test_cli_train_resume_evaluate_plot(cli_fixtures, tmp_path, run_cli):
    root, run = cli_fixtures, tmp_path / "run"
    common = ("--model", root / "tiny-gpt2", "--data", root / "corpus", "--run-dir", run, "--batch-size", 2,
              "--block-size", 16, "--save-every", 2, "--log-every", 1, "--lr", 1e-2)
    code, out, _ = run_cli("train", *common, "--steps", 4)
    assert code == 0 and json.loads(out.splitlines()[-1])["step"] == 4
    code, out, _ = run_cli("train", *common, "--steps", 6, "--resume")  # continue to 6 steps
    assert code == 0 and json.loads(out.splitlines()[-1])["step"] == 6
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    code, out, _ = run_cli("evaluate", "--model", run / "model", "--data", root / "corpus")
    metrics = json.loads(out)
    assert code == 0 and metrics["tokens"] > 0
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    code, out, _ = run_cli("evaluate", "--model", run / "model", "--data", root / "corpus",
                           "--block-size", 16, "--batch-size", 2, "--max-batches", 1)
    assert code == 0 and json.loads(out)["tokens"] == 2 * 15
    code, out, _ = run_cli("plot", run)
    assert code == 0 and (run / "metrics.png").is_file()


def test_cli_masked_lm_and_finetune(cli_fixtures, tmp_path, run_cli):
    root = cli_fixtures
    code, out, _ = run_cli("train", "--model", root / "tiny-bert", "--data", root / "corpus",
                           "--run-dir", tmp_path / "mlm", "--steps", 3, "--batch-size", 2, "--block-size", 16)
    assert code == 0 and "accuracy" in json.loads(out.splitlines()[-1])["eval"]
    code, out, _ = run_cli("finetune", "--model", root / "tiny-bert", "--data", root / "labelled",
                           "--run-dir", tmp_path / "ft", "--steps", 30, "--batch-size", 4, "--lr", 3e-3)
    result = json.loads(out.splitlines()[-1])
    assert code == 0 and result["test"]["accuracy"] == 1.0 and result["test"]["examples"] == 2
    code, out, _ = run_cli("evaluate", "--model", tmp_path / "ft" / "model", "--data",
                           root / "labelled", "--split", "all")
    assert code == 0 and json.loads(out)["examples"] == 20 and json.loads(out)["accuracy"] == 1.0
    # the saved classifier knows its labels: a folder with other label names is refused
    code, _, err = run_cli("evaluate", "--model", tmp_path / "ft" / "model", "--data", root / "other")
    assert code == 2 and "label-set mismatch" in err and "animals" in err


def test_cli_errors(cli_fixtures, tmp_path, run_cli):
    root = cli_fixtures
    code, _, err = run_cli("train", "--model", root / "tiny-gpt2", "--data", root / "corpus",
                           "--run-dir", tmp_path / "nowhere", "--resume")
    assert code == 2 and "nowhere" in err and "does not exist" in err
    code, _, err = run_cli("train", "--model", root / "tiny-gpt2", "--data", tmp_path / "no-corpus",
                           "--run-dir", tmp_path / "r")
    assert code == 2 and "no-corpus" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("train", "--model", root / "tiny-gpt2", "--data", tmp_path / "empty",
                           "--run-dir", tmp_path / "r")
    assert code == 2 and "no .txt files" in err
    code, _, err = run_cli("train", "--model", root / "tiny-gpt2", "--data", root / "corpus",
                           "--objective", "mlm", "--run-dir", tmp_path / "r")
    assert code == 2 and "masked LM an encoder" in err
    code, _, err = run_cli("train", "--model", root / "tiny-gpt2", "--data", root / "corpus",
                           "--block-size", 500, "--run-dir", tmp_path / "r")
    assert code == 2 and "--block-size 500" in err
    code, _, err = run_cli("plot", tmp_path / "nowhere")
    assert code == 2 and "metrics.jsonl" in err


# --- the loop against a hand-written AdamW + LambdaLR loop --------------------------------------------------


class NextToken:
    """A plain next-token objective, defined here so that the loop and the reference below compute the very same
    loss (bit-identical gradients: the loop, not the objective, is what these tests compare)."""

    @staticmethod
    def loss(model, input_ids):
        logits = model(input_ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))

    def __call__(self, model, batch):
        loss = self.loss(model, batch["input_ids"])
        return loss, {"loss": loss.detach()}

    def n_targets(self, batch):
        B, T = batch["input_ids"].shape
        return B * (T - 1)


class RecordingBlocks(TokenBlocks):
    """TokenBlocks that remember which items the loop fetched, in order (the data order the reference replays)."""

    def __init__(self, blocks):
        super().__init__(blocks)
        self.fetched: list[int] = []

    def __getitem__(self, i):
        self.fetched.append(int(i))
        return super().__getitem__(i)


def reference_lr_factor(step: int, warmup: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """The documented schedule, written out again: linear warm-up to 1 over `warmup` steps ((s+1)/(w+1)), then
    linear or cosine decay to `min_ratio` at `max_steps`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / (max_steps - warmup))
    shape = 1 - progress if schedule == "linear" else (1 + math.cos(math.pi * progress)) / 2
    return min_ratio + (1 - min_ratio) * shape


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_train_equals_a_hand_written_adamw_lambdalr_loop(schedule):
    """`train` = torch.optim.AdamW (no decay on biases and norms) + LambdaLR stepped after the optimizer,
    gradient clipping of the accumulated gradient, 2 micro-batches per step; weights within 1e-6.

    The scheduler stepped before the optimizer shifts every update's learning rate by one step (and PyTorch's
    scheduler-order warning is an error in this suite, see pyproject.toml)."""
    steps, warmup, accum, batch_size, clip = 7, 2, 2, 3, 0.5
    data = RecordingBlocks(blocks(10, 12, seed=3).blocks)
    cfg = quiet(lr=2e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6, warmup_steps=warmup, max_steps=steps,
                schedule=schedule, min_lr_ratio=0.1, batch_size=batch_size, grad_accum=accum, clip_norm=clip)
    model = tiny("tiny-gpt2")
    logged = {}
    train(model, NextToken(), data, cfg, on_step=lambda s, r: logged.setdefault(s, r["grad_norm"]))
    assert len(data.fetched) == steps * accum * batch_size

    ref = tiny("tiny-gpt2")
    named = dict(ref.named_parameters())  # the tied LM head appears once
    no_decay = [n for n in named if n.endswith(".bias") or "norm" in n]
    decay = [n for n in named if n not in no_decay]
    assert any(n.endswith(".bias") for n in no_decay) and any("norm" in n for n in no_decay) and decay
    optimizer = torch.optim.AdamW([{"params": [named[n] for n in decay], "weight_decay": 0.1},
                                   {"params": [named[n] for n in no_decay], "weight_decay": 0.0}],
                                  lr=2e-2, betas=(0.8, 0.95), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: reference_lr_factor(s, warmup, steps, schedule, 0.1))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    order = torch.tensor(data.fetched).view(steps, accum, batch_size)
    norms = []
    for step in range(steps):
        for micro in order[step]:
            (NextToken.loss(ref, data.blocks[micro]) / accum).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert sum(n > clip for n in norms) >= steps // 2  # clipping is active on most steps
    assert [logged[s + 1] for s in range(steps)] == pytest.approx(norms, rel=1e-6)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


# --- fp16 mixed precision: the gradient scaler ----------------------------------------------------------------


class InfGradientAt:
    """Turns one parameter's gradient into +inf during optimizer step `at` (1-based): a gradient overflow."""

    def __init__(self, model, at: int, next_step: int = 1):
        self.at, self.next_step = at, next_step
        next(model.parameters()).register_hook(self.hook)

    def hook(self, grad):
        return torch.full_like(grad, math.inf) if self.next_step == self.at else grad

    def on_step(self, step, record):
        self.next_step = step + 1


def test_fp16_logs_the_unscaled_gradient_norm_of_the_fp32_run():
    """With clipping, the norm logged in fp16 (scaled by 2^16 during backward) is the true one: that of the
    fp32 run from the same weights within fp16 rounding (measured: ~1e-4 relative on step 1)."""
    norms = {}
    for precision in ("fp32", "fp16"):
        cfg = quiet(lr=1e-3, max_steps=3, batch_size=4, clip_norm=0.1, precision=precision)
        norms[precision] = []
        train(tiny("tiny-gpt2"), CausalLM(), blocks(8), cfg,
              on_step=lambda s, r, p=precision: norms[p].append(r["grad_norm"]))
    assert min(norms["fp32"]) > 0.1  # clipping is active
    assert norms["fp16"] == pytest.approx(norms["fp32"], rel=1e-2)


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path):
    model = tiny("tiny-gpt2")
    inject = InfGradientAt(model, at=2)
    cfg = quiet(lr=1e-2, max_steps=3, batch_size=4, precision="fp16", save_every=1, keep_last=3,
                run_dir=str(tmp_path))
    train(model, CausalLM(), blocks(8), cfg, on_step=inject.on_step)
    (w1, s1), (w2, s2), (w3, s3) = (load_checkpoint(p) for p in checkpoint_dirs(tmp_path))
    assert s1["scaler"]["scale"] == 2.0**16 and s2["scaler"]["scale"] == 2.0**15 and s3["scaler"]["scale"] == 2.0**15
    for name in w1:  # step 2 changed nothing: neither the weights nor Adam's moments and step count
        assert torch.equal(w1[name], w2[name]), name
    for before, after in zip(s1["optimizer"]["state"].values(), s2["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(w2[name], w3[name]) for name in w2)  # step 3 ran


def test_fp16_resume_restores_the_gradient_scaler_bit_identically(tmp_path):
    """An overflow at step 2 halves the scale; a crash after step 4 resumes from the step-3 checkpoint. The
    resumed run ends with the uninterrupted run's weights and scaler state (scale and growth tracker)."""
    data = blocks(8)
    cfg = dict(lr=1e-2, max_steps=6, batch_size=4, precision="fp16", save_every=3, keep_last=3)

    ref = tiny("tiny-gpt2")
    inject = InfGradientAt(ref, at=2)
    train(ref, CausalLM(), data, quiet(run_dir=str(tmp_path / "ref"), **cfg), on_step=inject.on_step)

    def crash(step, record):
        inject.on_step(step, record)
        if step == 4:
            raise KeyboardInterrupt

    inject = InfGradientAt(tiny_model := tiny("tiny-gpt2"), at=2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model, CausalLM(), data, quiet(run_dir=str(tmp_path / "run"), **cfg), on_step=crash)
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"
    model = tiny("tiny-gpt2")
    inject = InfGradientAt(model, at=2, next_step=4)
    train(model, CausalLM(), data, quiet(run_dir=str(tmp_path / "run"), **cfg), resume=True,
          on_step=inject.on_step)
    (want_w, want), (got_w, got) = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("ref", "run"))
    assert want["scaler"] == got["scaler"] and want["scaler"]["scale"] == 2.0**15
    assert want["scaler"]["_growth_tracker"] == 4  # 4 good steps since the overflow
    for name, value in want_w.items():
        assert torch.equal(value, got_w[name]), name
