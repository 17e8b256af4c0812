"""Sentence embeddings from encoders, reading sentence-transformers' module files when a folder has them.

    vectors = lmforge.embed("all-minilm-l6-v2", ["A man is eating food.", "A man rides a horse."])  # (2, 384)
    encoder = SentenceEncoder.load("path/to/model")  # load once, embed many times
    vectors = encoder.encode(texts, batch_size=64)

A sentence-transformers folder lists its modules in modules.json: the transformer (the folder itself), then
Pooling (`1_Pooling/config.json`: cls / max / mean / mean_sqrt_len_tokens / weightedmean / lasttoken, several
modes concatenated in that order), optional Dense layers (`2_Dense/config.json` + weights: linear then an
activation) and Normalize (unit L2 length). Its sentence_bert_config.json gives the token limit
(max_seq_length) and lower-casing. A folder without modules.json gets mean pooling over the attention mask.
Texts are batched by token length (longest first) and the rows returned in the input order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmforge.io import load_model, resolve_source
from lmforge.io.hf import CheckpointError, read_tensors
from lmforge.models import Encoder
from lmforge.tokenizer import Tokenizer

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# sentence-transformers Dense activations (class paths in 2_Dense/config.json) -> functions; nothing is imported.
_ACTIVATIONS = {"Tanh": torch.tanh, "Identity": lambda x: x, "ReLU": torch.relu, "GELU": F.gelu,
                "Sigmoid": torch.sigmoid}


def pool(hidden: Tensor, attention_mask: Tensor, modes: Sequence[str]) -> Tensor:
    """Pool token states (B, T, C) over the real tokens of a right-padded batch -> (B, C * len(modes)).

    modes: any of POOLING_MODES, concatenated in the given order. Raises ValueError for an unknown mode.
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[:, 0])
        elif mode == "max":
            out.append(hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            count = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1)
            out.append((hidden * mask).sum(dim=1) / (count if mode == "mean" else count.sqrt()))
        elif mode == "weightedmean":
            weights = mask * torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype).view(1, -1, 1)
            out.append((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9))
        elif mode == "lasttoken":
            last = attention_mask.sum(dim=1).clamp(min=1) - 1  # (B,)
            out.append(hidden[torch.arange(hidden.shape[0]), last])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}; expected one of {', '.join(POOLING_MODES)}")
    return torch.cat(out, dim=-1)


@dataclass
class DenseLayer:
    """A sentence-transformers Dense module: activation(x @ weight.T + bias)."""

    linear: nn.Linear
    activation: str = "Tanh"

    def __call__(self, x: Tensor) -> Tensor:
        return _ACTIVATIONS[self.activation](self.linear(x))


@dataclass
class SentenceModules:
    """What follows the transformer in a sentence-transformers pipeline."""

    pooling: tuple[str, ...] = ("mean",)
    dense: list[DenseLayer] = field(default_factory=list)
    normalize: bool = False
    max_length: int | None = None
    lowercase: bool = False


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(value, (dict, list)):
        raise CheckpointError(f"{path}: expected a JSON object or list")
    return value


def _pooling_modes(config: dict, where: Path) -> tuple[str, ...]:
    mode = config.get("pooling_mode")
    if mode is None:
        modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key))
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    bad = [m for m in modes if m not in POOLING_MODES]
    if not modes or bad:
        raise CheckpointError(f"{where}: pooling modes {list(modes)} not understood; expected one or more of "
                              f"{', '.join(POOLING_MODES)}")
    return modes


def _dense(folder: Path) -> DenseLayer:
    config = _read_json(folder / "config.json")
    activation = str(config.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]
    if activation not in _ACTIVATIONS:
        raise CheckpointError(f"{folder / 'config.json'}: Dense activation {activation!r} is not supported; "
                              f"expected one of {', '.join(_ACTIVATIONS)}")
    tensors = read_tensors(folder)
    try:
        weight = tensors["linear.weight"]
    except KeyError:
        raise CheckpointError(f"{folder}: no tensor 'linear.weight' in the Dense module's weights") from None
    bias = tensors.get("linear.bias")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return DenseLayer(linear.eval().requires_grad_(False), activation)


