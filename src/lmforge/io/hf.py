"""Hugging Face checkpoints: config.json <-> `ModelConfig`, parameter names both ways, safetensors files.

This is the only module where Hugging Face config fields and parameter names appear. A folder holds
config.json and the weights as model.safetensors, as shards listed in model.safetensors.index.json, or as
pytorch_model.bin (read only through `torch.load(weights_only=True)`). Writing always produces safetensors,
atomically: the folder is built under a temporary name and swapped in, so a kill mid-write leaves the previous
folder intact.

Supported architectures (config.json `architectures[0]`, else `model_type`):
GPT-2 / DistilGPT2 (GPT2LMHeadModel, GPT2Model), Llama / SmolLM2 (LlamaForCausalLM, LlamaModel),
BERT / MiniLM, DistilBERT and RoBERTa (the bare model, ForMaskedLM, ForSequenceClassification),
T5 v1.0 and v1.1 / Flan-T5 (T5ForConditionalGeneration, T5EncoderModel).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.models import build_empty_model

__all__ = ["ARCHITECTURES", "CheckpointError", "config_from_hf", "config_to_hf", "parse_size",
           "read_checkpoint", "read_config", "read_tensors", "state_dict_from_hf", "state_dict_to_hf",
           "stored_dtypes", "weight_files", "write_checkpoint"]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILE_PATTERN = re.compile(
    r"^(model(-\d+-of-\d+)?\.safetensors|pytorch_model(-\d+-of-\d+)?\.bin)(\.index\.json)?$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed or does not match its config; the message names the file."""


# architecture -> (model_type, head). The bare models of the decoders keep the LM head tied to the embeddings.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "GPT2LMHeadModel": ("gpt2", "lm"),
    "GPT2Model": ("gpt2", "lm"),
    "LlamaForCausalLM": ("llama", "lm"),
    "LlamaModel": ("llama", "lm"),
    "BertModel": ("bert", "none"),
    "BertForMaskedLM": ("bert", "lm"),
    "BertForSequenceClassification": ("bert", "classify"),
    "DistilBertModel": ("distilbert", "none"),
    "DistilBertForMaskedLM": ("distilbert", "lm"),
    "DistilBertForSequenceClassification": ("distilbert", "classify"),
    "RobertaModel": ("roberta", "none"),
    "RobertaForMaskedLM": ("roberta", "lm"),
    "RobertaForSequenceClassification": ("roberta", "classify"),
    "T5ForConditionalGeneration": ("t5", "lm"),
    "T5EncoderModel": ("t5", "none"),
}
# What lmforge writes for each (family, head); GPT2Model / LlamaModel are read as their LM-head versions.
WRITE_ARCHITECTURE = {
    ("gpt2", "lm"): "GPT2LMHeadModel",
    ("llama", "lm"): "LlamaForCausalLM",
    **{(fam, head): arch for arch, (fam, head) in ARCHITECTURES.items() if fam not in ("gpt2", "llama")},
}
DEFAULT_HEAD = {"gpt2": "lm", "llama": "lm", "bert": "none", "distilbert": "none", "roberta": "none", "t5": "lm"}
# Prefix of the base model's parameters inside the *For* head models.
BASE_PREFIX = {"gpt2": "transformer.", "llama": "model.", "bert": "bert.", "distilbert": "distilbert.",
               "roberta": "roberta.", "t5": ""}

ACTIVATIONS_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                  "silu": "silu", "swish": "silu"}
ACTIVATIONS_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
DISTILBERT_NORM_EPS = 1e-12  # hard-coded in transformers' DistilBERT


# --- config.json <-> ModelConfig -------------------------------------------------------------------------

_REQUIRED = object()


class _Fields:
    """Typed access to config.json fields with errors that name the file and the field."""

    def __init__(self, raw: dict[str, Any], where: str):
        self.raw, self.where = raw, where

    def get(self, name: str, kind: type, default: Any = _REQUIRED) -> Any:
        value = self.raw.get(name, None)
        if value is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.where}: required field {name!r} is missing")
            return default
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
              else isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
        if not ok:
            raise CheckpointError(f"{self.where}: field {name!r} must be {kind.__name__}, got {value!r}")
        return float(value) if kind is float else value

    def activation(self, name: str, default: str) -> str:
        value = self.get(name, str, default)
        if value not in ACTIVATIONS_IN:
            raise CheckpointError(f"{self.where}: field {name!r} = {value!r} is not supported; "
                                  f"expected one of {sorted(ACTIVATIONS_IN)}")
        return ACTIVATIONS_IN[value]

    def token_ids(self) -> dict[str, Any]:
        out = {}
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = self.raw.get(name)
            if value is not None and not (isinstance(value, int) or (isinstance(value, list) and all(
                    isinstance(v, int) for v in value))):
                raise CheckpointError(f"{self.where}: field {name!r} must be an integer or a list of "
                                      f"integers, got {value!r}")
            out[name] = value
        return out

    def reject(self, name: str, unsupported: Any, why: str) -> None:
        if self.raw.get(name) == unsupported:
            raise CheckpointError(f"{self.where}: field {name!r} = {unsupported!r} is not supported ({why})")


def _gpt2_fields(f: _Fields) -> dict[str, Any]:
    f.reject("scale_attn_by_inverse_layer_idx", True, "lmforge scales attention by 1/sqrt(head size) only")
    f.reject("add_cross_attention", True, "lmforge decoders have no cross-attention")
    f.reject("scale_attn_weights", False, "lmforge always scales attention scores")
    d_model = f.get("n_embd", int)
    return dict(arch="decoder", vocab_size=f.get("vocab_size", int),
                max_seq_len=f.get("n_positions", int, f.raw.get("n_ctx", 1024)), d_model=d_model,
                n_layer=f.get("n_layer", int), n_head=f.get("n_head", int),
                d_ff=f.get("n_inner", int, 4 * d_model),
                activation=f.activation("activation_function", "gelu_new"),
                norm_eps=f.get("layer_norm_epsilon", float, 1e-5), norm="layernorm", norm_position="pre",
                position="learned", gated_mlp=False, attn_bias=True, mlp_bias=True,
                tie_embeddings=f.get("tie_word_embeddings", bool, True),
                dropout=f.get("resid_pdrop", float, 0.0))


