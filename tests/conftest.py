"""Shared fixtures: a real BPE tokenizer with a chat template and a tiny random Llama on disk.

Plain helpers (data files, model folders) live in ``helpers.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import CORPUS, save_tiny_model, write_prefs  # noqa: E402
from mmpo.world.tokenizer import train_tokenizer  # noqa: E402

# Tiny models run several times faster on one thread than on two contended ones.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CORPUS * 20, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A folder with a tiny random Llama (2 layers, d=32) and the tokenizer, like a Hub checkout."""
    return save_tiny_model(tokenizer, tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture()
def prefs(tmp_path):
    """(train file with 32 pairs, test file with 12 pairs)."""
    return str(write_prefs(tmp_path / "train.jsonl", 32)), str(write_prefs(tmp_path / "test.jsonl", 12, seed=1))
