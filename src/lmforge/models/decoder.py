"""Causal decoder: GPT-2 / DistilGPT2 and Llama / SmolLM2, chosen by `ModelConfig`.

GPT-2: learned positions, LayerNorm, GELU (tanh), multi-head attention with biases.
Llama: rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases.
Both: pre-norm blocks, a final norm, an LM head tied to the token embeddings when `tie_embeddings`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.models.blocks import (
    Block,
    KVCache,
    Linear,
    ModelOutput,
    check_input_ids,
    init_weights,
    make_norm,
    rotary_cos_sin,
)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "decoder":
            raise ValueError(f"Decoder needs a config with arch='decoder', got {config.arch!r}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_positions = (nn.Embedding(config.max_seq_len, config.d_model)
                                if config.position == "learned" else None)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def setup_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> None:
        """Give every attention layer key/value buffers for `batch_size` rows and `max_len` slots.

        Kept while their shape, dtype and device stay the same (so compiled steps and CUDA graphs recorded on
        them stay valid); `drop_cache` frees them. Raises ValueError when max_len exceeds a learned position
        table.
        """
        cfg = self.config
        if max_len < 1 or batch_size < 1:
            raise ValueError(f"setup_cache needs batch_size and max_len >= 1, got {batch_size} and {max_len}")
        if max_len > cfg.max_seq_len and cfg.position == "learned":
            raise ValueError(f"a cache of {max_len} positions exceeds the model context of {cfg.max_seq_len}")
        weight = self.norm.weight  # float in the model's dtype whatever format the linears hold
        dtype = dtype or weight.dtype
        device = torch.device(device) if device is not None else weight.device
        for layer in self.layers:
            n_kv_head = layer.attn.config.n_kv_head  # the heads this module computes (a shard's under TP)
            shape = (batch_size, n_kv_head, max_len, cfg.head_dim)
            cache = layer.attn.kv_cache
            if cache is None or cache.k.shape != shape or cache.k.dtype != dtype or cache.k.device != device:
                layer.attn.kv_cache = KVCache(batch_size, n_kv_head, max_len, cfg.head_dim, dtype, device)

    def drop_cache(self) -> None:
        """Free the key/value buffers of `setup_cache`."""
        for layer in self.layers:
            layer.attn.kv_cache = None

    def reorder_cache(self, index: Tensor) -> None:
        """Row i of every cache becomes row index[i] (LongTensor (B,)), in place: beams that survive, or one
        prompt's prefilled row copied to the rows of its other sequences."""
        for layer in self.layers:
            cache = layer.attn.kv_cache
            cache.k.copy_(cache.k.index_select(0, index))
            cache.v.copy_(cache.v.index_select(0, index))

    def copy_cache_row(self, src: int, dst: int) -> None:
        """Cache row `dst` becomes a copy of row `src` in every layer (a finished row's place taken by another
        one, or one prompt's prefill shared by several sequences)."""
        for layer in self.layers:
            cache = layer.attn.kv_cache
            cache.k[dst].copy_(cache.k[src])
            cache.v[dst].copy_(cache.v[src])

    @property
    def cache_shape(self) -> tuple[int, int] | None:
        """(batch_size, max_len) of the current cache, None without one."""
        cache = self.layers[0].attn.kv_cache
        return None if cache is None else (cache.k.shape[0], cache.k.shape[2])

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                input_pos: Tensor | None = None, output_hidden_states: bool = False,
                last_logits_only: bool = False, cache_rows: slice | None = None) -> ModelOutput:
        """Next-token logits (B, T, vocab) for input_ids (B, T): training, prompt prefill and one-token decode.

        input_pos: None for a plain forward over the whole sequence (no cache). Else a LongTensor (T,) of the
            cache slots the T new tokens occupy (`setup_cache` first): their keys and values are written there
            and the queries attend to the cached slots before them. Or a LongTensor (B, T): slots per row, for
            rows at different positions (each row attends to its own slots up to its query's).
        attention_mask: (B, S) with 1 for real tokens and 0 for padding, over every key slot the queries may see:
            S = T without a cache; with one, the first S slots of the cache (S > input_pos[-1]; slots after a
            query's own are masked as causal). Without it, a cached forward reads slots [0, input_pos[-1] + 1).
        position_ids: (B, T) positions for the position embeddings / rotary; default input_pos (or 0..T-1).
        last_logits_only: logits (B, 1, vocab) of the last position only (all a generation prefill needs).
        cache_rows: the cache rows the B input rows use (a slice of B rows; default the first B).
        Raises ValueError for ids outside the vocabulary or positions beyond the model's context.
        """
        cfg = self.config
        B, T = input_ids.shape
        if input_pos is None or T > 1:  # one-token decode steps feed back the model's own tokens
            check_input_ids(input_ids, cfg.vocab_size)
        if input_pos is None:
            kv_len = T
            slots = torch.arange(T, device=input_ids.device)
        else:
            kv_len = attention_mask.shape[-1] if attention_mask is not None else int(input_pos[..., -1].max()) + 1
            slots = input_pos
        if position_ids is None:
            position_ids = slots.expand(B, T)
        if cfg.position == "learned" and input_pos is None and T > cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds the model context of {cfg.max_seq_len}")

        x = self.embed_tokens(input_ids)  # (B, T, C)
        rotary = None
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids)
        else:
            rotary = rotary_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        x = self.dropout(x)
        mask, is_causal = padding_causal_mask(attention_mask, slots, kv_len, x.device)

        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, mask, is_causal, rotary, input_pos, kv_len, cache_rows)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x
        logits = self.lm_head(x[:, -1:] if last_logits_only else x)
        return ModelOutput(logits=logits, last_hidden_state=x, hidden_states=hidden)

    def generate(self, input_ids: Tensor, **kwargs) -> Tensor:
        """transformers-style generation returning token ids (prompt included); see `lmforge.generation`."""
        from lmforge.generation import generate_ids  # generation builds on this module

        return generate_ids(self, input_ids, **kwargs)


def padding_causal_mask(attention_mask: Tensor | None, q_pos: Tensor, S: int,
                        device: torch.device) -> tuple[Tensor | None, bool]:
    """The SDPA mask for queries at slots q_pos (T,), or per row (B, T), over key slots [0, S).

    Returns (mask, is_causal): no mask and is_causal=True for a plain causal forward (q_pos = 0..S-1), no
    mask at all for one new token without padding, else a boolean (B or 1, 1, T, S) mask: causal, and padded
    keys hidden. A query always sees itself, so padded rows never attend to nothing (which would make NaNs
    that leak through the cache).
    """
    T = q_pos.shape[-1]
    if attention_mask is None and q_pos.dim() == 1:
        if T == S:
            return None, T > 1
        if T == 1:
            return None, False
    k_pos = torch.arange(S, device=device)  # (S,)
    q = q_pos.view(-1, T)[:, None, :, None]  # (1 or B, 1, T, 1)
    mask = k_pos <= q  # (1 or B, 1, T, S)
    if attention_mask is not None:
        if attention_mask.shape[-1] != S:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {S}")
        mask = (mask & attention_mask[:, None, None, :].bool()) | (k_pos == q)
    return mask, False
