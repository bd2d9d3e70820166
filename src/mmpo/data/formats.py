"""Turn a user's dataset row into chat messages.

Preference rows become a :class:`PreferenceConversation` (prompt messages plus the chosen and
rejected *completion* turns); SFT rows become one message list. Every accepted layout is listed in
``PREFERENCE_LAYOUTS`` / ``SFT_LAYOUTS`` so that an unrecognised row gets an error that shows what
was found and what would have worked.

Messages are plain ``{"role": str, "content": str, ...}`` dicts, as ``apply_chat_template`` takes.
Keys whose value is ``None`` are dropped: Arrow/Parquet files fill a missing struct field with
``None`` and some chat templates treat a present-but-None key (``name``, ``tool_calls``) as set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]

PREFERENCE_LAYOUTS = (
    "explicit prompt: 'prompt', 'chosen', 'rejected' as strings",
    "conversational: 'prompt' as a message list, 'chosen'/'rejected' as message lists",
    "implicit prompt: only 'chosen'/'rejected', each a whole conversation sharing the prompt turns",
    "'prompt' string plus 'chosen'/'rejected' whole conversations (ultrafeedback_binarized, orca_dpo_pairs)",
    "any of these with an optional 'system' string column",
)
SFT_LAYOUTS = (
    "'messages' as a message list",
    "'prompt' + 'completion' (strings or message lists)",
    "'instruction' (+ optional 'input') + 'output' strings",
    "any of these with an optional 'system' string column",
)


class DataError(ValueError):
    """A dataset, file or row cannot be used; the message names it (and the row and column)."""

    #: Whether ``on_bad_rows="skip"`` would skip what failed (one row or line) instead of stopping.
    skippable = False


class RowError(DataError):
    """One row (or line of a file) cannot be used; ``on_bad_rows="skip"`` skips and counts such rows."""

    skippable = True


@dataclass(frozen=True)
class PreferenceConversation:
    """One preference pair: the shared prompt and the two competing completions.

    ``chosen`` and ``rejected`` hold the completion turns only (normally one assistant message);
    ``prompt + chosen`` is the whole chosen conversation.
    """

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


def row_name(row: Mapping[str, Any], index: int | str) -> str:
    """How errors refer to a row: its stable id when it has one, else its position."""
    row_id = row.get("id") if isinstance(row, Mapping) else None
    return f"row {row_id!r} (#{index})" if isinstance(row_id, str) else f"row #{index}"


def normalize_preference_row(row: Mapping[str, Any], index: int | str) -> PreferenceConversation:
    """Return the prompt/chosen/rejected messages of a preference ``row`` (see ``PREFERENCE_LAYOUTS``).

    ``index`` is the row's position, used (with the row's ``id`` if present) in error messages.
    When ``chosen``/``rejected`` are whole conversations the prompt is their shared message prefix,
    and a ``prompt`` string next to them must equal the last user turn of that prefix.
    """
    where = row_name(row, index)
    _require_mapping(row, where)
    missing = [key for key in ("chosen", "rejected") if key not in row]
    if missing:
        raise RowError(
            f"{where}: missing column(s) {missing} for a preference pair; "
            f"found columns {sorted(row)}. Accepted layouts: " + "; ".join(PREFERENCE_LAYOUTS)
        )
    chosen = _as_messages(row["chosen"], where, "chosen", default_role="assistant")
    rejected = _as_messages(row["rejected"], where, "rejected", default_role="assistant")
    prompt_value = row.get("prompt")

    if isinstance(prompt_value, list):
        prompt = _as_messages(prompt_value, where, "prompt", default_role="user")
        # Some datasets repeat the prompt turns at the start of chosen/rejected: drop that copy.
        if _starts_with(chosen, prompt) and _starts_with(rejected, prompt):
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    else:
        prefix = _shared_prefix(chosen, rejected)
        # The prompt never includes the final turn of either side (that is the completion).
        prefix = prefix[: min(len(prefix), len(chosen) - 1, len(rejected) - 1)] if prefix else prefix
        if prefix:
            prompt, chosen, rejected = prefix, chosen[len(prefix) :], rejected[len(prefix) :]
            if prompt_value is not None:
                _check_prompt_matches(prompt_value, prompt, where)
        elif prompt_value is None:
            raise RowError(
                f"{where}: no 'prompt' column and 'chosen'/'rejected' share no leading turns, so the "
                f"prompt cannot be inferred; found columns {sorted(row)}. Accepted layouts: "
                + "; ".join(PREFERENCE_LAYOUTS)
            )
        else:
            prompt = [{"role": "user", "content": _as_text(prompt_value, where, "prompt")}]

    prompt = _with_system(prompt, row.get("system"), where)
    _check_prompt(prompt, where)
    _check_completion(chosen, where, "chosen")
    _check_completion(rejected, where, "rejected")
    if chosen == rejected:
        raise RowError(
            f"{where}: 'chosen' and 'rejected' are identical; a preference pair needs two different completions"
        )
    return PreferenceConversation(prompt=prompt, chosen=chosen, rejected=rejected)


def normalize_sft_row(row: Mapping[str, Any], index: int | str) -> list[Message]:
    """Return the whole conversation of an SFT ``row`` (see ``SFT_LAYOUTS``); it ends with an assistant turn."""
    where = row_name(row, index)
    _require_mapping(row, where)
    if "messages" in row:
        messages = _as_messages(row["messages"], where, "messages", default_role=None)
        column = "messages"
    elif "prompt" in row and "completion" in row:
        prompt = _as_messages(row["prompt"], where, "prompt", default_role="user")
        completion = _as_messages(row["completion"], where, "completion", default_role="assistant")
        _check_completion(completion, where, "completion")
        messages, column = prompt + completion, "completion"
    elif "instruction" in row and "output" in row:
        instruction = _as_text(row["instruction"], where, "instruction")
        extra = row.get("input")
        if extra is not None and _as_text(extra, where, "input", allow_empty=True).strip():
            instruction = f"{instruction}\n\n{extra}"
        output = _as_text(row["output"], where, "output")
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]
        column = "output"
    else:
        raise RowError(
            f"{where}: no SFT columns recognised; found columns {sorted(row)}. "
            "Accepted layouts: " + "; ".join(SFT_LAYOUTS)
        )
    messages = _with_system(messages, row.get("system"), where)
    if not messages or messages[-1]["role"] != "assistant":
        raise RowError(f"{where}: column {column!r} must end with an assistant message (nothing to learn otherwise)")
    for message in messages:
        if message["role"] == "assistant" and not message["content"].strip():
            raise RowError(f"{where}: column {column!r} has an empty assistant message")
    return messages


# --- helpers ---------------------------------------------------------------------------------


def _require_mapping(row: Any, where: str) -> None:
    if not isinstance(row, Mapping):
        raise RowError(f"{where}: expected a dict of columns, got {type(row).__name__}")


def _as_text(value: Any, where: str, column: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RowError(f"{where}: column {column!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(f"{where}: column {column!r} is empty")
    _check_unicode(value, f"{where}: column {column!r}")
    return value


def _check_unicode(text: str, what: str) -> None:
    """Lone surrogates (e.g. a JSON ``\\ud800`` escape) are legal in Python strings but not text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RowError(
            f"{what} is not valid Unicode: lone surrogate {text[error.start]!r} at character {error.start}"
        ) from None


