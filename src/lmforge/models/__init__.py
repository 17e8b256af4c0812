"""Model classes: a causal `Decoder`, a bidirectional `Encoder` and an `EncoderDecoder` (T5), built from a
`ModelConfig`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.blocks import KVCache, ModelOutput
from lmforge.models.decoder import Decoder
from lmforge.models.encoder import Encoder
from lmforge.models.seq2seq import EncoderDecoder

__all__ = ["MODEL_CLASSES", "Decoder", "Encoder", "EncoderDecoder", "KVCache", "ModelOutput", "build_empty_model",
           "build_model"]

MODEL_CLASSES: dict[str, type[nn.Module]] = {"decoder": Decoder, "encoder": Encoder,
                                             "encoder-decoder": EncoderDecoder}


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised `Decoder`, `Encoder` or `EncoderDecoder` for `config.arch`."""
    return MODEL_CLASSES[config.arch](config)


_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_", "zeros_",
                   "ones_", "constant_")


@contextmanager
def _skip_init() -> Iterator[None]:
    """Turn torch.nn.init's fills into no-ops (as transformers' `no_init_weights` does)."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_empty_model(config: ModelConfig) -> nn.Module:
    """The model of `config` with parameters on the meta device: shapes only, no memory, no initialisation.

    For loading (`load_state_dict(..., assign=True)`) and for shape checks. Skipping the initialisation
    matters: the first `normal_` on a meta tensor imports torch._dynamo, which takes seconds.
    """
    with torch.device("meta"), _skip_init():
        return build_model(config)
