"""Blocks shared by the decoder and the encoder: norms, rotary positions, attention (torch SDPA), MLP, KV cache.

Shapes: B batch, T query length, S key length, H heads, Hkv key/value heads, D head size, C model width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.models.matvec import decode_attention, decode_step_attention, matvec, rms_norm, silu_mul, usable


@dataclass
class ModelOutput:
    """What every model's forward returns.

    logits: (B, T, vocab) for language-model heads, (B, n_labels) for classification, None without a head.
    last_hidden_state: (B, T, C), after the final norm for pre-norm decoders.
    hidden_states: with `output_hidden_states=True`, n_layer + 1 tensors (B, T, C): the embedding output, then
    every layer's output (the last one after the final norm, as transformers reports it).
    encoder_last_hidden_state: encoder-decoder models only, the encoder's output (B, S, C); last_hidden_state
    and hidden_states are then the decoder's.
    """

    logits: Tensor | None
    last_hidden_state: Tensor
    hidden_states: list[Tensor] | None = None
    encoder_last_hidden_state: Tensor | None = None


class Linear(nn.Linear):
    """`nn.Linear` whose decode-step products (a few rows, no autograd, CPU) run lmforge's matvec kernel; every
    other product (training, prompts, GPUs, sharded weights) is `F.linear`. Same parameters and state dict."""

    def forward(self, x: Tensor) -> Tensor:
        if usable(x, self.weight):
            return matvec(x, self.weight, bias=self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32 (as the Llama reference computes it), cast back to x's dtype
        # before the scale; F.rms_norm is that formula in one kernel. Eager decode steps: lmforge's kernel.
        y = rms_norm(x, self.weight, self.eps)
        if y is not None:
            return y
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


def activation(name: str, x: Tensor) -> Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {name!r}; expected gelu, gelu_tanh, silu or relu")


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin tables (B, 1, T, D) for integer positions (B, T), in the half-split (rotate_half) layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """One attention layer's key/value buffers, (B, Hkv, L, D) each, written at explicit slots.

    Owned by the `Attention` module it serves (`Decoder.setup_cache` creates one per layer); nothing in it
    advances by itself: the caller says where each new key goes (`input_pos`) and how many slots to read.
    """

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def rows(self, b: int, rows: slice | None = None) -> tuple[Tensor, Tensor]:
        """Views of the key and value buffers of cache rows `rows` (default [0, b)), which must hold b rows."""
        ck, cv = (self.k[:b], self.v[:b]) if rows is None else (self.k[rows], self.v[rows])
        if ck.shape[0] != b:
            raise ValueError(f"cache rows {rows} hold {ck.shape[0]} rows, the input has {b}")
        return ck, cv

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int,
               rows: slice | None = None) -> tuple[Tensor, Tensor]:
        """Write k, v (b, Hkv, T, D) at slots input_pos of cache rows `rows` (default [0, b)); return keys and
        values of slots [0, kv_len) of those rows (b, Hkv, kv_len, D).

        input_pos: (T,) slots shared by every row, or (b, T) slots per row (rows at different positions, as a
        continuously batched server decodes them).
        """
        b = k.shape[0]
        ck, cv = self.rows(b, rows)
        if input_pos.dim() == 1:
            ck.index_copy_(2, input_pos, k)
            cv.index_copy_(2, input_pos, v)
        else:
            r = torch.arange(b, device=k.device)[:, None]  # (b, 1) with input_pos (b, T): one slot per token
            ck[r, :, input_pos] = k.transpose(1, 2)  # advanced indices first: (b, T, Hkv, D)
            cv[r, :, input_pos] = v.transpose(1, 2)
        return ck[:, :, :kv_len], cv[:, :, :kv_len]


class Attention(nn.Module):
    """Multi-head / grouped-query attention through torch SDPA, with q, k and v as one fused projection.

    `qkv.weight` is (H*D + 2*Hkv*D, C): the query rows, then the key rows, then the value rows. With a
    `kv_cache` and `input_pos`, the new keys and values are written into the cache (rows `cache_rows`, default
    the first B) and attention reads the first `kv_len` slots. `mask` is boolean (True: may attend) or float
    (added to the scores: T5's position bias with -inf on hidden keys).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, h, hkv, d = config.d_model, config.n_head, config.n_kv_head, config.head_dim
        self.qkv = Linear(c, (h + 2 * hkv) * d, bias=config.attn_bias)
        self.out = Linear(h * d, c, bias=config.attn_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool, rotary: tuple[Tensor, Tensor] | None,
                input_pos: Tensor | None = None, kv_len: int | None = None,
                cache_rows: slice | None = None) -> Tensor:
        B, T, _ = x.shape
        cfg = self.config
        H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        p = cfg.dropout if self.training else 0.0
        scale = D ** -0.5 if cfg.attn_scale is None else cfg.attn_scale
        if input_pos is not None and self.kv_cache is None:
            raise ValueError("input_pos was given but the model has no KV cache; call setup_cache first")
        qkv = self.qkv(x)
        if input_pos is not None and T == 1 and input_pos.dim() == 1 and not p and not is_causal:
            # an eager decode step: rotation, cache writes and attention in one kernel where it applies
            y = decode_step_attention(qkv, rotary, *self.kv_cache.rows(B, cache_rows), int(input_pos[0]), kv_len,
                                      mask, scale, H)
            if y is not None:
                return self.out(y)
        qk, v = qkv.split([(H + Hkv) * D, Hkv * D], dim=-1)
        qk = qk.view(B, T, H + Hkv, D).transpose(1, 2)  # (B, H + Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        if rotary is not None:  # queries and keys rotated in one call
            qk = apply_rotary(qk, *rotary)
        q, k = qk.split([H, Hkv], dim=1)  # (B, H, T, D), (B, Hkv, T, D)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, kv_len, cache_rows)  # (B, Hkv, S, D)
        y = None if p or is_causal else decode_attention(q, k, v, mask, scale)  # one new token: lmforge's kernel
        if y is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal,
                                               scale=cfg.attn_scale, enable_gqa=Hkv != H)  # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    """Feed-forward: down(act(up(x))), or with `gated_mlp` down(act(gate(x)) * up(x)) where `up.weight` holds
    the gate rows then the up rows (2 * d_ff, C), one product for both."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation = config.activation
        self.gated = config.gated_mlp
        self.up = Linear(config.d_model, config.d_ff * (2 if self.gated else 1), bias=config.mlp_bias)
        self.down = Linear(config.d_ff, config.d_model, bias=config.mlp_bias)
        # T5 also drops inside the feed-forward, after the activation (GPT-2, Llama and BERT do not).
        self.inner_dropout = nn.Dropout(config.dropout) if config.arch == "encoder-decoder" else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)
        if self.gated:
            y = silu_mul(h) if self.activation == "silu" else None  # eager decode steps: one pass
            if y is None:
                gate, up = h.chunk(2, dim=-1)
                y = activation(self.activation, gate) * up
            return self.down(self.inner_dropout(y))
        return self.down(self.inner_dropout(activation(self.activation, h)))