def _llama_fields(f: _Fields) -> dict[str, Any]:
    rope = f.get("rope_parameters", dict, None) or f.get("rope_scaling", dict, None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{f.where}: rope type {rope_type!r} (field 'rope_parameters') is not "
                              "supported; expected 'default'")
    theta = rope.get("rope_theta", f.get("rope_theta", float, 10000.0))
    n_head = f.get("num_attention_heads", int)
    return dict(arch="decoder", vocab_size=f.get("vocab_size", int), d_model=f.get("hidden_size", int),
                d_ff=f.get("intermediate_size", int), n_layer=f.get("num_hidden_layers", int), n_head=n_head,
                n_kv_head=f.get("num_key_value_heads", int, n_head), head_dim=f.get("head_dim", int, None),
                max_seq_len=f.get("max_position_embeddings", int, 2048), norm="rmsnorm", norm_position="pre",
                norm_eps=f.get("rms_norm_eps", float, 1e-6), activation=f.activation("hidden_act", "silu"),
                gated_mlp=True, position="rotary", rope_theta=float(theta),
                attn_bias=f.get("attention_bias", bool, False), mlp_bias=f.get("mlp_bias", bool, False),
                tie_embeddings=f.get("tie_word_embeddings", bool, False),
                dropout=f.get("attention_dropout", float, 0.0))


def _bert_fields(f: _Fields) -> dict[str, Any]:
    position_type = f.get("position_embedding_type", str, "absolute")
    if position_type != "absolute":
        raise CheckpointError(f"{f.where}: field 'position_embedding_type' = {position_type!r} is not "
                              "supported; expected 'absolute'")
    f.reject("is_decoder", True, "lmforge encoders are bidirectional")
    f.reject("add_cross_attention", True, "lmforge encoders have no cross-attention")
    return dict(arch="encoder", vocab_size=f.get("vocab_size", int), d_model=f.get("hidden_size", int),
                n_layer=f.get("num_hidden_layers", int), n_head=f.get("num_attention_heads", int),
                d_ff=f.get("intermediate_size", int), activation=f.activation("hidden_act", "gelu"),
                max_seq_len=f.get("max_position_embeddings", int, 512),
                type_vocab_size=f.get("type_vocab_size", int, 2),
                norm_eps=f.get("layer_norm_eps", float, 1e-12),
                tie_embeddings=f.get("tie_word_embeddings", bool, True), cls_activation="tanh",
                dropout=f.get("hidden_dropout_prob", float, 0.0))


def _roberta_fields(f: _Fields) -> dict[str, Any]:
    fields = _bert_fields(f)
    pad = f.get("pad_token_id", int, 1)
    fields.update(pad_token_id=pad, position_offset=pad + 1)  # positions count from padding_idx + 1
    return fields


def _distilbert_fields(f: _Fields) -> dict[str, Any]:
    return dict(arch="encoder", vocab_size=f.get("vocab_size", int), d_model=f.get("dim", int),
                n_layer=f.get("n_layers", int), n_head=f.get("n_heads", int), d_ff=f.get("hidden_dim", int),
                activation=f.activation("activation", "gelu"),
                max_seq_len=f.get("max_position_embeddings", int, 512), type_vocab_size=0,
                norm_eps=DISTILBERT_NORM_EPS, tie_embeddings=f.get("tie_word_embeddings", bool, True),
                cls_activation="relu", dropout=f.get("dropout", float, 0.0))


def _t5_fields(f: _Fields) -> dict[str, Any]:
    proj = f.get("feed_forward_proj", str, "relu")
    parts = proj.split("-")
    gated = parts[0] == "gated"
    if len(parts) > 2 or (len(parts) == 2 and not gated) or parts[-1] not in ACTIVATIONS_IN:
        raise CheckpointError(f"{f.where}: field 'feed_forward_proj' = {proj!r} is not supported; expected "
                              f"ACT or gated-ACT with ACT one of {sorted(ACTIVATIONS_IN)}")
    activation = "gelu_tanh" if proj == "gated-gelu" else ACTIVATIONS_IN[parts[-1]]  # transformers: gelu_new
    f.reject("is_decoder", True, "a T5 checkpoint is an encoder-decoder model")
    # transformers >= 5 ties the embeddings of every T5 and says with scale_decoder_outputs whether the head
    # input is rescaled; before, tie_word_embeddings=False (v1.1) meant both untied and unscaled.
    tied = f.get("tie_word_embeddings", bool, True)
    n_layer = f.get("num_layers", int)
    return dict(arch="encoder-decoder", vocab_size=f.get("vocab_size", int), d_model=f.get("d_model", int),
                head_dim=f.get("d_kv", int), d_ff=f.get("d_ff", int), n_layer=n_layer,
                n_decoder_layer=f.get("num_decoder_layers", int, n_layer), n_head=f.get("num_heads", int),
                relative_buckets=f.get("relative_attention_num_buckets", int, 32),
                relative_max_distance=f.get("relative_attention_max_distance", int, 128),
                max_seq_len=f.get("n_positions", int, 512), norm="rmsnorm", norm_position="pre",
                norm_eps=f.get("layer_norm_epsilon", float, 1e-6), activation=activation, gated_mlp=gated,
                position="relative", attn_scale=1.0, attn_bias=False, mlp_bias=False, tie_embeddings=tied,
                scaled_head=f.get("scale_decoder_outputs", bool, tied), dropout=f.get("dropout_rate", float, 0.0),
                decoder_start_token_id=f.get("decoder_start_token_id", int, f.raw.get("pad_token_id") or 0))


_FAMILY_FIELDS = {"gpt2": _gpt2_fields, "llama": _llama_fields, "bert": _bert_fields,
                  "roberta": _roberta_fields, "distilbert": _distilbert_fields, "t5": _t5_fields}
