"""Encoder-decoder transformer: T5 v1.0 and v1.1 / Flan-T5, chosen by `ModelConfig`.

Both versions: pre-norm blocks with T5's RMS norm (no mean subtraction, no bias), no biases anywhere, unscaled
attention scores (`attn_scale=1.0`; T5 folds the scale into its initialisation), and no position table: each
stack learns one scalar per (distance bucket, head), computed once per forward (the first layer's table in
Hugging Face's layout) and added to the self-attention scores of every layer. Distances are bucketed exactly
up to half the buckets and log-spaced beyond, up to `relative_max_distance`; the encoder's buckets are
bidirectional, the decoder's count only the past. Decoder layers attend to the encoder output (cross-attention)
between their self-attention and their feed-forward.
- v1.0 (t5-small ...): ReLU feed-forward; the LM head is the shared embedding (`tie_embeddings`), applied to
  the decoder output scaled by d_model^-0.5 (`scaled_head`).
- v1.1 / Flan-T5: gated GELU (tanh) feed-forward, an untied LM head, no scaling.

One forward for training and generation (`decode`): with `input_pos`, the decoder writes its keys/values into
the caches its self-attention modules own (`setup_cache`), and reads the encoder's keys/values that
`remember` computed once per prompt into the buffers its cross-attention modules own.

Shapes: B rows, T decoder length, S encoder length, H heads, D head size, C model width, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.models.blocks import Block, KVCache, Linear, ModelOutput, RMSNorm, check_input_ids, make_norm

__all__ = ["CrossAttention", "EncoderDecoder", "RelativePositionBias", "relative_buckets", "shift_right"]


def relative_buckets(distance: Tensor, bidirectional: bool, n_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket (same shape, long) of each key-minus-query distance.

    Bidirectional: half the buckets for keys after the query, half for those before (or at). Causal: only
    distances into the past count, the future maps to bucket 0. Within a half, the first half of the buckets
    hold distances 0, 1, ... exactly, the rest log-spaced distances up to max_distance (and beyond, the last).
    """
    bucket = torch.zeros_like(distance)
    if bidirectional:
        n_buckets //= 2
        bucket = (distance > 0).long() * n_buckets
        distance = distance.abs()
    else:
        distance = (-distance).clamp(min=0)
    exact = n_buckets // 2
    # The same float operations, in the same order, as Mesh TensorFlow, so that the truncation agrees.
    far = exact + (torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                   * (n_buckets - exact)).long()
    far = far.clamp(max=n_buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Embedding):
    """One learned scalar per (bucket, head), `weight` (relative_buckets, H); see `relative_buckets`."""

    def __init__(self, config: ModelConfig, bidirectional: bool):
        super().__init__(config.relative_buckets, config.n_head)
        self.bidirectional = bidirectional
        self.max_distance = config.relative_max_distance

    def forward(self, q_pos: Tensor, kv_len: int) -> Tensor:  # type: ignore[override]
        """The bias (1, H, T, kv_len) for queries at positions q_pos (T,) over keys at 0..kv_len-1."""
        k_pos = torch.arange(kv_len, device=q_pos.device)
        buckets = relative_buckets(k_pos[None, :] - q_pos[:, None], self.bidirectional, self.num_embeddings,
                                   self.max_distance)  # (T, S)
        return super().forward(buckets).permute(2, 0, 1)[None]  # (1, H, T, S)