def read_sentence_modules(folder: str | os.PathLike[str]) -> SentenceModules:
    """The pooling, Dense, Normalize and length settings of a model folder (see the module docstring); mean
    pooling and no normalisation for a folder without modules.json. Raises CheckpointError naming the file."""
    folder = Path(folder)
    modules = SentenceModules()
    if (folder / "sentence_bert_config.json").is_file():
        config = _read_json(folder / "sentence_bert_config.json")
        modules.max_length = config.get("max_seq_length")
        modules.lowercase = bool(config.get("do_lower_case", False))
    if not (folder / "modules.json").is_file():
        return modules
    for entry in _read_json(folder / "modules.json"):
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1]
        path = folder / entry.get("path", "")
        if kind == "Pooling":
            modules.pooling = _pooling_modes(_read_json(path / "config.json"), path / "config.json")
        elif kind == "Dense":
            modules.dense.append(_dense(path))
        elif kind == "Normalize":
            modules.normalize = True
        elif kind not in ("Transformer", "Normalize"):
            raise CheckpointError(f"{folder / 'modules.json'}: module type {entry.get('type')!r} is not "
                                  f"supported; expected Transformer, Pooling, Dense, Normalize")
    return modules


class SentenceEncoder:
    """An encoder, its tokenizer and the sentence-transformers modules after it: texts -> vectors."""

    def __init__(self, model: Encoder, tokenizer: Tokenizer, modules: SentenceModules | None = None):
        if not isinstance(model, Encoder):
            raise TypeError(f"sentence embeddings need an lmforge Encoder, got {type(model).__name__}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.modules = modules or SentenceModules()
        context = model.config.max_seq_len - model.config.position_offset
        self.max_length = min(self.modules.max_length or context, context)

    @classmethod
    def load(cls, source: str | os.PathLike[str], dtype: torch.dtype | str | None = "float32",
             device: str = "cpu") -> SentenceEncoder:
        """The encoder body, tokenizer and sentence-transformers modules of a folder or packaged name."""
        path = resolve_source(source)
        model = load_model(path, dtype=dtype, device=device, head="none")
        modules = read_sentence_modules(path) if path.is_dir() else SentenceModules()
        for layer in modules.dense:
            layer.linear.to(device=device, dtype=next(model.parameters()).dtype)
        return cls(model, Tokenizer.for_model(path), modules)

    @property
    def dimension(self) -> int:
        return self.modules.dense[-1].linear.out_features if self.modules.dense else \
            self.model.config.d_model * len(self.modules.pooling)

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text.lower() if self.modules.lowercase else text)
        return ids if len(ids) <= self.max_length else ids[: self.max_length - 1] + ids[-1:]

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 32, normalize: bool | None = None,
               progress: bool = False) -> Tensor:
        """Embeddings (N, d) of `texts`, float32 on the CPU, in the input order.

        normalize: None follows the folder (Normalize module); True / False force unit length or not.
        Raises ValueError for an empty list or a bad batch size, TypeError for non-text items.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise ValueError("texts: expected a non-empty list of strings")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        ids = [self._ids(t) for t in texts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = torch.empty(len(ids), self.dimension)
        for start in tqdm(range(0, len(order), batch_size), disable=not progress, unit="batch"):
            rows = order[start:start + batch_size]
            T = len(ids[rows[0]])
            batch = torch.full((len(rows), T), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for r, i in enumerate(rows):
                batch[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1
            batch, mask = batch.to(device), mask.to(device)
            hidden = self.model(batch, attention_mask=mask).last_hidden_state  # (B, T, C)
            vectors = pool(hidden, mask, self.modules.pooling)
            for layer in self.modules.dense:
                vectors = layer(vectors)
            if self.modules.normalize if normalize is None else normalize:
                vectors = F.normalize(vectors, p=2, dim=-1)
            out[rows] = vectors.float().cpu()
        return out


def embed(model: str | os.PathLike[str] | SentenceEncoder, texts: Sequence[str], batch_size: int = 32,
          normalize: bool | None = None, progress: bool = False) -> Tensor:
    """Sentence embeddings (N, d) of `texts` with `model`: a folder, packaged name or `SentenceEncoder`.

    See `SentenceEncoder.encode` for normalize and the errors; the module docstring for what is read.
    """
    encoder = model if isinstance(model, SentenceEncoder) else SentenceEncoder.load(model)
    return encoder.encode(texts, batch_size=batch_size, normalize=normalize, progress=progress)
