"""One `Tokenizer` over the `tokenizers` library: HF folders, GGUF metadata, the offline GPT-2 vocabulary.

Sources it reads:
- an HF folder with `tokenizer.json`, or `vocab.json` + `merges.txt` (byte-level BPE, GPT-2 style), or
  `vocab.txt` (WordPiece, BERT style), or T5's `spiece.model` (a SentencePiece Unigram model, read from its
  protobuf here: the sentencepiece package is not needed), plus `tokenizer_config.json` /
  `special_tokens_map.json` / `chat_template.jinja`;
- a GGUF file's `tokenizer.*` metadata (byte-level BPE, e.g. SmolLM2), built the way transformers builds it;
- the name "gpt2": openai-whisper's `gpt2.tiktoken` ranks, converted once to vocab.json + merges.txt in the
  cache.

The BPE / WordPiece algorithms are the `tokenizers` library's; this module only assembles the pipeline
(normalizer, pre-tokenizer, model, post-processor, decoder), pads batches, renders chat templates and streams
text.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import struct
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import tokenizers
import torch
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tqdm.auto import tqdm

from lmforge import registry

# The special-token roles a Tokenizer knows, as named in tokenizer_config.json (`bos_token`, ...).
SPECIAL_ROLES = ("bos", "eos", "pad", "unk", "cls", "sep", "mask")
GPT2_EOT = "<|endoftext|>"
SENTINEL = re.compile(r"<extra_id_(\d+)>")  # T5's span-corruption sentinels
GPT2_NAMES = ("gpt2", "distilgpt2")
# Registry fixtures that carry a tokenizer (the others are data or the raw GPT-2 ranks).
PACKAGED_TOKENIZERS = ("smollm2-135m-instruct", "all-minilm-l6-v2")
# GGUF `tokenizer.ggml.pre` values and how text is split before BPE. transformers' GGUF loader splits "smollm"
# text with the plain GPT-2 regex, and lmforge matches transformers. SmolLM2's own tokenizer.json (and
# llama.cpp) isolate digits first; the only difference that shows is a run of newlines before a digit
# ("\n\n1": "Ċ","Ċ","1" here, "ĊĊ","1" there), which touches 30 of the 2,225 BBC documents.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_SPLITS: dict[str, str | None] = {
    "default": None, "gpt2": None, "smollm": None,  # None: the GPT-2 regex built into ByteLevel
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
GGUF_CACHE_VERSION = 1  # part of the cache key of tokenizers built from GGUF: bump when the builder changes


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used to spell byte-level BPE tokens.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are shifted to
    U+0100 onwards, so a space is spelled "Ġ" and a newline "Ċ".
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return dict(sorted(mapping.items()))


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and os.replace: a crash leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes the file private; the cache and saved folders are ordinary files
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- tiktoken -> vocab.json + merges.txt ------------------------------------------------------------------


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a `.tiktoken` file (one `base64(token bytes) rank` per line) into {token bytes: rank}.

    Raises FileNotFoundError for a missing file and ValueError (with the line number) for a malformed line or
    ranks that are not exactly 0..N-1.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tiktoken ranks file not found: {path}")
    try:
        lines = path.read_bytes().decode("ascii").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a tiktoken ranks file (non-ASCII content: {err})") from err
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:60]!r}") from err
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be the distinct integers 0..{len(ranks) - 1}")
    return ranks


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merge list implied by tiktoken ranks, in rank order (one merge per multi-byte token).

    A token of rank r was created by the merge that BPE reaches when it runs on the token's bytes using only
    merges of rank < r: that run ends in exactly two parts, and those two parts are the merge.
    Raises ValueError when a token cannot be reached that way (the ranks are not a BPE vocabulary).
    """
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best_i, best_rank = -1, rank
            for i in range(len(parts) - 1):
                pair_rank = ranks.get(parts[i] + parts[i + 1])
                if pair_rank is not None and pair_rank < best_rank:
                    best_i, best_rank = i, pair_rank
            if best_i < 0:
                break
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def convert_tiktoken(tiktoken_file: str | Path, out_dir: str | Path, special_tokens: dict[str, int],
                     tokenizer_config: dict[str, Any]) -> Path:
    """Convert tiktoken ranks to a byte-level BPE folder (vocab.json, merges.txt, tokenizer_config.json).

    Token ids equal tiktoken ranks; `special_tokens` ({text: id}) are added to the vocabulary. Each file is
    written atomically, tokenizer_config.json last. Returns `out_dir`.
    """
    ranks = read_tiktoken_ranks(tiktoken_file)
    spell = bytes_to_unicode()

    def spelled(token: bytes) -> str:
        return "".join(spell[b] for b in token)

    vocab = {spelled(token): rank for token, rank in ranks.items()}
    for text, token_id in special_tokens.items():
        if token_id in vocab.values() or text in vocab:
            raise ValueError(f"special token {text!r} (id {token_id}) collides with the ranks in "
                             f"{tiktoken_file}")
        vocab[text] = token_id
    merges = [f"{spelled(a)} {spelled(b)}" for a, b in recover_merges(ranks)]
    out_dir = Path(out_dir)
    _write_atomic(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    _write_atomic(out_dir / "merges.txt", "\n".join(["#version: 0.2", *merges]) + "\n")
    _write_atomic(out_dir / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2))
    return out_dir


