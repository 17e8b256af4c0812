"""lmforge.data: corpora, packing, dynamic MLM masking, labelled sets and the BBC split, the O(1) sampler."""

from __future__ import annotations

import time

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data import (
    IGNORE_INDEX,
    EncodedTexts,
    EpochSampler,
    LabelledTexts,
    MaskedBlocks,
    TokenBlocks,
    bbc_news,
    encoder_blocks,
    mask_tokens,
    pack_tokens,
    read_corpus,
    read_labelled_folder,
    split_blocks,
    split_labelled,
)
from lmforge.models import build_model
from lmforge.objectives import CausalLM
from lmforge.training import TrainConfig, latest_checkpoint, train


def test_read_corpus_folder_and_file(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "b" / "c.txt").write_text("second doc")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "ignored.md").write_text("not a corpus file")
    assert read_corpus(tmp_path) == ["first doc", "second doc"]
    assert read_corpus(tmp_path / "a.txt") == ["first doc"]
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "café" in read_corpus(tmp_path)


def test_read_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_corpus(tmp_path / "nope")
    with pytest.raises(ValueError, match="no .txt files"):
        read_corpus(tmp_path)
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        read_corpus(tmp_path)


def test_pack_tokens():
    blocks = pack_tokens([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_size=3, separator=0)
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0 -> four blocks of 3
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5], [0, 6, 7], [8, 9, 0]]
    assert pack_tokens([[1, 2, 3, 4, 5]], block_size=2).tolist() == [[1, 2], [3, 4]]  # tail dropped
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_tokens([[1, 2]], block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        pack_tokens([[1, 2]], block_size=1)
    ds = TokenBlocks.from_texts(["ab", "cde"], lambda s: [ord(c) for c in s], block_size=2, separator=0)
    assert ds.collate([ds[0], ds[1]])["input_ids"].tolist() == [[97, 98], [0, 99]]


def test_split_blocks_and_encoder_blocks():
    rows = torch.arange(40).view(10, 4)
    train_rows, eval_rows = split_blocks(rows, 0.2)
    assert train_rows.tolist() == rows[:8].tolist() and eval_rows.tolist() == rows[8:].tolist()
    with pytest.raises(ValueError, match="cannot be split"):
        split_blocks(rows[:1], 0.5)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_blocks(rows, 1.0)
    enc = encoder_blocks([[10, 11, 12], [13, 14, 15, 16]], block_size=5, cls_id=1, sep_id=2)
    # stream 10 11 12 [SEP] 13 14 15 16 [SEP] in 3-token rows, each wrapped in [CLS] ... [SEP]
    assert enc.tolist() == [[1, 10, 11, 12, 2], [1, 2, 13, 14, 2], [1, 15, 16, 2, 2]]


def test_mask_tokens_statistics_and_specials():
    vocab, mask_id, specials = 50, 3, [0, 1, 2, 3]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (400, 500), generator=gen)  # ~8% special ids mixed in
    masked, labels = mask_tokens(ids, mask_id, vocab, specials, torch.Generator().manual_seed(1))
    is_special = torch.isin(ids, torch.tensor(specials))
    selected = labels.ne(IGNORE_INDEX)
    # specials are never selected and never changed
    assert not (selected & is_special).any()
    assert torch.equal(masked[is_special], ids[is_special])
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    n_normal = int((~is_special).sum())
    rate = selected.sum().item() / n_normal
    sd = (0.15 * 0.85 / n_normal) ** 0.5
    assert abs(rate - 0.15) < 5 * sd
    n_sel = int(selected.sum())
    to_mask = (masked == mask_id) & selected
    changed = (masked != ids) & ~to_mask & selected
    unchanged = (masked == ids) & selected
    sd_sel = lambda p: 5 * (p * (1 - p) / n_sel) ** 0.5  # noqa: E731
    p_same_random = 0.1 / (vocab - len(specials))  # a random replacement can draw the token itself
    assert abs(to_mask.sum().item() / n_sel - 0.8) < sd_sel(0.8)
    assert abs(changed.sum().item() / n_sel - (0.1 - p_same_random)) < sd_sel(0.1)
    assert abs(unchanged.sum().item() / n_sel - (0.1 + p_same_random)) < sd_sel(0.1)
    # random replacements are never special tokens
    assert not torch.isin(masked[changed], torch.tensor(specials)).any()


