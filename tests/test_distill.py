"""Distillation: student initialisation, each loss term against hand-computed values, objective, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.data import IGNORE_INDEX, TokenBlocks
from lmforge.distill import (
    DistillObjective,
    aligned_hidden_pairs,
    cosine_hidden_loss,
    init_student,
    logit_mse_loss,
    soft_target_loss,
    student_layer_map,
)
from lmforge.io import load_model
from lmforge.models import build_model
from lmforge.objectives import CausalLM, Classification, MaskedLM
from lmforge.training import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig.from_name(name, **overrides)).eval()


# --- student initialisation -------------------------------------------------------------------------------


def test_layer_map_every_other_layer():
    assert student_layer_map(6) == [0, 2, 4]
    assert student_layer_map(6, 3) == [0, 2, 4]
    assert student_layer_map(30, 15) == list(range(0, 30, 2))
    assert student_layer_map(12, 4) == [0, 3, 6, 9]
    assert student_layer_map(5, 5) == [0, 1, 2, 3, 4]
    for bad in (0, 7, -1):
        with pytest.raises(ValueError, match="needs 1..6 layers"):
            student_layer_map(6, bad)


@pytest.mark.parametrize("preset,layers,expected", [
    ("tiny-gpt2", None, [0, 2]),
    ("tiny-llama", [3, 1], [3, 1]),
    ("tiny-bert", 2, [0, 2]),
    ("tiny-roberta", [1, 2, 3], [1, 2, 3]),
])
def test_student_copies_exactly_the_chosen_layers(preset, layers, expected):
    teacher = tiny(preset, n_layer=4)
    student, layer_map = init_student(teacher, layers)
    assert layer_map == expected
    assert student.config.n_layer == len(expected)
    assert student.config.replace(n_layer=4) == teacher.config
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    for name, p in s_params.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            source = t_params[f"layers.{expected[int(i)]}.{rest}"]
        else:
            source = t_params[name]
        assert torch.equal(p, source), name
        assert p.data_ptr() != source.data_ptr(), f"{name} shares storage with the teacher"
    # every teacher tensor outside the layers (embeddings, final norm, heads) is in the student
    outside = {n for n in t_params if not n.startswith("layers.")}
    assert outside <= set(s_params)


def test_student_with_every_layer_reproduces_the_teacher():
    teacher = tiny("tiny-bert", head="classify", n_labels=3)
    student, _ = init_student(teacher, [0, 1])
    ids = torch.randint(0, 128, (2, 7))
    torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=0, atol=0)
    with torch.no_grad():
        student.layers[0].mlp.up.weight.add_(1.0)
    assert not torch.equal(student.layers[0].mlp.up.weight, teacher.layers[0].mlp.up.weight)


def test_tied_head_stays_tied_in_the_student():
    student, _ = init_student(tiny("tiny-gpt2", n_layer=4))
    assert student.lm_head.weight is student.embed_tokens.weight


def test_fresh_student_from_config():
    teacher = tiny("tiny-llama", n_layer=4)
    config = teacher.config.replace(n_layer=1, d_model=16, n_head=2, n_kv_head=1, d_ff=32)
    student, layer_map = init_student(teacher, config=config)
    assert layer_map is None
    assert student.config == config
    with pytest.raises(ValueError, match="incompatible vocabularies: teacher has 128 tokens, the student 64"):
        init_student(teacher, config=config.replace(vocab_size=64))
    with pytest.raises(ValueError, match="either layers"):
        init_student(teacher, 2, config=config)


@pytest.mark.parametrize("layers", [[], [0, 4], [-1]])
def test_bad_layer_map(layers):
    with pytest.raises(ValueError, match=r"teacher layer indices in \[0, 4\)"):
        init_student(tiny("tiny-gpt2", n_layer=4), layers)


def test_aligned_hidden_pairs():
    assert aligned_hidden_pairs([0, 2, 4], 6) == [(1, 2), (2, 4), (3, 6)]
    assert aligned_hidden_pairs(list(range(0, 30, 2)), 30)[-2:] == [(14, 28), (15, 30)]
    assert aligned_hidden_pairs([1], 4) == [(1, 4)]
    with pytest.raises(ValueError, match="strictly increasing"):
        aligned_hidden_pairs([2, 0], 4)


# --- loss terms against hand-computed values --------------------------------------------------------------


def softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def hand_kl(s_rows: list[list[float]], t_rows: list[list[float]], temperature: float) -> float:
    total = 0.0
    for s, t in zip(s_rows, t_rows, strict=True):
        ps, pt = softmax(s, temperature), softmax(t, temperature)
        total += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
    return total / len(s_rows) * temperature**2


def test_soft_target_loss_by_hand():
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [9.0, 9.0, 9.0]]
    t = [[2.0, 0.0, 1.0], [1.5, 0.5, 0.5], [-5.0, 7.0, 1.0]]
    for temperature in (1.0, 2.0, 0.5):
        # (B=1, T=3, V=3); the last position is padding and must not count
        got = soft_target_loss(torch.tensor([s]), torch.tensor([t]), temperature, torch.tensor([[1, 1, 0]]))
        assert got.item() == pytest.approx(hand_kl(s[:2], t[:2], temperature), rel=1e-6)
    # classifier logits (B, n_labels): every row counts
    got = soft_target_loss(torch.tensor(s), torch.tensor(t), 3.0)
    assert got.item() == pytest.approx(hand_kl(s, t, 3.0), rel=1e-6)


def test_soft_target_loss_is_zero_for_equal_logits_and_positive_otherwise():
    x = torch.randn(2, 5, 11)
    assert soft_target_loss(x, x.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-7)
    assert soft_target_loss(x, torch.randn(2, 5, 11), 2.0).item() > 0


def test_cosine_hidden_loss_by_hand():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [7.0, -2.0]]])  # (B=1, T=4, C=2)
    t = torch.tensor([[[0.0, 2.0], [2.0, 2.0], [4.0, 3.0], [0.0, 1.0]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # 1 - cos: orthogonal -> 1, parallel -> 0, (3,4).(4,3) / 25 = 24/25 -> 1/25; the padded row is ignored
    expected = (1.0 + 0.0 + 1 / 25) / 3
    assert cosine_hidden_loss(s, t, mask).item() == pytest.approx(expected, rel=1e-6)
    assert cosine_hidden_loss(s[0, :2], t[0, :2]).item() == pytest.approx(0.5, rel=1e-6)


def test_logit_mse_loss_by_hand():
    s = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [5.0, 5.0]]])
    t = torch.tensor([[[0.0, 4.0], [1.0, -1.0], [0.0, 0.0]]])
    expected = (1 + 4 + 1 + 1) / 4  # two real positions, two logits each
    assert logit_mse_loss(s, t, torch.tensor([[1, 1, 0]])).item() == pytest.approx(expected)


def test_loss_shape_errors():
    with pytest.raises(ValueError, match=r"student logits \(2, 3\) and teacher logits \(2, 4\) differ"):
        soft_target_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        soft_target_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="project the student's first"):
        cosine_hidden_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match=r"mask of shape \(1, 3\)"):
        logit_mse_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 3))


# --- the objective ------------------------------------------------------------------------------------------


def lm_batch(B: int = 2, T: int = 6, vocab: int = 128, pad_last: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, T - pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_terms_vanish_when_student_equals_teacher():
    teacher = tiny("tiny-gpt2")
    student, _ = init_student(teacher, [0, 1])
    objective = DistillObjective(teacher, student, CausalLM(), alpha_ce=1.0, alpha_lm=1.0, alpha_cos=1.0,
                                 alpha_mse=1.0)
    _, metrics = objective(student, lm_batch())
    assert metrics["loss_ce"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["loss_cos"].item() == pytest.approx(0.0, abs=1e-6)
    # the teacher's no-grad forward takes the decode-sized matvec kernel (lm_batch has few rows), the student's
    # F.linear: equal up to float32 summation order
    assert metrics["loss_mse"].item() == pytest.approx(0.0, abs=1e-12)
    assert metrics["loss_lm"].item() > 1.0  # the hard-label loss of a random model is not zero


@pytest.mark.parametrize("preset,base", [("tiny-llama", "clm"), ("tiny-bert", "mlm"),
                                         ("tiny-distilbert", "cls")])
def test_total_is_the_weighted_sum_of_the_terms(preset, base):
    overrides = {"head": "classify", "n_labels": 3} if base == "cls" else {}
    teacher = tiny(preset, n_layer=4, **overrides)
    student, layer_map = init_student(teacher)
    with torch.no_grad():  # make the student differ from the teacher (random heads give near-zero logits)
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    batch = lm_batch()
    if base == "clm":
        objective_base = CausalLM()
    elif base == "mlm":
        objective_base = MaskedLM()
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        labels[:, 1] = batch["input_ids"][:, 1]
        batch["input_ids"][:, 1] = 4  # the masked tokens
        batch["labels"] = labels
    else:
        objective_base = Classification(3)
        batch["labels"] = torch.tensor([0, 2])
    pairs = aligned_hidden_pairs(layer_map, 4)
    alphas = dict(alpha_ce=0.7, alpha_lm=0.2, alpha_cos=0.4, alpha_mse=0.3)
    objective = DistillObjective(teacher, student, objective_base, temperature=3.0, hidden_pairs=pairs,
                                 **alphas)
    loss, metrics = objective(student, batch)

    mask = batch["attention_mask"].bool()
    kw = {"attention_mask": batch["attention_mask"], "output_hidden_states": True}
    s_out, t_out = student(batch["input_ids"], **kw), teacher(batch["input_ids"], **kw)
    logit_mask = None if base == "cls" else mask
    ce = soft_target_loss(s_out.logits, t_out.logits, 3.0, logit_mask)
    mse = logit_mse_loss(s_out.logits, t_out.logits, logit_mask)
    cos = sum(cosine_hidden_loss(s_out.hidden_states[s], t_out.hidden_states[t], mask) for s, t in pairs)
    cos = cos / len(pairs)
    lm, _ = objective_base(student, batch)
    for key, value in (("loss_ce", ce), ("loss_lm", lm), ("loss_cos", cos), ("loss_mse", mse)):
        assert metrics[key].item() == pytest.approx(value.item(), rel=1e-5), key
        assert value.item() > 1e-4, key
    expected = 0.7 * ce + 0.2 * lm + 0.4 * cos + 0.3 * mse
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["loss"].item() == pytest.approx(loss.item())


def test_gradients_reach_the_student_and_never_the_teacher():
    teacher = tiny("tiny-bert", n_layer=4).train()
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    student, _ = init_student(teacher)
    objective = DistillObjective(teacher, student, MaskedLM())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert list(objective.parameters()) == []  # the teacher is not a submodule
    batch = lm_batch()
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    loss, _ = objective(student.train(), batch)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.layers.parameters())
    for n, p in teacher.named_parameters():
        assert torch.equal(p, before[n])


def test_projection_when_widths_differ():
    teacher = tiny("tiny-gpt2")
    student, _ = init_student(teacher, config=teacher.config.replace(d_model=16, n_head=2, d_ff=32))
    with pytest.raises(ValueError, match="width mismatch: the student's hidden states have 16 features, "
                                         "the teacher's 32; the cosine loss needs allow_projection=True"):
        DistillObjective(teacher, student, CausalLM(), allow_projection=False)
    DistillObjective(teacher, student, CausalLM(), alpha_cos=0.0, allow_projection=False)  # no cosine: fine
    objective = DistillObjective(teacher, student, CausalLM())
    assert objective.projection is not None and objective.projection.weight.shape == (32, 16)
    assert [p.shape for p in objective.parameters()] == [(32, 16), (32,)]
    loss, _ = objective(student, lm_batch())
    loss.backward()
    assert objective.projection.weight.grad is not None and objective.projection.weight.grad.abs().sum() > 0


def test_objective_bad_inputs():
    teacher = tiny("tiny-gpt2")
    student, _ = init_student(teacher)
    other = tiny("tiny-gpt2", vocab_size=100)
    with pytest.raises(ValueError,
                       match="incompatible vocabularies: teacher has 128 tokens, the student 100"):
        DistillObjective(teacher, other, CausalLM())
    with pytest.raises(ValueError, match="the teacher has arch 'decoder' but the student has arch 'encoder'"):
        DistillObjective(teacher, tiny("tiny-bert"), CausalLM())
    with pytest.raises(ValueError, match="label sets differ: teacher has 3 labels, the student 4"):
        DistillObjective(tiny("tiny-bert", head="classify", n_labels=3),
                         tiny("tiny-bert", head="classify", n_labels=4), Classification(3))
    with pytest.raises(ValueError, match=r"hidden-state pair \(2, 1\) out of range"):
        DistillObjective(teacher, student, CausalLM(), hidden_pairs=[(2, 1)])
    with pytest.raises(ValueError, match="loss weights must be non-negative and not all zero"):
        DistillObjective(teacher, student, CausalLM(), alpha_ce=-1.0)
    with pytest.raises(ValueError, match="loss weights must be non-negative and not all zero"):
        DistillObjective(teacher, student, CausalLM(), alpha_ce=0, alpha_lm=0, alpha_cos=0)
    with pytest.raises(ValueError, match="temperature must be positive, got 0"):
        DistillObjective(teacher, student, CausalLM(), temperature=0)


# --- with the training loop and the command line ------------------------------------------------------------


def test_distillation_with_the_training_loop_trains_the_projection_and_closes_the_gap():
    teacher = tiny("tiny-gpt2", n_layer=3)
    with torch.no_grad():  # sharper teacher outputs (random init gives near-uniform ones)
        teacher.embed_tokens.weight.mul_(30)
    small = teacher.config.replace(n_layer=1, d_model=16, n_head=2, d_ff=32)
    student, _ = init_student(teacher, config=small)
    objective = DistillObjective(teacher, student, CausalLM(), alpha_ce=1.0, alpha_lm=0.0, alpha_cos=1.0,
                                 temperature=1.0)
    data = TokenBlocks(torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0)))
    batch = data.collate([data[i] for i in range(8)])
    with torch.no_grad():
        _, before = objective(student, batch)
    projection = objective.projection.weight.detach().clone()
    config = TrainConfig(lr=1e-2, max_steps=15, batch_size=8, progress=False)
    train(student, objective, data, config)
    with torch.no_grad():
        _, after = objective(student, batch)
    assert not torch.equal(objective.projection.weight, projection)  # optimised with the student
    assert after["loss_ce"] < 0.85 * before["loss_ce"]  # 4.6 -> 3.4 when written
    assert after["loss_cos"] < 0.6 * before["loss_cos"]  # 1.0 -> 0.46


@pytest.fixture(scope="module")
def cli_root(tmp_path_factory):
    """A 4-layer tiny decoder and a 2-layer tiny classifier saved as HF folders with a letter-level WordPiece
    vocabulary, a small corpus and a labelled folder."""
    import random
    import string

    from lmforge.io import save_model

    root = tmp_path_factory.mktemp("distill-cli")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *("##" + c for c in string.ascii_lowercase)]
    save_model(tiny("tiny-gpt2", n_layer=4), root / "gpt")
    classifier = tiny("tiny-bert", head="classify", n_labels=2)
    save_model(classifier, root / "unnamed")  # labels LABEL_0, LABEL_1
    classifier.config.extra.update(id2label={0: "animals", 1: "places"}, label2id={"animals": 0, "places": 1})
    save_model(classifier, root / "classifier")
    for name in ("gpt", "classifier", "unnamed"):
        (root / name / "vocab.txt").write_text("\n".join(vocab) + "\n")
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away"]
    (root / "corpus").mkdir()
    for i in range(4):
        (root / "corpus" / f"{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(60)))
    for label, label_words in (("animals", ["cat", "dog", "cow"]), ("places", ["home", "park", "town"])):
        (root / "labelled" / label).mkdir(parents=True)
        for i in range(10):
            text = " ".join(rng.choice(label_words) for _ in range(8))
            (root / "labelled" / label / f"{i}.txt").write_text(text)
    return root


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_distill_causal_lm(cli_root, tmp_path, capsys):
    code, out, err = run_cli(capsys, "distill", "--teacher", cli_root / "gpt", "--data", cli_root / "corpus",
                             "--run-dir", tmp_path / "run", "--steps", 2, "--batch-size", 2,
                             "--block-size", 16, "--align", "layers")
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["layer_map"] == [0, 2] and result["step"] == 2 and result["eval"]["perplexity"] > 1
    student = load_model(result["model"])
    assert student.config.n_layer == 2
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_cli_distill_classifier(cli_root, tmp_path, capsys):
    code, out, err = run_cli(capsys, "distill", "--teacher", cli_root / "classifier", "--data",
                             cli_root / "labelled", "--student-layers", "1,", "--run-dir", tmp_path / "run",
                             "--steps", 2, "--batch-size", 4)
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["layer_map"] == [1] and result["test"]["examples"] == 2
    assert load_model(result["model"]).config.n_labels == 2


def test_cli_distill_errors(cli_root, tmp_path, capsys):
    common = ("--data", cli_root / "corpus", "--run-dir", tmp_path / "run", "--steps", 1)
    code, _, err = run_cli(capsys, "distill", "--teacher", cli_root / "gpt", "--student-layers", "a,b",
                           *common)
    assert code == 2 and "--student-layers 'a,b': expected a layer count" in err
    code, _, err = run_cli(capsys, "distill", "--teacher", cli_root / "gpt", "--student-layers", "0,9",
                           *common)
    assert code == 2 and "teacher layer indices in [0, 4)" in err
    code, _, err = run_cli(capsys, "distill", "--teacher", cli_root / "gpt", "--objective", "mlm", *common)
    assert code == 2 and "--objective mlm does not fit the teacher (decoder" in err
    code, _, err = run_cli(capsys, "distill", "--teacher", cli_root / "gpt", "--resume", *common)
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "distill", "--teacher", cli_root / "classifier", "--data",
                           cli_root / "corpus", "--run-dir", tmp_path / "r2")
    assert code == 2 and "nor <label>/*.txt folders" in err
    code, _, err = run_cli(capsys, "distill", "--teacher", cli_root / "unnamed", "--data",
                           cli_root / "labelled", "--run-dir", tmp_path / "r3")
    assert code == 2 and "label-set mismatch" in err and "LABEL_0" in err
