"""Text in, text out: `generate` and `stream` over a model object or a model name / path (loaded with
`lmforge.io.load_model`), with the tokenizer, chat templates and stop strings."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.generation.decode import Decoding, check_decoder, generate_ids, inference, prepare, token_loop
from lmforge.io import load_model
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["generate", "stream"]


def _load(model: Decoder | str | Path, tokenizer: Tokenizer | None, dtype: str | torch.dtype | None):
    """Accept a model object or a name/path (loaded with `lmforge.io.load_model`) and find its tokenizer."""
    source = None
    if isinstance(model, (str, Path)):
        source = model
        model = load_model(source, dtype=dtype) if dtype is not None else load_model(source)
    check_decoder(model)
    if tokenizer is None:
        if source is None:
            raise ValueError("tokenizer is required with a model object (a name or path loads both)")
        tokenizer = Tokenizer.for_model(source)
    return model, tokenizer


def _encode_prompts(model: Decoder, tokenizer: Tokenizer, prompts: str | Sequence[str], chat: bool):
    """Token ids (B, P) and attention mask for prompts, left-padded; with chat, through the chat template."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise ValueError("prompts must be a string or a non-empty list of strings")
    rows = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise ValueError(f"prompt {i} must be a non-empty string, got {text!r}")
        if chat:
            rows.append(tokenizer.encode_chat([{"role": "user", "content": text}]))
        else:
            rows.append(tokenizer.encode(text))
        if not rows[-1]:
            raise ValueError(f"prompt {i} ({text!r}) encodes to no tokens")
    P = max(len(r) for r in rows)
    cfg = model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_ids or [0])[0]
    ids = torch.full((len(rows), P), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = torch.tensor(r)
        mask[i, P - len(r):] = 1
    return ids, mask


def _text_kwargs(model: Decoder, tokenizer: Tokenizer, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Generation arguments for text: stop at the model's and the tokenizer's eos ids."""
    kwargs = dict(kwargs)
    if kwargs.get("eos_token_id") is None and tokenizer.eos_token_id is not None:
        kwargs["eos_token_id"] = sorted({*model.config.eos_ids, tokenizer.eos_token_id})
    if kwargs.get("stop_strings"):
        kwargs["tokenizer"] = tokenizer
    return kwargs


def _cut_at_stop(text: str, stops: str | Sequence[str] | None) -> str:
    """Text up to and including the first stop string (generation stops on the token completing it)."""
    if not stops:
        return text
    ends = [text.find(s) + len(s) for s in ([stops] if isinstance(stops, str) else stops) if s in text]
    return text[:min(ends)] if ends else text


def generate(model: Decoder | str | Path, tokenizer: Tokenizer | None = None,
             prompts: str | Sequence[str] = "", chat: bool = False, dtype: str | torch.dtype | None = None,
             **kwargs: Any) -> list[str]:
    """Generated text (prompt excluded) for each prompt and each of its num_return_sequences, in order.

    model: a Decoder, or a name/path for `lmforge.io.load_model` (then tokenizer may be None); chat: wrap
    each prompt as a user message in the tokenizer's chat template. kwargs: as for `generate_ids`
    (stop_strings end the text right after the stop string). Special tokens (eos) are left out of the text.
    """
    model, tokenizer = _load(model, tokenizer, dtype)
    ids, mask = _encode_prompts(model, tokenizer, prompts, chat)
    kw = _text_kwargs(model, tokenizer, kwargs)
    out = generate_ids(model, ids, mask, **kw)
    eos = kw.get("eos_token_id")
    eos = set(model.config.eos_ids) if eos is None else {eos} if isinstance(eos, int) else set(eos)
    texts = []
    for row in out[:, ids.shape[1]:].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row))  # the text stops before eos
        text = tokenizer.decode(row[:end], skip_special_tokens=True)
        texts.append(_cut_at_stop(text, kwargs.get("stop_strings")))
    return texts


def stream(model: Decoder | str | Path, tokenizer: Tokenizer | None = None, prompt: str = "",
           chat: bool = False, dtype: str | torch.dtype | None = None, **kwargs: Any) -> Iterator[str]:
    """Yield the generated text of one prompt piece by piece as tokens arrive, whole characters only.

    Joined, the pieces equal `generate(...)[0]` for the same arguments. Sampling and greedy only (beam search
    cannot stream: its best hypothesis changes until the end).
    """
    model, tokenizer = _load(model, tokenizer, dtype)
    if not isinstance(prompt, str):
        raise ValueError(f"stream takes one prompt string, got {type(prompt).__name__}")
    ids, mask = _encode_prompts(model, tokenizer, prompt, chat)
    kw = _text_kwargs(model, tokenizer, kwargs)
    s, generator, ids, mask, options = prepare(model, ids, mask, kw)
    if s.num_beams > 1 or s.num_return_sequences > 1:
        raise ValueError("stream produces one sequence: num_beams and num_return_sequences must be 1")
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
    emitted = ""
    with inference(model):
        run = Decoding(model, ids, mask, s.max_new_tokens, options.get("compile"))
        for token in token_loop(run, ids, s, generator, options.get("tokenizer")):
            if int(token[0]) in s.eos_ids:
                break
            piece = decoder.step(int(token[0]))
            if piece and s.stop_strings:
                piece = _cut_at_stop(emitted + piece, s.stop_strings)[len(emitted):]
            if piece:
                emitted += piece
                yield piece
    tail = decoder.flush()
    if tail:
        yield _cut_at_stop(emitted + tail, s.stop_strings)[len(emitted):] if s.stop_strings else tail
