"""Text in, text out: `generate`, `stream` and `stream_rows` over a model object or a model name / path (loaded
with `lmforge.io.load_model`), with the tokenizer, chat templates and stop strings.

Length default: when neither max_length nor max_new_tokens is given, text generation produces up to
`DEFAULT_MAX_NEW_TOKENS` new tokens (capped by the model's context), whatever the prompt's length, so that a chat
template's ~30 tokens never use up the budget. (`generate_ids`, the token-level call, keeps transformers' default
of max_length=20.) Streaming runs the very decode loop `generate` runs, on the same batch, so that for the same
arguments and seed it yields the same tokens (one random draw per step for the whole batch in both).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lmforge.generation.decode import check_decoder, generate_ids, inference, prepare, start, token_loop
from lmforge.io import load_model
from lmforge.models.decoder import Decoder
from lmforge.models.seq2seq import EncoderDecoder
from lmforge.tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "Piece", "generate", "stream", "stream_rows"]

DEFAULT_MAX_NEW_TOKENS = 128  # text generation's budget when the caller gives no length


class Piece(NamedTuple):
    """Text that row `row` (prompt index * num_return_sequences + sequence index) produced at one step;
    `last` is True on the row's final piece (after its eos, stop string or the length limit)."""

    row: int
    text: str
    last: bool


def _load(model: Decoder | EncoderDecoder | str | Path, tokenizer: Tokenizer | None,
          dtype: str | torch.dtype | None):
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