class CrossAttention(nn.Module):
    """Decoder positions attending to the encoder output (memory): queries from x, keys and values from the
    memory through one fused projection `kv` ((2 * H * D, C): the key rows, then the value rows).

    `remember(memory)` projects the memory once into `kv_cache` (one row per prompt); a forward without memory
    reads it. Rows of x come in groups of equal size per prompt (beams or sampled sequences of one prompt):
    a group's queries attend to its prompt's keys together, as if they were more positions of one row, so the
    keys and values are neither copied per sequence nor reordered with the beams.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, h, d = config.d_model, config.n_head, config.head_dim
        self.q = Linear(c, h * d, bias=config.attn_bias)
        self.kv = Linear(c, 2 * h * d, bias=config.attn_bias)
        self.out = Linear(h * d, c, bias=config.attn_bias)
        self.kv_cache: KVCache | None = None

    def project(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (Bp, H, S, D) of memory (Bp, S, C)."""
        Bp, S, _ = memory.shape
        cfg = self.config
        k, v = self.kv(memory).view(Bp, S, 2 * cfg.n_head, cfg.head_dim).transpose(1, 2).chunk(2, dim=1)
        return k, v

    def remember(self, memory: Tensor) -> None:
        """Keep the keys and values of memory (Bp, S, C) in `kv_cache` for the forwards that follow."""
        k, v = self.project(memory)
        Bp, H, S, D = k.shape
        cache = self.kv_cache
        if cache is None or cache.k.shape != k.shape or cache.k.dtype != k.dtype or cache.k.device != k.device:
            cache = self.kv_cache = KVCache(Bp, H, S, D, k.dtype, k.device)
        cache.k.copy_(k)
        cache.v.copy_(v)

    def forward(self, x: Tensor, memory: Tensor | None, memory_mask: Tensor | None) -> Tensor:
        """x (B, T, C) over memory (Bp, S, C), or over the remembered keys/values without it; memory_mask
        (Bp, S): 1 for real encoder tokens. B must be a multiple of Bp (consecutive rows share a prompt)."""
        B, T, _ = x.shape
        cfg = self.config
        H, D = cfg.n_head, cfg.head_dim
        if memory is not None:
            k, v = self.project(memory)
        elif self.kv_cache is not None:
            k, v = self.kv_cache.k, self.kv_cache.v
        else:
            raise ValueError("cross-attention needs the encoder output: pass memory, or call remember() first")
        Bp = k.shape[0]
        if B % Bp:
            raise ValueError(f"{B} decoder rows cannot share {Bp} encoder rows: expected a multiple of {Bp}")
        g = B // Bp
        q = self.q(x).view(Bp, g * T, H, D).transpose(1, 2)  # (Bp, H, g*T, D): a group's rows as positions
        mask = None if memory_mask is None else memory_mask[:, None, None, :].bool()  # (Bp, 1, 1, S)
        p = cfg.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=cfg.attn_scale)
        return self.out(y.transpose(1, 2).reshape(B, T, H * D))