def test_masked_blocks_seeded_dynamic_and_padding():
    seqs = torch.randint(5, 100, (4, 64))
    seqs[:, -10:] = 0  # padding
    ds = MaskedBlocks(seqs, mask_id=4, vocab_size=100, special_ids=[1, 2], pad_id=0, seed=7)
    first = ds[2]
    assert torch.equal(first["input_ids"], ds[2]["input_ids"])  # reproducible
    assert first["attention_mask"][-10:].eq(0).all() and first["attention_mask"][:-10].eq(1).all()
    ds.set_epoch(1)
    assert not torch.equal(first["labels"], ds[2]["labels"])  # a new mask each epoch
    other = MaskedBlocks(seqs, mask_id=4, vocab_size=100, special_ids=[1, 2], pad_id=0, seed=7)
    other.set_epoch(1)
    assert torch.equal(other[2]["labels"], ds[2]["labels"])  # a pure function of (seed, epoch, index)
    for i in range(len(ds)):
        assert ds[i]["labels"][-10:].eq(IGNORE_INDEX).all()  # padding never masked
    batch = ds.collate([ds[0], ds[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 64)


def test_sampler_epochs_ranks_and_far_positions():
    n, bs, world = 103, 4, 3
    samplers = [EpochSampler(n, bs, seed=5, rank=r, world_size=world) for r in range(world)]
    per_epoch = samplers[0].batches_per_epoch
    assert per_epoch == n // (bs * world)
    for epoch in range(2):
        seen = [i for s in samplers for p in range(epoch * per_epoch, (epoch + 1) * per_epoch)
                for i in s.batch(p)[1]]
        assert len(seen) == len(set(seen)) == per_epoch * bs * world  # every rank disjoint, no repeats
        assert all(s.batch(epoch * per_epoch)[0] == epoch for s in samplers)
    assert samplers[0].permutation(0).tolist() != samplers[0].permutation(1).tolist()
    t0 = time.perf_counter()
    epoch, idx = EpochSampler(n, bs, seed=5).batch(10**12)  # no replay: a far position costs one permutation
    assert time.perf_counter() - t0 < 0.5 and len(idx) == bs and epoch == 10**12 // (n // bs)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        EpochSampler(5, 4, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(10, 2, rank=2, world_size=2)


class RecordedBlocks(TokenBlocks):
    """TokenBlocks that record the items the training loop fetches and the epochs it announces, in order."""

    def __init__(self, blocks):
        super().__init__(blocks)
        self.fetched: list[int] = []
        self.epochs: list[int] = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __getitem__(self, i):
        self.fetched.append(int(i))
        return super().__getitem__(i)


def test_training_resumed_mid_epoch_continues_the_uninterrupted_order(tmp_path):
    """The loop's sampler, interrupted after step 3 and resumed from the step-2 checkpoint (one batch into the
    second epoch), fetches exactly the items an uninterrupted run fetches from there on."""
    blocks = torch.randint(0, 128, (10, 8), generator=torch.Generator().manual_seed(0))
    config = dict(lr=1e-3, max_steps=6, batch_size=3, grad_accum=2, save_every=2, seed=7, progress=False)

    def run(data, run_dir, resume=False, on_step=None):
        torch.manual_seed(0)
        model = build_model(ModelConfig.from_name("tiny-gpt2"))
        train(model, CausalLM(), data, TrainConfig(run_dir=str(run_dir), **config), resume=resume,
              on_step=on_step)

    def crash(step, record):
        if step == 3:
            raise KeyboardInterrupt

    interrupted = RecordedBlocks(blocks)
    with pytest.raises(KeyboardInterrupt):
        run(interrupted, tmp_path / "run", on_step=crash)
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"
    resumed = RecordedBlocks(blocks)
    run(resumed, tmp_path / "run", resume=True)
    full = RecordedBlocks(blocks)
    run(full, tmp_path / "uninterrupted")

    # The uninterrupted order: 3 batches of 3 an epoch (the 10th item left out), each epoch a new permutation.
    per_epoch = 9
    epochs = [full.fetched[i:i + per_epoch] for i in range(0, len(full.fetched), per_epoch)]
    assert len(epochs) == 4 and all(len(set(e)) == per_epoch for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4
    assert full.epochs == [b // 3 for b in range(12)]
    # The resumed run continues after the checkpoint's 4 batches (12 items), in the middle of epoch 1.
    assert interrupted.fetched == full.fetched[:3 * 2 * 3]
    assert resumed.fetched == full.fetched[2 * 2 * 3:]
    assert resumed.epochs == full.epochs[4:]


def _labelled_tree(root, labels=("cats", "dogs", "fish"), per_label=10):
    for name in labels:
        (root / name).mkdir(parents=True)
        for i in range(per_label):
            (root / name / f"{i:03d}.txt").write_text(f"{name} text number {i}")
    return root


def test_labelled_folder_and_split(tmp_path):
    data = read_labelled_folder(_labelled_tree(tmp_path))
    assert data.label_names == ["cats", "dogs", "fish"] and len(data) == 30
    assert data.labels.count(1) == 10 and data.texts[data.labels.index(2)].startswith("fish")
    splits = split_labelled(data, seed=3)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [24, 3, 3]
    for s in splits.values():  # stratified: every label in every split
        assert sorted(set(s.labels)) == [0, 1, 2]
    all_texts = [t for s in splits.values() for t in s.texts]
    assert sorted(all_texts) == sorted(data.texts)
    dup = LabelledTexts(data.texts + data.texts[:5], data.labels + data.labels[:5], data.label_names)
    assert sum(len(s) for s in split_labelled(dup, seed=3).values()) == 30  # duplicates kept once
    assert split_labelled(data, seed=3)["test"].texts == splits["test"].texts
    assert split_labelled(data, seed=4)["test"].texts != splits["test"].texts


def test_labelled_errors(tmp_path):
    root = _labelled_tree(tmp_path / "d")
    with pytest.raises(ValueError, match=r"label-set mismatch.*missing \['birds'\].*unexpected \['fish'\]"):
        read_labelled_folder(root, label_names=["birds", "cats", "dogs"])
    with pytest.raises(FileNotFoundError, match="not a folder"):
        read_labelled_folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no label folders"):
        read_labelled_folder(tmp_path / "flat")
    with pytest.raises(ValueError, match="outside"):
        LabelledTexts(["a"], [3], ["x", "y"])
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        LabelledTexts(["a", "b"], [0], ["x", "y"])


def test_bbc_news_fixed_split(bbc_dir):
    splits = bbc_news()
    assert sum(len(s) for s in splits.values()) == 2127  # 2,225 files less 98 exact duplicates
    assert splits["train"].label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [1701, 212, 214]
    assert not set(splits["train"].texts) & set(splits["test"].texts)
    assert bbc_news("test").texts == splits["test"].texts  # fixed: the same split every call
    with pytest.raises(ValueError, match="unknown split"):
        bbc_news("dev")


def test_encoded_texts_truncate_and_pad():
    data = LabelledTexts(["abcdef", "xy"], [1, 0], ["neg", "pos"])
    enc = lambda s: [1] + [ord(c) for c in s] + [2]  # noqa: E731  [CLS] ... [SEP]
    ds = EncodedTexts(data, enc, max_len=5, pad_id=0)
    assert ds[0]["input_ids"].tolist() == [1, 97, 98, 99, 2]  # cut keeps the final [SEP]
    batch = ds.collate([ds[0], ds[1]])
    assert batch["input_ids"].tolist() == [[1, 97, 98, 99, 2], [1, 120, 121, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0]
