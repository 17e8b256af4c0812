"""Sentence embeddings against sentence-transformers: tiny folders with every pooling mode, Dense and Normalize,
and all-MiniLM-L6-v2 on 1,000 BBC sentences; the `embed` command."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from benchmarks.embed import bbc_sentences
from lmforge import cli
from lmforge.embeddings import SentenceEncoder, embed, pool, read_sentence_modules
from lmforge.io import CheckpointError, save_model
from tests.test_io_hf import random_model

sentence_transformers = pytest.importorskip("sentence_transformers")

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "big", "red", "sun"]
TEXTS = [" ".join(random.Random(i).choices(WORDS, k=random.Random(i).randint(1, 12))) for i in range(11)]
POOLING = "sentence_transformers.models.Pooling"
# name -> (pooling config, Dense layers as (in, out, activation), Normalize)
CASES = {
    "mean+normalize": ({"pooling_mode_mean_tokens": True}, [], True),
    "cls+max": ({"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True}, [], False),
    "three modes+dense+normalize": ({"pooling_mode": ["weightedmean", "lasttoken", "mean_sqrt_len_tokens"]},
                                    [(96, 16, "torch.nn.modules.activation.Tanh")], True),
    "two dense layers": ({"pooling_mode": "mean"}, [(32, 24, "torch.nn.modules.activation.ReLU"),
                                                    (24, 8, "torch.nn.modules.linear.Identity")], False),
}


def tiny_sentence_model(folder: Path, pooling: dict, dense: list, normalize: bool) -> Path:
    """A tiny random BERT with a letter-level vocabulary and sentence-transformers module files."""
    save_model(random_model("tiny-bert", head="none"), folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *("##" + c for c in string.ascii_lowercase)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": POOLING}]
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    g = torch.Generator().manual_seed(1)
    for i, (n_in, n_out, activation) in enumerate(dense):
        path = folder / f"{i + 2}_Dense"
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"in_features": n_in, "out_features": n_out, "bias": True,
                                                      "activation_function": activation}))
        save_file({"linear.weight": torch.randn(n_out, n_in, generator=g) * 0.3,
                   "linear.bias": torch.randn(n_out, generator=g) * 0.1}, path / "model.safetensors")
        modules.append({"idx": i + 2, "name": str(i + 2), "path": path.name,
                        "type": "sentence_transformers.models.Dense"})
    if normalize:
        modules.append({"idx": len(modules), "name": "n", "path": "9_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": False}))
    return folder


@pytest.mark.parametrize("case", list(CASES))
def test_module_files_match_sentence_transformers(case: str, tmp_path: Path) -> None:
    folder = tiny_sentence_model(tmp_path / "m", *CASES[case])
    reference = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    expected = reference.encode(TEXTS, convert_to_tensor=True, batch_size=4)
    got = embed(folder, TEXTS, batch_size=3)  # other batches: results do not depend on the batching
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected.float(), atol=2e-5, rtol=1e-4)
    if CASES[case][2]:
        torch.testing.assert_close(got.norm(dim=1), torch.ones(len(TEXTS)))


def test_plain_folder_mean_pools_over_the_mask(tmp_path: Path) -> None:
    """Without modules.json: the mean of the real tokens' last hidden states, as computed by hand."""
    folder = tiny_sentence_model(tmp_path / "m", {"pooling_mode_mean_tokens": True}, [], False)
    for name in ("modules.json", "sentence_bert_config.json"):
        (folder / name).unlink()
    encoder = SentenceEncoder.load(folder)
    assert encoder.modules.pooling == ("mean",) and not encoder.modules.normalize
    got = encoder.encode(TEXTS[:3])
    for row, text in enumerate(TEXTS[:3]):
        ids = torch.tensor([encoder.tokenizer.encode(text)])
        with torch.no_grad():
            hidden = encoder.model(ids).last_hidden_state[0]  # (T, C), one unpadded text
        torch.testing.assert_close(got[row], hidden.mean(0), atol=1e-5, rtol=1e-5)
    assert embed(encoder, TEXTS[:3], normalize=True).norm(dim=1).allclose(torch.ones(3))


def test_pool_modes_by_hand() -> None:
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)  # (B, T, C)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = pool(hidden, mask, ["cls", "max", "mean", "lasttoken"])
    assert out[0].tolist() == [0, 1, 2, 3, 1, 2, 2, 3]  # padding ignored by max, mean and last token
    assert out[1].tolist() == [6, 7, 10, 11, 8, 9, 10, 11]
    weighted = pool(hidden, mask, ["weightedmean"])[0]  # weights 1, 2 on the two real tokens
    assert weighted.tolist() == pytest.approx([(0 * 1 + 2 * 2) / 3, (1 * 1 + 3 * 2) / 3])
    with pytest.raises(ValueError, match="unknown pooling mode 'median'"):
        pool(hidden, mask, ["median"])


def test_bad_module_files(tmp_path: Path) -> None:
    folder = tiny_sentence_model(tmp_path / "m", {"pooling_mode": "median"}, [], False)
    with pytest.raises(CheckpointError, match=r"1_Pooling/config.json: pooling modes \['median'\] not understood"):
        read_sentence_modules(folder)
    folder = tiny_sentence_model(tmp_path / "d", {"pooling_mode": "mean"}, [(32, 4, "my.module.Swish")], False)
    with pytest.raises(CheckpointError, match="Dense activation 'Swish' is not supported"):
        read_sentence_modules(folder)
    (folder / "modules.json").write_text(json.dumps([{"path": "", "type": "sentence_transformers.models.LSTM"}]))
    with pytest.raises(CheckpointError, match="module type 'sentence_transformers.models.LSTM' is not supported"):
        read_sentence_modules(folder)
    good = tiny_sentence_model(tmp_path / "g", {"pooling_mode": "mean"}, [], False)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        embed(SentenceEncoder.load(good), "one string")


def test_embed_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tiny_sentence_model(tmp_path / "m", {"pooling_mode_mean_tokens": True}, [], True)
    (tmp_path / "in.txt").write_text("\n".join(TEXTS[:4]) + "\n\n")
    assert cli.main(["embed", "--model", str(folder), "--input", str(tmp_path / "in.txt"), "--output",
                     str(tmp_path / "out.npy")]) == 0
    vectors = np.load(tmp_path / "out.npy")
    assert vectors.shape == (4, 32) and np.allclose(vectors, embed(folder, TEXTS[:4]).numpy(), atol=1e-6)
    capsys.readouterr()
    assert cli.main(["embed", "--model", str(folder), "cat sat", "dog ran", "--no-normalize"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["cat sat", "dog ran"] and len(rows[0]["embedding"]) == 32
    assert cli.main(["embed", "--model", str(folder), "x", "--output", str(tmp_path / "o.csv")]) == 2
    assert "expected a .npy or .jsonl file" in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_parity_with_sentence_transformers(minilm_dir: Path) -> None:
    texts = bbc_sentences(1000)
    lengths = [len(t.split()) for t in texts]
    assert min(lengths) < 5 and max(lengths) > 300  # mixed, and some beyond the 256-token limit
    reference = sentence_transformers.SentenceTransformer(str(minilm_dir), device="cpu")
    expected = reference.encode(texts, convert_to_tensor=True, batch_size=64).float()
    got = embed("all-minilm-l6-v2", texts, batch_size=64)
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=1)
    assert got.shape == (1000, 384) and float(cosine.min()) >= 0.99999
