"""Shared fixtures: the real registry-package models and data, located once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.registry import packaged_path

torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (a second one only adds synchronisation on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return packaged_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
    """transformers' own SmolLM2-135M, loaded from the same GGUF in fp32: the reference (seconds to load, once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return packaged_path("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def bbc_dir() -> Path:
    return packaged_path("bbc-news")


@pytest.fixture(scope="session")
def gpt2_tiktoken() -> Path:
    return packaged_path("gpt2-tiktoken")


@pytest.fixture(scope="session")
def cli_fixtures(tmp_path_factory):
    """Tiny decoder and encoder folders (random weights, a letter-level WordPiece vocabulary), a corpus and a
    labelled folder."""
    import random
    import string

    from lmforge.config import ModelConfig
    from lmforge.io import save_model
    from lmforge.models import build_model

    root = tmp_path_factory.mktemp("cli")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *("##" + c for c in string.ascii_lowercase)]
    for name in ("tiny-gpt2", "tiny-bert"):
        torch.manual_seed(0)
        save_model(build_model(ModelConfig.from_name(name)), root / name)
        (root / name / "vocab.txt").write_text("\n".join(vocab) + "\n")
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away"]
    (root / "corpus").mkdir()
    for i in range(6):
        (root / "corpus" / f"{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(80)))
    for label, label_words in (("animals", ["cat", "dog", "cow"]), ("places", ["home", "park", "town"])):
        (root / "labelled" / label).mkdir(parents=True)
        (root / "other" / label.upper()).mkdir(parents=True)
        for i in range(10):
            text = " ".join(rng.choice(label_words) for _ in range(8))
            (root / "labelled" / label / f"{i}.txt").write_text(text)
            (root / "other" / label.upper() / f"{i}.txt").write_text("x")
    return root


@pytest.fixture
def run_cli(capsys):
    """`run_cli(*argv)`: `lmforge ARGV...` in this process, returning (exit code, stdout, stderr)."""
    from lmforge.cli import main

    def run(*argv) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse: bad options, --help, --version
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    return run