class CrossBlock(Block):
    """A decoder layer: self-attention, cross-attention over the encoder output, feed-forward; each pre-norm
    with a residual connection."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.cross_norm = make_norm(config)
        self.cross = CrossAttention(config)

    def forward(self, x: Tensor, mask: Tensor | None, memory: Tensor | None, memory_mask: Tensor | None,
                input_pos: Tensor | None = None, kv_len: int | None = None) -> Tensor:  # type: ignore[override]
        x = x + self.dropout(self.attn(self.attn_norm(x), mask, False, None, input_pos, kv_len))
        x = x + self.dropout(self.cross(self.cross_norm(x), memory, memory_mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention) of T5: layers, a final norm,
    and the relative position bias they share."""

    def __init__(self, config: ModelConfig, n_layer: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.relative_bias = RelativePositionBias(config, bidirectional=not causal)
        self.layers = nn.ModuleList((CrossBlock if causal else Block)(config) for _ in range(n_layer))
        self.norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def self_mask(self, q_pos: Tensor, kv_len: int, key_mask: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The additive self-attention mask (1 or B, H, T, kv_len): the position bias, -inf on keys a query
        may not see (later ones in the decoder; padding, key_mask (B, kv_len) == 0). A query always sees
        itself, so that no row attends to nothing (NaNs)."""
        bias = self.relative_bias(q_pos, kv_len).to(dtype)  # (1, H, T, S)
        k_pos = torch.arange(kv_len, device=q_pos.device)
        allowed = None
        if self.causal and (q_pos.shape[0] > 1 or int(q_pos[-1]) + 1 < kv_len):
            allowed = k_pos[None, :] <= q_pos[:, None]  # (T, S)
        if key_mask is not None:
            if key_mask.shape[-1] != kv_len:
                raise ValueError(f"attention mask covers {key_mask.shape[-1]} positions, expected {kv_len}")
            keys = key_mask[:, None, None, :].bool()  # (B, 1, 1, S)
            allowed = (keys if allowed is None else allowed & keys) | (k_pos[None, :] == q_pos[:, None])
        return bias if allowed is None else torch.where(allowed, bias, -math.inf)

    def forward(self, x: Tensor, key_mask: Tensor | None, memory: Tensor | None = None,
                memory_mask: Tensor | None = None, input_pos: Tensor | None = None,
                output_hidden_states: bool = False) -> tuple[Tensor, list[Tensor] | None]:
        """(output (B, T, C) after the final norm, hidden states or None) of embedded x (B, T, C).

        input_pos (decoder): cache slots (T,) of the new tokens; key_mask then covers the cache slots read.
        """
        T = x.shape[1]
        if input_pos is None:
            q_pos, kv_len = torch.arange(T, device=x.device), T
        else:
            q_pos = input_pos
            kv_len = key_mask.shape[-1] if key_mask is not None else int(input_pos[-1]) + 1
        mask = self.self_mask(q_pos, kv_len, key_mask, x.dtype)
        x = self.dropout(x)
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            if self.causal:
                x = layer(x, mask, memory, memory_mask, input_pos, kv_len)
            else:
                x = layer(x, mask, False, None)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x
        return self.dropout(x), hidden


def shift_right(labels: Tensor, decoder_start_token_id: int = 0, pad_token_id: int = 0) -> Tensor:
    """Teacher-forcing decoder inputs (B, T) for targets `labels` (B, T): the start token, then labels[:, :-1];
    -100 (ignored label positions) becomes pad_token_id. T5: start = pad = 0."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be (batch, target length), got shape {tuple(labels.shape)}")
    out = labels.new_full(labels.shape, decoder_start_token_id)
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill_(out == -100, pad_token_id)


class EncoderDecoder(nn.Module):
    """T5: shared token embeddings, an encoder stack and (head "lm") a decoder stack with a vocabulary head.

    head "none" is the encoder alone (transformers' T5EncoderModel): its forward returns the encoder output.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "encoder-decoder":
            raise ValueError(f"EncoderDecoder needs a config with arch='encoder-decoder', got {config.arch!r}")
        if config.head not in ("lm", "none"):
            raise ValueError(f"an encoder-decoder model has head 'lm' (with its decoder) or 'none' (the encoder "
                             f"alone), got {config.head!r}")
        if config.n_kv_head != config.n_head:
            raise ValueError(f"an encoder-decoder model uses multi-head attention: n_kv_head ({config.n_kv_head}) "
                             f"must equal n_head ({config.n_head})")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, config.n_layer, causal=False)
        with_decoder = config.head == "lm"
        self.decoder = Stack(config, config.n_decoder_layers, causal=True) if with_decoder else None
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False) if with_decoder else None
        self.init_weights()
        if self.lm_head is not None and config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights(self) -> None:
        """T5's initialisation (Mesh TensorFlow's): normal with std 1 for embeddings and an untied head,
        fan-in scaled elsewhere (queries also by the head size, as attention scores are not scaled), unit
        norms."""
        cfg = self.config
        c, hd = cfg.d_model, cfg.n_head * cfg.head_dim
        for name, m in self.named_modules():
            if isinstance(m, RelativePositionBias):
                nn.init.normal_(m.weight, std=c ** -0.5)
            elif isinstance(m, nn.Embedding) or m is self.lm_head:
                nn.init.normal_(m.weight, std=1.0)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, nn.Linear):
                leaf = name.rsplit(".", 1)[-1]
                std = {"qkv": None, "q": (c * cfg.head_dim) ** -0.5, "kv": c ** -0.5, "out": hd ** -0.5,
                       "up": c ** -0.5, "down": cfg.d_ff ** -0.5}[leaf]
                if std is None:  # fused self-attention: the query rows, then keys and values
                    q, kv = m.weight.split([hd, 2 * hd])
                    nn.init.normal_(q, std=(c * cfg.head_dim) ** -0.5)
                    nn.init.normal_(kv, std=c ** -0.5)
                else:
                    nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # --- caches for generation -------------------------------------------------------------------------------

    def _decoder(self) -> Stack:
        if self.decoder is None:
            raise ValueError("this T5 model has no decoder (head 'none', as transformers' T5EncoderModel): it "
                             "encodes, it cannot decode or generate")
        return self.decoder

    def setup_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> None:
        """Give every decoder self-attention key/value buffers for `batch_size` rows and `max_len` positions
        (kept while their shape, dtype and device stay the same)."""
        cfg = self.config
        if max_len < 1 or batch_size < 1:
            raise ValueError(f"setup_cache needs batch_size and max_len >= 1, got {batch_size} and {max_len}")
        weight = self.encoder.norm.weight
        dtype = dtype or weight.dtype
        device = torch.device(device) if device is not None else weight.device
        shape = (batch_size, cfg.n_head, max_len, cfg.head_dim)
        for layer in self._decoder().layers:
            cache = layer.attn.kv_cache
            if cache is None or cache.k.shape != shape or cache.k.dtype != dtype or cache.k.device != device:
                layer.attn.kv_cache = KVCache(batch_size, cfg.n_head, max_len, cfg.head_dim, dtype, device)

    def remember(self, memory: Tensor) -> None:
        """Compute every cross-attention's keys and values of the encoder output memory (Bp, S, C) once, for
        the cached decoder forwards that follow (rows of those come in equal groups per memory row)."""
        for layer in self._decoder().layers:
            layer.cross.remember(memory)

    def drop_cache(self) -> None:
        """Free the buffers of `setup_cache` and `remember`."""
        if self.decoder is not None:
            for layer in self.decoder.layers:
                layer.attn.kv_cache = None
                layer.cross.kv_cache = None

    def reorder_cache(self, index: Tensor) -> None:
        """Row i of every self-attention cache becomes row index[i] (LongTensor (B,)), in place: the beams that
        survive. Rows keep their prompt, so the cross-attention buffers (one row per prompt) stay as they are."""
        for layer in self._decoder().layers:
            cache = layer.attn.kv_cache
            cache.k.copy_(cache.k.index_select(0, index))
            cache.v.copy_(cache.v.index_select(0, index))

    # --- forward ---------------------------------------------------------------------------------------------

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               output_hidden_states: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """The encoder output (B, S, C) of input_ids (B, S) (attention_mask (B, S): 1 for real tokens); with
        output_hidden_states, (output, the embeddings and every layer's output)."""
        check_input_ids(input_ids, self.config.vocab_size)
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                             f"{tuple(input_ids.shape)}")
        x, hidden = self.encoder(self.embed_tokens(input_ids), attention_mask,
                                 output_hidden_states=output_hidden_states)
        return (x, hidden) if output_hidden_states else x

    def decode(self, decoder_input_ids: Tensor, memory: Tensor | None = None, memory_mask: Tensor | None = None,
               decoder_attention_mask: Tensor | None = None, input_pos: Tensor | None = None,
               output_hidden_states: bool = False, last_logits_only: bool = False) -> ModelOutput:
        """Decoder logits (B, T, V) for decoder_input_ids (B, T): teacher forcing and generation steps.

        memory: the encoder output (Bp, S, C), B a multiple of Bp; None reads the keys/values of `remember`.
        memory_mask (Bp, S): 1 for real encoder tokens. decoder_attention_mask (B, T), or with a cache
        (B, slots read): 1 for real decoder tokens (keys at 0 are hidden, on top of the causal mask).
        input_pos: None for a plain forward; else the cache slots (T,) of the new tokens (`setup_cache`
        first), whose keys/values are written there, the queries attending to every slot before them.
        last_logits_only: logits (B, 1, V) of the last position only.
        Raises ValueError for ids outside the vocabulary or a model without a decoder.
        """
        decoder = self._decoder()
        if input_pos is None or decoder_input_ids.shape[1] > 1:  # decode steps feed back the model's tokens
            check_input_ids(decoder_input_ids, self.config.vocab_size)
        x, hidden = decoder(self.embed_tokens(decoder_input_ids), decoder_attention_mask, memory, memory_mask,
                            input_pos, output_hidden_states)
        h = x[:, -1:] if last_logits_only else x
        if self.config.scaled_head:  # v1.0: the embedding matrix as the head, on a rescaled output
            h = h * self.config.d_model ** -0.5
        return ModelOutput(logits=self.lm_head(h), last_hidden_state=x, hidden_states=hidden)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                output_hidden_states: bool = False) -> ModelOutput:
        """Decoder logits (B, T, V) of decoder_input_ids (B, T) given the encoded input_ids (B, S).

        attention_mask (B, S) / decoder_attention_mask (B, T): 1 for real tokens, 0 for padding (either side
        for the encoder; right padding for the decoder). The decoder inputs of targets `labels` are
        `shift_right(labels)`. Head "none" (the encoder alone): logits None and the encoder output as
        last_hidden_state. The returned `encoder_last_hidden_state` is the encoder output (B, S, C); with
        output_hidden_states, hidden_states are the decoder's (the encoder's for head "none").
        Raises ValueError for a missing or unexpected decoder_input_ids, ids outside the vocabulary or masks of
        the wrong shape.
        """
        encoded = self.encode(input_ids, attention_mask, output_hidden_states)
        memory, enc_hidden = encoded if output_hidden_states else (encoded, None)
        if self.decoder is None:
            if decoder_input_ids is not None or decoder_attention_mask is not None:
                raise ValueError("decoder_input_ids / decoder_attention_mask were given, but this T5 model has no "
                                 "decoder (head 'none', as transformers' T5EncoderModel)")
            return ModelOutput(logits=None, last_hidden_state=memory, hidden_states=enc_hidden,
                               encoder_last_hidden_state=memory)
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids is required: the decoder's inputs (B, T), e.g. "
                             "shift_right(labels) for training targets labels")
        if decoder_attention_mask is not None and decoder_attention_mask.shape != decoder_input_ids.shape:
            raise ValueError(f"decoder_attention_mask shape {tuple(decoder_attention_mask.shape)} differs from "
                             f"decoder_input_ids shape {tuple(decoder_input_ids.shape)}")
        if decoder_input_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"decoder_input_ids has {decoder_input_ids.shape[0]} rows, input_ids "
                             f"{input_ids.shape[0]}")
        out = self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask,
                          output_hidden_states=output_hidden_states)
        out.encoder_last_hidden_state = memory
        return out

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        """transformers-style generation: decoder token ids (B * num_return_sequences, T), the decoder start
        token first; see `lmforge.generation.generate_ids`."""
        from lmforge.generation import generate_ids  # generation builds on this module

        return generate_ids(self, input_ids, attention_mask, **kwargs)
