"""Shared fixtures: a real BPE tokenizer with a chat template and a tiny random Llama on disk."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Tiny models run several times faster on one thread than on two contended ones.
torch.set_num_threads(1)

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


WORDS = ["banop", "zorbat", "mipo", "tuvalak", "fox", "dog", "quick", "lazy", "brown", "hello"]


def write_prefs(path: Path, count: int, seed: int = 0) -> Path:
    """Preference pairs in the explicit prompt/chosen/rejected layout (+ world-style metadata)."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            word = rng.choice(WORDS) + rng.choice(WORDS)
            row = {"prompt": f"Repeat the word {word}.", "chosen": word, "answer": word, "task": "repeat",
                   "rejected": rng.choice(["I am not sure about that, sorry.", f"{word} {word} {word}"])}
            handle.write(json.dumps(row) + "\n")
    return path


@pytest.fixture()
def prefs(tmp_path):
    """(train file with 32 pairs, test file with 12 pairs)."""
    return str(write_prefs(tmp_path / "train.jsonl", 32)), str(write_prefs(tmp_path / "test.jsonl", 12, seed=1))