_ENCODER_COMMON = dict(norm="layernorm", norm_position="post", position="learned", embed_norm=True,
                       gated_mlp=False, attn_bias=True, mlp_bias=True)


def config_from_hf(raw: Any, where: str = CONFIG_FILE) -> ModelConfig:
    """Translate a parsed config.json into a `ModelConfig`.

    `architectures[0]` (else `model_type`) picks the family and the head ("lm", "classify" or "none");
    id2label/label2id/problem_type are kept in `config.extra` so they are written back.
    Raises CheckpointError naming `where` and the field for unknown architectures or bad values.
    """
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    f = _Fields(raw, where)
    architectures = f.get("architectures", list, [])
    model_type = f.get("model_type", str, None)
    if architectures:
        name = architectures[0]
        if name not in ARCHITECTURES:
            raise CheckpointError(f"{where}: unsupported architecture {name!r} (field 'architectures'); "
                                  f"supported: {', '.join(ARCHITECTURES)}")
        family, head = ARCHITECTURES[name]
        if model_type is not None and model_type != family:
            raise CheckpointError(f"{where}: model_type {model_type!r} does not match architecture {name!r}")
    elif model_type in DEFAULT_HEAD:
        family, head = model_type, DEFAULT_HEAD[model_type]
    else:
        raise CheckpointError(f"{where}: unknown model_type {model_type!r} and no 'architectures'; "
                              f"supported model types: {', '.join(DEFAULT_HEAD)}")
    fields = {**f.token_ids(), **_FAMILY_FIELDS[family](f), "family": family, "head": head}
    if fields["arch"] == "encoder":
        fields = {**_ENCODER_COMMON, **fields}
    extra = {}
    id2label = f.get("id2label", dict, None)
    if id2label is not None:
        if not all(isinstance(k, str) and k.lstrip("-").isdigit() for k in id2label):
            raise CheckpointError(f"{where}: field 'id2label' must map label numbers to names, "
                                  f"got {id2label!r}")
        extra["id2label"] = {int(k): v for k, v in id2label.items()}
        extra["label2id"] = f.get("label2id", dict, {v: int(k) for k, v in id2label.items()})
    if f.get("problem_type", str, None) is not None:
        extra["problem_type"] = raw["problem_type"]
    n_labels = f.get("num_labels", int, len(id2label) if id2label else 2)
    try:
        return ModelConfig(**fields, n_labels=n_labels, extra=extra)
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from None


def _require(config: ModelConfig, checks: dict[str, Any]) -> None:
    for name, want in checks.items():
        have = getattr(config, name)
        if have != want:
            raise ValueError(f"cannot write a Hugging Face {config.family} checkpoint: ModelConfig.{name} is "
                             f"{have!r}, this family needs {want!r}")


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The config.json for `config` in the layout of its family (`config.family`).

    Raises ValueError when the config uses something the family's transformers class cannot express.
    """
    family = config.family
    if family not in _FAMILY_FIELDS:
        raise ValueError(f"cannot write family {family!r}; expected one of {', '.join(_FAMILY_FIELDS)}")
    if (family, config.head) not in WRITE_ARCHITECTURE:
        raise ValueError(f"a {family} model has no head {config.head!r} in transformers")
    if config.activation not in ACTIVATIONS_OUT:
        raise ValueError(f"activation {config.activation!r} has no transformers name")
    common_dense = dict(gated_mlp=False, attn_bias=True, mlp_bias=True, n_kv_head=config.n_head,
                        head_dim=config.d_model // config.n_head, norm="layernorm", position="learned")
    if family != "t5":
        _require(config, dict(attn_scale=None, scaled_head=False))
    out: dict[str, Any] = {"architectures": [WRITE_ARCHITECTURE[family, config.head]], "model_type": family}
    act = ACTIVATIONS_OUT[config.activation]
    if family == "gpt2":
        _require(config, dict(arch="decoder", norm_position="pre", embed_norm=False, type_vocab_size=0,
                              **common_dense))
        out.update(vocab_size=config.vocab_size, n_positions=config.max_seq_len, n_embd=config.d_model,
                   n_layer=config.n_layer, n_head=config.n_head, n_inner=config.d_ff, activation_function=act,
                   layer_norm_epsilon=config.norm_eps, resid_pdrop=config.dropout, embd_pdrop=config.dropout,
                   attn_pdrop=config.dropout)
    elif family == "t5":
        _require(config, dict(arch="encoder-decoder", norm="rmsnorm", norm_position="pre", position="relative",
                              attn_scale=1.0, attn_bias=False, mlp_bias=False, n_kv_head=config.n_head,
                              embed_norm=False, type_vocab_size=0))
        if config.gated_mlp:
            proj = "gated-gelu" if config.activation == "gelu_tanh" else f"gated-{act}"
        else:
            proj = act
        # Read the same by transformers 4 (tie_word_embeddings: tied and scaled, or neither) and 5 (always
        # tied unless the file holds a different lm_head.weight, which `_t5_entries` writes when unscaled).
        out.update(vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.head_dim, d_ff=config.d_ff,
                   num_layers=config.n_layer, num_decoder_layers=config.n_decoder_layers,
                   num_heads=config.n_head, relative_attention_num_buckets=config.relative_buckets,
                   relative_attention_max_distance=config.relative_max_distance, n_positions=config.max_seq_len,
                   layer_norm_epsilon=config.norm_eps, feed_forward_proj=proj, dropout_rate=config.dropout,
                   is_encoder_decoder=True, decoder_start_token_id=config.decoder_start_token_id,
                   scale_decoder_outputs=config.scaled_head)
    elif family == "llama":
        _require(config, dict(arch="decoder", norm="rmsnorm", norm_position="pre", position="rotary",
                              gated_mlp=True, embed_norm=False, type_vocab_size=0))
        out.update(vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
                   num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                   num_key_value_heads=config.n_kv_head, head_dim=config.head_dim, hidden_act=act,
                   max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
                   rope_theta=config.rope_theta,
                   rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                   attention_bias=config.attn_bias, mlp_bias=config.mlp_bias,
                   attention_dropout=config.dropout)
    else:
        encoder = dict(arch="encoder", norm_position="post", embed_norm=True, **common_dense)
        if family == "distilbert":
            _require(config, dict(encoder, type_vocab_size=0, position_offset=0, cls_activation="relu",
                                  norm_eps=DISTILBERT_NORM_EPS))
            out.update(vocab_size=config.vocab_size, dim=config.d_model, n_layers=config.n_layer,
                       n_heads=config.n_head, hidden_dim=config.d_ff, activation=act,
                       max_position_embeddings=config.max_seq_len, sinusoidal_pos_embds=False,
                       dropout=config.dropout, attention_dropout=config.dropout)
        else:
            pad = config.pad_token_id if config.pad_token_id is not None else -2
            offset = 0 if family == "bert" else pad + 1
            _require(config, dict(encoder, position_offset=offset, cls_activation="tanh"))
            if config.type_vocab_size < 1:
                raise ValueError(f"cannot write a Hugging Face {family} checkpoint without token-type "
                                 "embeddings (ModelConfig.type_vocab_size must be at least 1)")
            out.update(vocab_size=config.vocab_size, hidden_size=config.d_model,
                       num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                       intermediate_size=config.d_ff, hidden_act=act,
                       max_position_embeddings=config.max_seq_len, type_vocab_size=config.type_vocab_size,
                       layer_norm_eps=config.norm_eps, position_embedding_type="absolute",
                       hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout)
    out.update(tie_word_embeddings=config.scaled_head if family == "t5" else config.tie_embeddings,
               pad_token_id=config.pad_token_id,
               bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
    if config.head == "classify":
        id2label = config.extra.get("id2label")
        if not id2label or len(id2label) != config.n_labels:
            id2label = {i: f"LABEL_{i}" for i in range(config.n_labels)}
        out["id2label"] = {str(k): v for k, v in id2label.items()}
        label2id = config.extra.get("label2id")
        out["label2id"] = label2id if label2id and len(label2id) == config.n_labels else {
            v: int(k) for k, v in id2label.items()}
        if "problem_type" in config.extra:
            out["problem_type"] = config.extra["problem_type"]
    return out


# --- parameter names -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One lmforge tensor and the Hugging Face tensors it holds (concatenated along dim 0, in order): q, k and v
    are one lmforge parameter (`attn.qkv`), and so are a gated MLP's gate and up (`mlp.up`)."""

    hf: tuple[str, ...]  # names without the base-model prefix when `base`
    lm: str
    transpose: bool = False  # GPT-2's Conv1D stores weights as (in, out)
    base: bool = True  # inside the base model (prefixed in the *For* head models) or a top-level head tensor


