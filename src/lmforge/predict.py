"""Using a fine-tuned model on a data set: labels with per-class probabilities or scores (classifiers and
regressors), generated targets and their ROUGE (encoder-decoder models).

    predictions = predict(model, tokenizer, ["great film", "dull"])   # classifier
    # [{"label": "pos", "probabilities": {"neg": 0.03, "pos": 0.97}}, ...]; a regressor gives {"score": 3.8}
    texts = generate_targets(t5, tokenizer, ["summarize: ..."], max_new_tokens=32)
    scores = seq2seq_rouge(t5, tokenizer, pairs)     # {"rouge1", "rouge2", "rougeL", "examples"}

Texts (or text pairs) are encoded as in fine-tuning (`lmforge.data.EncodedTexts`: the same cut to `max_len`,
the same pair format and token types), batched by length, and returned in the input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lmforge.data import EncodedPairs, EncodedTexts, LabelledTexts, TextPairs
from lmforge.metrics import corpus_rouge
from lmforge.objectives import model_inputs
from lmforge.tokenizer import Tokenizer


def is_regressor(config) -> bool:
    """Whether a model with a classification head predicts one score (HF's num_labels=1 / problem_type)."""
    return config.head == "classify" and (config.n_labels == 1 or config.extra.get("problem_type") == "regression")


def label_names(config) -> list[str]:
    """A classifier's label names in output order (config id2label, else LABEL_i); [] for a regressor."""
    if is_regressor(config):
        return []
    stored = config.extra.get("id2label") or {}
    return [str(stored.get(i, f"LABEL_{i}")) for i in range(config.n_labels)]


def encode_for(model: nn.Module, tokenizer: Tokenizer, data: LabelledTexts, max_len: int,
               progress: bool = False) -> EncodedTexts:
    """`data` tokenised for `model`: pairs in the tokenizer's pair format, token types when the model has
    segment embeddings (BERT), padding with the tokenizer's pad token; a progress bar when `progress`."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return EncodedTexts(data, tokenizer.encode, max_len, pad, encode_pair=tokenizer.encode_pair,
                        token_types=model.config.type_vocab_size > 1, progress=progress)


@torch.no_grad()
def predict(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], pairs: Sequence[str] | None = None,
            batch_size: int = 32, max_len: int = 256, progress: bool = False) -> list[dict[str, Any]]:
    """One prediction per text (pair): {"label", "probabilities": {name: p}} for a classifier, {"score"} for a
    regressor. Raises ValueError for a model without a classification head, empty input or mismatched pairs."""
    cfg = model.config
    if cfg.head != "classify":
        raise ValueError(f"predict needs a classifier or regressor (head 'classify'), got head {cfg.head!r}; "
                         f"fine-tune the model first (lmforge finetune)")
    if isinstance(texts, str) or not texts:
        raise ValueError("texts: expected a non-empty list of strings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    data = LabelledTexts(list(texts), [0.0] * len(texts), [], None if pairs is None else list(pairs))  # no labels
    encoded = encode_for(model, tokenizer, data, max_len)
    names = label_names(cfg)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded.ids[i]))
    device = next(model.parameters()).device
    model.eval()
    out: list[dict[str, Any]] = [{} for _ in order]
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, unit="batch"):
        rows = order[start:start + batch_size]
        batch = encoded.collate([encoded[i] for i in rows])
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        logits = model(batch["input_ids"].to(device), **inputs).logits.float().cpu()  # (B, n_labels)
        if not names:
            for r, i in enumerate(rows):
                out[i] = {"score": float(logits[r, 0])}
            continue
        probs = torch.softmax(logits, dim=-1)
        for r, i in enumerate(rows):
            p = probs[r].tolist()
            out[i] = {"label": names[int(probs[r].argmax())],
                      "probabilities": {name: p[k] for k, name in enumerate(names)}}
    return out


def encode_pairs(tokenizer: Tokenizer, pairs: TextPairs, max_source_len: int, max_target_len: int,
                 pad_id: int = 0) -> EncodedPairs:
    """(source, target) pairs tokenised for an encoder-decoder model: each text's tokens, then the tokenizer's
    end-of-sequence token (T5's </s>), cut as `EncodedPairs` says. Raises ValueError without an eos token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{tokenizer}: sequence-to-sequence data needs an end-of-sequence token")
    return EncodedPairs(pairs, lambda text: tokenizer.encode(text, add_special_tokens=False) + [eos],
                        max_source_len, max_target_len, pad_id)


@torch.no_grad()
def generate_targets(model: nn.Module, tokenizer: Tokenizer, sources: Sequence[str], *, batch_size: int = 16,
                     max_source_len: int = 512, max_new_tokens: int = 32, num_beams: int = 1,
                     progress: bool = False) -> list[str]:
    """The text an encoder-decoder model generates for each source (greedy, or beam search with num_beams),
    in the input order: sources are encoded as in `encode_pairs`, batched by length (right-padded, with their
    attention mask) and decoded by `model.generate`; special tokens are left out of the text."""
    if isinstance(sources, str) or not sources:
        raise ValueError("sources: expected a non-empty list of strings")
    if batch_size < 1 or max_new_tokens < 1 or num_beams < 1:
        raise ValueError(f"batch_size, max_new_tokens and num_beams must be positive, got {batch_size}, "
                         f"{max_new_tokens} and {num_beams}")
    pad = model.config.pad_token_id or 0
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{tokenizer}: sequence-to-sequence inputs need an end-of-sequence token")
    encoded = [tokenizer.encode(text, add_special_tokens=False)[: max_source_len - 1] + [eos] for text in sources]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    device = next(model.parameters()).device
    model.eval()
    out = [""] * len(order)
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, unit="batch"):
        rows = order[start:start + batch_size]
        width = len(encoded[rows[0]])  # the longest of the batch
        ids = torch.tensor([encoded[i] + [pad] * (width - len(encoded[i])) for i in rows], device=device)
        mask = torch.tensor([[1] * len(encoded[i]) + [0] * (width - len(encoded[i])) for i in rows], device=device)
        ids = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, num_beams=num_beams)
        for r, text in zip(rows, tokenizer.decode_batch(ids.tolist(), skip_special_tokens=True), strict=True):
            out[r] = text.strip()
    return out


def seq2seq_rouge(model: nn.Module, tokenizer: Tokenizer, pairs: TextPairs, **generate_options: Any
                  ) -> dict[str, Any]:
    """Mean ROUGE-1/2/L F-measures (`lmforge.metrics.corpus_rouge`) of the model's generated targets
    (`generate_targets` with `generate_options`) against the pairs' targets, and the number of examples."""
    predictions = generate_targets(model, tokenizer, pairs.sources, **generate_options)
    return {**corpus_rouge(predictions, pairs.targets), "examples": len(pairs)}
