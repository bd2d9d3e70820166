"""Test data and model folders shared by the test packages (imported as ``helpers``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from mmpo.world.model import build_tiny_llama

#: Text the shared tokenizer is trained on.
CORPUS = [
    "Repeat the word banop please.",
    "What is the first letter of zorbat? It is z.",
    "The quick brown fox jumps over the lazy dog.",
    "I am not sure about that, sorry. Let me think about it.",
    "Which word is longer, mipo or tuvalak? tuvalak",
    "Hello there! How are you today? 0123456789",
]
WORDS = ["banop", "zorbat", "mipo", "tuvalak", "fox", "dog", "quick", "lazy", "brown", "hello"]
#: Sizes of a world small enough to build in a test (``mmpo.world.tasks.WorldSizes`` fields).
SMALL_WORLD = dict(
    train_words=200,
    heldout_words=250,
    facts=20,
    sft_train=400,
    sft_val=50,
    prefs_train=300,
    prefs_test=60,
    prompts_eval=50,
    mc_copy=40,
)
TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


def write_prefs(path: Path, count: int, seed: int = 0) -> Path:
    """Preference pairs in the explicit prompt/chosen/rejected layout (+ world-style metadata)."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            word = rng.choice(WORDS) + rng.choice(WORDS)
            row = {
                "prompt": f"Repeat the word {word}.",
                "chosen": word,
                "answer": word,
                "task": "repeat",
                "rejected": rng.choice(["I am not sure about that, sorry.", f"{word} {word} {word}"]),
            }
            handle.write(json.dumps(row) + "\n")
    return path


def write_chat(path: Path, count: int) -> Path:
    """SFT conversations in the ``messages`` layout."""
    with open(path, "w") as handle:
        for i in range(count):
            word = WORDS[i % len(WORDS)] + WORDS[(i * 3) % len(WORDS)]
            messages = [
                {"role": "user", "content": f"Repeat the word {word}."},
                {"role": "assistant", "content": word},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def save_tiny_model(tokenizer, path: Path, *, seed: int = 0, **config_overrides) -> Path:
    """A folder holding a tiny random Llama (2 layers, d=32) and ``tokenizer``, like a Hub checkout."""
    model = build_tiny_llama(tokenizer, seed=seed, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    for key, value in config_overrides.items():
        setattr(model.config, key, value)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
