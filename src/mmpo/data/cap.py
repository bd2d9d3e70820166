"""Cap each message's characters before tokenizing, at a bound derived from the token limit.

Tokenizing a 50 MB field to keep its first 512 tokens costs gigabytes of memory and minutes; cut
first, memory stays proportional to the limit. The cut keeps enough text for the limit and a
margin: no token covers more characters than the longest entry of the vocabulary (in its raw
form, which is never shorter than the text it stands for in byte-level BPE, SentencePiece and
WordPiece), so ``(limit + margin) x longest`` characters hold at least ``limit + margin`` tokens.
Prompts keep their end (they are truncated from the left), completions and SFT conversations
their start. Only BPE merges right at the cut can differ from tokenizing the whole field, and
those tokens lie in the margin, beyond the limit. (A tokenizer whose normalizer deletes
characters could need more text; chat models' tokenizers do not.)
"""

from __future__ import annotations

from typing import Any

from mmpo.data.formats import Message, PreferenceConversation

MARGIN_TOKENS = 64


def longest_token_chars(tokenizer: Any) -> int:
    """Characters of the longest vocabulary entry, added (special) tokens included."""
    vocab = tokenizer.get_vocab()
    return max([len(token) for token in vocab] + [1])


def char_limit(longest: int, token_limit: int) -> int:
    return (token_limit + MARGIN_TOKENS) * longest


def _keep_start(message: Message, limit: int) -> Message:
    return message if len(message["content"]) <= limit else {**message, "content": message["content"][:limit]}


def _keep_end(message: Message, limit: int) -> Message:
    return message if len(message["content"]) <= limit else {**message, "content": message["content"][-limit:]}


def cap_preference(
    items: list[tuple[str, PreferenceConversation]], tokenizer: Any, max_prompt_length: int, max_completion_length: int
) -> list[tuple[str, PreferenceConversation]]:
    longest = longest_token_chars(tokenizer)
    prompt_chars = char_limit(longest, max_prompt_length)
    completion_chars = char_limit(longest, max_completion_length)
    capped = []
    for row_id, pair in items:
        if any(len(m["content"]) > prompt_chars for m in pair.prompt) or any(
            len(m["content"]) > completion_chars for m in (*pair.chosen, *pair.rejected)
        ):
            pair = PreferenceConversation(
                prompt=[_keep_end(m, prompt_chars) for m in pair.prompt],
                chosen=[_keep_start(m, completion_chars) for m in pair.chosen],
                rejected=[_keep_start(m, completion_chars) for m in pair.rejected],
            )
        capped.append((row_id, pair))
    return capped


def cap_sft(items: list[tuple[str, list[Message]]], tokenizer: Any, max_length: int) -> list[tuple[str, list[Message]]]:
    chars = char_limit(longest_token_chars(tokenizer), max_length)
    return [(row_id, [_keep_start(m, chars) for m in messages]) for row_id, messages in items]
