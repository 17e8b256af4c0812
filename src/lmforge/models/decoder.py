"""Causal decoder: GPT-2 / DistilGPT2 and Llama / SmolLM2, chosen by `ModelConfig`.

GPT-2: learned positions, LayerNorm, GELU (tanh), multi-head attention with biases.
Llama: rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases.
Both: pre-norm blocks, a final norm, an LM head tied to the token embeddings when `tie_embeddings`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.models.blocks import Block, KVCache, ModelOutput, check_input_ids, init_weights, make_norm, rotary_cos_sin


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
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: KVCache | None = None, output_hidden_states: bool = False,
                last_logits_only: bool = False) -> ModelOutput:
        """Next-token logits (B, T, vocab) for input_ids (B, T).

        attention_mask: (B, S) with 1 for real tokens and 0 for padding, over every key position: S = T without a
            cache, S = cache.length + T with one.
        position_ids: (B, T); by default consecutive positions starting at the cache length (or 0).
        cache: a `KVCache`; keys and values are written into it and its length advances by T.
        last_logits_only: logits (B, 1, vocab) of the last position only (all a generation prefill needs).
        Raises ValueError for ids outside the vocabulary or positions beyond the model's context.
        """
        cfg = self.config
        start = cache.length if cache is not None else 0
        if start == 0:
            check_input_ids(input_ids, cfg.vocab_size)
        B, T = input_ids.shape
        S = start + T
        if position_ids is None:
            position_ids = torch.arange(start, S, device=input_ids.device).expand(B, T)
        if cfg.position == "learned" and S > cfg.max_seq_len:
            raise ValueError(f"sequence of {S} tokens exceeds the model context of {cfg.max_seq_len}")

        x = self.embed_tokens(input_ids)  # (B, T, C)
        rotary = None
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids)
        else:
            rotary = rotary_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        x = self.dropout(x)
        mask, is_causal = causal_mask(attention_mask, start, T, x.device)

        hidden = [x] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, is_causal, rotary, cache, i)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x
        if cache is not None:
            cache.length = S
        logits = self.lm_head(x[:, -1:] if last_logits_only else x)
        return ModelOutput(logits=logits, last_hidden_state=x, hidden_states=hidden)

    def generate(self, input_ids: Tensor, **kwargs) -> Tensor:
        """transformers-style generation returning token ids (prompt included); see `lmforge.generation`."""
        from lmforge.generation import generate_ids  # generation builds on this module

        return generate_ids(self, input_ids, **kwargs)


def causal_mask(attention_mask: Tensor | None, start: int, T: int, device: torch.device) -> tuple[Tensor | None, bool]:
    """The SDPA mask for T queries at absolute positions [start, start + T) over S = start + T keys.

    Returns (mask, is_causal): no mask and is_causal=True for the plain case, no mask at all for one new token
    without padding, else a boolean (B, 1, T, S) mask. A query always sees itself, so padded rows never
    attend to nothing (which would make NaNs that leak through the cache).
    """
    S = start + T
    if attention_mask is None:
        if start == 0:
            return None, T > 1
        if T == 1:
            return None, False
    q_pos = torch.arange(start, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        if attention_mask.shape[-1] != S:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {S} "
                             f"(cached {start} + new {T})")
        mask = (mask & attention_mask[:, None, None, :].bool()) | (k_pos == q_pos)[None, None]
    return mask, False
