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
from gguf.quants import dequantize
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.models import build_empty_model
from lmforge.registry import cache_root

__all__ = ["CACHE_VERSION", "SUPPORTED_ARCHITECTURES", "cache_dir", "cache_file", "load_gguf", "read_gguf"]

CACHE_VERSION = 1  # bump when the conversion changes, so older cache entries are rebuilt
SUPPORTED_ARCHITECTURES = ("llama", "gpt2")
GGUF_MAGIC = b"GGUF"

# GGUF tensor names (without the ".weight"/".bias" suffix) -> lmforge names. GGUF uses the same names for
# every architecture; GPT-2's fused "attn_qkv" is split into q/k/v separately.
_GLOBAL_NAMES = {"token_embd": "embed_tokens", "position_embd": "embed_positions", "output_norm": "norm",
                 "output": "lm_head"}
_BLOCK_NAMES = {"attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
                "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "ffn_norm": "mlp_norm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")
_PARSE_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, EOFError)
_MISSING = object()


def cache_dir() -> Path:
    """Where converted GGUF weights are cached: `$LMFORGE_CACHE/gguf`, default `~/.cache/lmforge/gguf`."""
    return cache_root() / "gguf"


def cache_file(path: str | os.PathLike[str]) -> Path:
    """The cache entry (a safetensors file) for the GGUF file at `path`, whether or not it exists yet."""
    source = Path(path).expanduser().resolve()
    digest = zlib.crc32(str(source).encode()) & 0xFFFFFFFF
    return cache_dir() / f"{_safe_stem(source.stem)}-{digest:08x}.safetensors"


def load_gguf(path: str | os.PathLike[str], *, cache: bool = True) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Read a GGUF checkpoint as (config, state dict in lmforge parameter names), through the cache.

    Same result as `read_gguf`; with `cache=True` the converted tensors are read from (or written to) the
    cache entry `cache_file(path)`. A cache entry that is stale (the GGUF file's size or mtime changed), from
    another cache format, or corrupt is rebuilt. A cache folder that cannot be written is reported with a
    warning and the converted weights are returned anyway.
    Raises the errors of `read_gguf`.
    """
    source = _check_path(path)
    if not cache:
        return read_gguf(source)
    entry = cache_file(source)
    key = _cache_key(source)
    cached = _read_cache(entry, key)
    if cached is not None:
        return cached
    config, tensors = read_gguf(source)
    if _cache_key(source) == key:  # the source did not change while it was being read
        _write_cache(entry, key, config, tensors)
    return config, tensors


def read_gguf(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Parse and dequantize a GGUF checkpoint, without the cache.

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
    arch = _meta(reader, source, "general.architecture")
    if arch == "llama":
        config = _llama_config(reader, source)
    elif arch == "gpt2":
        config = _gpt2_config(reader, source)
    else:
        raise ValueError(f"{source}: unsupported GGUF architecture {arch!r}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return config, _convert_tensors(reader, source, config)


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


def _target_names(gguf_name: str) -> list[str]:
    """The lmforge name(s) a GGUF tensor becomes (three for a fused QKV); [] for an unknown name."""
    if m := _BLOCK_RE.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        if part == "attn_qkv":
            return [f"layers.{layer}.attn.{p}_proj.{kind}" for p in "qkv"]
        return [f"layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"] if part in _BLOCK_NAMES else []
    if m := _GLOBAL_RE.fullmatch(gguf_name):
        part, kind = m.groups()
        return [f"{_GLOBAL_NAMES[part]}.{kind}"] if part in _GLOBAL_NAMES else []
    return []


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the lmforge Decoder for `config` (built on the meta device: no memory, no init)."""
    shapes = {name: tuple(p.shape) for name, p in build_empty_model(config).state_dict().items()}
    if config.tie_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def _convert_tensors(reader: GGUFReader, source: Path, config: ModelConfig) -> dict[str, Tensor]:
    """Check every GGUF tensor's name and shape against the config, then dequantize and rename it."""
    expected = _expected_shapes(config)
    plan: list[tuple[Any, list[str]]] = []
    for t in reader.tensors:
        targets = _target_names(t.name)
        if not targets or any(name not in expected for name in targets):
            raise ValueError(f"{source}: unexpected tensor {t.name!r} for a {config.family} model "
                             f"(it maps to no lmforge parameter)")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        want = expected[targets[0]]
        want = (want[0] * len(targets), *want[1:])  # a fused QKV stacks q, k and v rows
        if shape != want:
            raise ValueError(f"{source}: tensor {t.name!r} has shape {shape}, expected {want} for "
                             f"{'/'.join(targets)} from the file's metadata")
        plan.append((t, targets))
    missing = sorted(set(expected) - {name for _, targets in plan for name in targets})
    if missing:
        raise ValueError(f"{source}: GGUF file lacks tensors for {len(missing)} parameters, "
                         f"e.g. {missing[:3]}")

    tensors: dict[str, Tensor] = {}
    for t, targets in plan:
        w = _dequantize(t, source)
        if len(targets) == 3:  # GPT-2 attn_qkv: rows [q; k; v]
            for name, part in zip(targets, w.chunk(3, dim=0), strict=True):
                tensors[name] = part.clone()  # own storage: safetensors refuses shared ones
            continue
        name = targets[0]
        if config.position == "rotary" and name.endswith(("attn.q_proj.weight", "attn.q_proj.bias")):
            w = _unpermute_rotary(w, config.n_head)
        elif config.position == "rotary" and name.endswith(("attn.k_proj.weight", "attn.k_proj.bias")):
            w = _unpermute_rotary(w, config.n_kv_head)
        tensors[name] = w
    return tensors


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


def _read_cache(entry: Path, key: dict[str, str]) -> tuple[ModelConfig, dict[str, Tensor]] | None:
    """The cached (config, tensors) if `entry` exists and matches `key` and its checksum; else None."""
    if not entry.exists():
        return None
    try:
        with safe_open(entry, framework="pt") as f:
            meta = f.metadata() or {}
        if any(meta.get(k) != v for k, v in key.items()):
            return None  # stale (source changed) or older format: rebuilt quietly
        tensors = load_file(entry)
        if _checksum(tensors) != meta.get("crc32"):
            raise ValueError("checksum mismatch")
        config = ModelConfig.from_dict(json.loads(meta["config"]))
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as err:
        warnings.warn(f"ignoring corrupt GGUF cache entry {entry} ({err}); rebuilding it", stacklevel=3)
        return None
    return config, tensors


def _write_cache(entry: Path, key: dict[str, str], config: ModelConfig, tensors: dict[str, Tensor]) -> None:
    """Write the entry atomically: a temporary file in the same folder, then os.replace."""
    metadata = dict(key, config=json.dumps(config.to_dict()), crc32=_checksum(tensors))
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
