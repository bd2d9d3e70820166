"""Load and tokenize in one call: what training, evaluation and the benchmarks all use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmpo.data.loading import DatasetSpec, load_rows
from mmpo.data.tokenize import DataReport, prepare_preference_examples, prepare_sft_examples


def _specs(datasets: Sequence[str | DatasetSpec]) -> list[DatasetSpec]:
    return [d if isinstance(d, DatasetSpec) else DatasetSpec.parse(d) for d in datasets]


def load_preference_examples(
    datasets: Sequence[str | DatasetSpec],
    tokenizer: Any,
    *,
    seed: int = 0,
    max_prompt_length: int = 1800,
    max_completion_length: int = 512,
    on_bad_rows: str = "raise",
) -> tuple[list[dict[str, Any]], DataReport]:
    """Tokenized preference examples of ``datasets`` ('PATH_OR_HUB_ID[:SPLIT][@WEIGHT]'), and their report."""
    rows = load_rows(_specs(datasets), seed=seed)
    return prepare_preference_examples(
        rows,
        tokenizer,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        on_error=on_bad_rows,
    )


def load_sft_examples(
    datasets: Sequence[str | DatasetSpec],
    tokenizer: Any,
    *,
    seed: int = 0,
    max_length: int = 1024,
    on_bad_rows: str = "raise",
) -> tuple[list[dict[str, Any]], DataReport]:
    """Tokenized chat examples of ``datasets`` (labels only on assistant tokens), and their report."""
    rows = load_rows(_specs(datasets), seed=seed)
    return prepare_sft_examples(rows, tokenizer, max_length=max_length, on_error=on_bad_rows)
