"""One hyperparameter vocabulary for every model family, and named presets.

A `ModelConfig` says everything the model code needs to build a network; file formats (Hugging Face config.json,
GGUF metadata) are translated to and from it in `lmforge.io` only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Arch = Literal["decoder", "encoder", "encoder-decoder"]
Family = Literal["gpt2", "llama", "bert", "distilbert", "roberta", "t5"]
ARCHS = ("decoder", "encoder", "encoder-decoder")


@dataclass
class ModelConfig:
    """Architecture hyperparameters shared by every family.

    `arch` picks the model class (causal decoder, bidirectional encoder, or encoder-decoder: T5); `family` only
    records the original naming so checkpoints can be written back in the layout that family uses.
    Encoder-decoder models have `n_layer` encoder layers and `n_decoder_layer` decoder layers (None: as many),
    relative position buckets instead of a position table (`max_seq_len` then only bounds generation), and
    start their decoder inputs with `decoder_start_token_id`. Their head is "lm" (the decoder and its
    vocabulary projection) or "none" (the encoder alone).
    """

    arch: Arch = "decoder"
    family: Family = "gpt2"
    vocab_size: int = 50257
    n_layer: int = 12
    n_decoder_layer: int | None = None  # encoder-decoder only; None: n_layer
    n_head: int = 12
    n_kv_head: int | None = None  # None: same as n_head (multi-head); fewer: grouped-query attention
    d_model: int = 768
    d_ff: int = 3072
    head_dim: int | None = None  # None: d_model // n_head
    max_seq_len: int = 1024
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    norm_position: Literal["pre", "post"] = "pre"  # pre: GPT/Llama; post: BERT family
    activation: Literal["gelu", "gelu_tanh", "silu", "relu"] = "gelu_tanh"
    gated_mlp: bool = False  # True: SwiGLU-style gate * up projection (Llama)
    position: Literal["learned", "rotary", "relative"] = "learned"  # relative: T5's bucketed attention bias
    relative_buckets: int = 32  # position="relative": buckets of the bias table
    relative_max_distance: int = 128  # position="relative": distances from here on share the last bucket
    attn_scale: float | None = None  # attention score scale; None: 1/sqrt(head_dim) (T5: 1.0)
    rope_theta: float = 10000.0
    position_offset: int = 0  # RoBERTa counts positions from padding_idx + 1
    type_vocab_size: int = 0  # BERT token-type (segment) embeddings; 0 means none
    attn_bias: bool = True
    mlp_bias: bool = True
    tie_embeddings: bool = True
    scaled_head: bool = False  # encoder-decoder (T5 v1.0): the decoder output times d_model^-0.5 before the head
    embed_norm: bool = False  # a norm right after the embeddings (BERT family)
    head: Literal["lm", "classify", "none"] = "lm"  # lm: next-token (decoder) or masked-token (encoder) logits
    cls_activation: Literal["tanh", "relu"] = "tanh"  # classification head: dense -> act -> out
    pooler: bool = False  # a bare BERT / RoBERTa body's pooler (dense + tanh on the first token), kept on convert
    dropout: float = 0.0
    n_labels: int = 2
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    decoder_start_token_id: int | None = None  # encoder-decoder: the decoder's first input (T5: the pad id, 0)
    extra: dict[str, Any] = field(default_factory=dict)  # format details kept for a faithful write-back

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
            self.head_dim = self.d_model // self.n_head
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.arch not in ARCHS:
            raise ValueError(f"ModelConfig.arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.n_decoder_layer is not None:
            if self.arch != "encoder-decoder":
                raise ValueError(f"ModelConfig.n_decoder_layer applies to encoder-decoder models only, this one "
                                 f"has arch={self.arch!r}")
            if not isinstance(self.n_decoder_layer, int) or self.n_decoder_layer < 1:
                raise ValueError(f"ModelConfig.n_decoder_layer must be a positive integer, got "
                                 f"{self.n_decoder_layer!r}")
        if self.position == "relative" and not (
                self.relative_buckets >= 4 and self.relative_max_distance > self.relative_buckets // 2):
            raise ValueError(f"ModelConfig.relative_buckets must be >= 4 and relative_max_distance above half of "
                             f"them, got {self.relative_buckets} and {self.relative_max_distance}")
        if (self.position == "relative") != (self.arch == "encoder-decoder"):
            raise ValueError(f"ModelConfig.position='relative' goes with arch='encoder-decoder' (T5) and only "
                             f"there; got position={self.position!r}, arch={self.arch!r}")
        if self.head not in ("lm", "classify", "none"):
            raise ValueError(f"ModelConfig.head must be 'lm', 'classify' or 'none', got {self.head!r}")

    @property
    def n_decoder_layers(self) -> int:
        """Decoder layers of an encoder-decoder model (n_decoder_layer, else n_layer)."""
        return self.n_layer if self.n_decoder_layer is None else self.n_decoder_layer

    @property
    def eos_ids(self) -> list[int]:
        """End-of-sequence ids as a list (empty when the model has none)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (head_dim and n_kv_head recomputed unless given)."""
        fields = dataclasses.asdict(self)
        if "n_head" in changes or "d_model" in changes:
            fields["head_dim"] = None
            if "n_kv_head" not in changes and self.n_kv_head == self.n_head:
                fields["n_kv_head"] = None
        fields.update(changes)
        return ModelConfig(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset, e.g. `ModelConfig.from_name("distilgpt2")`; keyword arguments override fields."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        fields = dict(PRESETS[key])
        fields.update(overrides)
        return cls(**fields)


_GPT2 = dict(arch="decoder", family="gpt2", vocab_size=50257, n_head=12, d_model=768, d_ff=3072, max_seq_len=1024,
             norm="layernorm", norm_eps=1e-5, activation="gelu_tanh", position="learned", tie_embeddings=True,
             bos_token_id=50256, eos_token_id=50256)
_LLAMA = dict(arch="decoder", family="llama", norm="rmsnorm", activation="silu", gated_mlp=True, position="rotary",
              attn_bias=False, mlp_bias=False)
_BERT = dict(arch="encoder", family="bert", vocab_size=30522, n_layer=12, n_head=12, d_model=768, d_ff=3072,
             max_seq_len=512, norm="layernorm", norm_eps=1e-12, norm_position="post", activation="gelu",
             position="learned", type_vocab_size=2, embed_norm=True, tie_embeddings=True, pad_token_id=0)

_T5 = dict(arch="encoder-decoder", family="t5", vocab_size=32128, n_layer=6, n_head=8, d_model=512, head_dim=64,
           d_ff=2048, max_seq_len=512, norm="rmsnorm", norm_eps=1e-6, activation="relu", gated_mlp=False,
           position="relative", attn_scale=1.0, attn_bias=False, mlp_bias=False, tie_embeddings=True,
           scaled_head=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_GPT2, n_layer=12),
    "distilgpt2": dict(_GPT2, n_layer=6),
    "smollm2-135m": dict(_LLAMA, vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536,
                         max_seq_len=8192, norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "bert-base-uncased": dict(_BERT),
    "bert-large-uncased": dict(_BERT, n_layer=24, n_head=16, d_model=1024, d_ff=4096),
    "distilbert-base-uncased": dict(_BERT, family="distilbert", n_layer=6, type_vocab_size=0, cls_activation="relu"),
    "roberta-base": dict(_BERT, family="roberta", vocab_size=50265, max_seq_len=514, norm_eps=1e-5, type_vocab_size=1,
                         position_offset=2, pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "all-minilm-l6-v2": dict(_BERT, n_layer=6, d_model=384, d_ff=1536),
    "t5-small": dict(_T5),  # T5 v1.0: ReLU feed-forward, head tied to the embeddings (scaled by d_model^-0.5)
    "flan-t5-small": dict(_T5, n_layer=8, n_head=6, d_ff=1024, activation="gelu_tanh", gated_mlp=True,
                          tie_embeddings=False, scaled_head=False),  # v1.1 / Flan-T5: gated GELU, untied head
    # Tiny sizes for tests: every code path of the full families at a fraction of a second per forward.
    "tiny-gpt2": dict(_GPT2, vocab_size=128, n_layer=2, n_head=4, d_model=32, d_ff=64, max_seq_len=64,
                      bos_token_id=0, eos_token_id=0),
    "tiny-llama": dict(_LLAMA, vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                       max_seq_len=64, bos_token_id=1, eos_token_id=2),
    "tiny-bert": dict(_BERT, vocab_size=128, n_layer=2, n_head=4, d_model=32, d_ff=64, max_seq_len=64),
    "tiny-distilbert": dict(_BERT, family="distilbert", vocab_size=128, n_layer=2, n_head=4, d_model=32, d_ff=64,
                            max_seq_len=64, type_vocab_size=0, cls_activation="relu"),
    "tiny-roberta": dict(_BERT, family="roberta", vocab_size=128, n_layer=2, n_head=4, d_model=32, d_ff=64,
                         max_seq_len=66, norm_eps=1e-5, type_vocab_size=1, position_offset=2, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2),
    "tiny-t5": dict(_T5, vocab_size=128, n_layer=2, n_head=4, d_model=32, head_dim=8, d_ff=64, max_seq_len=64,
                    relative_buckets=8, relative_max_distance=16),
}
