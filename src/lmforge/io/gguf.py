"""GGUF import: a llama.cpp GGUF file -> `ModelConfig` + lmforge-named float32 tensors, with an on-disk cache.

Parsing and dequantization are the `gguf` package's (`GGUFReader`, `gguf.quants.dequantize`). This module
only maps GGUF metadata to `ModelConfig`, maps GGUF tensor names to lmforge's, splits GPT-2's fused QKV
projection and undoes the row permutation llama.cpp's converter applies to the Llama Q and K projections.

Architectures: "llama" (Llama, SmolLM2, ...) and "gpt2". Tensor types: everything `gguf.quants` dequantizes
(F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants, ...); every tensor comes out as float32 (an F32
tensor bit for bit, a quantized one as its exact dequantized values).

Cache: parsing a GGUF file and dequantizing it takes seconds (SmolLM2-135M: ~2 s to parse the 49k-token
vocabulary, ~1 s to dequantize), so `load_gguf` keeps the converted tensors in one safetensors file per source
under `$LMFORGE_CACHE/gguf` (default `~/.cache/lmforge/gguf`), named after the source's absolute path. Its
metadata holds the config as JSON, the source's size and mtime, the cache format version and a CRC-32 of
the tensors; an entry that disagrees with any of them is rebuilt, never trusted. Entries are written to a
temporary file and moved into place with `os.replace`, so a kill during a write leaves the previous entry
intact. A cache hit never parses the GGUF file: it mmaps the safetensors file (copy-on-write) and checks the
CRC.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.io.hf import part_rows
from lmforge.models import build_empty_model
from lmforge.models.linear import QUANTIZED, BlockInt8Linear, Int4Linear, quantize_state, targets
from lmforge.registry import cache_root

__all__ = ["CACHE_VERSION", "SUPPORTED_ARCHITECTURES", "cache_dir", "cache_file", "load_gguf", "read_gguf"]

CACHE_VERSION = 2  # bump when the conversion changes, so older cache entries are rebuilt
SUPPORTED_ARCHITECTURES = ("llama", "gpt2")
GGUF_MAGIC = b"GGUF"

# GGUF tensor names (without the ".weight"/".bias" suffix) -> (lmforge name, part): GGUF uses the same names for
# every architecture. Parts are stacked along the rows of one lmforge tensor: q, k, v in `attn.qkv` (GPT-2's
# "attn_qkv" is already that), and a gated MLP's gate and up in `mlp.up`.
_GLOBAL_NAMES = {"token_embd": "embed_tokens", "position_embd": "embed_positions", "output_norm": "norm",
                 "output": "lm_head"}
_BLOCK_NAMES = {"attn_norm": ("attn_norm", 0, 1), "attn_q": ("attn.qkv", 0, 3), "attn_k": ("attn.qkv", 1, 3),
                "attn_v": ("attn.qkv", 2, 3), "attn_qkv": ("attn.qkv", 0, 1), "attn_output": ("attn.out", 0, 1),
                "ffn_norm": ("mlp_norm", 0, 1), "ffn_gate": ("mlp.up", 0, 2), "ffn_up": ("mlp.up", 1, 2),
                "ffn_down": ("mlp.down", 0, 1)}
# GGUF block types kept as they are with keep_quantized, and the module that computes with them.
_BLOCK_KINDS = {Q.Q4_0: Int4Linear.from_blocks, Q.Q4_1: Int4Linear.from_blocks, Q.Q8_0: BlockInt8Linear}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")
_PARSE_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, EOFError)
_MISSING = object()


def cache_dir() -> Path:
    """Where converted GGUF weights are cached: `$LMFORGE_CACHE/gguf`, default `~/.cache/lmforge/gguf`."""
    return cache_root() / "gguf"


def cache_file(path: str | os.PathLike[str], weights: str | None = None) -> Path:
    """The cache entry (a safetensors file) for the GGUF file at `path` converted to `weights` (see
    `load_gguf`), whether or not it exists yet."""
    source = Path(path).expanduser().resolve()
    digest = zlib.crc32(str(source).encode()) & 0xFFFFFFFF
    kind = f"-{weights}" if weights else ""
    return cache_dir() / f"{_safe_stem(source.stem)}-{digest:08x}{kind}.safetensors"


def load_gguf(path: str | os.PathLike[str], *, cache: bool = True,
              weights: str | None = None) -> tuple[ModelConfig, dict[str, Tensor | nn.Module]]:
    """Read a GGUF checkpoint as (config, state dict in lmforge parameter names), through the cache.

    weights: None, float32 tensors (`read_gguf`); "gguf", the file's Q4_0 / Q4_1 / Q8_0 blocks kept
    (`read_gguf(keep_quantized=True)`); "int8" / "int4", the linears' weights converted to those formats
    (`lmforge.models.linear`). With `cache=True` the result is read from (or written to) the cache entry
    `cache_file(path, weights)`. A cache entry that is stale (the GGUF file's size or mtime changed), from
    another cache format, or corrupt is rebuilt. A cache folder that cannot be written is reported with a
    warning and the converted weights are returned anyway.
    Raises the errors of `read_gguf`, and ValueError for an unknown `weights`.
    """
    source = _check_path(path)
    if weights not in (None, "gguf"):
        targets(build_empty_model(ModelConfig()), weights)  # an unknown format fails before any work
    entry = cache_file(source, weights)
    key = _cache_key(source)
    cached = _read_cache(entry, key) if cache else None
    if cached is not None:
        return cached
    config, tensors = read_gguf(source, keep_quantized=weights == "gguf")
    if weights not in (None, "gguf"):
        quantize_state(tensors, targets(build_empty_model(config), weights), weights)
    if cache and _cache_key(source) == key:  # the source did not change while it was being read
        _write_cache(entry, key, config, tensors)
    return config, tensors


def read_gguf(path: str | os.PathLike[str], *,
              keep_quantized: bool = False) -> tuple[ModelConfig, dict[str, Tensor | nn.Module]]:
    """Parse and dequantize a GGUF checkpoint, without the cache.

    keep_quantized: weights stored as Q4_0, Q4_1 or Q8_0 are not dequantized but returned as the module that
    keeps them in that form (`Int4Linear`, `BlockInt8Linear` from `lmforge.models.linear`), under the name of
    the weight they replace; every other tensor is dequantized as usual.

    Returns the `ModelConfig` (arch "decoder", family "llama" or "gpt2") and float32 tensors named as
    lmforge's `Decoder` names its parameters; with tied embeddings (no "output.weight" in the file) there is
    no "lm_head.weight" entry.
    Raises FileNotFoundError for a missing file; ValueError naming the file for a file that is not GGUF, a
    truncated or corrupt one, an unsupported architecture or missing metadata; ValueError naming the tensor
    for an unsupported tensor type, an unknown tensor name, a missing tensor or a shape that does not fit the
    config.
    """
    source = _check_path(path)
    reader = _open_reader(source)
    config = _config(reader, source)
    return config, _convert_tensors(reader, source, config, keep_quantized)


def read_gguf_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The `ModelConfig` of a GGUF file from its metadata alone (no tensor is read). Raises as `read_gguf`."""
    source = _check_path(path)
    return _config(_open_reader(source), source)


def _config(reader, source: Path) -> ModelConfig:
    arch = _meta(reader, source, "general.architecture")
    if arch == "llama":
        return _llama_config(reader, source)
    if arch == "gpt2":
        return _gpt2_config(reader, source)
    raise ValueError(f"{source}: unsupported GGUF architecture {arch!r}; supported: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)}")


# --- reading ------------------------------------------------------------------------------------------------

def _check_path(path: str | os.PathLike[str]) -> Path:
    source = Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"GGUF file not found: {source}")
    if not source.is_file():
        raise ValueError(f"expected a GGUF file, got a directory: {source}")
    return source.resolve()


