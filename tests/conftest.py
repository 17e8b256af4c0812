"""Shared fixtures: the real registry-package models and data, located once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.registry import packaged_path

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return packaged_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return packaged_path("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def bbc_dir() -> Path:
    return packaged_path("bbc-news")


@pytest.fixture(scope="session")
def gpt2_tiktoken() -> Path:
    return packaged_path("gpt2-tiktoken")