def _linear(hf: str | tuple[str, ...], lm: str, bias: bool = True, base: bool = True,
            transpose: bool = False) -> list[_Entry]:
    """The weight (+ bias) entries of one lmforge linear from one or several (fused) HF linears."""
    parts = (hf,) if isinstance(hf, str) else hf
    entries = [_Entry(tuple(f"{p}.weight" for p in parts), f"{lm}.weight", transpose, base)]
    if bias:
        entries.append(_Entry(tuple(f"{p}.bias" for p in parts), f"{lm}.bias", False, base))
    return entries


_norm = _linear  # norms have the same weight (+ bias) pair


def _gpt2_entries(c: ModelConfig) -> list[_Entry]:
    e = _linear("wte", "embed_tokens", bias=False) + _linear("wpe", "embed_positions", bias=False)
    for i in range(c.n_layer):
        h, l = f"h.{i}.", f"layers.{i}."
        e += _norm(h + "ln_1", l + "attn_norm")
        e += _linear(h + "attn.c_attn", l + "attn.qkv", transpose=True)
        e += _linear(h + "attn.c_proj", l + "attn.out", transpose=True)
        e += _norm(h + "ln_2", l + "mlp_norm")
        e += _linear(h + "mlp.c_fc", l + "mlp.up", transpose=True)
        e += _linear(h + "mlp.c_proj", l + "mlp.down", transpose=True)
    e += _norm("ln_f", "norm")
    if not c.tie_embeddings:
        e += _linear("lm_head", "lm_head", bias=False, base=False)
    return e


def _llama_entries(c: ModelConfig) -> list[_Entry]:
    e = _linear("embed_tokens", "embed_tokens", bias=False)
    for i in range(c.n_layer):
        h, l = f"layers.{i}.", f"layers.{i}."
        e += _linear(tuple(f"{h}self_attn.{p}_proj" for p in "qkv"), l + "attn.qkv", bias=c.attn_bias)
        e += _linear(h + "self_attn.o_proj", l + "attn.out", bias=c.attn_bias)
        e += _norm(h + "input_layernorm", l + "attn_norm", bias=False)
        e += _norm(h + "post_attention_layernorm", l + "mlp_norm", bias=False)
        e += _linear((h + "mlp.gate_proj", h + "mlp.up_proj"), l + "mlp.up", bias=c.mlp_bias)
        e += _linear(h + "mlp.down_proj", l + "mlp.down", bias=c.mlp_bias)
    e += _norm("norm", "norm", bias=False)
    if not c.tie_embeddings:
        e += _linear("lm_head", "lm_head", bias=False, base=False)
    return e


def _bert_body(c: ModelConfig) -> list[_Entry]:
    e = _linear("embeddings.word_embeddings", "embed_tokens", bias=False)
    e += _linear("embeddings.position_embeddings", "embed_positions", bias=False)
    e += _linear("embeddings.token_type_embeddings", "embed_types", bias=False)
    e += _norm("embeddings.LayerNorm", "embed_norm")
    for i in range(c.n_layer):
        h, l = f"encoder.layer.{i}.", f"layers.{i}."
        e += _linear(tuple(f"{h}attention.self.{p}" for p in ("query", "key", "value")), l + "attn.qkv")
        e += _linear(h + "attention.output.dense", l + "attn.out")
        e += _norm(h + "attention.output.LayerNorm", l + "attn_norm")
        e += _linear(h + "intermediate.dense", l + "mlp.up")
        e += _linear(h + "output.dense", l + "mlp.down")
        e += _norm(h + "output.LayerNorm", l + "mlp_norm")
    return e


