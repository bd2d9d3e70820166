"""Shared fixtures: a real BPE tokenizer with a chat template and a tiny random Llama on disk."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from mmpo.world.model import build_tiny_llama
from mmpo.world.tokenizer import train_tokenizer

CORPUS = [
    "Repeat the word banop please.",
    "What is the first letter of zorbat? It is z.",
    "The quick brown fox jumps over the lazy dog.",
    "I am not sure about that, sorry. Let me think about it.",
    "Which word is longer, mipo or tuvalak? tuvalak",
    "Hello there! How are you today? 0123456789",
]


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CORPUS * 20, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A folder with a tiny random Llama (2 layers, d=32) and the tokenizer, like a Hub checkout."""
    path = tmp_path_factory.mktemp("tiny_model")
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
