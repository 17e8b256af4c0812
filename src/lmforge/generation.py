"""Text generation over a static KV cache: `prefill`, `decode_one_token` and `sample`, gpt-fast style.

Decoding strategies follow transformers' `generate` so that results can be compared token for token:
greedy, sampling (temperature, top_k, top_p, min_p), beam search (num_beams, length_penalty, early_stopping),
with repetition_penalty, no_repeat_ngram_size, min/max lengths, eos ids and stop strings. Batches of prompts
of different lengths are left-padded; each row gets position ids `cumsum(mask) - 1` so its result equals
running it alone.

Speed: the prompt goes through the model's own forward (`prefill`); every later token goes through a
`DecodeStep`, the same computation written for one token, with fused q/k/v and gate/up weights and, on CPU,
oneDNN's inner-product kernel (in fp32 it reads weights up to ~2x faster than the MKL path of `F.linear`).
Sampling with top_k draws among the k best scores only. Several sequences or beams of one prompt share one
prefill. On CUDA the step uses fixed shapes (attention over the whole cache under a mask) and is compiled
with CUDA graphs.

Shapes: B batch (rows being decoded), P prompt length, L cache length, V vocabulary, C model width.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.models.blocks import KVCache, activation, apply_rotary, check_input_ids, rotary_cos_sin
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["DecodeStep", "GenerationSettings", "decode_one_token", "generate", "generate_ids",
           "preferred_dtype", "prefill", "process_logits", "resolve_settings", "sample", "stream"]

DEFAULT_MAX_LENGTH = 20  # transformers' default when neither max_length nor max_new_tokens is given
DEFAULT_TOP_K = 50  # transformers' default top_k when sampling; top_k=0 turns it off


# --- settings -----------------------------------------------------------------------------------------------

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


# --- logits processors and sampling -------------------------------------------------------------------------

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


def penalise(scores: Tensor, seqs: Tensor, valid: Tensor, new_tokens: int, s: GenerationSettings) -> Tensor:
    """The processors that do not depend on sampling: repetition penalty, n-gram ban, min_new_tokens."""
    if s.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, seqs, valid, s.repetition_penalty)
    if s.no_repeat_ngram_size > 0:
        scores = ban_repeated_ngrams(scores, seqs, s.no_repeat_ngram_size)
    if new_tokens < s.min_new_tokens and s.eos_ids:
        scores = scores.clone()
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
        return scores.argmax(-1)
    index = None
    if 0 < s.top_k < scores.shape[-1]:
        scores, index = torch.topk(scores, s.top_k)  # (B, k)
    token = torch.multinomial(warp(scores, s, 0).softmax(-1), 1, generator=generator)  # (B, 1)
    return (token if index is None else index.gather(1, token))[:, 0]


# --- the model steps ----------------------------------------------------------------------------------------

class _MatVec(nn.Module):
    """y = x W^T + b for a few rows x, through the fastest kernel measured for the device and dtype."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.register_buffer("bias", bias, persistent=False)
        # On CPU, oneDNN's inner product over weights reordered once into its blocked layout: 1.4-4.4x the
        # speed of F.linear in fp32 (MKL), 0.9-2.1x in bf16 (oneDNN on the plain layout), for 1 and 10 rows of
        # SmolLM2's shapes on 2 cores (benchmarks/matvec.py). CUDA and other dtypes: F.linear.
        self.onednn = (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
                       and torch.backends.mkldnn.is_available())
        if self.onednn:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())  # opaque oneDNN tensor
        else:
            self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # (N, in) -> (N, out)
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _fused(linears: Sequence[nn.Linear]) -> _MatVec:
    """One matrix-vector product for several linears sharing their input (q/k/v, gate/up)."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    biases = [lin.bias for lin in linears]
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    return _MatVec(weight, bias)


class DecodeStep(nn.Module):
    """The decoder's forward for one new token per row, over a `KVCache` filled by `prefill`.

    Same computation as `Decoder.forward` (it uses the model's own norms, rotary tables and activation), with
    q/k/v and gate/up projections fused and weights laid out for matrix-vector products. Built once per model
    and reused while the weights are unchanged (`DecodeStep.for_model`).

    static=False: attention over the filled cache slots only (CPU). static=True: fixed shapes for CUDA graphs:
    keys are written with `index_copy_` at a slot given as a tensor and attention runs over the whole cache
    under a mask.
    """

    def __init__(self, model: Decoder):
        super().__init__()
        cfg = model.config
        if cfg.norm_position != "pre":
            raise ValueError("DecodeStep supports pre-norm decoders only")
        device = model.embed_tokens.weight.device
        self.config = cfg
        self.embed_tokens = model.embed_tokens
        self.embed_positions = model.embed_positions
        self.norm = model.norm
        self.attn_norms = nn.ModuleList(layer.attn_norm for layer in model.layers)
        self.mlp_norms = nn.ModuleList(layer.mlp_norm for layer in model.layers)
        self.qkv = nn.ModuleList(_fused([b.attn.q_proj, b.attn.k_proj, b.attn.v_proj])
                                 for b in model.layers)
        self.o = nn.ModuleList(_fused([b.attn.o_proj]) for b in model.layers)
        up = [[b.mlp.gate_proj, b.mlp.up_proj] if cfg.gated_mlp else [b.mlp.up_proj] for b in model.layers]
        self.up = nn.ModuleList(_fused(lins) for lins in up)
        self.down = nn.ModuleList(_fused([b.mlp.down_proj]) for b in model.layers)
        self.lm_head = _fused([model.lm_head])
        self._static: dict[tuple[int, int], KVCache] = {}
        self._compiled = None
        if cfg.position == "rotary":  # tables for every position, computed as the model computes them
            positions = torch.arange(cfg.max_seq_len, device=device)[None]  # (1, max_seq_len)
            dtype = model.embed_tokens.weight.dtype
            cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype)
            self.register_buffer("cos", cos[0, 0], persistent=False)  # (max_seq_len, D)
            self.register_buffer("sin", sin[0, 0], persistent=False)

    _built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def for_model(cls, model: Decoder) -> DecodeStep:
        """The step for `model`, rebuilt only when its parameters changed (new tensors or in-place edits)."""
        fingerprint = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())
        cached = cls._built.get(model)
        if cached is None or cached[0] != fingerprint:
            with torch.no_grad():
                cached = (fingerprint, cls(model))
            cls._built[model] = cached
        return cached[1]

    def static_cache(self, batch: int, length: int) -> KVCache:
        """An empty cache of at least `length` slots (rounded up to 256) for the compiled step; the same
        buffers are handed out again for the same shape, so CUDA graphs recorded on them stay valid."""
        length = min(-(-length // 256) * 256, self.config.max_seq_len)
        key = (batch, length)
        if key not in self._static:
            weight = self.embed_tokens.weight
            cache = KVCache(self.config, batch, length, weight.dtype, weight.device)
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
            self._static = {key: cache}  # one shape at a time: caches are large
        cache = self._static[key]
        cache.length = 0
        return cache

    @property
    def compiled(self):
        """`forward` compiled with CUDA graphs (torch.compile, mode="reduce-overhead"), built on first use."""
        if self._compiled is None:
            self._compiled = torch.compile(self.forward, mode="reduce-overhead", fullgraph=True)
        return self._compiled

    def forward(self, token: Tensor, position: Tensor, cache: KVCache, key_mask: Tensor | None = None,
                slot: Tensor | None = None) -> Tensor:
        """Logits (B, V) for token (B,) at positions (B,); writes its keys into the cache and advances it.

        key_mask: (B, S) bool over the cache slots a token may see (None: all filled slots). With `slot` (a
        (1,) LongTensor) the step runs in static mode: key_mask covers the whole cache (B, max_len) and the
        caller advances `cache.length`.
        """
        cfg = self.config
        B = token.shape[0]
        H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        x = self.embed_tokens(token)  # (B, C)
        rotary = None
        if self.embed_positions is not None:
            x = x + self.embed_positions(position)
        else:
            rotary = self.cos[position][:, None, None], self.sin[position][:, None, None]  # (B, 1, 1, D)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S)
        # Plain lists of bound forwards: ModuleList indexing and Module.__call__ cost ~3 us each, 180 per token.
        layers = zip(*[[m.forward for m in mods] for mods in (self.attn_norms, self.qkv, self.o, self.mlp_norms,
                                                                   self.up, self.down)], strict=True)
        for i, (attn_norm, qkv, o, mlp_norm, up_proj, down) in enumerate(layers):
            qk, v = qkv(attn_norm(x)).split([(H + Hkv) * D, Hkv * D], dim=-1)
            qk = qk.view(B, H + Hkv, 1, D)
            if rotary is not None:  # queries and keys rotated together
                qk = apply_rotary(qk, *rotary)
            q, k, v = qk[:, :H], qk[:, H:], v.view(B, Hkv, 1, D)  # (B, heads, 1, D)
            if slot is None:
                k, v = cache.update(i, k, v)  # (B, Hkv, S, D)
            else:
                cache.k[i].index_copy_(2, slot, k)
                cache.v[i].index_copy_(2, slot, v)
                k, v = cache.k[i], cache.v[i]  # (B, Hkv, max_len, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)  # (B, H, 1, D)
            x = x + o(y.reshape(B, H * D))
            h = up_proj(mlp_norm(x))  # (B, d_ff) or (B, 2 d_ff)
            if cfg.gated_mlp:
                gate, up = h.chunk(2, dim=-1)
                h = activation(cfg.activation, gate) * up
            else:
                h = activation(cfg.activation, h)
            x = x + down(h)
        if slot is None:
            cache.length += 1
        return self.lm_head(self.norm(x)).float()


def prefill(model: Decoder, input_ids: Tensor, cache: KVCache, attention_mask: Tensor | None = None,
            position_ids: Tensor | None = None) -> Tensor:
    """Run prompts (B, P) through the model, filling the empty `cache`; return the last logits (B, V).

    Prompts are left-padded: attention_mask (B, P) is 0 on padding, and position_ids (B, P) count real tokens.
    """
    if cache.length != 0:
        raise ValueError(f"prefill needs an empty cache, this one holds {cache.length} positions")
    out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                last_logits_only=True)
    return out.logits[:, -1].float()


def decode_one_token(step: DecodeStep | Decoder, token: Tensor, position: Tensor, cache: KVCache,
                     attention_mask: Tensor | None = None) -> Tensor:
    """Logits (B, V) for one new token per row: token and position (B,), attention_mask (B, cache.length + 1).

    `step` is a `DecodeStep` (the fast path) or the `Decoder` itself (its plain forward, the reference path).
    """
    if isinstance(step, DecodeStep):
        mask = None if attention_mask is None else attention_mask.bool()
        return step(token, position, cache, mask)
    out = step(token[:, None], attention_mask=attention_mask, position_ids=position[:, None], cache=cache)
    return out.logits[:, -1].float()


class _Decoding:
    """The model side of one generation call: cache, masks and positions for B rows, and the step to run.

    With `compiled` (default on CUDA) the steps after the prompt run the static-shape `DecodeStep` compiled
    with CUDA graphs, over a cache kept by the step and reused by later calls of the same shape.
    """

    def __init__(self, model: Decoder, input_ids: Tensor, attention_mask: Tensor, max_new: int, fast: bool,
                 use_compile: bool | None):
        B, P = input_ids.shape
        weight = model.embed_tokens.weight
        self.model = model
        self.device = weight.device
        self.step_fn: DecodeStep | Decoder = DecodeStep.for_model(model) if fast else model
        self.compiled = fast and (use_compile if use_compile is not None else self.device.type == "cuda")
        if self.compiled:
            self.cache = self.step_fn.static_cache(B, P + max_new)
        else:
            self.cache = KVCache(model.config, B, P + max_new, weight.dtype, self.device)
        self.mask = torch.ones(B, self.cache.max_len, dtype=torch.bool, device=self.device)  # (B, L)
        self.mask[:, :P] = attention_mask.bool()
        self.padded = not bool(self.mask[:, :P].all())
        self.position = attention_mask.long().cumsum(-1) - 1  # (B, P), as transformers counts them
        self.position.masked_fill_(attention_mask == 0, 1)

    def prefill(self, input_ids: Tensor, copies: int = 1) -> Tensor:
        """Run the prompts; `copies` > 1: rows come in groups of that many equal prompts (sequences or beams
        of one prompt), each group is run once and its keys, values and logits are copied to its rows."""
        B, P = input_ids.shape
        mask = self.mask[:, :P].long() if self.padded else None
        if copies == 1:
            logits = prefill(self.model, input_ids, self.cache, mask, self.position)
        else:
            first = slice(None, None, copies)
            cache = KVCache(self.model.config, B // copies, P, self.cache.k.dtype, self.device)
            logits = prefill(self.model, input_ids[first], cache, None if mask is None else mask[first],
                             self.position[first]).repeat_interleave(copies, 0)
            self.cache.k[:, :, :, :P] = cache.k.repeat_interleave(copies, 1)
            self.cache.v[:, :, :, :P] = cache.v.repeat_interleave(copies, 1)
            self.cache.length = P
        self.position = self.position[:, -1]  # (B,): the last position of each row
        return logits

    def step(self, token: Tensor) -> Tensor:
        self.position = self.position + 1
        S = self.cache.length + 1
        if self.compiled:
            slot = torch.tensor([S - 1], device=self.device)
            key_mask = self.mask & (torch.arange(self.cache.max_len, device=self.device) < S)
            logits = self.step_fn.compiled(token, self.position, self.cache, key_mask, slot)
            self.cache.length = S
            return logits.clone()  # CUDA graphs reuse their output buffer at the next replay
        mask = self.mask[:, :S] if self.padded else None
        return decode_one_token(self.step_fn, token, self.position, self.cache, mask)

    def reorder(self, index: Tensor) -> None:
        """Keep cache rows `index` (B,) (beam search); a prompt's beams share their masks and positions."""
        if self.compiled:  # in place: the recorded graphs read these buffers
            self.cache.k.copy_(self.cache.k.index_select(1, index))
            self.cache.v.copy_(self.cache.v.index_select(1, index))
        else:
            self.cache.reorder(index)


@contextmanager
def _inference(model: nn.Module):
    """No autograd and eval mode (no dropout) for the duration; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


# --- decoding loops -----------------------------------------------------------------------------------------

def _stop_string_hits(tokenizer: Tokenizer, seqs: Tensor, start: int, stops: tuple[str, ...]) -> Tensor:
    """(N,) bool: the text of seqs[:, start:] contains a stop string."""
    texts = [tokenizer.decode(row) for row in seqs[:, start:].tolist()]
    return torch.tensor([any(s in t for s in stops) for t in texts], device=seqs.device)


def _token_loop(run: _Decoding, input_ids: Tensor, s: GenerationSettings, generator: torch.Generator | None,
                tokenizer: Tokenizer | None) -> Iterator[Tensor]:
    """Greedy or sampled decoding; yields the next token of every row (B,), pad for finished rows."""
    B, P = input_ids.shape
    seqs = torch.full((B, P + s.max_new_tokens), s.pad_id, dtype=torch.long, device=input_ids.device)
    seqs[:, :P] = input_ids
    eos = torch.tensor(s.eos_ids, dtype=torch.long, device=input_ids.device)
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    penalised = s.repetition_penalty != 1.0 or s.no_repeat_ngram_size > 0 or s.min_new_tokens > 0
    logits = run.prefill(input_ids, s.num_return_sequences)
    for n in range(s.max_new_tokens):
        cur = P + n
        scores = penalise(logits, seqs[:, :cur], run.mask[:, :cur], n, s) if penalised else logits
        token = sample(scores, s, generator)
        token = torch.where(unfinished, token, s.pad_id)
        seqs[:, cur] = token
        if len(eos):
            unfinished &= ~torch.isin(token, eos)
        if s.stop_strings:
            unfinished &= ~_stop_string_hits(tokenizer, seqs[:, :cur + 1], P, s.stop_strings)
        yield token
        if n + 1 == s.max_new_tokens or not bool(unfinished.any()):
            return
        logits = run.step(token)


def _gather_beams(t: Tensor, index: Tensor) -> Tensor:
    """t (B, K, ...) at beams index (B, K') -> (B, K', ...)."""
    return torch.take_along_dim(t, index.view(*index.shape, *([1] * (t.dim() - 2))), dim=1)


def _beam_search(run: _Decoding, input_ids: Tensor, s: GenerationSettings, generator: torch.Generator | None,
                 tokenizer: Tokenizer | None) -> Tensor:
    """transformers' vectorised beam search; input_ids (B * num_beams, P) -> (B * num_return_sequences, T).

    Keeps, per prompt, `num_beams` running hypotheses and the `num_beams` best finished ones (scored by summed
    log-probability / generated_length ** length_penalty); stops per `early_stopping` as transformers does.
    """
    nb, P, device = s.num_beams, input_ids.shape[1], input_ids.device
    B = input_ids.shape[0] // nb
    max_len = P + s.max_new_tokens
    keep = max(2, 1 + len(s.eos_ids)) * nb  # enough candidates that num_beams of them can go on
    top_nb = torch.arange(keep, device=device) < nb
    eos = torch.tensor(s.eos_ids, dtype=torch.long, device=device)
    # transformers fills finished beams with `pad_token_id or eos_token_id[0]`: eos when the pad id is 0.
    fill = s.pad_id if s.pad_id or not s.eos_ids else s.eos_ids[0]
    running = torch.full((B, nb, max_len), fill, dtype=torch.long, device=device)
    running[:, :, :P] = input_ids.view(B, nb, P)
    finished = running.clone()
    running_scores = torch.zeros(B, nb, device=device)
    running_scores[:, 1:] = -1e9  # only the first beam's continuations count at the first step
    finished_scores = torch.full((B, nb), -1e9, device=device)
    finished_len = torch.zeros(B, nb, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    min_keep = len(s.eos_ids) + 1
    logits = run.prefill(input_ids, nb)
    for cur in range(P, max_len):
        logp = F.log_softmax(logits, dim=-1)  # (B * nb, V)
        flat = running[:, :, :cur].reshape(B * nb, cur)
        logp = process_logits(logp, flat, run.mask[:, :cur], cur - P, s, min_keep)
        V = logp.shape[-1]
        logp = (logp.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
        if s.do_sample:
            index = torch.multinomial(logp.softmax(-1), keep, generator=generator)  # (B, keep)
            top_scores = logp.gather(1, index)
        else:
            top_scores, index = torch.topk(logp, keep)
        beam, token = index // V, index % V  # (B, keep)
        cand = _gather_beams(running, beam)  # (B, keep, max_len)
        cand[:, :, cur] = token
        hits = torch.isin(token, eos) if len(eos) else torch.zeros_like(token, dtype=torch.bool)
        if cur + 1 >= max_len:
            hits = torch.ones_like(hits)
        if s.stop_strings:
            hits |= _stop_string_hits(tokenizer, cand[:, :, :cur + 1].reshape(B * keep, -1), P,
                                      s.stop_strings).view(B, keep)

        # The best num_beams candidates that did not finish go on.
        go_scores = top_scores + hits.float() * -1e9
        go = torch.topk(go_scores, nb).indices  # (B, nb)
        running = _gather_beams(cand, go)
        running_scores = go_scores.gather(1, go)
        source_beam = beam.gather(1, go)  # (B, nb)

        # Finished candidates among the top num_beams join the finished set if they beat its members.
        just = hits & top_nb
        fin_scores = top_scores / ((cur + 1 - P) ** s.length_penalty)
        full = is_finished.all(-1, keepdim=True) & (s.early_stopping is True)
        for excluded in (full, ~improvable, ~just):  # added one by one, as transformers does (same rounding)
            fin_scores = fin_scores + excluded.float() * -1e9
        merged = torch.topk(torch.cat([finished_scores, fin_scores], 1), nb).indices  # (B, nb)
        finished = _gather_beams(torch.cat([finished, cand], 1), merged)
        finished_scores = torch.cat([finished_scores, fin_scores], 1).gather(1, merged)
        lengths = torch.full_like(token, cur + 1 - P)
        finished_len = torch.cat([finished_len, lengths], 1).gather(1, merged)
        is_finished = torch.cat([is_finished, just], 1).gather(1, merged)

        # Stop when no running beam can beat the worst finished one (transformers' heuristics), when every
        # beam finished under early_stopping=True, or when every candidate finished (max length).
        steps = (max_len if s.early_stopping == "never" and s.length_penalty > 0 else cur + 1) - P
        best_running = running_scores[:, :1] / (steps ** s.length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, -1e9)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        all_done = bool(is_finished.all()) and s.early_stopping is True
        if not bool(improvable.any()) or all_done or bool(hits.all()):
            break
        run.reorder((torch.arange(B, device=device)[:, None] * nb + source_beam).view(-1))
        logits = run.step(running[:, :, cur].reshape(-1))

    nrs = s.num_return_sequences
    out_len = P + int(finished_len[:, :nrs].max())
    return finished[:, :nrs, :out_len].reshape(B * nrs, out_len)


def preferred_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The fastest exact-enough dtype for decoding on `device`: bfloat16 on CUDA and on CPUs with native bf16
    matrix support (AVX512-BF16/AMX, as oneDNN reports it), float32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    return torch.float32


# --- public API ---------------------------------------------------------------------------------------------

def _check_decoder(model: Any) -> None:
    if not isinstance(model, Decoder):
        raise TypeError(f"generation needs an lmforge Decoder (a causal language model), got "
                        f"{type(model).__name__}")
    if model.config.head != "lm":
        raise ValueError(f"generation needs a language-model head, this model has head={model.config.head!r}")


def _default_mask(input_ids: Tensor, s: GenerationSettings, pad_given: bool) -> Tensor:
    """As transformers infers it: mask pad ids only when the pad id is known and is no eos id."""
    if pad_given and s.pad_id not in s.eos_ids and bool((input_ids == s.pad_id).any()):
        return (input_ids != s.pad_id).long()
    return torch.ones_like(input_ids)


def _generator(seed: int | None, generator: torch.Generator | None,
               device: torch.device) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return torch.Generator(device=device).manual_seed(seed)


def _prepare(model: Decoder, input_ids: Tensor, attention_mask: Tensor | None, kwargs: dict[str, Any]):
    """Validate and expand the inputs: returns (settings, generator, input_ids, attention_mask, options)."""
    _check_decoder(model)
    check_input_ids(input_ids, model.config.vocab_size)
    options = {k: kwargs.pop(k) for k in ("seed", "generator", "tokenizer", "fast", "compile") if k in kwargs}
    s = resolve_settings(model.config, input_ids.shape[1], **kwargs)
    device = model.embed_tokens.weight.device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is None:
        pad_known = kwargs.get("pad_token_id", model.config.pad_token_id) is not None
        attention_mask = _default_mask(input_ids, s, pad_known)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                         f"{tuple(input_ids.shape)}")
    attention_mask = attention_mask.to(device)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: attention_mask must be 1 at every row's last position")
    if s.stop_strings and options.get("tokenizer") is None:
        raise ValueError("stop_strings needs tokenizer= to read the generated text")
    expand = s.num_beams if s.num_beams > 1 else s.num_return_sequences
    if expand > 1:
        input_ids = input_ids.repeat_interleave(expand, dim=0)
        attention_mask = attention_mask.repeat_interleave(expand, dim=0)
    generator = _generator(options.get("seed"), options.get("generator"), device)
    return s, generator, input_ids, attention_mask, options


def generate_ids(model: Decoder, input_ids: Tensor, attention_mask: Tensor | None = None,
                 **kwargs: Any) -> Tensor:
    """Token ids as transformers' `model.generate` returns them: (B * num_return_sequences, T), prompt first;
    rows that finished early are padded with the pad id (the model's, else the first eos id).

    input_ids: (B, P) left-padded prompts; attention_mask: (B, P), 1 for real tokens (inferred from the pad id
    when it is no eos id, else all ones). kwargs: the decoding settings of `resolve_settings`, plus seed (int)
    or generator (torch.Generator) for sampling, tokenizer (for stop_strings), fast (default True: the
    `DecodeStep` path; False runs the model's plain forward each step) and compile (default: CUDA only).
    Raises TypeError/ValueError for bad inputs or settings, naming them.
    """
    s, generator, input_ids, attention_mask, options = _prepare(model, input_ids, attention_mask,
                                                                dict(kwargs))
    with _inference(model):
        run = _Decoding(model, input_ids, attention_mask, s.max_new_tokens, options.get("fast", True),
                        options.get("compile"))
        if s.num_beams > 1:
            return _beam_search(run, input_ids, s, generator, options.get("tokenizer"))
        tokens = list(_token_loop(run, input_ids, s, generator, options.get("tokenizer")))
        return torch.cat([input_ids, torch.stack(tokens, 1)], 1)


def _load(model: Decoder | str | Path, tokenizer: Tokenizer | None, dtype: str | torch.dtype | None):
    """Accept a model object or a name/path (loaded with `lmforge.io.load_model`) and find its tokenizer."""
    source = None
    if isinstance(model, (str, Path)):
        from lmforge.io import load_model

        source = model
        model = load_model(source, dtype=dtype) if dtype is not None else load_model(source)
    _check_decoder(model)
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
    s, generator, ids, mask, options = _prepare(model, ids, mask, kw)
    if s.num_beams > 1 or s.num_return_sequences > 1:
        raise ValueError("stream produces one sequence: num_beams and num_return_sequences must be 1")
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
    emitted = ""
    with _inference(model):
        run = _Decoding(model, ids, mask, s.max_new_tokens, options.get("fast", True), options.get("compile"))
        for token in _token_loop(run, ids, s, generator, options.get("tokenizer")):
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