def _open_reader(source: Path) -> GGUFReader:
    """A GGUFReader over `source`, with GGUF's own parse errors turned into one error naming the file."""
    with open(source, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{source} is not a GGUF file: it starts with {magic!r}, expected {GGUF_MAGIC!r}")
    try:
        reader = GGUFReader(source)
    except _PARSE_ERRORS as err:
        raise ValueError(f"{source}: truncated or corrupt GGUF file ({type(err).__name__}: {err})") from err
    if reader.byte_order != "I":
        raise ValueError(f"{source}: big-endian GGUF files are not supported")
    size = source.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"{source}: truncated GGUF file: tensor {t.name!r} ends at byte "
                             f"{t.data_offset + t.n_bytes}, the file has {size} bytes")
    return reader


def _meta(reader: GGUFReader, source: Path, key: str, default: Any = _MISSING) -> Any:
    """The value of metadata field `key` (str, int, float, bool or list), or `default` when absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"{source}: GGUF metadata field {key!r} is missing")
        return default
    try:
        return field.contents()
    except _PARSE_ERRORS as err:
        raise ValueError(f"{source}: GGUF metadata field {key!r} is corrupt ({err})") from err


def _meta_int(reader: GGUFReader, source: Path, key: str, default: Any = _MISSING) -> Any:
    value = _meta(reader, source, key, default)
    if value is not default and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{source}: GGUF metadata field {key!r} must be a non-negative integer, "
                         f"got {value!r}")
    return value


def _vocab_size(reader: GGUFReader, source: Path, arch: str) -> int:
    """The size of the token list (its length, without decoding 50k strings), else `{arch}.vocab_size`."""
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    vocab = _meta_int(reader, source, f"{arch}.vocab_size", None)
    if vocab is None:
        raise ValueError(f"{source}: GGUF metadata has neither 'tokenizer.ggml.tokens' "
                         f"nor '{arch}.vocab_size'")
    return vocab


def _special_ids(reader: GGUFReader, source: Path) -> dict[str, int | None]:
    return {f"{name}_token_id": _meta_int(reader, source, f"tokenizer.ggml.{gguf_name}_token_id", None)
            for name, gguf_name in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}


def _build_config(source: Path, **fields: Any) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except ValueError as err:
        raise ValueError(f"{source}: GGUF metadata gives an invalid model config: {err}") from err


def _llama_config(reader: GGUFReader, source: Path) -> ModelConfig:
    """Llama-architecture metadata ("llama.*") -> ModelConfig (rotary, RMSNorm, SwiGLU, GQA)."""
    names = {t.name for t in reader.tensors}
    n_head = _meta_int(reader, source, "llama.attention.head_count")
    d_model = _meta_int(reader, source, "llama.embedding_length")
    head_dim = _meta_int(reader, source, "llama.attention.key_length", d_model // max(n_head, 1))
    rotary_dim = _meta_int(reader, source, "llama.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ValueError(f"{source}: partial rotary embeddings (llama.rope.dimension_count={rotary_dim}, "
                         f"head size {head_dim}) are not supported")
    scaling = _meta(reader, source, "llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in names:
        raise ValueError(f"{source}: rotary scaling ({scaling!r}) is not supported; "
                         f"lmforge implements plain RoPE")
    return _build_config(
        source, arch="decoder", family="llama", norm="rmsnorm", activation="silu", gated_mlp=True,
        position="rotary", tie_embeddings="output.weight" not in names,
        attn_bias="blk.0.attn_q.bias" in names, mlp_bias="blk.0.ffn_up.bias" in names,
        vocab_size=_vocab_size(reader, source, "llama"),
        n_layer=_meta_int(reader, source, "llama.block_count"),
        n_head=n_head, n_kv_head=_meta_int(reader, source, "llama.attention.head_count_kv", n_head),
        d_model=d_model, head_dim=head_dim,
        d_ff=_meta_int(reader, source, "llama.feed_forward_length"),
        max_seq_len=_meta_int(reader, source, "llama.context_length"),
        norm_eps=float(_meta(reader, source, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_meta(reader, source, "llama.rope.freq_base", 10000.0)),
        **_special_ids(reader, source))


def _gpt2_config(reader: GGUFReader, source: Path) -> ModelConfig:
    """GPT-2-architecture metadata ("gpt2.*") -> ModelConfig (learned positions, LayerNorm, GELU-tanh)."""
    names = {t.name for t in reader.tensors}
    return _build_config(
        source, arch="decoder", family="gpt2", norm="layernorm", activation="gelu_tanh", gated_mlp=False,
        position="learned", tie_embeddings="output.weight" not in names,
        attn_bias="blk.0.attn_qkv.bias" in names, mlp_bias="blk.0.ffn_up.bias" in names,
        vocab_size=_vocab_size(reader, source, "gpt2"),
        n_layer=_meta_int(reader, source, "gpt2.block_count"),
        n_head=_meta_int(reader, source, "gpt2.attention.head_count"),
        d_model=_meta_int(reader, source, "gpt2.embedding_length"),
        d_ff=_meta_int(reader, source, "gpt2.feed_forward_length"),
        max_seq_len=_meta_int(reader, source, "gpt2.context_length"),
        norm_eps=float(_meta(reader, source, "gpt2.attention.layer_norm_epsilon")),
        **_special_ids(reader, source))


def _target(gguf_name: str, config: ModelConfig) -> tuple[str, int, int] | None:
    """(lmforge tensor name, part index, number of parts) of a GGUF tensor; None for an unknown name."""
    if m := _BLOCK_RE.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        if part not in _BLOCK_NAMES:
            return None
        name, index, n_parts = _BLOCK_NAMES[part]
        if part == "ffn_up" and not config.gated_mlp:
            index, n_parts = 0, 1
        return f"layers.{layer}.{name}.{kind}", index, n_parts
    if m := _GLOBAL_RE.fullmatch(gguf_name):
        part, kind = m.groups()
        return (f"{_GLOBAL_NAMES[part]}.{kind}", 0, 1) if part in _GLOBAL_NAMES else None
    return None


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the lmforge Decoder for `config` (built on the meta device: no memory, no init)."""
    shapes = {name: tuple(p.shape) for name, p in build_empty_model(config).state_dict().items()}
    if config.tie_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def tensor_plan(reader: GGUFReader, source: Path, config: ModelConfig) -> dict[str, list[tuple[Any, int]]]:
    """Check every GGUF tensor's name and shape against the config: lmforge name -> its parts in row order, each
    (GGUF tensor, rotary heads to un-permute or 0). Raises ValueError naming the tensor at fault."""
    expected = _expected_shapes(config)
    parts: dict[str, dict[int, Any]] = {}
    n_parts: dict[str, int] = {}
    for t in reader.tensors:
        target = _target(t.name, config)
        if target is None or target[0] not in expected:
            raise ValueError(f"{source}: unexpected tensor {t.name!r} for a {config.family} model "
                             f"(it maps to no lmforge parameter)")
        parts.setdefault(target[0], {})[target[1]] = t
        n_parts[target[0]] = target[2]
    missing = sorted(set(expected) - set(parts))
    if missing:
        raise ValueError(f"{source}: GGUF file lacks tensors for {len(missing)} parameters, e.g. {missing[:3]}")
    plan: dict[str, list[tuple[Any, int]]] = {}
    for name, by_index in parts.items():
        want_full = expected[name]
        rows = part_rows(config, n_parts[name], want_full[0])
        if sorted(by_index) != list(range(n_parts[name])):
            have = ", ".join(t.name for t in by_index.values())
            raise ValueError(f"{source}: GGUF file lacks tensors for {name}: it is stacked from {n_parts[name]} "
                             f"tensors, the file has only {have}")
        plan[name] = []
        for index, t in sorted(by_index.items()):
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
            want = (rows[index], *want_full[1:])
            if shape != want:
                raise ValueError(f"{source}: tensor {t.name!r} has shape {shape}, expected {want} for {name} "
                                 f"from the file's metadata")
            heads = 0
            if config.position == "rotary" and n_parts[name] == 3 and index < 2:
                heads = config.n_head if index == 0 else config.n_kv_head
            plan[name].append((t, heads))
    return plan


