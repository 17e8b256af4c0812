"""Text generation: settings and sampling (`settings`), the decode loop over the model's one forward
(`decode`), and text in / text out over models or names (`api`)."""

from lmforge.generation.api import DEFAULT_MAX_NEW_TOKENS, Piece, generate, stream, stream_rows
from lmforge.generation.decode import Decoding, Seq2SeqDecoding, generate_ids
from lmforge.generation.settings import (
    GenerationSettings,
    default_dtype,
    min_p_filter,
    preferred_dtype,
    process_logits,
    resolve_settings,
    sample,
    top_k_filter,
    top_p_filter,
)

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "Decoding", "GenerationSettings", "Piece", "Seq2SeqDecoding", "default_dtype",
           "generate", "generate_ids", "min_p_filter", "preferred_dtype", "process_logits", "resolve_settings",
           "sample", "stream", "stream_rows", "top_k_filter", "top_p_filter"]
