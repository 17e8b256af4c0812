"""Loading and saving models: one entry point for Hugging Face folders, GGUF files and packaged model names.

    model = load_model("smollm2-135m-instruct")  # a name from lmforge.registry ("default" works too)
    model = load_model("path/to/hf-folder", head="classify", n_labels=5)  # encoder body + a new classifier
    save_model(model, "out/folder")  # config.json + model.safetensors, loads in transformers
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.io import hf
from lmforge.io.hf import CheckpointError
from lmforge.models import MODEL_CLASSES, build_empty_model
from lmforge.models.blocks import init_weights
from lmforge.models.linear import install, is_quantized, quantize_state, targets
from lmforge.models.linear import quantize as quantize_model
from lmforge.registry import ALIASES, packaged_path

__all__ = ["MODEL_NAMES", "CheckpointError", "build_loaded", "describe_checkpoint", "load_config",
           "load_model", "resolve_dtype", "resolve_source", "save_model"]

# Packaged model names (see lmforge.registry) accepted wherever a model source is.
MODEL_NAMES = ("smollm2-135m-instruct", "all-minilm-l6-v2")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def _accepted() -> str:
    aliases = sorted(a for a, target in ALIASES.items() if target in MODEL_NAMES)
    return (f"a Hugging Face model folder (config.json + model.safetensors), a .gguf file, or a packaged "
            f"model name: {', '.join(MODEL_NAMES)} (aliases: {', '.join(aliases)})")


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """The folder or .gguf file that `source` names: an existing path, else a packaged model name.

    Raises ValueError listing what is accepted for anything else, and FileNotFoundError (with the pip command)
    when a packaged model's package is not installed.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"model source must be a path or a name, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; expected {_accepted()}")
        return path
    key = ALIASES.get(str(source).lower(), str(source).lower())
    if key in MODEL_NAMES:
        return packaged_path(key)
    raise ValueError(f"unknown model {str(source)!r} (no such file or folder, not a packaged name); "
                     f"expected {_accepted()}")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch floating dtype from a dtype or a name ("float32", "bf16", ...); None stays None."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"unsupported dtype {dtype!r}; expected a floating torch.dtype or one of "
                     f"{', '.join(DTYPES)}")


def _read(path: Path, head: str | None, n_labels: int | None,
          weights: str | None = None) -> tuple[ModelConfig, dict[str, Tensor | nn.Module]]:
    """(config, state) of a source; `weights`: None (float), "int8" / "int4" (see `load_model`), or "gguf"
    (the GGUF file's quantized blocks as they are)."""
    if path.suffix.lower() == ".gguf":
        if head not in (None, "lm") or n_labels is not None:
            raise ValueError(f"{path}: a GGUF decoder only has its language-model head; got head={head!r}, "
                             f"n_labels={n_labels!r}")
        from lmforge.io.gguf import load_gguf  # the gguf package is only needed for .gguf sources

        return load_gguf(path, weights=weights)
    if weights == "gguf":
        raise ValueError(f"{path}: keep_quantized applies to GGUF files (their Q4_0/Q4_1/Q8_0 blocks); for a "
                         f"Hugging Face folder use quantize='int8' or 'int4'")
    config, state = hf.read_checkpoint(path, head=head, n_labels=n_labels)
    if weights is not None:
        quantize_state(state, targets(build_empty_model(config), weights), weights)
    return config, state