def _convert_tensors(reader: GGUFReader, source: Path, config: ModelConfig,
                     keep_quantized: bool = False) -> dict[str, Tensor | nn.Module]:
    """Every lmforge tensor of the file (parts stacked, rotary rows un-permuted): dequantized to float32, or
    with `keep_quantized` a module holding the blocks when every part is Q4_0, Q4_1 or Q8_0 (for the token
    embeddings Q8_0 only: 4-bit rows are packed for products, not for lookups)."""
    tensors: dict[str, Tensor | nn.Module] = {}
    for name, parts in tensor_plan(reader, source, config).items():
        kinds = {GGMLQuantizationType(t.tensor_type) for t, _ in parts}
        keep = keep_quantized and name.endswith(".weight") and len(kinds) == 1 and kinds <= set(_BLOCK_KINDS)
        if name.startswith("embed_") and kinds != {Q.Q8_0}:
            keep = False  # embeddings are looked up by row: only Q8_0 rows are read as they are
        if keep:
            blocks = [[_unpermute_rotary(b, heads) if heads else b for b in _blocks(t)] for t, heads in parts]
            tensors[name] = _BLOCK_KINDS[kinds.pop()](*(torch.cat(b) for b in zip(*blocks, strict=True)))
            continue
        ws = [_unpermute_rotary(_dequantize(t, source), heads) if heads else _dequantize(t, source)
              for t, heads in parts]
        tensors[name] = ws[0] if len(ws) == 1 else torch.cat(ws)
    return tensors