def convert_gpt2_tiktoken(out_dir: str | Path | None = None, tiktoken_file: str | Path | None = None) -> Path:
    """Build GPT-2's vocab.json + merges.txt from whisper's gpt2.tiktoken (50,256 ranks + <|endoftext|>).

    Defaults: the packaged ranks file and `registry.cache_root() / "tokenizers" / "gpt2"`. Returns the folder.
    """
    out_dir = Path(out_dir) if out_dir is not None else registry.cache_root() / "tokenizers" / "gpt2"
    tiktoken_file = tiktoken_file if tiktoken_file is not None else registry.packaged_path("gpt2-tiktoken")
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": GPT2_EOT, "eos_token": GPT2_EOT,
              "unk_token": GPT2_EOT, "add_bos_token": False, "model_max_length": 1024}
    return convert_tiktoken(tiktoken_file, out_dir, {GPT2_EOT: 50256}, config)


def _gpt2_dir() -> Path:
    """The converted GPT-2 folder in the cache, converting it on first use."""
    folder = registry.cache_root() / "tokenizers" / "gpt2"
    if not all((folder / name).is_file() for name in ("vocab.json", "merges.txt", "tokenizer_config.json")):
        convert_gpt2_tiktoken(folder)
    return folder


# --- batches, chat templates ------------------------------------------------------------------------------


@dataclass
class BatchEncoding:
    """A padded batch: `input_ids` (B, T) and `attention_mask` (B, T), 1 for real tokens and 0 for padding.

    LongTensors when encoded with return_tensors=True, else lists of lists. `batch["input_ids"]` also works.
    """

    input_ids: torch.Tensor | list[list[int]]
    attention_mask: torch.Tensor | list[list[int]]

    def __getitem__(self, key: str) -> torch.Tensor | list[list[int]]:
        if key not in ("input_ids", "attention_mask"):
            raise KeyError(f"BatchEncoding has 'input_ids' and 'attention_mask', not {key!r}")
        return getattr(self, key)


