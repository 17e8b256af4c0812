"""Model classes: a causal `Decoder` and a bidirectional `Encoder`, built from a `ModelConfig`."""

from __future__ import annotations

from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.blocks import KVCache, ModelOutput
from lmforge.models.decoder import Decoder
from lmforge.models.encoder import Encoder

__all__ = ["Decoder", "Encoder", "KVCache", "ModelOutput", "build_model"]


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised `Decoder` or `Encoder` for `config.arch`."""
    return Decoder(config) if config.arch == "decoder" else Encoder(config)
