"""Shapes of the small Llama-architecture models the project builds from scratch."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


def tiny_llama_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 384,
    max_positions: int = 512,
) -> LlamaConfig:
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


def build_tiny_llama(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **shape) -> LlamaForCausalLM:
    import torch

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer, **shape))
