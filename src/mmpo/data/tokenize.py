"""Render rows with the chat template, tokenize, split prompt/completion, truncate, count.

The invariant every preference example keeps: ``prompt_ids + chosen_ids`` is exactly the token
sequence of the whole rendered chosen conversation (likewise rejected). Tokenizing the prompt and
the completion separately breaks this whenever BPE merges characters across the boundary (e.g.
a generation prompt ending in "ASSISTANT: " followed by "Hi" tokenizes as "Ġ" alone but as "ĠHi"
in the whole text), so both are cut from the whole conversation's tokens: the prompt is the longest
common prefix of the rendered prompt's tokens and both conversations' tokens. Rows where that
moved tokens into the completions are counted (``DataReport.boundary_adjusted``).

Rendered text is tokenized with ``add_special_tokens=False`` because chat templates usually write
the BOS themselves; when the tokenizer normally adds a BOS and the template did not, one is
prepended, so a sequence never starts with zero or two BOS tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_all_start_methods, get_context
from typing import Any

from mmpo.data.cap import cap_preference, cap_sft
from mmpo.data.formats import (
    DataError,
    Message,
    PreferenceConversation,
    RowError,
    normalize_preference_row,
    normalize_sft_row,
)

IGNORE_INDEX = -100
CHUNK_SIZE = 512  # rows rendered and batch-tokenized together
MAX_EXAMPLE_IDS = 5  # row ids kept per drop reason, to show the user

# Drop reasons.
INVALID_ROW = "invalid_row"
EMPTY_PROMPT = "empty_prompt"
EMPTY_COMPLETION = "empty_completion"
IDENTICAL_AFTER_TRUNCATION = "identical_after_truncation"
NO_ASSISTANT_TOKENS = "no_assistant_tokens"


@dataclass
class DataReport:
    """What happened to the rows on their way to examples; nothing is dropped without a count here."""

    kind: str  # "preference" or "sft"
    rows_in: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_ids: dict[str, list[str]] = field(default_factory=dict)  # up to 5 row ids per reason
    errors: list[str] = field(default_factory=list)  # first messages of rows skipped as invalid
    truncated: dict[str, int] = field(default_factory=dict)  # "prompt"/"chosen"/"rejected" or "sequence"
    boundary_adjusted: int = 0  # rows whose prompt/completion split moved to a token boundary
    lengths: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {"mean", "max"} over kept

    def drop(self, reason: str, row_id: str, error: str | None = None) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        examples = self.dropped_ids.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLE_IDS:
            examples.append(row_id)
        if error is not None and len(self.errors) < MAX_EXAMPLE_IDS:
            self.errors.append(error)

    def count_truncation(self, name: str) -> None:
        self.truncated[name] = self.truncated.get(name, 0) + 1

    def summary(self) -> str:
        """One readable paragraph."""
        parts = [f"{self.kind} data: {self.rows_in} rows in, {self.kept} examples kept"]
        if self.dropped:
            parts.append(
                "dropped "
                + ", ".join(
                    f"{count} {reason} (e.g. {', '.join(self.dropped_ids[reason])})"
                    for reason, count in sorted(self.dropped.items())
                )
            )
        if self.truncated:
            parts.append("truncated " + ", ".join(f"{count} {name}" for name, count in sorted(self.truncated.items())))
        if self.boundary_adjusted:
            parts.append(f"{self.boundary_adjusted} prompt/completion splits moved to a token boundary")
        if self.lengths:
            parts.append(
                "tokens "
                + ", ".join(f"{name} mean {s['mean']:.1f} max {s['max']:.0f}" for name, s in self.lengths.items())
            )
        text = "; ".join(parts) + "."
        if self.errors:
            text += " First invalid row: " + self.errors[0]
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- chat template --------------------------------------------------------------------------


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"tokenizer {_tokenizer_name(tokenizer)!r} has no chat template, so conversations cannot be "
            "rendered. Use a chat-tuned model (or its tokenizer), or give a template file with --chat-template-path."
        )


_PROBE_ANSWER = "mmpo probe answer"


def require_closed_assistant_turn(tokenizer: Any) -> None:
    """The template must write something (an end-of-turn or EOS token) after the assistant's text:
    completions are cut from the rendered text, and without it they would not end with a stop token,
    so the trained model would never learn to stop."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_ANSWER}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # templates with their own rules (e.g. a required system turn) are checked per row
        return
    if _PROBE_ANSWER in text and not text.rsplit(_PROBE_ANSWER, 1)[1].strip():
        raise DataError(
            f"the chat template of tokenizer {_tokenizer_name(tokenizer)!r} does not end the assistant turn "
            "(nothing follows the assistant's text), so completions would not end with an end-of-turn token and "
            "the model would never learn to stop; give a template that closes the turn with --chat-template-path"
        )


