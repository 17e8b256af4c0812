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