def _bert_entries(c: ModelConfig) -> list[_Entry]:
    e = _bert_body(c)
    if c.head == "lm":
        e += _linear("cls.predictions.transform.dense", "mlm_head.dense", base=False)
        e += _norm("cls.predictions.transform.LayerNorm", "mlm_head.norm", base=False)
        if not c.tie_embeddings:
            e += _linear("cls.predictions.decoder", "mlm_head.decoder", bias=False, base=False)
        e.append(_Entry(("cls.predictions.bias",), "mlm_head.decoder.bias", base=False))
    elif c.head == "classify":
        e += _linear("pooler.dense", "cls_head.dense")
        e += _linear("classifier", "cls_head.out", base=False)
    elif c.pooler:
        e += _linear("pooler.dense", "pooler")
    return e


def _roberta_entries(c: ModelConfig) -> list[_Entry]:
    e = _bert_body(c)
    if c.head == "lm":
        e += _linear("lm_head.dense", "mlm_head.dense", base=False)
        e += _norm("lm_head.layer_norm", "mlm_head.norm", base=False)
        if not c.tie_embeddings:
            e += _linear("lm_head.decoder", "mlm_head.decoder", bias=False, base=False)
        e.append(_Entry(("lm_head.bias",), "mlm_head.decoder.bias", base=False))
    elif c.head == "classify":
        e += _linear("classifier.dense", "cls_head.dense", base=False)
        e += _linear("classifier.out_proj", "cls_head.out", base=False)
    elif c.pooler:
        e += _linear("pooler.dense", "pooler")
    return e


def _distilbert_entries(c: ModelConfig) -> list[_Entry]:
    e = _linear("embeddings.word_embeddings", "embed_tokens", bias=False)
    e += _linear("embeddings.position_embeddings", "embed_positions", bias=False)
    e += _norm("embeddings.LayerNorm", "embed_norm")
    for i in range(c.n_layer):
        h, l = f"transformer.layer.{i}.", f"layers.{i}."
        e += _linear(tuple(f"{h}attention.{p}_lin" for p in "qkv"), l + "attn.qkv")
        e += _linear(h + "attention.out_lin", l + "attn.out")
        e += _norm(h + "sa_layer_norm", l + "attn_norm")
        e += _linear(h + "ffn.lin1", l + "mlp.up")
        e += _linear(h + "ffn.lin2", l + "mlp.down")
        e += _norm(h + "output_layer_norm", l + "mlp_norm")
    if c.head == "lm":
        e += _linear("vocab_transform", "mlm_head.dense", base=False)
        e += _norm("vocab_layer_norm", "mlm_head.norm", base=False)
        if not c.tie_embeddings:
            e += _linear("vocab_projector", "mlm_head.decoder", bias=False, base=False)
        e.append(_Entry(("vocab_projector.bias",), "mlm_head.decoder.bias", base=False))
    elif c.head == "classify":
        e += _linear("pre_classifier", "cls_head.dense", base=False)
        e += _linear("classifier", "cls_head.out", base=False)
    return e


def _t5_entries(c: ModelConfig) -> list[_Entry]:
    e = _linear("shared", "embed_tokens", bias=False)
    stacks = [("encoder", c.n_layer)] + ([("decoder", c.n_decoder_layers)] if c.head == "lm" else [])
    for stack, n_layer in stacks:
        e += _linear(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias", f"{stack}.relative_bias",
                     bias=False)
        for i in range(n_layer):
            h, l = f"{stack}.block.{i}.layer.", f"{stack}.layers.{i}."
            e += _linear(tuple(f"{h}0.SelfAttention.{p}" for p in "qkv"), l + "attn.qkv", bias=False)
            e += _linear(h + "0.SelfAttention.o", l + "attn.out", bias=False)
            e += _norm(h + "0.layer_norm", l + "attn_norm", bias=False)
            if stack == "decoder":
                e += _linear(h + "1.EncDecAttention.q", l + "cross.q", bias=False)
                e += _linear((h + "1.EncDecAttention.k", h + "1.EncDecAttention.v"), l + "cross.kv", bias=False)
                e += _linear(h + "1.EncDecAttention.o", l + "cross.out", bias=False)
                e += _norm(h + "1.layer_norm", l + "cross_norm", bias=False)
            ff = f"{h}{2 if stack == 'decoder' else 1}."
            wi = (ff + "DenseReluDense.wi_0", ff + "DenseReluDense.wi_1") if c.gated_mlp else ff + "DenseReluDense.wi"
            e += _linear(wi, l + "mlp.up", bias=False)
            e += _linear(ff + "DenseReluDense.wo", l + "mlp.down", bias=False)
            e += _norm(ff + "layer_norm", l + "mlp_norm", bias=False)
        e += _norm(f"{stack}.final_layer_norm", f"{stack}.norm", bias=False)
    if c.head == "lm" and not (c.tie_embeddings and c.scaled_head):  # see config_to_hf
        e += _linear("lm_head", "lm_head", bias=False, base=False)
    return e


_FAMILY_ENTRIES = {"gpt2": _gpt2_entries, "llama": _llama_entries, "bert": _bert_entries,
                   "roberta": _roberta_entries, "distilbert": _distilbert_entries, "t5": _t5_entries}