def load_model(source: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None,
               device: torch.device | str = "cpu", head: str | None = None, n_labels: int | None = None,
               seed: int = 0, quantize: str | None = None, keep_quantized: bool = False) -> nn.Module:
    """A `Decoder`, `Encoder` or `EncoderDecoder` (T5) in eval mode with the weights of `source` (see
    `resolve_source`).

    dtype: None keeps the dtype most of the stored weights have (dequantized GGUF weights: what the importer
        gives); otherwise every weight is cast to it. With quantized weights, the dtype of the activations.
    head / n_labels (encoders): replace the checkpoint's head, e.g. a BertModel body with a new classifier of
        n_labels outputs for fine-tuning; the new head's weights are freshly initialised from `seed`, so
        loading twice gives the same model (the global random state is neither used nor changed).
    quantize: "int8" or "int4" (or "packed": oneDNN's layout): the weights of every linear in that format
        (`lmforge.models.linear`), converted tensor by tensor while loading (for GGUF files, once, into the
        cache), so the float model is never built.
    keep_quantized (GGUF only): Q4_0 / Q4_1 / Q8_0 weights stay in their blocks and are computed with as such.
    Raises ValueError (CheckpointError for file problems) naming the file, field or tensor at fault.
    """
    if quantize is not None and keep_quantized:
        raise ValueError("give quantize or keep_quantized, not both")
    if quantize is not None:
        targets(build_empty_model(ModelConfig()), quantize)  # an unknown format fails before any loading
    path = resolve_source(source)
    weights = "gguf" if keep_quantized else None if quantize == "packed" else quantize
    config, state = _read(path, head, n_labels, weights)
    model = build_loaded(config, state, dtype=dtype, device=device, where=str(path), seed=seed)
    return quantize_model(model, "packed") if quantize == "packed" else model  # packed for the final dtype