def _encode_prompts(model: Decoder | EncoderDecoder, tokenizer: Tokenizer, prompts: str | Sequence[str],
                    chat: bool):
    """Token ids (B, P) and attention mask for prompts, left-padded; with chat, through the chat template."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise ValueError("prompts must be a string or a non-empty list of strings")
    if chat and isinstance(model, EncoderDecoder):
        raise ValueError("chat=True (--chat) wraps prompts in a decoder chat model's template; an encoder-decoder "
                         "(T5) takes the task in plain text, e.g. 'summarize: ...'")
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


def _text_kwargs(model: Decoder | EncoderDecoder, tokenizer: Tokenizer, kwargs: dict[str, Any],
                 prompt_len: int) -> dict[str, Any]:
    """Generation arguments for text: stop at the model's and the tokenizer's eos ids; without a length,
    `DEFAULT_MAX_NEW_TOKENS` new tokens (at most what the context leaves after the prompt, at least 1; an
    encoder-decoder's decoder starts from its start token whatever the prompt's length)."""
    kwargs = dict(kwargs)
    if isinstance(model, EncoderDecoder):
        prompt_len = 1
    if kwargs.get("max_length") is None and kwargs.get("max_new_tokens") is None:
        kwargs["max_new_tokens"] = max(1, min(DEFAULT_MAX_NEW_TOKENS, model.config.max_seq_len - prompt_len))
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


def generate(model: Decoder | EncoderDecoder | str | Path, tokenizer: Tokenizer | None = None,
             prompts: str | Sequence[str] = "", chat: bool = False, dtype: str | torch.dtype | None = None,
             **kwargs: Any) -> list[str]:
    """Generated text (prompt excluded) for each prompt and each of its num_return_sequences, in order.

    model: a Decoder, or a name/path for `lmforge.io.load_model` (then tokenizer may be None); chat: wrap
    each prompt as a user message in the tokenizer's chat template. kwargs: as for `generate_ids`
    (stop_strings end the text right after the stop string). Special tokens (eos) are left out of the text.
    """
    model, tokenizer = _load(model, tokenizer, dtype)
    ids, mask = _encode_prompts(model, tokenizer, prompts, chat)
    kw = _text_kwargs(model, tokenizer, kwargs, ids.shape[1])
    out = generate_ids(model, ids, mask, **kw)
    eos = kw.get("eos_token_id")
    eos = set(model.config.eos_ids) if eos is None else {eos} if isinstance(eos, int) else set(eos)
    texts = []
    prompt_len = ids.shape[1]
    if isinstance(model, EncoderDecoder):
        given = kw.get("decoder_input_ids")
        prompt_len = 1 if given is None else given.shape[1]
    for row in out[:, prompt_len:].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row))  # the text stops before eos
        text = tokenizer.decode(row[:end], skip_special_tokens=True)
        texts.append(_cut_at_stop(text, kwargs.get("stop_strings")))
    return texts


def stream_rows(model: Decoder | EncoderDecoder | str | Path, tokenizer: Tokenizer | None = None,
                prompts: str | Sequence[str] = "", chat: bool = False, dtype: str | torch.dtype | None = None,
                **kwargs: Any) -> Iterator[Piece]:
    """Stream every row of a `generate` call: `Piece`s (row, text, last) as tokens arrive, whole characters
    only. Rows are ordered as `generate` returns them, and each row's joined text equals its `generate` text
    for the same arguments (the same batch through the same decode loop, so the same random draws).

    The arguments are checked before this returns (nothing is yielded then raised for a bad setting); beam
    search is refused (ValueError), since its best hypothesis changes until the end.
    """
    model, tokenizer = _load(model, tokenizer, dtype)
    ids, mask = _encode_prompts(model, tokenizer, prompts, chat)
    kw = _text_kwargs(model, tokenizer, kwargs, ids.shape[1])
    s, generator, ids, mask, options = prepare(model, ids, mask, kw)
    if s.num_beams > 1:
        raise ValueError("beam search cannot stream (its best hypothesis changes until the end): use "
                         "num_beams=1, or generate without streaming")
    return _pieces(model, tokenizer, s, generator, ids, mask, options)


def _pieces(model: Decoder | EncoderDecoder, tokenizer: Tokenizer, s, generator, ids, mask,
            options) -> Iterator[Piece]:
    """The decode loop of `generate_ids` on (B, P) prompts, as `Piece`s (B * num_return_sequences rows): each
    row's text up to its first eos, cut right after its first stop string."""
    rows = ids.shape[0] * s.num_return_sequences
    decoders = [IncrementalDecoder(tokenizer, skip_special_tokens=True) for _ in range(rows)]
    emitted = [""] * rows
    done = [False] * rows

    def add(row: int, piece: str, last: bool) -> Piece:
        text = emitted[row] + piece
        if s.stop_strings and any(stop in text for stop in s.stop_strings):
            piece, last = _cut_at_stop(text, s.stop_strings)[len(emitted[row]):], True
        emitted[row] += piece
        done[row] = last
        return Piece(row, piece, last)

    with inference(model):
        run, prompt = start(model, ids, mask, s, options)
        for token in token_loop(run, prompt, s, generator, options.get("tokenizer")):
            for row, t in enumerate(token.tolist()):
                if done[row]:
                    continue
                piece = add(row, decoders[row].flush(), True) if t in s.eos_ids else \
                    add(row, decoders[row].step(t), False)
                if piece.text or piece.last:
                    yield piece
    for row in range(rows):
        if not done[row]:
            yield add(row, decoders[row].flush(), True)


def stream(model: Decoder | EncoderDecoder | str | Path, tokenizer: Tokenizer | None = None, prompt: str = "",
           chat: bool = False, dtype: str | torch.dtype | None = None, **kwargs: Any) -> Iterator[str]:
    """Yield the generated text of one prompt piece by piece as tokens arrive, whole characters only.

    Joined, the pieces equal `generate(...)[0]` for the same arguments. One sequence; beam search is refused
    (see `stream_rows`, which streams several prompts and sequences).
    """
    if not isinstance(prompt, str):
        raise ValueError(f"stream takes one prompt string, got {type(prompt).__name__}")
    if (kwargs.get("num_return_sequences") or 1) > 1:
        raise ValueError("stream produces one sequence: num_return_sequences must be 1 (stream_rows streams "
                         "several)")
    pieces = stream_rows(model, tokenizer, prompt, chat, dtype, **kwargs)
    return (p.text for p in pieces if p.text)