# Tensors that may be present and carry nothing lmforge needs: buffers, and duplicates of tied/shared weights.
_HARMLESS = {
    "gpt2": [r"(.*\.)?h\.\d+\.attn\.(bias|masked_bias)"],
    "llama": [r".*rotary_emb\.inv_freq"],
    "bert": [r"(.*\.)?embeddings\.(position_ids|token_type_ids)", r"cls\.predictions\.decoder\.bias"],
    "roberta": [r"(.*\.)?embeddings\.(position_ids|token_type_ids)", r"lm_head\.decoder\.bias"],
    "distilbert": [r"(.*\.)?embeddings\.position_ids"],
    "t5": [r"(encoder|decoder)\.embed_tokens\.weight",  # copies of shared.weight
           r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"],  # never used
}
# Head tensors, ignored when the caller asked for another head than the checkpoint's.
_HEAD_TENSORS = {
    "gpt2": [], "llama": [],
    "bert": [r"(bert\.)?pooler\..*", r"cls\..*", r"classifier\..*"],
    "roberta": [r"(roberta\.)?pooler\..*", r"lm_head\..*", r"classifier\..*"],
    "distilbert": [r"vocab_(transform|layer_norm|projector)\..*", r"pre_classifier\..*", r"classifier\..*"],
    "t5": [r"decoder\..*", r"lm_head\..*"],
}
# Tied output weights: transformers may store a copy.
_TIED_COPIES = {"gpt2": "lm_head.weight", "llama": "lm_head.weight", "bert": "cls.predictions.decoder.weight",
                "roberta": "lm_head.decoder.weight", "distilbert": "vocab_projector.weight", "t5": "lm_head.weight"}


def _entries(config: ModelConfig) -> list[_Entry]:
    if config.family not in _FAMILY_ENTRIES:
        raise ValueError(f"unknown family {config.family!r}; expected one of {', '.join(_FAMILY_ENTRIES)}")
    entries = _FAMILY_ENTRIES[config.family](config)
    if config.arch == "encoder" and not config.type_vocab_size:
        entries = [e for e in entries if not e.lm.startswith("embed_types.")]
    return entries


def _uses_prefix(config: ModelConfig) -> bool:
    """Whether the written architecture nests the base model under a prefix (all *For* head models do)."""
    bare = ("BertModel", "DistilBertModel", "RobertaModel")
    return WRITE_ARCHITECTURE[config.family, config.head] not in bare


def part_rows(config: ModelConfig, n_parts: int, rows: int) -> list[int]:
    """Rows of each stacked part of an lmforge tensor of `rows` rows: q/k/v (3 parts), gate/up or a
    cross-attention's k/v (2 equal parts), or 1."""
    if n_parts == 3:
        return [config.n_head * config.head_dim] + [config.n_kv_head * config.head_dim] * 2
    if n_parts == 2:
        return [rows // 2, rows // 2]
    return [rows]


def state_dict_from_hf(config: ModelConfig, tensors: Mapping[str, Tensor], expected: Mapping[str, torch.Size],
                       where: str = "checkpoint", fresh: tuple[str, ...] = (),
                       other_heads_ok: bool = False) -> dict[str, Tensor]:
    """Rename (and join/transpose) Hugging Face tensors into lmforge parameters.

    expected: lmforge name -> shape, for every parameter of the model `config` builds.
    fresh: lmforge name prefixes that may be missing (a new head the caller will initialise).
    other_heads_ok: ignore head tensors the model does not build (the caller changed the head).
    Raises CheckpointError for missing tensors, unexpected tensors and shape mismatches, naming the tensor.
    """
    prefix = BASE_PREFIX[config.family]
    if not any(name.startswith(prefix) for name in tensors):
        prefix = ""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for entry in _entries(config):
        replaceable = bool(fresh) and entry.lm.startswith(fresh)
        names = [(prefix if entry.base else "") + hf for hf in entry.hf]
        absent = [name for name in names if name not in tensors]
        if absent:
            if not replaceable and not (config.tie_embeddings and entry.lm == "lm_head.weight"):  # tied: optional
                missing.extend(absent)
            continue
        lm_shape = tuple(expected[entry.lm])
        parts = []
        for name, rows in zip(names, part_rows(config, len(names), lm_shape[0]), strict=True):
            tensor = tensors[name]
            want = (rows, *lm_shape[1:])
            if entry.transpose:
                want = want[::-1]
            if tuple(tensor.shape) != want:
                if replaceable:
                    break  # a head being replaced (e.g. another number of labels): not loaded
                raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                                      f"{want} from config.json")
            parts.append(tensor.t() if entry.transpose else tensor)
        used.update(names)
        if len(parts) == len(names):
            out[entry.lm] = parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=0)
    if missing:
        raise CheckpointError(f"{where}: missing tensors {_names(missing)} (needed by a {config.family} "
                              f"model with head {config.head!r})")
    ignorable = list(_HARMLESS[config.family])
    if config.tie_embeddings:
        copy = _TIED_COPIES[config.family]
        ignorable.append(re.escape(prefix + copy) + "|" + re.escape(copy))
    if other_heads_ok or config.head != "classify":
        ignorable.append(r"(bert\.|roberta\.)?pooler\..*")
    if other_heads_ok:
        ignorable.extend(_HEAD_TENSORS[config.family])
    pattern = re.compile("|".join(f"(?:{p})" for p in ignorable)) if ignorable else None
    unexpected = [n for n in tensors if n not in used and not (pattern and pattern.fullmatch(n))]
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensors {_names(unexpected)} for a {config.family} model "
                              f"with head {config.head!r}; the weights do not match config.json")
    return out


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def state_dict_to_hf(config: ModelConfig, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """lmforge parameters -> Hugging Face tensor names of `WRITE_ARCHITECTURE[family, head]`, contiguous.

    Raises ValueError when `state` lacks a parameter or has one the family cannot store.
    """
    prefix = BASE_PREFIX[config.family] if _uses_prefix(config) else ""
    out: dict[str, Tensor] = {}
    consumed: set[str] = set()
    for entry in _entries(config):
        if entry.lm not in state:
            raise ValueError(f"model state has no {entry.lm!r}, needed for {entry.hf[0]!r}")
        tensor = state[entry.lm].detach()
        for hf, part in zip(entry.hf, tensor.split(part_rows(config, len(entry.hf), tensor.shape[0])), strict=True):
            out[(prefix if entry.base else "") + hf] = (part.t() if entry.transpose else part).contiguous()
        consumed.add(entry.lm)
    tied = {"lm_head.weight", "mlm_head.decoder.weight"} if config.tie_embeddings else set()
    left = sorted(set(state) - consumed - tied)
    if left:
        raise ValueError(f"cannot write {left[:5]} in a Hugging Face {config.family} checkpoint")
    return out


# --- files ---------------------------------------------------------------------------------------------


def read_config(folder: Path) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face folder or of a training checkpoint's run (see `training_run`);
    CheckpointError for a missing or malformed config.json."""
    folder = training_run(folder) or Path(folder)
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}; expected a Hugging Face model folder "
                              f"({CONFIG_FILE} + {SAFETENSORS_FILE}) or a training checkpoint of a run "
                              f"folder with {CONFIG_FILE}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: malformed JSON ({err})") from None
    return config_from_hf(raw, str(path))


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder, in the order read_tensors reads them (index first when sharded).

    Raises CheckpointError when there are none or an index lists a missing shard.
    """
    folder = Path(folder)
    for single, index in ((SAFETENSORS_FILE, SAFETENSORS_INDEX), (BIN_FILE, BIN_INDEX)):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            shards = sorted(set(_read_index(folder / index).values()))
            paths = [folder / s for s in shards]
            for p in paths:
                if not p.is_file():
                    raise CheckpointError(f"{folder / index}: lists shard {p.name!r}, which does not exist")
            return [folder / index, *paths]
    raise CheckpointError(f"{folder}: no weights; expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or "
                          f"{BIN_FILE}")


def _read_index(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: malformed JSON ({err})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: field 'weight_map' must map tensor names to shard file names")
    return weight_map


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a valid safetensors file, it may be truncated or corrupt "
                              f"({err})") from None


def _read_bin(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch.load raises many unrelated types for a bad file)
        raise CheckpointError(f"{path}: cannot be read as a weights-only PyTorch checkpoint "
                              f"({err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return state


def read_tensors(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a folder's weights under its Hugging Face name (on the CPU, in the stored dtype).

    Raises CheckpointError for missing, truncated or corrupt files and for shards that disagree with their
    index.
    """
    files = weight_files(folder)
    read = _read_safetensors if files[-1].suffix == ".safetensors" else _read_bin
    if len(files) == 1:
        return read(files[0])
    weight_map = _read_index(files[0])
    tensors: dict[str, Tensor] = {}
    for shard in files[1:]:
        part = read(shard)
        listed = {name for name, file in weight_map.items() if file == shard.name}
        absent = sorted(listed - set(part))
        if absent:
            raise CheckpointError(f"{shard}: lacks tensor {absent[0]!r} listed for it in {files[0].name}")
        tensors.update({name: part[name] for name in listed})
    return tensors


def stored_dtypes(folder: Path) -> Counter[str]:
    """How many tensors of each stored dtype a folder's weights hold, e.g. {"F32": 103, "I64": 1}.

    Read from the safetensors headers (no tensor data); a pytorch_model.bin is loaded to look.
    """
    files = weight_files(folder)
    if files[-1].suffix != ".safetensors":
        return Counter(str(t.dtype).removeprefix("torch.") for t in read_tensors(folder).values())
    counts: Counter[str] = Counter()
    for path in files[1:] if len(files) > 1 else files:
        try:
            with safe_open(path, framework="pt") as f:
                counts.update(f.get_slice(name).get_dtype() for name in f.keys())  # noqa: SIM118
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{path}: not a valid safetensors file, it may be truncated or corrupt "
                                  f"({err})") from None
    return counts


TRAINING_WEIGHTS = "model.pt"  # a training checkpoint: RUN/checkpoints/step_N/{model.pt, trainer.pt}
SHARDED_WEIGHTS = ".metadata"  # a model-parallel run's: torch.distributed.checkpoint files + trainer.pt


def training_run(folder: Path) -> Path | None:
    """The run folder of a training checkpoint folder (RUN/checkpoints/step_N with model.pt and trainer.pt,
    the run's config.json and tokenizer in RUN, as lmforge's training commands write them), else None."""
    folder = Path(folder)
    weights = (folder / TRAINING_WEIGHTS).is_file() or (folder / SHARDED_WEIGHTS).is_file()
    if weights and (folder / "trainer.pt").is_file() and not (folder / CONFIG_FILE).is_file():
        return folder.parent.parent
    return None


def read_checkpoint(folder: Path, *, head: str | None = None,
                    n_labels: int | None = None) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Config and lmforge-named tensors of a Hugging Face folder (`lmforge.io.load_model` builds the model).

    head / n_labels replace the checkpoint's head (encoders only: "lm", "classify" or "none"). The parameters
    of a new head (all of it, or only the output layer when just the number of labels changes) are then absent
    from the returned dict, for the caller to initialise; a BERT pooler still initialises a new classifier's
    dense layer, as in transformers. Raises CheckpointError naming the file and tensor for any mismatch.
    """
    folder = Path(folder)
    run = training_run(folder)
    config = read_config(folder if run is None else run)
    stored = config
    new_head = config.head if head is None else head
    if new_head not in ("lm", "classify", "none"):
        raise ValueError(f"head must be 'lm', 'classify' or 'none', got {head!r}")
    if config.arch == "decoder" and new_head != "lm":
        raise ValueError(f"{folder}: a decoder ({config.family}) only has an 'lm' head, got head={head!r}")
    if config.arch == "encoder-decoder" and new_head not in (config.head, "none"):
        raise ValueError(f"{folder}: a {config.family} checkpoint with head {config.head!r} reads as that head or "
                         f"as 'none' (the encoder alone), got head={head!r}")
    if config.arch == "encoder-decoder" and n_labels is not None:
        raise ValueError(f"{folder}: n_labels applies to classification heads; a {config.family} model has none")
    if n_labels is not None and (not isinstance(n_labels, int) or n_labels < 1):
        raise ValueError(f"n_labels must be a positive integer, got {n_labels!r}")
    fresh: tuple[str, ...] = ()
    if new_head != config.head:
        fresh = ("mlm_head.", "cls_head.")
    elif n_labels is not None and n_labels != config.n_labels:
        fresh = ("cls_head.out.",)
    if new_head != config.head or n_labels is not None:
        config = config.replace(head=new_head, n_labels=config.n_labels if n_labels is None else n_labels)
    if run is None:
        tensors, where = read_tensors(folder), str(weight_files(folder)[0])
    elif (folder / SHARDED_WEIGHTS).is_file():  # a model-parallel run's sharded checkpoint, gathered here
        from lmforge.models import build_model
        from lmforge.parallel.sharded_checkpoint import load_model_weights

        where = str(folder)
        tensors = state_dict_to_hf(stored, load_model_weights(folder, build_model(stored)).state_dict())
    else:  # lmforge names, saved by the training loop: through the HF names, so that heads can be swapped
        where = str(folder / TRAINING_WEIGHTS)
        tensors = state_dict_to_hf(stored, torch.load(where, map_location="cpu", weights_only=True))
    if config.family == "t5" and config.head == "lm":
        config = _t5_tying(config, tensors)
    pooled = re.compile(r"((bert|roberta)\.)?pooler\.dense\.weight")
    if config.family in ("bert", "roberta") and new_head == "none" and any(pooled.fullmatch(n) for n in tensors):
        config = config.replace(pooler=True)  # a bare body keeps its pooler, so that convert loses nothing
    expected = {name: t.shape for name, t in build_empty_model(config).state_dict().items()}
    return config, state_dict_from_hf(config, tensors, expected, where, fresh, other_heads_ok=bool(fresh))


def _t5_tying(config: ModelConfig, tensors: Mapping[str, Tensor]) -> ModelConfig:
    """T5's head is the shared embedding unless the file holds a different lm_head.weight (transformers 5 reads
    it so; its own v1.1 folders store no lm_head and say scale_decoder_outputs=False instead)."""
    head, shared = tensors.get("lm_head.weight"), tensors.get("shared.weight")
    tied = head is None or (shared is not None and head.shape == shared.shape and torch.equal(head, shared))
    return config if tied == config.tie_embeddings else config.replace(tie_embeddings=tied)


# sentence-transformers module files beside the weights: which modules, their pooling, Dense and Normalize.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def copy_sentence_transformers_files(src: Path, dst: Path) -> list[Path]:
    """Copy a sentence-transformers folder's module files (modules.json, its configs and every module
    folder it lists, e.g. 1_Pooling/, 2_Dense/) from `src` to `dst`; returns the copied top-level paths."""
    src, dst = Path(src), Path(dst)
    if not (src / "modules.json").is_file():
        return []
    try:
        modules = json.loads((src / "modules.json").read_text(encoding="utf-8"))
        folders = sorted({m["path"] for m in modules if m.get("path")})
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as err:
        raise CheckpointError(f"{src / 'modules.json'}: malformed sentence-transformers module list "
                              f"({err})") from None
    copied = []
    for name in [*SENTENCE_TRANSFORMERS_FILES, *folders]:
        path = src / name
        if path.is_dir():
            shutil.copytree(path, dst / name, dirs_exist_ok=True)
        elif path.is_file():
            shutil.copy2(path, dst / name)
        else:
            continue
        copied.append(dst / name)
    return copied


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "500MB", "2GB" or "1GiB". Raises ValueError otherwise."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not match or isinstance(size, bool):
        raise ValueError(f"max_shard_size must be a positive number of bytes or a size like '2GB', "
                         f"got {size!r}")
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    value = int(float(match.group(1)) * units.get((match.group(2) or "").lower(), 1))
    if value < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _shards(tensors: Mapping[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    """Split tensors (in name order) into groups of at most max_bytes (a bigger tensor gets its own group)."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    return shards


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_config(config: ModelConfig, folder: Path) -> Path:
    """Write config.json alone (a training run's, so that its checkpoints load before the run ends)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / CONFIG_FILE
    tmp = path.with_name(f".{CONFIG_FILE}.tmp-{os.getpid()}")
    _write_json(tmp, config_to_hf(config))
    os.replace(tmp, path)
    return path


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_checkpoint(config: ModelConfig, state: Mapping[str, Tensor], folder: Path,
                     max_shard_size: int | str = "5GB") -> list[Path]:
    """Write config.json + safetensors weights (sharded with an index above max_shard_size) into `folder`.

    Atomic: everything is written to a temporary folder beside `folder`, then swapped in. Files of an existing
    folder that are not weights or config.json (tokenizer files, ...) are carried over; old weight files are
    not.
    Returns the written file paths. Raises ValueError for a config the family cannot express.
    """
    folder = Path(folder)
    max_bytes = parse_size(max_shard_size)
    hf_config = config_to_hf(config)  # first: it says what the family cannot express
    tensors = state_dict_to_hf(config, state)
    sizes: Counter[str] = Counter()
    for t in tensors.values():
        if t.is_floating_point():
            sizes[str(t.dtype).removeprefix("torch.")] += t.numel()
    if sizes:
        hf_config["dtype"] = sizes.most_common(1)[0][0]
    # safetensors refuses tensors that share memory; give each its own storage where needed.
    seen: set[int] = set()
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            tensors[name] = t.clone()
        seen.add(ptr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a saved model is an ordinary folder
        _write_json(tmp / CONFIG_FILE, hf_config)
        shards = _shards({k: v.cpu() for k, v in tensors.items()}, max_bytes)
        names = ([SAFETENSORS_FILE] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for name, shard in zip(names, shards, strict=True):
            save_file(shard, tmp / name, metadata={"format": "pt"})
            os.chmod(tmp / name, 0o666 & ~_umask())
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map = {t: name for name, shard in zip(names, shards, strict=True) for t in shard}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            _write_json(tmp / SAFETENSORS_INDEX, index)
            names.append(SAFETENSORS_INDEX)
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.name == CONFIG_FILE or WEIGHT_FILE_PATTERN.match(entry.name):
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, copy_function=_link_or_copy)
                else:
                    _link_or_copy(str(entry), str(tmp / entry.name))
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [folder / CONFIG_FILE] + [folder / n for n in names]


def _swap_in(tmp: Path, folder: Path) -> None:
    """Replace `folder` by the complete `tmp`; the old folder stays intact until the new one is in place."""
    if not folder.exists():
        os.replace(tmp, folder)
        return
    if not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    os.replace(folder, old / folder.name)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
