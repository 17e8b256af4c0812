"""Sequence-to-sequence training: the Seq2SeqLM objective, T5's span corruption, (source, target) data (BBC
News headlines and users' files), checked against hand-written losses and closed-form counts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.data import (
    BBC_HEADLINE_PREFIX,
    IGNORE_INDEX,
    EncodedPairs,
    SpanCorruptedBlocks,
    TextPairs,
    bbc_headlines,
    bbc_news,
    random_segmentation,
    span_corrupt,
    span_counts,
    span_noise_mask,
)
from lmforge.labelled import load_pair_splits, read_pairs, split_pairs
from lmforge.objectives import Seq2SeqLM
from lmforge.training import TrainConfig, evaluate, train

pytestmark = pytest.mark.usefixtures("one_thread")

V = 50


class StandIn(torch.nn.Module):
    """A tiny model with the encoder-decoder call signature: the decoder's logits at t depend on the decoder
    inputs up to t (a running mean of their embeddings) and on the masked mean of the encoder's embeddings."""

    def __init__(self, vocab: int = V, width: int = 16):
        super().__init__()
        self.enc = torch.nn.Embedding(vocab, width)
        self.dec = torch.nn.Embedding(vocab, width)
        self.out = torch.nn.Linear(width, vocab)
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask,
                           "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_attention_mask})
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        enc = (self.enc(input_ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, C)
        dec = self.dec(decoder_input_ids).cumsum(1) / torch.arange(1, decoder_input_ids.shape[1] + 1)[:, None]
        return self.out(torch.tanh(dec + enc[:, None]))  # (B, T, V)


def pair_data(n: int = 12, seed: int = 0) -> EncodedPairs:
    """Pairs of varied lengths whose target is a function of the source (learnable)."""
    rng = torch.Generator().manual_seed(seed)
    sources, targets = [], []
    for _ in range(n):
        length = int(torch.randint(2, 9, (), generator=rng))
        sources.append(" ".join(str(int(x)) for x in torch.randint(3, V, (length,), generator=rng)))
        targets.append(" ".join(sources[-1].split()[: 1 + length % 4]))
    encode = lambda text: [int(w) for w in text.split()] + [1]  # noqa: E731 - eos 1
    return EncodedPairs(TextPairs(sources, targets), encode, max_source_len=16, max_target_len=8, pad_id=0)


# --- the objective --------------------------------------------------------------------------------------------


def test_seq2seq_loss_equals_hand_written_cross_entropy_per_example():
    """The batched, padded loss is the mean over every real target token of -log p(y_t | x, y_<t), computed
    here one example at a time with no padding at all."""
    data = pair_data()
    items = [data[i] for i in range(6)]
    batch = data.collate(items)
    assert batch["labels"].eq(IGNORE_INDEX).any() and batch["attention_mask"].eq(0).any()  # padding on both sides
    torch.manual_seed(0)
    model = StandIn()
    loss, metrics = Seq2SeqLM()(model, batch)
    call = model.calls[-1]
    assert torch.equal(call["decoder_input_ids"][:, 0], torch.zeros(6, dtype=torch.long))  # T5 starts with pad 0
    assert torch.equal(call["decoder_attention_mask"], batch["labels"].ne(IGNORE_INDEX).long())
    total, count = 0.0, 0
    for it in items:
        target = it["labels"]
        decoder_inputs = torch.cat([torch.zeros(1, dtype=torch.long), target[:-1]])
        logits = model(it["input_ids"][None], decoder_input_ids=decoder_inputs[None])[0].detach()  # (T, V)
        total += F.cross_entropy(logits, target, reduction="sum").item()
        count += len(target)
    assert loss.item() == pytest.approx(total / count, rel=1e-6)
    assert Seq2SeqLM().n_targets(batch) == count
    stats = Seq2SeqLM().eval_stats(model, batch)
    summary = Seq2SeqLM().summarize(stats)
    assert summary["loss"] == pytest.approx(total / count, rel=1e-6) and summary["tokens"] == count
    assert summary["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-6)
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_seq2seq_rejects_decoder_only_outputs_and_missing_labels():
    batch = pair_data().collate([pair_data()[0], pair_data()[1]])

    def decoder_only(input_ids, **kwargs):
        return torch.zeros(*input_ids.shape, V)  # logits over the input positions, not the targets

    with pytest.raises(ValueError, match="encoder-decoder"):
        Seq2SeqLM()(decoder_only, {**batch, "labels": batch["labels"][:, :1]})
    with pytest.raises(ValueError, match="needs 'labels'"):
        Seq2SeqLM()(StandIn(), {"input_ids": batch["input_ids"]})


def test_seq2seq_accumulation_equals_one_large_batch():
    """Targets of unequal lengths: k micro-batches weighted by their target counts give one large batch's step."""
    states = []
    for batch_size, accum in ((8, 1), (2, 4)):
        torch.manual_seed(0)
        model = StandIn()
        cfg = TrainConfig(lr=0.1, max_steps=2, betas=(0.0, 0.0), eps=1.0, weight_decay=0.0, progress=False,
                          batch_size=batch_size, grad_accum=accum)
        train(model, Seq2SeqLM(), pair_data(16), cfg)
        states.append(model.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=5e-7, msg=key)


def test_stand_in_learns_the_pairs_through_the_loop():
    data = pair_data(8)
    torch.manual_seed(0)
    model = StandIn()
    before = evaluate(model, Seq2SeqLM(), data, batch_size=4)["loss"]
    cfg = TrainConfig(lr=3e-2, max_steps=150, batch_size=4, schedule="constant", progress=False)
    after = train(model, Seq2SeqLM(), data, cfg, eval_data=data).eval_metrics
    assert before > 3.0 and after["loss"] < 0.5 * before


# --- span corruption ------------------------------------------------------------------------------------------


def sentinels(top: int, n: int = 100) -> list[int]:
    """T5's sentinel ids: <extra_id_k> = top - k."""
    return [top - k for k in range(n)]


def test_random_segmentation_sums_and_is_positive():
    gen = torch.Generator().manual_seed(0)
    for n_items, n_segments in ((10, 1), (10, 10), (57, 6), (2, 2)):
        parts = random_segmentation(n_items, n_segments, gen)
        assert len(parts) == n_segments and sum(parts) == n_items and min(parts) >= 1
    with pytest.raises(ValueError, match="cannot cut"):
        random_segmentation(3, 4, gen)
    # uniform over compositions: 4 items in 2 parts -> (1,3), (2,2), (3,1) a third each
    seen = [tuple(random_segmentation(4, 2, gen)) for _ in range(3000)]
    for composition in ((1, 3), (2, 2), (3, 1)):
        assert abs(seen.count(composition) / 3000 - 1 / 3) < 0.04


@pytest.mark.parametrize("length", [2, 7, 20, 64, 100, 128, 512, 568])
def test_span_noise_mask_closed_form_counts(length):
    n_noise, n_spans = span_counts(length)
    assert n_noise == min(max(round(length * 0.15), 1), length - 1)
    assert n_spans == max(round(n_noise / 3), 1)
    for seed in range(5):
        mask = span_noise_mask(length, torch.Generator().manual_seed(seed))
        assert int(mask.sum()) == n_noise
        starts = int((mask[1:] & ~mask[:-1]).sum()) + int(mask[0])
        assert starts == n_spans  # spans never touch: kept and noise spans alternate
        assert not mask[0]  # T5 begins with a kept span
    assert span_counts(568) == (85, 28)  # T5's own example: 568 raw tokens -> 512 inputs, 114 targets


def test_span_corrupt_reconstructs_the_original_and_numbers_sentinels_down():
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    mask = torch.tensor([0, 1, 1, 0, 0, 1], dtype=torch.bool)
    inputs, targets = span_corrupt(ids, mask, sentinels(99), eos_id=1)
    assert inputs.tolist() == [10, 99, 13, 14, 98, 1]
    assert targets.tolist() == [99, 11, 12, 98, 15, 1]
    # a random block: the sentinels in the inputs, replaced by their spans from the targets, give the block back
    gen = torch.Generator().manual_seed(3)
    block = torch.randint(2, 90, (200,), generator=gen)
    mask = span_noise_mask(200, gen)
    inputs, targets = span_corrupt(block, mask, sentinels(99), eos_id=1)
    n_noise, n_spans = span_counts(200)
    assert len(inputs) == 200 - n_noise + n_spans + 1 and len(targets) == n_noise + n_spans + 1
    spans: dict[int, list[int]] = {}
    for token in targets[:-1].tolist():
        if token >= 90:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    assert list(spans) == [99 - k for k in range(n_spans)]
    rebuilt = [t for token in inputs[:-1].tolist() for t in (spans[token] if token >= 90 else [token])]
    assert rebuilt == block.tolist()


def test_span_corrupted_blocks_seeded_per_item_and_epoch():
    blocks = torch.randint(2, 90, (6, 40), generator=torch.Generator().manual_seed(0))
    ds = SpanCorruptedBlocks(blocks, sentinels(99), eos_id=1, pad_id=0, seed=7)
    first = [ds[i] for i in range(6)]
    again = SpanCorruptedBlocks(blocks, sentinels(99), eos_id=1, pad_id=0, seed=7)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(first, [again[i] for i in range(6)], strict=True))
    assert torch.equal(again[4]["input_ids"], first[4]["input_ids"])  # read out of order: the same item
    other_seed = SpanCorruptedBlocks(blocks, sentinels(99), eos_id=1, pad_id=0, seed=8)
    assert any(not torch.equal(first[i]["labels"], other_seed[i]["labels"]) for i in range(6))
    ds.set_epoch(1)
    assert any(not torch.equal(first[i]["labels"], ds[i]["labels"]) for i in range(6))  # new noise each epoch
    batch = ds.collate([ds[0], ds[1]])
    n_noise, n_spans = span_counts(40)
    assert batch["input_ids"].shape == (2, 40 - n_noise + n_spans + 1)
    assert batch["labels"].shape == (2, n_noise + n_spans + 1) and batch["attention_mask"].all()
    with pytest.raises(ValueError, match="make 2 noise spans but there are 1 sentinel tokens"):
        SpanCorruptedBlocks(blocks, [99], eos_id=1, pad_id=0)


def test_span_corruption_trains_and_resumes_exactly(tmp_path):
    """The loop with span-corrupted data stopped after 3 of 6 steps and resumed ends where 6 steps in a row
    end (the data position and the per-(epoch, item) noise are restored)."""
    blocks = torch.randint(2, 40, (8, 24), generator=torch.Generator().manual_seed(0))
    data = SpanCorruptedBlocks(blocks, sentinels(V - 1, 10), eos_id=1, pad_id=0)
    states = []
    for name, stops in (("straight", [6]), ("resumed", [3, 6])):
        torch.manual_seed(0)
        model = StandIn()
        for i, stop in enumerate(stops):
            cfg = TrainConfig(lr=1e-2, max_steps=stop, batch_size=4, progress=False, run_dir=str(tmp_path / name),
                              schedule="constant")
            train(model, Seq2SeqLM(), data, cfg, resume=i > 0)
            if i == 0 and len(stops) > 1:
                torch.manual_seed(123)
                model = StandIn()  # a fresh model: everything must come from the checkpoint
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


# --- (source, target) data ------------------------------------------------------------------------------------


def test_encoded_pairs_truncate_keep_eos_and_pad():
    pairs = TextPairs(["5 6 7 8 9", "5"], ["4 3 2", "4"])
    data = EncodedPairs(pairs, lambda t: [int(w) for w in t.split()] + [1], max_source_len=4, max_target_len=3,
                        pad_id=0)
    assert data[0]["input_ids"].tolist() == [5, 6, 7, 1] and data[0]["labels"].tolist() == [4, 3, 1]
    batch = data.collate([data[0], data[1]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1], [5, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[4, 3, 1], [4, 1, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="pair 1: target '' encodes to no tokens"):
        EncodedPairs(TextPairs(["5", "6"], ["4", ""]), lambda t: [int(w) for w in t.split()], 4, 4, 0)
    with pytest.raises(ValueError, match="2 sources but 1 targets"):
        TextPairs(["a", "b"], ["c"])


def test_bbc_headlines_on_the_fixed_bbc_split(bbc_dir):
    splits = bbc_headlines()
    news = bbc_news()
    assert {k: len(v) for k, v in splits.items()} == {"train": 1701, "validation": 212, "test": 214}
    for name in splits:
        assert splits[name].where == news[name].sources  # the same articles in the same order
    test = splits["test"]
    first_file = news["test"].texts[0]
    assert first_file.startswith(test.targets[0] + "\n")
    assert test.sources[0].startswith(BBC_HEADLINE_PREFIX)
    assert test.sources[0][len(BBC_HEADLINE_PREFIX):] in first_file and "\n" not in test.targets[0]
    assert all(s.startswith(BBC_HEADLINE_PREFIX) for s in test.sources)
    assert all(t and t.strip() == t for t in test.targets)
    assert bbc_headlines("validation").targets == splits["validation"].targets


def test_user_pair_files_and_their_errors(tmp_path):
    rows = [{"source": f"question {i}", "target": f"answer {i}"} for i in range(20)]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("src,tgt\n" + "".join(f'"{r["source"]}, quoted","{r["target"]}"\n' for r in rows))
    pairs = read_pairs(jsonl)
    assert pairs.sources[3] == "question 3" and pairs.targets[3] == "answer 3" and pairs.where[3].endswith(":4")
    assert read_pairs(csv_file, "src", "tgt").sources[0] == "question 0, quoted"
    splits = load_pair_splits(jsonl, split_seed=1)
    assert [len(s) for s in splits.values()] == [16, 2, 2]
    assert sorted(t for s in splits.values() for t in s.targets) == sorted(r["target"] for r in rows)
    assert splits["test"].targets == load_pair_splits(jsonl, split_seed=1)["test"].targets  # seeded
    given = load_pair_splits(train=jsonl, validation=jsonl, test=jsonl)
    assert set(given) == {"train", "validation", "test"} and given["test"].targets == pairs.targets
    with pytest.raises(ValueError, match=r"pairs.csv, line 1: no source column 'source'"):
        load_pair_splits(train=jsonl, validation=csv_file)
    with pytest.raises(ValueError, match=r"no target column 'summary'"):
        read_pairs(jsonl, target_column="summary")
    (tmp_path / "empty_target.jsonl").write_text('{"source": "a", "target": " "}\n')
    with pytest.raises(ValueError, match=r"empty_target.jsonl, line 1, column 'target': expected a non-empty"):
        read_pairs(tmp_path / "empty_target.jsonl")
    (tmp_path / "lines.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="need a CSV, TSV or JSON-lines file"):
        read_pairs(tmp_path / "lines.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pair_splits(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="at least train and validation"):
        load_pair_splits(train=jsonl)
    with pytest.raises(ValueError, match="too few"):
        split_pairs(TextPairs(["a", "b"], ["c", "d"]))
    with pytest.warns(UserWarning, match="1 pair\\(s\\) repeat"):
        split_pairs(TextPairs(["a", "a", *"bcdefghijk"], ["x", "x", *"bcdefghijk"]))


# --- the real T5 model ------------------------------------------------------------------------------------------


def tiny_t5(**overrides) -> torch.nn.Module:
    from lmforge.config import ModelConfig
    from lmforge.models import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig.from_name("tiny-t5", **overrides))


def t5_pairs(n: int = 16, seed: int = 0) -> EncodedPairs:
    """Pairs of varied lengths over tiny-t5's 128 ids (eos 1, pad 0): target = the source's first few ids."""
    rng = torch.Generator().manual_seed(seed)
    sources, targets = [], []
    for _ in range(n):
        length = int(torch.randint(3, 12, (), generator=rng))
        words = [str(int(x)) for x in torch.randint(3, 100, (length,), generator=rng)]
        sources.append(" ".join(words))
        targets.append(" ".join(words[: 1 + length % 4]))
    encode = lambda text: [int(w) for w in text.split()] + [1]  # noqa: E731
    return EncodedPairs(TextPairs(sources, targets), encode, max_source_len=16, max_target_len=8, pad_id=0)


@pytest.mark.parametrize("version", ["tiny-t5", "flan"])
def test_t5_loss_equals_transformers_loss_with_labels(version, tmp_path):
    """Seq2SeqLM on lmforge's T5 equals transformers' T5ForConditionalGeneration(labels=...).loss on the same
    weights (its own shift_right and -100 handling), with padding in the encoder input and the targets."""
    import transformers

    from lmforge.io import save_model

    flan = dict(activation="gelu_tanh", gated_mlp=True, tie_embeddings=False)
    model = tiny_t5(**(flan if version == "flan" else {})).eval()
    save_model(model, tmp_path)
    reference = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    data = t5_pairs()
    batch = data.collate([data[i] for i in range(8)])
    assert batch["labels"].eq(IGNORE_INDEX).any() and batch["attention_mask"].eq(0).any()
    with torch.no_grad():
        loss, _ = Seq2SeqLM()(model, batch)
        expected = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_t5_learns_pairs_and_span_corruption_through_the_loop():
    data = t5_pairs(8)
    model = tiny_t5()
    before = evaluate(model, Seq2SeqLM(), data, batch_size=4)["loss"]
    cfg = TrainConfig(lr=1e-2, max_steps=60, batch_size=4, schedule="constant", progress=False)
    after = train(model, Seq2SeqLM(), data, cfg, eval_data=data).eval_metrics
    assert after["loss"] < 0.3 * before, (before, after)
    blocks = torch.randint(2, 60, (8, 32), generator=torch.Generator().manual_seed(0))
    corrupted = SpanCorruptedBlocks(blocks, sentinels(127), eos_id=1, pad_id=0)
    model = tiny_t5()
    before = evaluate(model, Seq2SeqLM(), corrupted, batch_size=4)["loss"]
    after = train(model, Seq2SeqLM(), corrupted, cfg, eval_data=corrupted).eval_metrics
    assert after["loss"] < 0.6 * before, (before, after)


def test_t5_resume_is_bit_identical(tmp_path):
    """A run interrupted after step 4 (checkpoint at step 3) and resumed into a fresh model ends with the weights
    of the uninterrupted run: data position, RNG (dropout), optimizer and schedule come back."""
    data = t5_pairs(12)
    cfg = TrainConfig(lr=1e-2, max_steps=6, batch_size=4, save_every=3, warmup_steps=2, progress=False)

    class Interrupt(Exception):
        pass

    def stop_at_4(step, record):
        if step == 4:
            raise Interrupt

    straight = tiny_t5(dropout=0.1)
    train(straight, Seq2SeqLM(), data, cfg)
    with pytest.raises(Interrupt):
        train(tiny_t5(dropout=0.1), Seq2SeqLM(), data, dataclasses.replace(cfg, run_dir=str(tmp_path)),
              on_step=stop_at_4)
    resumed = tiny_t5(dropout=0.1)
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)  # a different start: everything must come from the checkpoint
    train(resumed, Seq2SeqLM(), data, dataclasses.replace(cfg, run_dir=str(tmp_path)), resume=True)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def dp_config(batch_size: int) -> TrainConfig:
    """betas=(0, 0) and eps=1 make AdamW's update g / (|g| + 1): smooth in the gradient, so that float rounding
    stays tiny (Adam's g / |g| turns rounding of near-zero gradients into +-lr jumps), while a wrong weighting
    of the ranks' batches moves the weights by ~1e-3 at this learning rate."""
    return TrainConfig(lr=0.1, betas=(0.0, 0.0), eps=1.0, batch_size=batch_size, grad_accum=2, max_steps=3,
                       clip_norm=5.0, progress=False)


def data_parallel_t5_rank(names: list[str]) -> dict[str, dict]:
    """Train tiny T5 once per strategy name in one process group (batch 2 per rank, 2 micro-batches)."""
    from lmforge.parallel.strategy import make_strategy, run_training

    out = {}
    for name in names:
        strategy = make_strategy(name)
        model = tiny_t5()
        if strategy.rank == 1:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)  # rank 0's weights must be broadcast
        run_training(model, Seq2SeqLM(), t5_pairs(16), dp_config(2), strategy)
        out[name] = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return out


def test_t5_allreduce_and_ddp_at_two_ranks_equal_one_process():
    """T5 under allreduce and ddp at 2 gloo ranks of batch 2 ends with the weights of one process with batch 4
    (the ranks' batches side by side; clipping and accumulation on), though the ranks' batches hold different
    numbers of target tokens: every micro-batch weighs by its share of all ranks' targets."""
    from parallel_helpers import run

    results = run(data_parallel_t5_rank, 2, ["allreduce", "ddp"], timeout=180)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks
    try:
        model = tiny_t5()
        train(model, Seq2SeqLM(), t5_pairs(16), dp_config(4))
    finally:
        torch.set_num_threads(threads)
    expected = model.state_dict()
    for name in ("allreduce", "ddp"):
        for rank in range(2):
            got = results[rank][name]
            assert got.keys() == expected.keys()
            for key in expected:
                torch.testing.assert_close(torch.from_numpy(got[key]), expected[key], rtol=0, atol=2e-6,
                                           msg=lambda m, key=key, name=name: f"{name} {key}: {m}")


# --- distillation of T5 -------------------------------------------------------------------------------------------


def test_t5_student_copies_the_chosen_layers():
    from lmforge.distill import init_student

    teacher = tiny_t5(n_layer=3, n_decoder_layer=4)
    student, layer_map = init_student(teacher, [0, 3], encoder_layers=[1, 2])
    assert layer_map == [0, 3]
    assert (student.config.n_layer, student.config.n_decoder_layers) == (2, 2)
    t, s = teacher.state_dict(), student.state_dict()
    for i, j in enumerate([0, 3]):
        for k, v in teacher.decoder.layers[j].state_dict().items():
            assert torch.equal(s[f"decoder.layers.{i}.{k}"], v), k
    for i, j in enumerate([1, 2]):
        for k, v in teacher.encoder.layers[j].state_dict().items():
            assert torch.equal(s[f"encoder.layers.{i}.{k}"], v), k
    for k in ("embed_tokens.weight", "encoder.relative_bias.weight", "decoder.relative_bias.weight",
              "encoder.norm.weight", "decoder.norm.weight"):
        assert torch.equal(s[k], t[k]) and s[k].data_ptr() != t[k].data_ptr(), k
    default, default_map = init_student(teacher)  # every other decoder layer, the whole encoder
    assert default_map == [0, 2] and default.config.n_layer == 3 and default.config.n_decoder_layers == 2
    same, _ = init_student(teacher, 4)  # all layers: the teacher's function
    batch = t5_pairs().collate([t5_pairs()[i] for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(Seq2SeqLM().logits(same.eval(), batch), Seq2SeqLM().logits(teacher.eval(), batch),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"decoder layer map \[0, 9\]"):
        init_student(teacher, [0, 9])
    with pytest.raises(ValueError, match="encoder_layers applies to encoder-decoder"):
        init_student(build_decoder(), 1, encoder_layers=1)


def build_decoder():
    from lmforge.config import ModelConfig
    from lmforge.models import build_model

    return build_model(ModelConfig.from_name("tiny-gpt2"))


def test_t5_distillation_loss_on_decoder_outputs_by_hand():
    """The triple loss of a T5 student equals KL, cross-entropy and cosine terms computed here from the two
    models' decoder outputs at the real target positions only."""
    from lmforge.distill import DistillObjective, init_student

    teacher = tiny_t5(n_decoder_layer=4).eval()
    student, layer_map = init_student(teacher, [0, 2])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    data = t5_pairs()
    batch = data.collate([data[i] for i in range(6)])
    T = 2.0
    objective = DistillObjective(teacher, student, Seq2SeqLM(), alpha_ce=5.0, alpha_lm=2.0, alpha_cos=1.0,
                                 temperature=T)
    loss, metrics = objective(student, batch)
    labels = batch["labels"]
    real = labels.ne(IGNORE_INDEX)
    kwargs = Seq2SeqLM().model_kwargs(batch)
    with torch.no_grad():
        s = student(batch["input_ids"], output_hidden_states=True, **kwargs)
        t = teacher(batch["input_ids"], output_hidden_states=True, **kwargs)
    ps, pt = (s.logits[real] / T).log_softmax(-1), (t.logits[real] / T).log_softmax(-1)  # (N, V)
    kl = (pt.exp() * (pt - ps)).sum(-1).mean() * T**2
    ce = F.cross_entropy(s.logits[real], labels[real])
    cos = 1 - F.cosine_similarity(s.hidden_states[-1][real], t.hidden_states[-1][real], dim=-1).mean()
    assert metrics["loss_ce"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert metrics["loss_lm"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert metrics["loss_cos"].item() == pytest.approx(cos.item(), rel=1e-5, abs=1e-7)
    assert loss.item() == pytest.approx(5 * kl.item() + 2 * ce.item() + cos.item(), rel=1e-5)
    before = metrics["loss_ce"].item()
    cfg = TrainConfig(lr=3e-3, max_steps=30, batch_size=4, progress=False)
    result = train(student, objective, data, cfg)
    assert result.train_loss < loss.item()
    assert objective(student, batch)[1]["loss_ce"].item() < before


# --- the command line ---------------------------------------------------------------------------------------------

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "far", "away", "home", "big", "small", "red", "blue",
         "green", "bank", "rates", "rise", "fall", "uk", "shares", "sales", "net", "profit", "deal"]


@pytest.fixture(scope="module")
def t5_cli(tmp_path_factory):
    """A tiny random T5 folder with a word-level T5-layout tokenizer (<pad> 0, </s> 1, <unk> 2, 25 words, 100
    sentinels with <extra_id_0> on top: 128 ids), a corpus folder and (source, target) pairs in JSON lines."""
    import random

    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    from lmforge.io import save_model
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("t5cli")
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    vocab.update({f"<extra_id_{k}>": 127 - k for k in range(100)})
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    backend.add_special_tokens([f"<extra_id_{k}>" for k in range(100)])  # as T5's: added, at their vocab ids
    save_model(tiny_t5(), root / "t5")
    Tokenizer(backend, {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"}).save(root / "t5")
    rng = random.Random(0)
    (root / "corpus").mkdir()
    for i in range(6):
        (root / "corpus" / f"{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(120)))
    rows = []
    for _ in range(40):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        rows.append({"source": "summarize: " + " ".join(words), "target": " ".join(words[:3])})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.slow
def test_cli_pretrain_finetune_evaluate_distill_t5(t5_cli, run_cli, tmp_path):
    common = ("--steps", 4, "--batch-size", 4, "--quiet", "--lr", "3e-3")
    code, out, err = run_cli("train", "--model", t5_cli / "t5", "--data", t5_cli / "corpus", "--block-size", 24,
                             "--run-dir", tmp_path / "pre", *common)  # default for a corpus: span corruption
    assert code == 0, err
    pre = json.loads(out)
    assert pre["step"] == 4 and pre["eval"]["tokens"] > 0
    code, out, err = run_cli("train", "--model", tmp_path / "pre" / "model", "--objective", "seq2seq", "--data",
                             t5_cli / "pairs.jsonl", "--run-dir", tmp_path / "ft", *common)
    assert code == 0, err
    code, out, err = run_cli("train", "--model", tmp_path / "ft" / "model", "--objective", "seq2seq", "--data",
                             t5_cli / "pairs.jsonl", "--run-dir", tmp_path / "ft", "--resume", *common[:1], 6,
                             *common[2:])
    assert code == 0 and json.loads(out)["step"] == 6, err
    code, out, err = run_cli("evaluate", "--model", tmp_path / "ft" / "model", "--data", t5_cli / "pairs.jsonl",
                             "--split", "test", "--max-target-len", 6)
    assert code == 0, err
    scores = json.loads(out)
    assert scores["examples"] == 4 and scores["tokens"] > 0 and 0 <= scores["rougeL"] <= 1
    assert {"rouge1", "rouge2", "loss", "perplexity"} <= set(scores)
    code, out, err = run_cli("finetune", "--model", t5_cli / "t5", "--data", t5_cli / "pairs.jsonl",
                             "--run-dir", tmp_path / "finetune", "--max-target-len", 6, *common)
    assert code == 0, err
    report = json.loads(out)
    assert report["validation"]["tokens"] > 0 and report["test"]["examples"] == 4 and "rougeL" in report["test"]
    code, out, err = run_cli("distill", "--teacher", tmp_path / "ft" / "model", "--data", t5_cli / "pairs.jsonl",
                             "--student-layers", "1", "--student-encoder-layers", "0,", "--run-dir",
                             tmp_path / "student", *common)
    assert code == 0, err
    assert json.loads(out)["layer_map"] == [0]
    from lmforge.io import load_model

    student = load_model(tmp_path / "student" / "model")
    assert (student.config.n_layer, student.config.n_decoder_layers) == (1, 1)


def test_cli_t5_from_scratch_with_a_tokenizer(t5_cli, run_cli, tmp_path):
    code, out, err = run_cli("train", "--model", "tiny-t5", "--from-scratch", "--tokenizer", t5_cli / "t5",
                             "--n-layer", 1, "--n-decoder-layer", 2, "--data", t5_cli / "pairs.jsonl",
                             "--run-dir", tmp_path / "r", "--steps", 2, "--batch-size", 4, "--quiet")
    assert code == 0, err
    from lmforge.io import load_model

    model = load_model(tmp_path / "r" / "model")
    assert (model.config.n_layer, model.config.n_decoder_layers, model.config.vocab_size) == (1, 2, 128)


def test_cli_t5_errors(t5_cli, run_cli, tmp_path):
    t5, pairs, corpus = t5_cli / "t5", t5_cli / "pairs.jsonl", t5_cli / "corpus"
    run = ("--run-dir", tmp_path / "r")
    cases = [
        (("train", "--model", t5, "--data", corpus, "--objective", "clm", *run),
         "--objective clm does not fit --model"),
        (("train", "--model", t5, "--data", pairs, "--objective", "span-corruption", *run),
         "pre-trains on a text corpus"),
        (("train", "--model", t5, "--data", "bbc-news", "--objective", "seq2seq", *run), "plain-text corpus"),
        (("train", "--model", t5, "--data", pairs, "--max-target-len", 1, *run), "--max-target-len 1"),
        (("evaluate", "--model", t5, "--data", corpus, "--objective", "mlm"), "does not fit this model"),
        (("evaluate", "--model", t5, "--data", pairs, "--split", "all"), "--split all"),
        (("finetune", "--model", t5, "--data", pairs, "--task", "sst2", *run), "--task applies to classification"),
        (("finetune", "--model", t5, "--data", pairs, "--source-column", "question", *run),
         "no source column 'question'"),
        (("distill", "--teacher", t5, "--data", pairs, "--objective", "classify", *run), "does not fit the teacher"),
        (("train", "--model", "tiny-t5", "--from-scratch", "--tokenizer", "gpt2", "--data", corpus, *run),
         "sentinel tokens <extra_id_0>"),
    ]
    for argv, expected in cases:
        code, _, err = run_cli(*argv)
        assert code == 2 and expected in err and err.count("\n") == 1, (argv, err)


def test_generate_targets_and_rouge_equal_a_hand_written_greedy_loop(t5_cli):
    """`generate_targets` (batched by length, right-padded sources) gives, in the input order, the text of a
    plain greedy loop over the model's forward run one source at a time; `seq2seq_rouge` scores it."""
    from lmforge.io import load_model
    from lmforge.metrics import corpus_rouge
    from lmforge.predict import generate_targets, seq2seq_rouge
    from lmforge.tokenizer import Tokenizer

    model, tokenizer = load_model(t5_cli / "t5"), Tokenizer.for_model(t5_cli / "t5")
    sources = ["the cat sat", "big red dog ran far away home", "uk shares rise", "net profit"]
    got = generate_targets(model, tokenizer, sources, batch_size=3, max_new_tokens=5)
    expected = []
    for source in sources:
        ids = torch.tensor([tokenizer.encode(source)])
        out = [0]
        with torch.no_grad():
            for _ in range(5):
                logits = model(ids, decoder_input_ids=torch.tensor([out])).logits[0, -1]
                out.append(int(logits.argmax()))
                if out[-1] == 1:
                    break
        expected.append(tokenizer.decode(out, skip_special_tokens=True).strip())
    assert got == expected
    references = ["the cat", "a dog", "uk shares", "profit"]
    pairs = TextPairs(sources, references)
    scores = seq2seq_rouge(model, tokenizer, pairs, batch_size=2, max_new_tokens=5)
    assert scores == {**corpus_rouge(expected, references), "examples": 4}
    with pytest.raises(ValueError, match="non-empty list"):
        generate_targets(model, tokenizer, "one string")
