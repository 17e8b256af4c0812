"""Decoding settings, checked once per call, with transformers' names and defaults; the logits processors
and `sample`.

Processors follow transformers' `generate` so that results can be compared token for token: repetition
penalty, n-gram ban, min_new_tokens, then (sampling only) temperature, top_k, top_p, min_p. Shapes: B rows,
V vocabulary, S sequence so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.models.matvec import top_k

__all__ = ["GenerationSettings", "default_dtype", "min_p_filter", "penalise", "preferred_dtype", "process_logits",
           "resolve_settings", "sample", "top_k_filter", "top_p_filter", "warp"]

DEFAULT_MAX_LENGTH = 20  # transformers' default when neither max_length nor max_new_tokens is given
DEFAULT_TOP_K = 50  # transformers' default top_k when sampling; top_k=0 turns it off


@dataclass(frozen=True)
class GenerationSettings:
    """Validated decoding settings for one call (see `resolve_settings`)."""

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = DEFAULT_TOP_K
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    stop_strings: tuple[str, ...] = ()


_SETTING_NAMES = ("max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "temperature",
                  "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size", "num_beams",
                  "length_penalty", "early_stopping", "num_return_sequences", "eos_token_id", "pad_token_id",
                  "stop_strings")


def _number(name: str, value: Any, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        lo_s = f"{'(' if lo_open else '['}{lo}"
        raise ValueError(f"{name} must be in {lo_s}, {hi}{']' if hi != math.inf else ')'}, got {value!r}")
    return float(value)


def _integer(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def _token_ids(name: str, value: Any, vocab_size: int) -> tuple[int, ...]:
    ids = [value] if isinstance(value, int) else list(value)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise ValueError(f"{name} must be token ids in [0, {vocab_size}), got {value!r}")
    return tuple(ids)


def resolve_settings(config: ModelConfig, prompt_len: int, **kwargs: Any) -> GenerationSettings:
    """Check every decoding argument; return `GenerationSettings` for a prompt of `prompt_len` tokens.

    Arguments (all optional, transformers' names and defaults): max_length (prompt + new tokens, default 20)
    or max_new_tokens; min_length / min_new_tokens; do_sample; temperature (0 means greedy); top_k (50, 0 =
    off); top_p; min_p; repetition_penalty; no_repeat_ngram_size; num_beams; length_penalty; early_stopping
    (True, False or "never"); num_return_sequences; eos_token_id (int or list; default the model's);
    pad_token_id (default the model's, else the first eos id); stop_strings (str or list).
    Raises TypeError for unknown arguments and ValueError, naming the argument, for bad values or when the
    prompt plus the requested tokens exceed the model's context.
    """
    unknown = sorted(set(kwargs) - set(_SETTING_NAMES))
    if unknown:
        raise TypeError(f"unknown generation arguments {unknown}; known: {', '.join(_SETTING_NAMES)}")
    kw = {k: v for k, v in kwargs.items() if v is not None}

    if "max_length" in kw and "max_new_tokens" in kw:
        raise ValueError("give max_length (prompt + new tokens) or max_new_tokens, not both")
    if "max_new_tokens" in kw:
        max_new = _integer("max_new_tokens", kw["max_new_tokens"], 1)
    else:
        max_length = _integer("max_length", kw.get("max_length", DEFAULT_MAX_LENGTH), 1)
        if max_length <= prompt_len:
            raise ValueError(f"max_length ({max_length}) counts prompt and new tokens, so it must be longer "
                             f"than the prompt ({prompt_len} tokens); max_new_tokens counts new tokens only")
        max_new = max_length - prompt_len
    if prompt_len + max_new > config.max_seq_len:
        raise ValueError(f"the prompt ({prompt_len} tokens) plus {max_new} new tokens exceeds the model "
                         f"context of {config.max_seq_len} tokens")
    min_new = _integer("min_new_tokens", kw.get("min_new_tokens", 0), 0)
    if "min_length" in kw:
        min_new = max(min_new, _integer("min_length", kw["min_length"], 0) - prompt_len)
    if min_new > max_new:
        raise ValueError(f"min_new_tokens/min_length ask for {min_new} new tokens, more than the {max_new} "
                         "allowed")

    do_sample = kw.get("do_sample", False)
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    temperature = _number("temperature", kw.get("temperature", 1.0), 0.0)
    if temperature == 0.0:
        do_sample = False  # temperature 0 means "always the most likely token"
    top_k = _integer("top_k", kw.get("top_k", DEFAULT_TOP_K), 0)
    top_p = _number("top_p", kw.get("top_p", 1.0), 0.0, 1.0, lo_open=True)
    min_p = _number("min_p", kw["min_p"], 0.0, 1.0) if "min_p" in kw else None
    penalty = _number("repetition_penalty", kw.get("repetition_penalty", 1.0), 0.0, lo_open=True)
    ngram = _integer("no_repeat_ngram_size", kw.get("no_repeat_ngram_size", 0), 0)
    num_beams = _integer("num_beams", kw.get("num_beams", 1), 1)
    length_penalty = _number("length_penalty", kw.get("length_penalty", 1.0), -math.inf)
    early_stopping = kw.get("early_stopping", False)
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    nrs = _integer("num_return_sequences", kw.get("num_return_sequences", 1), 1)
    if num_beams > 1 and nrs > num_beams:
        raise ValueError(f"num_return_sequences ({nrs}) cannot exceed num_beams ({num_beams})")
    if num_beams == 1 and not do_sample and nrs > 1:
        raise ValueError(f"num_return_sequences={nrs} needs do_sample=True (with temperature > 0) or "
                         f"num_beams >= {nrs}: greedy decoding returns one sequence per prompt")

    eos = _token_ids("eos_token_id", kw["eos_token_id"], config.vocab_size) if "eos_token_id" in kw \
        else tuple(config.eos_ids)
    pad = kw.get("pad_token_id", config.pad_token_id)
    if pad is None:
        pad = eos[0] if eos else 0
    pad = _token_ids("pad_token_id", pad, config.vocab_size)[0]
    stops = kw.get("stop_strings", ())
    stops = (stops,) if isinstance(stops, str) else tuple(stops)
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop_strings must be non-empty strings, got {stops!r}")
    return GenerationSettings(max_new, min_new, do_sample, temperature, top_k, top_p, min_p, penalty, ngram,
                              num_beams, length_penalty, early_stopping, nrs, eos, pad, stops)


def apply_repetition_penalty(scores: Tensor, seqs: Tensor, valid: Tensor, penalty: float) -> Tensor:
    """Divide positive (multiply negative) scores (B, V) of the tokens in seqs (B, S) where valid (B, S)."""
    V = scores.shape[-1]
    ids = seqs.masked_fill(~valid, V)  # padding goes to a spare column
    padded = F.pad(scores, (0, 1))  # (B, V + 1)
    seen = padded.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, seen)[:, :V]


def ban_repeated_ngrams(scores: Tensor, seqs: Tensor, n: int) -> Tensor:
    """Set to -inf (B, V) every token that would repeat an n-gram already in seqs (B, S)."""
    S = seqs.shape[1]
    if S < n:
        return scores
    prefix = seqs[:, S + 1 - n:]  # (B, n-1): the n-gram the next token would complete starts with this
    windows = seqs.unfold(1, n, 1)  # (B, S-n+1, n)
    matches = (windows[..., :-1] == prefix[:, None]).all(-1)  # (B, S-n+1)
    V = scores.shape[-1]
    banned = scores.new_zeros((scores.shape[0], V + 1), dtype=torch.bool)
    banned.scatter_(1, torch.where(matches, windows[..., -1], V), True)
    return scores.masked_fill(banned[:, :V], -math.inf)


def top_k_filter(scores: Tensor, k: int, min_keep: int = 1) -> Tensor:
    """Keep the k highest scores per row (ties with the k-th kept), -inf elsewhere."""
    k = min(max(k, min_keep), scores.shape[-1])
    kth = torch.topk(scores, k).values[..., -1:]  # (B, 1)
    return scores.masked_fill(scores < kth, -math.inf)


def top_p_filter(scores: Tensor, p: float, min_keep: int = 1) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus), -inf elsewhere."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cum = sorted_scores.softmax(-1).cumsum(-1)
    remove = cum <= 1 - p
    remove[..., -min_keep:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), -math.inf)


def min_p_filter(scores: Tensor, min_p: float, min_keep: int = 1) -> Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    probs = scores.softmax(-1)
    remove = probs < min_p * probs.amax(-1, keepdim=True)
    remove.scatter_(-1, torch.topk(probs, min(min_keep, probs.shape[-1])).indices, False)
    return scores.masked_fill(remove, -math.inf)


def process_logits(scores: Tensor, seqs: Tensor, valid: Tensor, new_tokens: int, s: GenerationSettings,
                   min_keep: int = 1) -> Tensor:
    """transformers' processor chain on next-token scores (B, V) float32, given the sequences so far (B, S).

    valid (B, S) marks real tokens (False on left padding); new_tokens counts the tokens generated so far.
    Order: repetition penalty, n-gram ban, eos suppression before min_new_tokens, then (sampling only)
    temperature, top_k, top_p, min_p.
    """
    scores = penalise(scores, seqs, valid, new_tokens, s)
    return warp(scores, s, s.top_k, min_keep) if s.do_sample else scores


def penalise(scores: Tensor, seqs: Tensor, valid: Tensor, new_tokens: int, s: GenerationSettings,
             owned: bool = False) -> Tensor:
    """The processors that do not depend on sampling: repetition penalty, n-gram ban, min_new_tokens. `owned`:
    scores may be changed in place (a decode loop's own logits: no copy of (B, V) per step)."""
    if s.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, seqs, valid, s.repetition_penalty)
    if s.no_repeat_ngram_size > 0:
        scores = ban_repeated_ngrams(scores, seqs, s.no_repeat_ngram_size)
    if new_tokens < s.min_new_tokens and s.eos_ids:
        scores = scores if owned else scores.clone()
        scores[:, list(s.eos_ids)] = -math.inf
    return scores


def warp(scores: Tensor, s: GenerationSettings, top_k: int, min_keep: int = 1) -> Tensor:
    """The sampling warpers in transformers' order: temperature, top_k (0: off), top_p, min_p."""
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if top_k > 0:
        scores = top_k_filter(scores, top_k, min_keep)
    if s.top_p < 1.0:
        scores = top_p_filter(scores, s.top_p, min_keep)
    if s.min_p is not None:
        scores = min_p_filter(scores, s.min_p, min_keep)
    return scores


def sample(scores: Tensor, s: GenerationSettings, generator: torch.Generator | None = None) -> Tensor:
    """Next tokens (B,) from penalised scores (B, V): the argmax, or a draw from the warped distribution.

    With top_k, the k best scores are taken first and the other warpers and the draw see only those (B, k):
    the distribution of filtering all V scores (except that exactly k are kept when several tie with the k-th)
    for a fraction of the work at large vocabularies.
    """
    if not s.do_sample:
        return top_k(scores, 1)[1][:, 0]  # the first of equal maxima, as argmax; one pass on the CPU
    index = None
    if 0 < s.top_k < scores.shape[-1]:
        scores, index = top_k(scores, s.top_k)  # (B, k)
    token = torch.multinomial(warp(scores, s, 0).softmax(-1), 1, generator=generator)  # (B, 1)
    return (token if index is None else index.gather(1, token))[:, 0]


def default_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype `lmforge generate --dtype auto` loads weights in: float32 on CPU, bfloat16 on CUDA.

    On this project's CPU (AVX512-BF16), bfloat16 keeps SmolLM2-135M's held-out perplexity within 1% of float32
    (x1.0007 in one forward per block, x0.997 teacher-forced through the decode path; benchmarks/
    dtype_perplexity.py), yet its greedy continuations drift into garbled text where float32 stays coherent
    (README; transformers in bf16 writes the same tokens), so CPUs get float32 even with native bf16; pass
    --dtype bfloat16 for speed.
    """
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def preferred_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The fastest exact-enough dtype for decoding on `device`: bfloat16 on CUDA and on CPUs with native bf16
    matrix support (AVX512-BF16/AMX, as oneDNN reports it), float32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    return torch.float32
