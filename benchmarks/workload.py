"""The benchmarks' workload: a tokenizer in which every word is one token, synthetic preference
pairs shaped like UltraFeedback, and random-weight models of small and of real models' shapes.

Pairs are synthetic, shaped like UltraFeedback (long prompts, completions of a few hundred
tokens): prompt, chosen and rejected lengths are drawn independently and uniformly from
``prompt_range`` (default 100-400 tokens) and ``completion_range`` (default 100-300), as
made-up words that are one token each, wrapped in the chat template (which adds a few tokens).
"""

from __future__ import annotations

import random
from pathlib import Path

SMOLLM2_135M = "HuggingFaceTB/SmolLM2-135M-Instruct"


def bench_words() -> list[str]:
    syllables = ["ka", "to", "mi", "ra", "ne", "lu", "so", "vi", "da", "pe", "ro", "zu"]
    return sorted({a + b + c for a in syllables for b in syllables for c in syllables[:4]})[:300]


def bench_tokenizer():
    """A real byte-level BPE tokenizer (with chat template) in which every bench word is one token."""
    from mmpo.world.tokenizer import train_tokenizer

    words, rng = bench_words(), random.Random(0)
    tokenizer = train_tokenizer([" ".join(rng.choice(words) for _ in range(50)) for _ in range(400)], vocab_size=1200)
    assert all(len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1 for w in words)
    return tokenizer


def synthetic_pairs(count: int, seed: int, prompt_range=(100, 400), completion_range=(100, 300)) -> list[dict]:
    """Conversational preference rows with UltraFeedback-like lengths (module docstring)."""
    words, rng = bench_words(), random.Random(seed)

    def text(low_high):
        return "".join(" " + rng.choice(words) for _ in range(rng.randint(*low_high)))

    return [
        {
            "id": f"bench:{i}",
            "prompt": [{"role": "user", "content": text(prompt_range)}],
            "chosen": [{"role": "assistant", "content": text(completion_range)}],
            "rejected": [{"role": "assistant", "content": text(completion_range)}],
        }
        for i in range(count)
    ]


#: The benchmark's model sizes: random weights of a real model's shape (the tabled shapes of
#: ``mmpo.study.estimate``), or small Llamas for CPU runs and dry runs.
SHAPES = {
    "135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "1b": "meta-llama/Llama-3.2-1B-Instruct",
}
SMALL = {  # ~5M and ~0.1M parameters
    "tiny": dict(hidden_size=256, num_layers=6, num_heads=4, intermediate_size=768, max_positions=2048),
    "micro": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_positions=512),
}
SIZES = (*SMALL, *SHAPES)


def model_config(size: str, tokenizer):
    from mmpo.study.estimate import known_model_config
    from mmpo.world.model import tiny_llama_config

    if size in SMALL:
        return tiny_llama_config(tokenizer, **SMALL[size])
    if size in SHAPES:  # the real model's shape and vocabulary size, random weights
        config = known_model_config(SHAPES[size], max_position_embeddings=8192)
        config.pad_token_id, config.eos_token_id, config.bos_token_id = (
            tokenizer.pad_token_id,
            tokenizer.eos_token_id,
            None,
        )
        return config
    raise ValueError(f"unknown model size {size!r} ({', '.join(SIZES)})")


def save_model(size: str, tokenizer, path: Path, seed: int = 0, device: str = "cpu") -> int:
    """A random-weight model of ``size`` and the tokenizer in ``path`` (float32); its parameter count.

    ``device``: where the weights are drawn (a GPU draws a 1B model's in a fraction of the CPU's time)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(model_config(size, tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":  # the children measure their own memory; leave them the card
        torch.cuda.empty_cache()
    return params
