"""Logit parity with transformers (fp32, max abs diff <= 1e-4).

Each reference is a tiny random transformers model built from a seed and saved with `save_pretrained`; lmforge
loads the folder with its own converter (`lmforge.io.load_model`) and must give the same logits on a padded
batch. Weights use a wide init (std 0.2) so logits are O(1) and a wrong layout cannot hide in small numbers.
The real all-MiniLM-L6-v2 checks every layer's hidden states on real sentences.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf

from lmforge.io import load_model

ATOL = 1e-4
VOCAB = 96

_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=48, max_position_embeddings=40, initializer_range=0.2)
_DISTIL = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=40,
               initializer_range=0.2)
_GPT2 = dict(vocab_size=VOCAB, n_embd=32, n_head=4, n_positions=40, initializer_range=0.2, bos_token_id=0,
             eos_token_id=0)
_LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2, bos_token_id=1,
              eos_token_id=2)

# id -> (transformers model class, config class, config fields)
CASES = {
    "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config, dict(_GPT2, n_layer=2)),
    "distilgpt2-shape": (tf.GPT2LMHeadModel, tf.GPT2Config, dict(_GPT2, n_layer=6)),
    "gpt2-untied": (tf.GPT2LMHeadModel, tf.GPT2Config, dict(_GPT2, n_layer=2, tie_word_embeddings=False)),
    "llama-gqa": (tf.LlamaForCausalLM, tf.LlamaConfig,
                  dict(_LLAMA, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5)),
    "llama-tied-headdim": (tf.LlamaForCausalLM, tf.LlamaConfig,
                           dict(_LLAMA, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)),
    "bert-mlm": (tf.BertForMaskedLM, tf.BertConfig, _ENCODER),
    "bert-classify": (tf.BertForSequenceClassification, tf.BertConfig, dict(_ENCODER, num_labels=3)),
    "bert-base": (tf.BertModel, tf.BertConfig, _ENCODER),
    "distilbert-mlm": (tf.DistilBertForMaskedLM, tf.DistilBertConfig, _DISTIL),
    "distilbert-classify": (tf.DistilBertForSequenceClassification, tf.DistilBertConfig,
                            dict(_DISTIL, num_labels=4)),
    "roberta-mlm": (tf.RobertaForMaskedLM, tf.RobertaConfig, dict(_ENCODER, max_position_embeddings=42)),
    "roberta-classify": (tf.RobertaForSequenceClassification, tf.RobertaConfig,
                         dict(_ENCODER, max_position_embeddings=42, num_labels=2, type_vocab_size=1)),
}


def make_reference(case: str, folder: Path, seed: int = 0) -> torch.nn.Module:
    """A seeded random transformers model of `case`, saved to `folder`."""
    model_cls, config_cls, fields = CASES[case]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**fields)).eval()
    model.save_pretrained(folder)
    return model


def batch(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (3, 12) avoiding the special ids 0-2, right padding in rows 1 and 2 (pad id 1 for RoBERTa)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    pad = 1 if case.startswith("roberta") else 0
    return ids.masked_fill(mask == 0, pad), mask


def outputs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, reference: bool,
            **kwargs: torch.Tensor) -> torch.Tensor:
    """Logits, or the last hidden state for a model without a head; real tokens only for per-token outputs.
    kwargs (token_type_ids) go to both models."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **kwargs) if reference else model(ids, attention_mask=mask,
                                                                                           **kwargs)
    result = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return result[mask.bool()] if result.dim() == 3 else result


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case: str, tmp_path: Path) -> None:
    reference = make_reference(case, tmp_path)
    model = load_model(tmp_path)
    ids, mask = batch(case)
    want, got = outputs(reference, ids, mask, True), outputs(model, ids, mask, False)
    assert got.shape == want.shape
    assert want.abs().max() > 0.1, "reference outputs too small for a meaningful comparison"
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_parity_check_detects_a_wrong_weight(tmp_path: Path) -> None:
    """The comparison above is sharp: one perturbed weight matrix gives a visible difference."""
    reference = make_reference("llama-gqa", tmp_path)
    model = load_model(tmp_path)
    with torch.no_grad():
        model.layers[1].attn.qkv.weight.mul_(1.01)
    ids, mask = batch("llama-gqa")
    diff = (outputs(reference, ids, mask, True) - outputs(model, ids, mask, False)).abs().max()
    assert diff > 10 * ATOL