def _blocks(t: Any) -> list[Tensor]:
    """The blocks of a Q4_0 / Q4_1 / Q8_0 tensor as (q, scale[, zero]) with q (N, K) and scale, zero (N, K / 32),
    so that w = (q - 8) * scale + zero for the 4-bit types and w = q * scale for Q8_0."""
    qtype = GGMLQuantizationType(t.tensor_type)
    data = np.asarray(t.data).view(np.uint8)
    rows = data.shape[0]
    block_bytes = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}[qtype]
    blocks = data.reshape(rows, -1, block_bytes)  # (N, K/32, bytes)
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))  # (N, K/32)
    if qtype == Q.Q8_0:
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(rows, -1)
        return [q, d]
    start = 4 if qtype == Q.Q4_1 else 2
    packed = blocks[..., start:]  # (N, K/32, 16): element j in the low nibble, j + 16 in the high one
    q = torch.from_numpy(np.concatenate([packed & 0x0F, packed >> 4], axis=-1)).reshape(rows, -1)
    if qtype == Q.Q4_0:  # w = d * (q - 8)
        return [q, d, torch.zeros_like(d)]
    m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    return [q, d, m + 8 * d]  # w = d * q + m = (q - 8) * d + (m + 8 d)


def _dequantize(t: Any, source: Path) -> Tensor:
    """One GGUF tensor as a float32 torch tensor in (rows, cols) layout, via gguf.quants.dequantize."""
    qtype = GGMLQuantizationType(t.tensor_type)
    try:
        values = dequantize(t.data, qtype)
    except NotImplementedError as err:
        raise ValueError(f"{source}: tensor {t.name!r} has type {qtype.name}, which cannot be dequantized "
                         f"({err})") from err
    if values.dtype != np.float32:
        raise ValueError(f"{source}: tensor {t.name!r} has type {qtype.name}, "
                         f"expected a float or quantized type")
    if not values.flags.writeable:  # F32 comes back as a view of the read-only file mapping
        values = values.copy()
    return torch.from_numpy(values)