class Block(nn.Module):
    """One transformer layer; pre-norm (GPT, Llama) or post-norm (BERT family) by config."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool, rotary: tuple[Tensor, Tensor] | None,
                input_pos: Tensor | None = None, kv_len: int | None = None,
                cache_rows: slice | None = None) -> Tensor:
        drop = self.dropout if self.training else _identity  # (a decode step makes no needless module calls)
        if self.pre_norm:
            x = x + drop(self.attn(self.attn_norm(x), mask, is_causal, rotary, input_pos, kv_len, cache_rows))
            return x + drop(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + drop(self.attn(x, mask, is_causal, rotary, input_pos, kv_len, cache_rows)))
        return self.mlp_norm(x + drop(self.mlp(x)))


def _identity(x: Tensor) -> Tensor:
    return x


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT/BERT-style initialisation: normal(0, std) weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def check_input_ids(input_ids: Tensor, vocab_size: int) -> None:
    """Raise a clear error for input ids that are not a non-empty (B, T) integer tensor within the vocabulary."""
    if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an integer torch.Tensor of shape (batch, seq), got {type(input_ids)}"
                        f"{'' if not isinstance(input_ids, Tensor) else ' of dtype ' + str(input_ids.dtype)}")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, seq) tensor, got shape {tuple(input_ids.shape)}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"input_ids out of range: found ids in [{lo}, {hi}], vocabulary is [0, {vocab_size})")