def _raise_exception(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
            sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _compile_chat_template(source: str):
    """Compile a Jinja2 chat template in a sandbox, with the helpers HF templates expect."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _check_messages(messages: Sequence[dict[str, Any]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message):
            raise ValueError(f"messages[{i}] must be a dict with a 'role' string and a 'content', "
                             f"got {message!r}")


# --- the Tokenizer ----------------------------------------------------------------------------------------


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _protobuf_fields(buf: bytes, where: str) -> Iterator[tuple[int, Any]]:
    """(field number, value) of a serialized protobuf message: ints for varints, bytes otherwise."""
    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            if i >= len(buf):
                raise ValueError(f"{where}: truncated protobuf")
            byte = buf[i]
            value |= (byte & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if byte < 0x80:
                return value, i

    i = 0
    while i < len(buf):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        elif wire == 2:
            size, i = varint(i)
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"{where}: not a SentencePiece model (protobuf wire type {wire})")
        if i > len(buf):
            raise ValueError(f"{where}: truncated protobuf")
        yield key >> 3, value


@dataclass
class SentencePieceModel:
    """What a SentencePiece `.model` file holds that the `tokenizers` library needs: pieces with scores, the
    unknown id, byte fallback, and the normalizer's precompiled character map."""

    pieces: list[tuple[str, float]]
    model_type: int  # 1 unigram, 2 BPE, 3 word, 4 char
    unk_id: int
    byte_fallback: bool
    charsmap: bytes

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> SentencePieceModel:
        """Parse the ModelProto of a `.model` file (fields: pieces 1, trainer_spec 2, normalizer_spec 3).
        Raises ValueError naming the file for anything else."""
        where = str(path)
        pieces, model_type, unk_id, byte_fallback, charsmap = [], 1, 0, False, b""
        for field, value in _protobuf_fields(Path(path).read_bytes(), where):
            if field == 1 and isinstance(value, bytes):
                piece, score = None, 0.0
                for f, v in _protobuf_fields(value, where):
                    if f == 1:
                        piece = v.decode("utf-8")
                    elif f == 2 and isinstance(v, bytes) and len(v) == 4:
                        score = struct.unpack("<f", v)[0]
                if piece is None:
                    raise ValueError(f"{where}: a SentencePiece piece without its text")
                pieces.append((piece, score))
            elif field == 2 and isinstance(value, bytes):
                for f, v in _protobuf_fields(value, where):
                    if f == 3:
                        model_type = v
                    elif f == 35:
                        byte_fallback = bool(v)
                    elif f == 40:
                        unk_id = v
            elif field == 3 and isinstance(value, bytes):
                charsmap = next((v for f, v in _protobuf_fields(value, where) if f == 2), b"")
        if not pieces:
            raise ValueError(f"{where}: not a SentencePiece model (no pieces)")
        return cls(pieces, model_type, unk_id, byte_fallback, charsmap)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _template_processor(bos: str | None, eos: str | None, add_bos: bool, add_eos: bool,
                        vocab: dict[str, int]) -> processors.TemplateProcessing:
    """`[bos] $A [eos]` as a post-processor, each special token included only when its flag is set."""
    start = [f"{bos}:0"] if add_bos and bos is not None else []
    end = [f"{eos}:0"] if add_eos and eos is not None else []
    single = [*start, "$A:0", *end]
    specials = [(t.removesuffix(":0"), vocab[t.removesuffix(":0")]) for t in start + end]
    return processors.TemplateProcessing(single=single, pair=[*single, "$B:1"], special_tokens=specials)


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], add_prefix_space: bool = False,
                    split_regex: str | None = None) -> tokenizers.Tokenizer:
    """A GPT-2 style byte-level BPE pipeline (no unknown token: every byte has a token)."""
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    if split_regex is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and (for instruct models) its chat template.

    Build one with `Tokenizer.for_model(source)` (an HF folder, a .gguf file or a registry name),
    `from_dir`, `from_gguf` or `from_name`. Ids are plain Python ints; batches are padded LongTensors.
    """

    def __init__(self, backend: tokenizers.Tokenizer, special_tokens: dict[str, str | None] | None = None,
                 chat_template: str | None = None, source: str = "") -> None:
        """Wrap a `tokenizers.Tokenizer`.

        `special_tokens` maps roles (bos, eos, pad, unk, cls, sep, mask) to token strings that must be in the
        vocabulary; they are registered as special tokens (kept whole, skipped by
        decode(skip_special_tokens=True)). Padding/truncation stored in the backend are switched off: this
        class pads and truncates itself.
        """
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.source = source
        self.chat_template = chat_template
        self.special_tokens: dict[str, str | None] = {role: None for role in SPECIAL_ROLES}
        for role, token in (special_tokens or {}).items():
            if role not in SPECIAL_ROLES:
                raise ValueError(f"unknown special-token role {role!r}; expected one of {SPECIAL_ROLES}")
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{source or 'tokenizer'}: {role} token {token!r} is not in the vocabulary")
            self.special_tokens[role] = token
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in self.special_tokens.values() if t is not None])

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"

    # -- constructors ---------------------------------------------------------------------------------------

    @classmethod
    def for_model(cls, source: str | os.PathLike[str]) -> Tokenizer:
        """The tokenizer of what `lmforge.io.load_model` accepts: an HF folder, a .gguf file or a name."""
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"tokenizer source must be a path or a name, got {type(source).__name__}")
        text = os.fspath(source)
        path = Path(text).expanduser()
        if path.is_dir():
            from lmforge.io.hf import training_run  # a training checkpoint: the run's tokenizer

            return cls.from_dir(training_run(path) or path)
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ValueError(f"{path}: expected a model folder or a .gguf file")
            return cls.from_gguf(path)
        if isinstance(source, os.PathLike) or os.sep in text or text.lower().endswith(".gguf"):
            raise FileNotFoundError(f"no such model folder or GGUF file: {path}")
        return cls.from_name(text)

    @classmethod
    def from_name(cls, name: str) -> Tokenizer:
        """A named tokenizer, offline: "gpt2"/"distilgpt2" (converted from gpt2.tiktoken into the cache on
        first use), "smollm2-135m-instruct" (alias "default"), "all-minilm-l6-v2" (registry packages)."""
        key = registry.ALIASES.get(name.lower(), name.lower())
        if key in GPT2_NAMES:
            tok = cls.from_dir(_gpt2_dir())
            tok.source = name
            return tok
        if key not in PACKAGED_TOKENIZERS:
            known = ", ".join([*GPT2_NAMES, *PACKAGED_TOKENIZERS, *sorted(registry.ALIASES)])
            raise ValueError(f"unknown tokenizer name {name!r}; known: {known} "
                             "(or give a folder / .gguf path)")
        return cls.for_model(registry.packaged_path(key))

    @classmethod
    def from_dir(cls, folder: str | os.PathLike[str]) -> Tokenizer:
        """Read an HF tokenizer folder: tokenizer.json, else vocab.json + merges.txt, else vocab.txt, plus
        tokenizer_config.json / special_tokens_map.json (special tokens, add_bos/eos_token, do_lower_case,
        chat_template) and chat_template.jinja when present.

        Raises FileNotFoundError naming the folder and the files looked for; ValueError for malformed files.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        config_file = folder / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        if (folder / "special_tokens_map.json").is_file():
            config = {**_read_json(folder / "special_tokens_map.json"), **config}
        special = {role: _token_text(config.get(f"{role}_token")) for role in SPECIAL_ROLES}
        if (folder / "tokenizer.json").is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as err:  # the Rust library raises a bare Exception for a malformed file
                raise ValueError(f"{folder / 'tokenizer.json'}: not a valid tokenizer.json ({err})") from err
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            backend = cls._bpe_backend(folder, config, special)
        elif (folder / "vocab.txt").is_file():
            backend = cls._wordpiece_backend(folder, config, special)
        elif (folder / "spiece.model").is_file():
            backend = cls._t5_spiece_backend(folder, config, special)
        else:
            raise FileNotFoundError(f"no tokenizer in {folder}: looked for tokenizer.json, "
                                    "vocab.json + merges.txt, vocab.txt, spiece.model")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, special, template if isinstance(template, str) else None, source=str(folder))

    @staticmethod
    def _bpe_backend(folder: Path, config: dict[str, Any],
                     special: dict[str, str | None]) -> tokenizers.Tokenizer:
        """GPT-2 style byte-level BPE from vocab.json + merges.txt; fills GPT-2's special-token defaults."""
        try:
            vocab, merges = models.BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        except Exception as err:
            raise ValueError(f"{folder}: unreadable vocab.json / merges.txt ({err})") from err
        backend = _byte_level_bpe(vocab, merges, add_prefix_space=bool(config.get("add_prefix_space", False)))
        if GPT2_EOT in vocab:
            for role in ("bos", "eos", "unk"):
                special[role] = special[role] or GPT2_EOT
        backend.post_processor = _template_processor(special["bos"], special["eos"],
                                                     bool(config.get("add_bos_token", False)),
                                                     bool(config.get("add_eos_token", False)), vocab)
        return backend

    @staticmethod
    def _wordpiece_backend(folder: Path, config: dict[str, Any],
                           special: dict[str, str | None]) -> tokenizers.Tokenizer:
        """BERT style WordPiece from vocab.txt: BertNormalizer, [CLS] $A [SEP]; BERT's special defaults."""
        try:
            vocab = models.WordPiece.read_file(str(folder / "vocab.txt"))
        except Exception as err:
            raise ValueError(f"{folder / 'vocab.txt'}: unreadable WordPiece vocabulary ({err})") from err
        for role, default in (("unk", "[UNK]"), ("sep", "[SEP]"), ("pad", "[PAD]"), ("cls", "[CLS]"),
                              ("mask", "[MASK]")):
            special[role] = special[role] or default
            if special[role] not in vocab:
                raise ValueError(f"{folder / 'vocab.txt'}: {role} token {special[role]!r} is not in the "
                                 "vocabulary")
        backend = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=special["unk"]))
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
            strip_accents=config.get("strip_accents"), lowercase=bool(config.get("do_lower_case", True)))
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        cls_token, sep_token = special["cls"], special["sep"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls_token}:0 $A:0 {sep_token}:0",
            pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
            special_tokens=[(cls_token, vocab[cls_token]), (sep_token, vocab[sep_token])])
        return backend

    @staticmethod
    def _t5_spiece_backend(folder: Path, config: dict[str, Any],
                           special: dict[str, str | None]) -> tokenizers.Tokenizer:
        """T5's SentencePiece Unigram model as transformers builds it: the pieces, then `extra_ids` sentinels
        (tokenizer_config.json, default 100) <extra_id_N> from the highest N down; the model's normalizer
        (precompiled character map), whitespace split + "▁" prefix, "</s>" appended."""
        path = folder / "spiece.model"
        try:
            spm = SentencePieceModel.read(path)
        except OSError as err:
            raise ValueError(f"{path}: unreadable ({err})") from err
        if spm.model_type != 1:
            raise ValueError(f"{path}: a SentencePiece model of type {spm.model_type}; only Unigram (1, T5's) is "
                             "supported")
        extra_ids = config.get("extra_ids", 100)
        if isinstance(extra_ids, bool) or not isinstance(extra_ids, int) or extra_ids < 0:
            raise ValueError(f"{folder / 'tokenizer_config.json'}: extra_ids must be a non-negative integer, got "
                             f"{extra_ids!r}")
        vocab = spm.pieces + [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
        for role, default in (("eos", "</s>"), ("unk", "<unk>"), ("pad", "<pad>")):
            special[role] = special[role] or default
        backend = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=spm.unk_id, byte_fallback=spm.byte_fallback))
        if spm.charsmap:
            backend.normalizer = normalizers.Precompiled(spm.charsmap)
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        eos_id = backend.token_to_id(special["eos"])
        if eos_id is None:
            raise ValueError(f"{path}: eos token {special['eos']!r} is not in the vocabulary")
        backend.post_processor = processors.TemplateProcessing(
            single=f"$A {special['eos']}", pair=f"$A {special['eos']} $B {special['eos']}",
            special_tokens=[(special["eos"], eos_id)])
        backend.add_special_tokens([AddedToken(f"<extra_id_{i}>", special=True, normalized=False)
                                    for i in range(extra_ids)])
        return backend

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], cache: bool = True) -> Tokenizer:
        """Build the tokenizer a GGUF file's metadata describes (tokenizer.ggml.model "gpt2": byte-level BPE).

        Reads tokens, merges, token_type (control tokens become special, user-defined ones added tokens),
        bos/eos/unk/padding ids, add_bos/eos_token, add_space_prefix, the pre-tokenizer name and
        tokenizer.chat_template. Gives the same ids as transformers' tokenizer loaded from the same file.
        Parsing the metadata takes seconds, so with `cache` the result is saved as an HF tokenizer folder in
        `registry.cache_root() / "tokenizers"` (keyed by the file's path, size and mtime) and later calls load
        that instead.
        Raises FileNotFoundError / ValueError naming the file and the missing or unsupported field.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        if not cache:
            return cls._build_from_gguf(path)
        stat = path.stat()
        identity = f"{GGUF_CACHE_VERSION}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        key = hashlib.sha256(identity.encode()).hexdigest()[:16]
        folder = registry.cache_root() / "tokenizers" / f"gguf-{path.stem}-{key}"
        if (folder / "tokenizer_config.json").is_file():  # written last by save(): the folder is complete
            tok = cls.from_dir(folder)
        else:
            tok = cls._build_from_gguf(path)
            try:
                tok.save(folder)
            except OSError as err:
                warnings.warn(f"could not cache the tokenizer of {path} in {folder}: {err}", stacklevel=2)
        tok.source = str(path)
        return tok

    @classmethod
    def _build_from_gguf(cls, path: Path) -> Tokenizer:
        from gguf import GGUFReader

        try:
            fields = GGUFReader(path).fields
        except Exception as err:  # the reader fails with assorted errors on truncated or foreign files
            raise ValueError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from err

        def meta(key: str, default: Any = ValueError) -> Any:
            if key in fields:
                return fields[key].contents()
            if default is ValueError:
                raise ValueError(f"{path}: GGUF metadata has no {key!r}, which a tokenizer needs")
            return default

        kind = meta("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}; lmforge reads byte-level BPE "
                             "('gpt2') only")
        pre = meta("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_SPLITS:
            raise ValueError(f"{path}: unsupported tokenizer.ggml.pre {pre!r}; "
                             f"supported: {sorted(GGUF_PRE_SPLITS)}")
        tokens: list[str] = meta("tokenizer.ggml.tokens")
        token_types: list[int] = meta("tokenizer.ggml.token_type", [1] * len(tokens))
        # Every real byte-level token is spelled in GPT-2's byte alphabet; respell the rare one that is not.
        spell = bytes_to_unicode()
        alphabet = set(spell.values())
        spelled = [t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")) for t in tokens]
        vocab = {token: i for i, token in enumerate(spelled)}
        merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges")]
        backend = _byte_level_bpe(vocab, merges, bool(meta("tokenizer.ggml.add_space_prefix", False)),
                                  GGUF_PRE_SPLITS[pre])
        typed = list(zip(tokens, token_types, strict=True))
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, kind in typed if kind == GGUF_CONTROL and t in vocab])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, kind in typed if kind == GGUF_USER_DEFINED and t in vocab])
        special: dict[str, str | None] = {}
        for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                          ("pad", "padding_token_id")):
            token_id = meta(f"tokenizer.ggml.{key}", None)
            if token_id is not None and not 0 <= token_id < len(tokens):
                raise ValueError(f"{path}: tokenizer.ggml.{key} = {token_id} is outside the vocabulary "
                                 f"(0..{len(tokens) - 1})")
            special[role] = tokens[token_id] if token_id is not None else None
        backend.post_processor = _template_processor(special["bos"], special["eos"],
                                                     bool(meta("tokenizer.ggml.add_bos_token", False)),
                                                     bool(meta("tokenizer.ggml.add_eos_token", False)), vocab)
        return cls(backend, special, meta("tokenizer.chat_template", None), source=str(path))

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write tokenizer.json + tokenizer_config.json (special tokens, chat template) into `folder`, each
        file atomically; transformers' AutoTokenizer reads the result. Returns the folder."""
        folder = Path(folder)
        config: dict[str, Any] = {f"{role}_token": t for role, t in self.special_tokens.items() if t}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        sentinels = [self.backend.id_to_token(i) for i in self.sentinel_ids]
        if sentinels:  # T5: transformers adds 100 <extra_id_N> of its own unless told they exist
            config.update(extra_ids=len(sentinels), extra_special_tokens=sentinels)
        _write_atomic(folder / "tokenizer.json", self.backend.to_str())
        _write_atomic(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
        return folder

    # -- vocabulary and special tokens ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included; valid ids are 0..vocab_size-1."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string (as the vocabulary spells it), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary spelling of one id (byte-level tokens spell a space as "Ġ")."""
        self._check_ids([token_id])
        return self.backend.id_to_token(token_id)

    def special_token_id(self, role: str) -> int | None:
        """The id of the special token playing `role` (bos, eos, pad, unk, cls, sep, mask), or None."""
        if role not in SPECIAL_ROLES:
            raise ValueError(f"unknown special-token role {role!r}; expected one of {SPECIAL_ROLES}")
        token = self.special_tokens[role]
        return None if token is None else self.backend.token_to_id(token)

    bos_token = property(lambda self: self.special_tokens["bos"], doc="Beginning-of-sequence token, or None.")
    eos_token = property(lambda self: self.special_tokens["eos"], doc="End-of-sequence token, or None.")
    pad_token = property(lambda self: self.special_tokens["pad"], doc="Padding token, or None.")
    unk_token = property(lambda self: self.special_tokens["unk"], doc="Unknown token, or None.")
    mask_token = property(lambda self: self.special_tokens["mask"], doc="Mask token (MLM), or None.")
    bos_token_id = property(lambda self: self.special_token_id("bos"), doc="Id of bos_token, or None.")
    eos_token_id = property(lambda self: self.special_token_id("eos"), doc="Id of eos_token, or None.")
    pad_token_id = property(lambda self: self.special_token_id("pad"), doc="Id of pad_token, or None.")
    unk_token_id = property(lambda self: self.special_token_id("unk"), doc="Id of unk_token, or None.")
    mask_token_id = property(lambda self: self.special_token_id("mask"), doc="Id of mask_token, or None.")

    @cached_property
    def sentinel_ids(self) -> list[int]:
        """Ids of T5's sentinel tokens <extra_id_0>, <extra_id_1>, ... in that order (span corruption marks the
        n-th dropped span with <extra_id_n>); empty for a vocabulary without them."""
        found = {}
        for i, token in self.backend.get_added_tokens_decoder().items():
            match = SENTINEL.fullmatch(token.content)
            if match:
                found[int(match.group(1))] = i
        if sorted(found) != list(range(len(found))):
            raise ValueError(f"{self.source or 'tokenizer'}: sentinel tokens <extra_id_N> are not numbered "
                             f"0..{len(found) - 1}")
        return [found[n] for n in range(len(found))]

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of every token registered as special (control tokens of a GGUF included), sorted."""
        return sorted(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    # -- encode / decode ------------------------------------------------------------------------------------

    @staticmethod
    def _check_text(text: Any, where: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"{where}: expected a string, got {type(text).__name__}")
        if not text:
            raise ValueError(f"{where}: empty text; expected at least one character")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the model's post-processor adds ([CLS]/[SEP]
        for BERT, nothing for GPT-2 / SmolLM2). Raises ValueError for empty text, TypeError for non-text."""
        self._check_text(text, "encode(text)")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_many(self, texts: Sequence[str], add_special_tokens: bool = True,
                    progress: bool = False) -> list[list[int]]:
        """`encode` of every text, in batches the `tokenizers` library runs on all cores, with a progress bar
        (stderr) when `progress`. Raises as `encode` does, naming the text's index."""
        for i, text in enumerate(texts):
            self._check_text(text, f"encode_many(texts[{i}])")
        out: list[list[int]] = []
        with tqdm(total=len(texts), unit="text", desc="tokenising", disable=not progress, leave=False) as bar:
            for start in range(0, len(texts), 256):
                chunk = list(texts[start:start + 256])
                out += [e.ids for e in self.backend.encode_batch(chunk, add_special_tokens=add_special_tokens)]
                bar.update(len(chunk))
        return out

    def encode_pair(self, text: str, pair: str, max_length: int | None = None) -> tuple[list[int], list[int]]:
        """(ids, token type ids) of a sentence pair in the model's pair format: [CLS] A [SEP] B [SEP] with
        types 0 then 1 for BERT, <s> A </s></s> B </s> for RoBERTa (as its tokenizer.json says).

        With `max_length`, the pair is cut to fit as the `tokenizers` library's "longest_first" does: the
        shorter text keeps up to half of the room, the longer one the rest (each cut at its end). Raises
        ValueError for empty texts or a max_length that leaves no room for one token of each text.
        """
        self._check_text(text, "encode_pair(text)")
        self._check_text(pair, "encode_pair(pair)")
        first = self.backend.encode(text, add_special_tokens=False)
        second = self.backend.encode(pair, add_special_tokens=False)
        if max_length is not None:
            budget = max_length - self.backend.num_special_tokens_to_add(True)
            if budget < 2:
                raise ValueError(f"max_length={max_length} leaves no room for both texts of a pair")
            n_first, n_second = len(first.ids), len(second.ids)
            if n_first + n_second > budget:  # the shorter text keeps up to half (the first one on a tie)
                if n_first > n_second:
                    n_second = min(n_second, budget // 2)
                    n_first = budget - n_second
                else:
                    n_first = min(n_first, budget // 2)
                    n_second = budget - n_first
                first.truncate(n_first)
                second.truncate(n_second)
        enc = self.backend.post_process(first, second, add_special_tokens=True)
        return enc.ids, enc.type_ids

    def encode_batch(self, texts: Sequence[str], padding_side: Literal["left", "right"] = "left",
                     max_length: int | None = None, truncation: bool = False, add_special_tokens: bool = True,
                     return_tensors: bool = True) -> BatchEncoding:
        """Encode and pad a batch to a common length T (the longest row, or `max_length` when given).

        Left padding (default) suits generation, right padding suits encoders/training. Rows are padded
        with pad_token_id, or eos_token_id when the tokenizer has no pad token (GPT-2); attention_mask marks
        them 0. With truncation=True rows longer than `max_length` are cut at the end, special tokens kept;
        without it a longer row is an error. Returns `BatchEncoding(input_ids (B, T), attention_mask (B, T))`.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise ValueError("encode_batch(texts): expected a non-empty list of strings")
        for i, text in enumerate(texts):
            self._check_text(text, f"encode_batch(texts[{i}])")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if truncation and max_length is None:
            raise ValueError("truncation=True needs max_length")
        n_special = self.backend.num_special_tokens_to_add(False) if add_special_tokens else 0
        if max_length is not None and max_length <= n_special:
            raise ValueError(f"max_length={max_length} leaves no room for text beside {n_special} special "
                             "tokens")
        rows = []
        for enc in self.backend.encode_batch(list(texts), add_special_tokens=False):
            if truncation:
                enc.truncate(max_length - n_special)
            rows.append(self.backend.post_process(enc, add_special_tokens=add_special_tokens).ids)
        longest = max(len(r) for r in rows)
        if max_length is not None and longest > max_length:
            i = next(i for i, r in enumerate(rows) if len(r) > max_length)
            raise ValueError(f"texts[{i}] has {len(rows[i])} tokens > max_length={max_length}; "
                             "pass truncation=True to cut it")
        length = max_length if max_length is not None else longest
        pad_id = self.pad_token_id if self.pad_token_id is not None else self.eos_token_id
        if pad_id is None and any(len(r) < length for r in rows):
            raise ValueError(f"{self.source or 'tokenizer'}: rows need padding but there is no pad or eos "
                             "token")
        ids, mask = [], []
        for row in rows:
            pad = length - len(row)
            ids.append([pad_id] * pad + row if padding_side == "left" else row + [pad_id] * pad)
            mask.append([0] * pad + [1] * len(row) if padding_side == "left" else [1] * len(row) + [0] * pad)
        if not return_tensors:
            return BatchEncoding(ids, mask)
        # (B, T) each
        return BatchEncoding(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long))

    def _check_ids(self, ids: Sequence[int]) -> None:
        n = self.vocab_size
        for i, token_id in enumerate(ids):
            if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < n:
                raise ValueError(f"token id {token_id!r} at position {i} is out of range: expected an int in "
                                 f"0..{n - 1} ({self.source or 'tokenizer'})")

    @staticmethod
    def _as_id_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D sequence of ids, got a tensor of shape "
                                 f"{tuple(ids.shape)}")
            return ids.tolist()
        return list(ids)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D sequence of ids. Raises ValueError for an id outside 0..vocab_size-1."""
        ids = self._as_id_list(ids)
        self._check_ids(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]] | torch.Tensor,
                     skip_special_tokens: bool = False) -> list[str]:
        """Texts of a batch of id rows (a (B, T) tensor or a list of lists)."""
        rows = batch.tolist() if isinstance(batch, torch.Tensor) else [self._as_id_list(r) for r in batch]
        for row in rows:
            self._check_ids(row)
        return self.backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------------------

    @cached_property
    def _compiled_template(self):
        if self.chat_template is None:
            raise ValueError(f"{self.source or 'this tokenizer'} has no chat template (looked for "
                             "tokenizer_config.json 'chat_template', chat_template.jinja, GGUF "
                             "tokenizer.chat_template); it is not an instruct/chat model")
        try:
            return _compile_chat_template(self.chat_template)
        except TemplateError as err:
            raise ValueError(f"{self.source or 'tokenizer'}: invalid chat template ({err})") from err

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """Render `messages` ([{"role": "user", "content": "..."}, ...]) with the model's Jinja2 chat
        template, as transformers' apply_chat_template(tokenize=False) does. Template variables: messages,
        add_generation_prompt, bos_token, eos_token (and the other special tokens), plus `variables`.
        Raises ValueError when the tokenizer has no template or the messages are malformed."""
        _check_messages(messages)
        names = {f"{role}_token": token for role, token in self.special_tokens.items()}
        prompt = add_generation_prompt
        try:
            return self._compiled_template.render(messages=list(messages), add_generation_prompt=prompt,
                                                  **names, **variables)
        except TemplateError as err:
            raise ValueError(f"{self.source or 'tokenizer'}: chat template failed ({err})") from err

    def encode_chat(self, messages: Sequence[dict[str, Any]],
                    add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered chat (the template writes its own special tokens, so none are added)."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


# --- streaming --------------------------------------------------------------------------------------------


class IncrementalDecoder:
    """Turns token ids, one at a time, into text pieces that only ever hold whole characters.

    A byte-level token can end inside a multi-byte UTF-8 character (an emoji or a CJK character split across
    tokens). Such bytes decode to U+FFFD, so the decoder holds them back until a later token completes the
    character. Each step decodes only a short window (from the last clean boundary), so a step costs O(1) in
    the stream length. `flush()` returns whatever is still held at the end; concatenating every returned piece
    gives `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: a clean boundary one step behind `_read`, for decode context
        self._read = 0  # everything before this index has been emitted

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        """Add one id; return the newly completed text ("" while a character is still incomplete)."""
        self.tokenizer._check_ids([token_id])
        self.ids.append(token_id)
        done = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix, len(self.ids))
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """The text still held back (e.g. a stream that stopped mid-character, decoded with U+FFFD)."""
        done = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix, len(self.ids))
        self._prefix = self._read = len(self.ids)
        return text[len(done):]


def stream_decode(tokenizer: Tokenizer, ids: Iterable[int],
                  skip_special_tokens: bool = False) -> Iterator[str]:
    """Yield the text of `ids` piece by piece as they arrive, never splitting a character.

    See IncrementalDecoder; the pieces concatenate to `tokenizer.decode(list(ids))`."""
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens)
    for token_id in ids:
        piece = decoder.step(token_id)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail
