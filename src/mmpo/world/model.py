"""Shapes of the small Llama-architecture models the project builds from scratch."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


def tiny_llama_config(tokenizer: PreTrainedTokenizerBase, *, hidden_size: int = 128, num_layers: int = 4,
                      num_heads: int = 4, intermediate_size: int = 384, max_positions: int = 512) -> LlamaConfig:
    """A few-hundred-thousand to few-million parameter Llama sized for 2 CPU cores."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attention_dropout=0.0,
    )


def smollm2_135m_config(vocab_size: int = 49152) -> LlamaConfig:
    """SmolLM2-135M's shape (random weights) for benchmarks."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
    )


def build_tiny_llama(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **shape) -> LlamaForCausalLM:
    import torch

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer, **shape))