def test_decoder_hidden_states_match(tmp_path: Path) -> None:
    reference = make_reference("gpt2", tmp_path)
    model = load_model(tmp_path)
    ids, _ = batch("gpt2")
    with torch.no_grad():
        want = reference(input_ids=ids, output_hidden_states=True).hidden_states
        got = model(ids, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


def _bbc_sentences(bbc_dir: Path, n: int) -> list[str]:
    sentences: list[str] = []
    for path in sorted((bbc_dir / "tech").glob("*.txt"))[:5]:
        text = path.read_text(encoding="latin-1")
        sentences += [s.strip() for s in text.replace("\n", " ").split(". ") if len(s.split()) > 4]
    return sentences[:n]


@pytest.fixture(scope="module")
def minilm_reference(minilm_dir: Path) -> torch.nn.Module:
    return tf.BertModel.from_pretrained(minilm_dir).eval()


def test_minilm_hidden_states_match_transformers(minilm_dir: Path, bbc_dir: Path,
                                                 minilm_reference: torch.nn.Module) -> None:
    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_dir)
    enc = tokenizer(_bbc_sentences(bbc_dir, 6), padding=True, truncation=True, max_length=64,
                    return_tensors="pt")
    assert enc["attention_mask"].eq(0).any(), "the batch should contain padding"
    model = load_model("all-minilm-l6-v2")
    with torch.no_grad():
        want = minilm_reference(**enc, output_hidden_states=True).hidden_states
        got = model(enc["input_ids"], attention_mask=enc["attention_mask"],
                    token_type_ids=enc["token_type_ids"], output_hidden_states=True).hidden_states
    real = enc["attention_mask"].bool()
    assert len(got) == len(want) == 7
    for layer, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g[real], w[real], atol=ATOL, rtol=0, msg=f"hidden state {layer}")


# --- sentence pairs: token type ids -------------------------------------------------------------------------


def pair_types(mask: torch.Tensor, first: tuple[int, ...] = (7, 5, 3)) -> torch.Tensor:
    """Token types of sentence pairs: 0 for each row's first `first[row]` tokens, 1 for the rest (padding 0)."""
    positions = torch.arange(mask.shape[1])[None]
    return ((positions >= torch.tensor(first)[:, None]) & mask.bool()).long()


@pytest.mark.parametrize("case", ["bert-base", "bert-mlm", "bert-classify"])
def test_sentence_pairs_match_transformers(case: str, tmp_path: Path) -> None:
    """Non-zero token_type_ids (the second sentence of a pair) reach the type embedding as in transformers."""
    reference = make_reference(case, tmp_path)
    model = load_model(tmp_path)
    ids, mask = batch(case)
    types = pair_types(mask)
    want = outputs(reference, ids, mask, True, token_type_ids=types)
    got = outputs(model, ids, mask, False, token_type_ids=types)
    single = outputs(reference, ids, mask, True)  # every token of type 0
    assert (want - single).abs().max() > 10 * ATOL  # the types matter: ignoring them would show
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_minilm_sentence_pairs_match_transformers(minilm_dir: Path, bbc_dir: Path,
                                                  minilm_reference: torch.nn.Module) -> None:
    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_dir)
    sentences = _bbc_sentences(bbc_dir, 8)
    enc = tokenizer(sentences[:4], sentences[4:], padding=True, truncation=True, max_length=96,
                    return_tensors="pt")
    assert enc["token_type_ids"].eq(1).sum() > 40 and enc["attention_mask"].eq(0).any()
    model = load_model("all-minilm-l6-v2")
    with torch.no_grad():
        want = minilm_reference(**enc).last_hidden_state
        got = model(enc["input_ids"], attention_mask=enc["attention_mask"],
                    token_type_ids=enc["token_type_ids"]).last_hidden_state
        single = minilm_reference(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    real = enc["attention_mask"].bool()
    assert (want[real] - single[real]).abs().max() > 10 * ATOL
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