def build_loaded(config: ModelConfig, state: dict[str, Tensor], *, dtype: torch.dtype | str | None = None,
                 device: torch.device | str = "cpu", where: str = "state dict", seed: int = 0) -> nn.Module:
    """Build the model of `config` around lmforge-named tensors without a throwaway random initialisation.

    A value of `state` may also be a module that keeps a weight quantized (`read_gguf(keep_quantized=True)`):
    it replaces the linear whose weight it names (and, with tied embeddings, serves the token embedding too).
    Tensors missing from `state` are allowed only inside a head (mlm_head, cls_head) and are initialised
    fresh from `seed` (on the CPU, so the same on every device); tied output weights may be absent. Raises
    CheckpointError for unknown names, wrong shapes or missing tensors.
    """
    modules = {name: m for name, m in state.items() if isinstance(m, nn.Module)}
    state = {name: t for name, t in state.items() if name not in modules}
    dtype = resolve_dtype(dtype)
    if dtype is None:
        sizes: Counter[torch.dtype] = Counter()
        for t in state.values():
            if t.is_floating_point():
                sizes[t.dtype] += t.numel()
        dtype = sizes.most_common(1)[0][0] if sizes and not modules else torch.float32
    model = build_empty_model(config)
    expected = model.state_dict()
    tied = set()
    if config.tie_embeddings:
        tied = {"mlm_head.decoder.weight"} if config.arch == "encoder" else {"lm_head.weight"}
    unexpected = sorted((set(state) | set(modules)) - set(expected))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensors {unexpected[:5]} for a {config.family} "
                              f"{config.arch}")
    shapes = {**{n: t.shape for n, t in state.items()},
              **{n: torch.Size((m.out_features, m.in_features)) for n, m in modules.items()}}
    for name, shape in shapes.items():
        if shape != expected[name].shape:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(shape)}, expected "
                                  f"{tuple(expected[name].shape)}")
    missing = [n for n in expected if n not in shapes and n not in tied]
    not_head = [n for n in missing if not n.startswith(("mlm_head.", "cls_head."))]
    if not_head:
        raise CheckpointError(f"{where}: missing tensors {not_head[:5]} for a {config.family} {config.arch}")
    state = {name: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
             for name, t in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module_name in sorted({n.rsplit(".", 1)[0] for n in missing}):
            module = model.get_submodule(module_name)
            module.to_empty(device="cpu")
            init_weights(module)
            module.to(device)
    for name, module in modules.items():
        owner = name.removesuffix(".weight")
        if f"{owner}.bias" in state:
            module.bias = model.get_submodule(owner).bias.detach()
        install(model, owner, module)
    if config.tie_embeddings and "embed_tokens.weight" not in modules:  # assign=True replaced one side only
        if config.arch == "encoder":
            if model.mlm_head is not None:
                model.mlm_head.decoder.weight = model.embed_tokens.weight
        elif model.lm_head is not None:
            model.lm_head.weight = model.embed_tokens.weight
    return model.to(device=device, dtype=dtype).eval()


def load_config(source: str | os.PathLike[str]) -> ModelConfig:
    """The `ModelConfig` of a model source (HF folder, .gguf file or packaged name), without the weights."""
    path = resolve_source(source)
    if path.suffix.lower() == ".gguf":
        from lmforge.io.gguf import read_gguf_config  # the gguf package is only needed for .gguf sources

        return read_gguf_config(path)
    return hf.read_config(path)


def save_model(model: nn.Module, folder: str | os.PathLike[str], *,
               max_shard_size: int | str = "5GB") -> list[Path]:
    """Write `model` as a Hugging Face folder (config.json + safetensors, sharded above max_shard_size).

    The folder loads in transformers' Auto classes for its architecture. Atomic: a kill mid-write leaves the
    previous folder intact. Returns the written paths. Raises TypeError for a model that is not an lmforge
    Decoder/Encoder/EncoderDecoder and ValueError for a config its family's Hugging Face class cannot express.
    """
    if not isinstance(model, tuple(MODEL_CLASSES.values())):
        raise TypeError(f"save_model needs an lmforge Decoder or Encoder (or an EncoderDecoder), got "
                        f"{type(model).__name__}")
    if is_quantized(model):
        raise ValueError("save_model writes float weights; this model holds quantized ones (int8/int4/GGUF "
                         "blocks): save the model it was quantized from")
    return hf.write_checkpoint(model.config, model.state_dict(), Path(folder), max_shard_size=max_shard_size)


def _gguf_types(path: Path) -> Counter[str]:
    from gguf import GGUFReader

    return Counter(t.tensor_type.name for t in GGUFReader(path).tensors)


def describe_checkpoint(source: str | os.PathLike[str]) -> dict[str, Any]:
    """What `lmforge info` prints: format, architecture (the transformers class it loads as), sizes,
    parameter count (lmforge's model, tied weights once), loaded and stored dtypes, and files with sizes."""
    path = resolve_source(source)
    model = load_model(path)
    config: ModelConfig = model.config
    if path.suffix.lower() == ".gguf":
        fmt, files, stored = "gguf", [path], _gguf_types(path)
    elif (run := hf.training_run(path)) is not None:
        files = [run / hf.CONFIG_FILE, *((path / hf.TRAINING_WEIGHTS,) if (path / hf.TRAINING_WEIGHTS).is_file()
                                         else sorted(p for p in path.iterdir() if p.name != "trainer.pt"))]
        fmt = "lmforge-training-checkpoint"
        stored = Counter(str(t.dtype).removeprefix("torch.") for t in model.state_dict().values())
    else:
        files = [path / hf.CONFIG_FILE, *hf.weight_files(path)]
        fmt = "hf-safetensors" if files[-1].suffix == ".safetensors" else "hf-pytorch-bin"
        stored = hf.stored_dtypes(path)
    return {
        "source": str(path), "format": fmt, "family": config.family,
        "architecture": hf.WRITE_ARCHITECTURE[config.family, config.head],
        "arch": config.arch, "head": config.head,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "stored_dtypes": dict(stored),
        "context_length": config.max_seq_len - config.position_offset, "n_layer": config.n_layer,
        "n_decoder_layer": config.n_decoder_layers if config.arch == "encoder-decoder" else None,
        "d_model": config.d_model, "n_head": config.n_head, "n_kv_head": config.n_kv_head,
        "vocab_size": config.vocab_size, "files": [(str(f), f.stat().st_size) for f in files],
    }
