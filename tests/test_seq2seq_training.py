"""Sequence-to-sequence training: the Seq2SeqLM objective, T5's span corruption, (source, target) data (BBC
News headlines and users' files), checked against hand-written losses and closed-form counts."""

from __future__ import annotations

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
from lmforge.objectives import Seq2SeqLM, shift_right
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


def test_shift_right_closed_form():
    labels = torch.tensor([[5, 6, 7, 1], [8, 1, IGNORE_INDEX, IGNORE_INDEX]])
    assert shift_right(labels, 0, 0).tolist() == [[0, 5, 6, 7], [0, 8, 1, 0]]
    assert shift_right(labels, 9, 3).tolist() == [[9, 5, 6, 7], [9, 8, 1, 3]]
    with pytest.raises(ValueError, match="target length"):
        shift_right(torch.tensor([1, 2]), 0, 0)


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
    inputs, targets = span_corrupt(ids, mask, first_sentinel=99, eos_id=1)
    assert inputs.tolist() == [10, 99, 13, 14, 98, 1]
    assert targets.tolist() == [99, 11, 12, 98, 15, 1]
    # a random block: the sentinels in the inputs, replaced by their spans from the targets, give the block back
    gen = torch.Generator().manual_seed(3)
    block = torch.randint(2, 90, (200,), generator=gen)
    mask = span_noise_mask(200, gen)
    inputs, targets = span_corrupt(block, mask, first_sentinel=99, eos_id=1)
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
    ds = SpanCorruptedBlocks(blocks, first_sentinel=99, eos_id=1, pad_id=0, seed=7)
    first = [ds[i] for i in range(6)]
    again = SpanCorruptedBlocks(blocks, first_sentinel=99, eos_id=1, pad_id=0, seed=7)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(first, [again[i] for i in range(6)], strict=True))
    assert torch.equal(again[4]["input_ids"], first[4]["input_ids"])  # read out of order: the same item
    other_seed = SpanCorruptedBlocks(blocks, first_sentinel=99, eos_id=1, pad_id=0, seed=8)
    assert any(not torch.equal(first[i]["labels"], other_seed[i]["labels"]) for i in range(6))
    ds.set_epoch(1)
    assert any(not torch.equal(first[i]["labels"], ds[i]["labels"]) for i in range(6))  # new noise each epoch
    batch = ds.collate([ds[0], ds[1]])
    n_noise, n_spans = span_counts(40)
    assert batch["input_ids"].shape == (2, 40 - n_noise + n_spans + 1)
    assert batch["labels"].shape == (2, n_noise + n_spans + 1) and batch["attention_mask"].all()
    with pytest.raises(ValueError, match="sentinels"):
        SpanCorruptedBlocks(blocks, first_sentinel=99, eos_id=1, pad_id=0, n_sentinels=1)


def test_span_corruption_trains_and_resumes_exactly(tmp_path):
    """The loop with span-corrupted data stopped after 3 of 6 steps and resumed ends where 6 steps in a row
    end (the data position and the per-(epoch, item) noise are restored)."""
    blocks = torch.randint(2, 40, (8, 24), generator=torch.Generator().manual_seed(0))
    data = SpanCorruptedBlocks(blocks, first_sentinel=V - 1, eos_id=1, pad_id=0)
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