def _unpermute_rotary(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's Q/K row permutation: per head it interleaves the two rotary halves (row i of the first
    half, then row i of the second half); transformers and lmforge rotate the halves as contiguous blocks.

    w: (n_heads * D, C) weight or (n_heads * D,) bias.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


# --- cache --------------------------------------------------------------------------------------------------

def _safe_stem(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:80] or "model"


def _cache_key(source: Path) -> dict[str, str]:
    """What a cache entry must match: format version, the source's absolute path, size and mtime."""
    st = source.stat()
    return {"lmforge_cache_version": str(CACHE_VERSION), "source": str(source), "size": str(st.st_size),
            "mtime_ns": str(st.st_mtime_ns)}


def _checksum(tensors: dict[str, Tensor]) -> str:
    """CRC-32 over every tensor's name, dtype, shape and bytes, in name order (~0.2 s for 0.5 GB)."""
    crc = 0
    for name in sorted(tensors):
        t = tensors[name]
        crc = zlib.crc32(f"{name}|{t.dtype}|{tuple(t.shape)}".encode(), crc)
        crc = zlib.crc32(t.contiguous().view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, each read straight into its own new (64-byte aligned) tensor: no
    mapping of the file and no intermediate copy, so reading costs the tensors' size in memory and no more."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        tensors = {}
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
            f.seek(8 + header_len + begin)
            if end - begin != t.numel() * t.element_size() or f.readinto(t.view(-1).view(torch.uint8).numpy()) \
                    != end - begin:
                raise ValueError(f"tensor {name!r} is truncated or its size does not match its shape")
            tensors[name] = t
    return tensors


def _flatten(state: dict[str, Tensor | nn.Module]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors only: a quantized module's buffers under "name::buffer", and its class per name."""
    tensors, modules = {}, {}
    for name, value in state.items():
        if isinstance(value, nn.Module):
            modules[name] = type(value).__name__
            tensors.update({f"{name}::{b}": t for b, t in value.named_buffers() if t is not None})
        else:
            tensors[name] = value
    return tensors, modules


def _unflatten(tensors: dict[str, Tensor], modules: dict[str, str]) -> dict[str, Tensor | nn.Module]:
    """The inverse of `_flatten`; consumes `tensors`, so that each buffer read is released once its module
    holds it (the modules may copy misaligned ones)."""
    state: dict[str, Tensor | nn.Module] = {n: t for n, t in tensors.items() if "::" not in n}
    classes = {cls.__name__: cls for cls in QUANTIZED}
    for name, cls_name in modules.items():
        keys = [n for n in tensors if n.startswith(name + "::")]
        state[name] = classes[cls_name](**{n.split("::", 1)[1]: tensors.pop(n) for n in keys})
    return state


def _read_cache(entry: Path, key: dict[str, str]) -> tuple[ModelConfig, dict[str, Tensor | nn.Module]] | None:
    """The cached (config, tensors) if `entry` exists and matches `key` and its checksum; else None."""
    if not entry.exists():
        return None
    try:
        with safe_open(entry, framework="pt") as f:
            meta = f.metadata() or {}
        if any(meta.get(k) != v for k, v in key.items()):
            return None  # stale (source changed) or older format: rebuilt quietly
        tensors = _read_safetensors(entry)
        if _checksum(tensors) != meta.get("crc32"):
            raise ValueError("checksum mismatch")
        config = ModelConfig.from_dict(json.loads(meta["config"]))
        state = _unflatten(tensors, json.loads(meta.get("modules", "{}")))
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as err:
        warnings.warn(f"ignoring corrupt GGUF cache entry {entry} ({err}); rebuilding it", stacklevel=3)
        return None
    return config, state


def _write_cache(entry: Path, key: dict[str, str], config: ModelConfig,
                 state: dict[str, Tensor | nn.Module]) -> None:
    """Write the entry atomically: a temporary file in the same folder, then os.replace."""
    tensors, modules = _flatten(state)
    metadata = dict(key, config=json.dumps(config.to_dict()), crc32=_checksum(tensors),
                    modules=json.dumps(modules))
    tmp: str | None = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=entry.stem + ".", suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, entry)
        tmp = None
    except OSError as err:
        warnings.warn(f"could not write the GGUF cache entry {entry} ({err}); the next load converts again",
                      stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
