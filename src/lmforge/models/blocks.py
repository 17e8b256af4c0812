"""Blocks shared by the decoder and the encoder: norms, rotary positions, attention (torch SDPA), MLP, KV cache.

Shapes: B batch, T query length, S key length, H heads, Hkv key/value heads, D head size, C model width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig


@dataclass
class ModelOutput:
    """What every model's forward returns.

    logits: (B, T, vocab) for language-model heads, (B, n_labels) for classification, None without a head.
    last_hidden_state: (B, T, C), after the final norm for pre-norm decoders.
    hidden_states: with `output_hidden_states=True`, n_layer + 1 tensors (B, T, C): the embedding output, then
    every layer's output (the last one after the final norm, as transformers reports it).
    """

    logits: Tensor | None
    last_hidden_state: Tensor
    hidden_states: list[Tensor] | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32 (as the Llama reference computes it), cast back to x's dtype
        # before the scale; F.rms_norm is that formula in one kernel.
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


class KVCache:
    """Static key/value buffers for every layer: (n_layer, B, Hkv, max_len, D), allocated once.

    `length` counts the filled slots; a decoder forward with a cache writes its keys at [length, length + T) and
    then advances it. Slots are shared by the whole batch: with left padding, rows differ in their position ids
    and attention masks, not in their slots.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if max_len > config.max_seq_len and config.position == "learned":
            raise ValueError(f"KVCache max_len {max_len} exceeds the model context {config.max_seq_len}")
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, T, D) at the current slots; return all filled keys and values (B, Hkv, S, D)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache is full: {end} positions requested, {self.max_len} allocated")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (LongTensor (B',)), e.g. the surviving beams."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, h, hkv, d = config.d_model, config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(c, h * d, bias=config.attn_bias)
        self.k_proj = nn.Linear(c, hkv * d, bias=config.attn_bias)
        self.v_proj = nn.Linear(c, hkv * d, bias=config.attn_bias)
        self.o_proj = nn.Linear(h * d, c, bias=config.attn_bias)

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool, rotary: tuple[Tensor, Tensor] | None,
                cache: KVCache | None, layer: int) -> Tensor:
        B, T, _ = x.shape
        cfg = self.config
        q = self.q_proj(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, D)
        p = cfg.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal,
                                           enable_gqa=cfg.n_kv_head != cfg.n_head)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation = config.activation
        self.gated = config.gated_mlp
        if self.gated:
            self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            return self.down_proj(activation(self.activation, self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(activation(self.activation, self.up_proj(x)))


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
                cache: KVCache | None, layer: int) -> Tensor:
        if self.pre_norm:
            x = x + self.dropout(self.attn(self.attn_norm(x), mask, is_causal, rotary, cache, layer))
            return x + self.dropout(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.dropout(self.attn(x, mask, is_causal, rotary, cache, layer)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


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