def _as_messages(value: Any, where: str, column: str, *, default_role: str | None) -> list[Message]:
    """A string becomes one message with ``default_role``; a list is validated message by message."""
    if isinstance(value, str):
        if default_role is None:
            raise RowError(f"{where}: column {column!r} must be a list of messages, got a string")
        return [{"role": default_role, "content": _as_text(value, where, column)}]
    if not isinstance(value, list | tuple):
        raise RowError(
            f"{where}: column {column!r} must be a string or a list of {{role, content}} messages, "
            f"got {type(value).__name__}"
        )
    if not value:
        raise RowError(f"{where}: column {column!r} is an empty message list")
    messages = []
    for position, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise RowError(f"{where}: column {column!r} message {position} is a {type(message).__name__}, not a dict")
        message = {key: item for key, item in message.items() if item is not None}
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise RowError(f"{where}: column {column!r} message {position} has no 'role' (keys: {sorted(message)})")
        if not isinstance(message.get("content"), str):
            raise RowError(
                f"{where}: column {column!r} message {position} has no string 'content' (keys: {sorted(message)})"
            )
        _check_unicode(message["content"], f"{where}: column {column!r} message {position}")
        messages.append(message)
    return messages


def _starts_with(messages: list[Message], prefix: list[Message]) -> bool:
    return len(messages) > len(prefix) and messages[: len(prefix)] == prefix


def _shared_prefix(a: list[Message], b: list[Message]) -> list[Message]:
    length = 0
    while length < min(len(a), len(b)) and a[length] == b[length]:
        length += 1
    return a[:length]


def _check_prompt_matches(prompt_value: Any, prompt: list[Message], where: str) -> None:
    """A ``prompt`` string beside whole conversations must be the prompt they repeat."""
    text = _as_text(prompt_value, where, "prompt")
    user_turns = [message["content"] for message in prompt if message["role"] == "user"]
    if not user_turns or user_turns[-1].strip() != text.strip():
        raise RowError(
            f"{where}: column 'prompt' does not match the last user turn shared by 'chosen' and "
            f"'rejected' ({text[:60]!r} vs {(user_turns[-1] if user_turns else '')[:60]!r})"
        )


def _with_system(messages: list[Message], system: Any, where: str) -> list[Message]:
    if system is None or (isinstance(system, str) and not system.strip()):
        return messages
    text = _as_text(system, where, "system")
    if messages and messages[0]["role"] == "system":
        if messages[0]["content"] != text:
            raise RowError(f"{where}: column 'system' differs from the conversation's own system message")
        return messages
    return [{"role": "system", "content": text}, *messages]


def _check_prompt(prompt: list[Message], where: str) -> None:
    if not any(message["content"].strip() for message in prompt):
        raise RowError(f"{where}: column 'prompt' is empty")


def _check_completion(completion: list[Message], where: str, column: str) -> None:
    if not completion:
        raise RowError(f"{where}: column {column!r} has no completion after the prompt turns")
    if completion[-1]["role"] != "assistant":
        raise RowError(
            f"{where}: column {column!r} must end with an assistant message, "
            f"but its last message has role {completion[-1]['role']!r}"
        )
    if not completion[-1]["content"].strip():
        raise RowError(f"{where}: column {column!r} has an empty assistant completion")
    stray = [message["role"] for message in completion if message["role"] in ("user", "system")]
    if stray:
        raise RowError(
            f"{where}: column {column!r} has a {stray[0]!r} message in its completion; completions hold "
            "assistant (or tool) turns only, so every earlier turn must be part of the prompt "
            "(shared by 'chosen' and 'rejected')"
        )