def _render(tokenizer: Any, messages: list[Message], *, generation_prompt: bool, row_id: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # jinja raises its own errors, e.g. "roles must alternate"
        raise RowError(f"row {row_id!r}: the chat template failed on this conversation: {error}") from error


@dataclass(frozen=True)
class _Encoder:
    """Renders and tokenizes without special tokens, adding the tokenizer's BOS once where needed."""

    bos_id: int | None  # set only when the tokenizer adds a BOS by itself

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> _Encoder:
        bos = getattr(tokenizer, "bos_token_id", None)
        adds_bos = bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
        return cls(bos_id=bos if adds_bos else None)

    def encode(self, tokenizer: Any, texts: list[str]) -> list[list[int]]:
        batch = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        if self.bos_id is None:
            return [list(ids) for ids in batch]
        return [list(ids) if ids[:1] == [self.bos_id] else [self.bos_id, *ids] for ids in batch]


def _common_prefix_length(first: Sequence[int], *others: Sequence[int]) -> int:
    if all(other[: len(first)] == first for other in others):  # the usual case, compared in C
        return len(first)
    for position, token in enumerate(first):
        if any(position >= len(other) or other[position] != token for other in others):
            return position
    return len(first)


def _keep_last(ids: list[int], limit: int) -> list[int]:
    return ids[len(ids) - limit :] if len(ids) > limit else ids


# --- preference -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _PreferenceSettings:
    encoder: _Encoder
    max_prompt_length: int
    max_completion_length: int


def _tokenize_preference_chunk(
    items: list[tuple[str, PreferenceConversation]], tokenizer: Any, settings: _PreferenceSettings
) -> list[dict[str, Any]]:
    """One outcome dict per row: {"id", "example" | "drop" | "error", "truncated": [...], "adjusted"}."""
    outcomes, texts, rendered_ids = [], [], []
    for row_id, pair in items:
        try:
            rendered = [
                _render(tokenizer, pair.prompt, generation_prompt=True, row_id=row_id),
                _render(tokenizer, pair.prompt + pair.chosen, generation_prompt=False, row_id=row_id),
                _render(tokenizer, pair.prompt + pair.rejected, generation_prompt=False, row_id=row_id),
            ]
        except DataError as error:
            outcomes.append({"id": row_id, "error": str(error)})
            continue
        texts.extend(rendered)
        rendered_ids.append(row_id)
        outcomes.append({"id": row_id})
    encoded = iter(settings.encoder.encode(tokenizer, texts))
    for outcome in outcomes:
        if "error" not in outcome:
            outcome.update(_split_and_truncate(outcome["id"], next(encoded), next(encoded), next(encoded), settings))
    return outcomes


def _split_and_truncate(
    row_id: str, prompt: list[int], chosen_full: list[int], rejected_full: list[int], settings: _PreferenceSettings
) -> dict[str, Any]:
    cut = _common_prefix_length(prompt, chosen_full, rejected_full)
    prompt_ids, chosen_ids, rejected_ids = chosen_full[:cut], chosen_full[cut:], rejected_full[cut:]
    truncated = [
        name
        for name, ids, limit in (
            ("prompt", prompt_ids, settings.max_prompt_length),
            ("chosen", chosen_ids, settings.max_completion_length),
            ("rejected", rejected_ids, settings.max_completion_length),
        )
        if len(ids) > limit
    ]
    prompt_ids = _keep_last(prompt_ids, settings.max_prompt_length)
    chosen_ids = chosen_ids[: settings.max_completion_length]
    rejected_ids = rejected_ids[: settings.max_completion_length]
    outcome: dict[str, Any] = {"truncated": truncated, "adjusted": cut < len(prompt)}
    if not prompt_ids:  # the first completion token needs context to be scored
        outcome["drop"] = EMPTY_PROMPT
    elif not chosen_ids or not rejected_ids:
        outcome["drop"] = EMPTY_COMPLETION
    elif chosen_ids == rejected_ids:
        outcome["drop"] = IDENTICAL_AFTER_TRUNCATION
    else:
        outcome["example"] = {
            "id": row_id,
            "prompt_ids": prompt_ids,
            "chosen_ids": chosen_ids,
            "rejected_ids": rejected_ids,
        }
    return outcome


def prepare_preference_examples(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    max_prompt_length: int = 1800,
    max_completion_length: int = 512,
    num_proc: int | None = None,
    on_error: str = "raise",
) -> tuple[list[dict[str, Any]], DataReport]:
    """Tokenized preference examples ``{"id", "prompt_ids", "chosen_ids", "rejected_ids"}`` and a report.

    Prompts are truncated from the left to ``max_prompt_length`` tokens, completions from the
    right to ``max_completion_length``. Every row is validated before any tokenization: with
    ``on_error="raise"`` (default) the first bad row raises its :class:`DataError`; with
    ``on_error="skip"`` bad rows are counted in the report under ``invalid_row``. ``num_proc``
    above 1 tokenizes in that many worker processes (same output).
    """
    _check_limits(max_prompt_length=max_prompt_length, max_completion_length=max_completion_length)
    require_chat_template(tokenizer)
    report = DataReport(kind="preference", rows_in=len(rows))
    items = _normalize_rows(rows, normalize_preference_row, report, on_error)
    items = cap_preference(items, tokenizer, max_prompt_length, max_completion_length)  # memory ~ the limits
    require_closed_assistant_turn(tokenizer)  # after the rows: a bad row is reported before any rendering
    settings = _PreferenceSettings(_Encoder.for_tokenizer(tokenizer), max_prompt_length, max_completion_length)
    examples = []
    for outcome in _map_chunks(_tokenize_preference_chunk, items, tokenizer, settings, num_proc):
        if _record(outcome, report, on_error):
            examples.append(outcome["example"])
    if examples:
        prompt_lengths = [len(example["prompt_ids"]) for example in examples]
        completion_lengths = [len(example[key]) for example in examples for key in ("chosen_ids", "rejected_ids")]
        report.lengths = {"prompt": _stats(prompt_lengths), "completion": _stats(completion_lengths)}
    return examples, report


# --- SFT ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SFTSettings:
    encoder: _Encoder
    max_length: int


def _tokenize_sft_chunk(
    items: list[tuple[str, list[Message]]], tokenizer: Any, settings: _SFTSettings
) -> list[dict[str, Any]]:
    """Assistant spans come from rendering the conversation up to each assistant turn: the span of
    turn i runs from the end of ``messages[:i]`` + generation prompt to the end of ``messages[:i + 1]``
    (so it includes the turn's end-of-turn token). Boundaries are token counts of the longest common
    prefix with the whole conversation's tokens, which stays exact when BPE merges across them."""
    outcomes, texts, layouts = [], [], []
    for row_id, messages in items:
        try:
            full = _render(tokenizer, messages, generation_prompt=False, row_id=row_id)
            boundaries = []
            for index, message in enumerate(messages):
                if message["role"] == "assistant":
                    start = _render(tokenizer, messages[:index], generation_prompt=True, row_id=row_id) if index else ""
                    end = _render(tokenizer, messages[: index + 1], generation_prompt=False, row_id=row_id)
                    boundaries += [start, end]
        except DataError as error:
            outcomes.append({"id": row_id, "error": str(error)})
            continue
        texts += [full, *boundaries]
        layouts.append(len(boundaries))
        outcomes.append({"id": row_id})
    encoded = iter(settings.encoder.encode(tokenizer, texts))
    sizes = iter(layouts)
    for outcome in outcomes:
        if "error" in outcome:
            continue
        input_ids = next(encoded)
        labels = [IGNORE_INDEX] * len(input_ids)
        for _ in range(next(sizes) // 2):
            start = _common_prefix_length(next(encoded), input_ids)
            end = _common_prefix_length(next(encoded), input_ids)
            labels[start:end] = input_ids[start:end]
        truncated = len(input_ids) > settings.max_length
        input_ids, labels = input_ids[: settings.max_length], labels[: settings.max_length]
        outcome["truncated"] = ["sequence"] if truncated else []
        if all(label == IGNORE_INDEX for label in labels):
            outcome["drop"] = NO_ASSISTANT_TOKENS
        else:
            outcome["example"] = {"id": outcome["id"], "input_ids": input_ids, "labels": labels}
    return outcomes


def prepare_sft_examples(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    max_length: int = 1024,
    num_proc: int | None = None,
    on_error: str = "raise",
) -> tuple[list[dict[str, Any]], DataReport]:
    """Tokenized SFT examples ``{"id", "input_ids", "labels"}`` (labels -100 outside assistant turns).

    Sequences are truncated from the right to ``max_length``; an example left with no assistant
    token is dropped and counted. Validation and ``on_error`` work as in :func:`prepare_preference_examples`.
    """
    _check_limits(max_length=max_length)
    require_chat_template(tokenizer)
    report = DataReport(kind="sft", rows_in=len(rows))
    items = cap_sft(_normalize_rows(rows, normalize_sft_row, report, on_error), tokenizer, max_length)
    require_closed_assistant_turn(tokenizer)  # after the rows: a bad row is reported before any rendering
    settings = _SFTSettings(_Encoder.for_tokenizer(tokenizer), max_length)
    examples = []
    for outcome in _map_chunks(_tokenize_sft_chunk, items, tokenizer, settings, num_proc):
        if _record(outcome, report, on_error):
            examples.append(outcome["example"])
    if examples:
        report.lengths = {
            "sequence": _stats([len(example["input_ids"]) for example in examples]),
            "assistant": _stats([sum(label != IGNORE_INDEX for label in example["labels"]) for example in examples]),
        }
    return examples, report


# --- shared plumbing ------------------------------------------------------------------------


def _check_limits(**limits: int) -> None:
    for name, value in limits.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _normalize_rows(
    rows: Sequence[dict[str, Any]], normalize: Callable[[dict[str, Any], int], Any], report: DataReport, on_error: str
) -> list[tuple[str, Any]]:
    """Validate every row up front (cheap), so a bad row fails before any tokenization work."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    items = []
    for index, row in enumerate(rows):
        row_id = row.get("id") if isinstance(row, dict) else None
        row_id = row_id if isinstance(row_id, str) else str(index)
        try:
            items.append((row_id, normalize(row, index)))
        except DataError as error:
            if on_error == "raise":
                raise
            report.drop(INVALID_ROW, row_id, str(error))
    return items


def _record(outcome: dict[str, Any], report: DataReport, on_error: str) -> bool:
    """Count one row's outcome in ``report``; True when it produced an example."""
    if "error" in outcome:
        if on_error == "raise":
            raise RowError(outcome["error"])
        report.drop(INVALID_ROW, outcome["id"], outcome["error"])
        return False
    for name in outcome["truncated"]:
        report.count_truncation(name)
    report.boundary_adjusted += bool(outcome.get("adjusted"))
    if "drop" in outcome:
        report.drop(outcome["drop"], outcome["id"])
        return False
    report.kept += 1
    return True


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_worker_tokenizer: Any = None


def _set_worker_tokenizer(tokenizer: Any) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _run_in_worker(
    function: Callable[..., list[dict[str, Any]]], chunk: list[Any], settings: Any
) -> list[dict[str, Any]]:
    return function(chunk, _worker_tokenizer, settings)


def _map_chunks(
    function: Callable[..., list[dict[str, Any]]], items: list[Any], tokenizer: Any, settings: Any, num_proc: int | None
) -> Iterator[dict[str, Any]]:
    """Outcomes of ``function`` over ``items`` in order, chunk by chunk, in-process or in ``num_proc`` workers."""
    if not num_proc or num_proc <= 1 or len(items) <= CHUNK_SIZE:
        for chunk in _chunks(items, CHUNK_SIZE):
            yield from function(chunk, tokenizer, settings)
        return
    # Workers only render templates and run the Rust tokenizer (never torch), so "fork" is safe and
    # avoids re-importing torch in each worker; "spawn" where fork does not exist.
    context = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(
        max_workers=num_proc, mp_context=context, initializer=_set_worker_tokenizer, initargs=(tokenizer,)
    ) as pool:
        chunks = list(_chunks(items, CHUNK_SIZE))
        for outcomes in pool.map(_run_in_worker, [function] * len(chunks), chunks, [settings] * len(chunks)):
            yield from outcomes


def _stats(values: list[int]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "max": float(max(values))}


# --- fingerprint ----------------------------------------------------------------------------


FINGERPRINT_KEYS = ("id", "prompt_ids", "chosen_ids", "rejected_ids", "input_ids", "labels")


def examples_fingerprint(examples: Sequence[dict[str, Any]]) -> str:
    """sha256 over the examples' ids and token ids (the ``FINGERPRINT_KEYS`` an example has).

    Other keys (e.g. reference log-probs attached later) are ignored. Order-independent (the
    sorted per-example digests are hashed), so reshuffling the same examples keeps the
    fingerprint; a cache keyed by it must check or store its values by example id, not position.
    """
    digests = sorted(
        hashlib.sha256(
            json.dumps(
                {key: example[key] for key in FINGERPRINT_KEYS if key in example}, separators=(",", ":")
            ).encode()
        ).digest()
        for example in examples
    )
    combined = hashlib.sha256()
    for digest in digests:
        combined.update(digest)
    return combined.hexdigest()
