"""Load and tokenize in one call: what training, evaluation and the benchmarks all use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmpo.data.loading import BadLines, DatasetSpec, load_rows
from mmpo.data.tokenize import DataReport, prepare_preference_examples, prepare_sft_examples

#: Drop reason of a line of a local file that is not a row (bad JSON, bad UTF-8), under on_bad_rows="skip".
INVALID_LINE = "invalid_line"


def _specs(datasets: Sequence[str | DatasetSpec]) -> list[DatasetSpec]:
    return [d if isinstance(d, DatasetSpec) else DatasetSpec.parse(d) for d in datasets]


def _count_skipped_lines(report: DataReport, bad: BadLines) -> DataReport:
    """Skipped lines are rows in that were dropped: ``kept + dropped == rows_in`` still holds."""
    report.rows_in += len(bad.skipped)
    for where, message in bad.skipped:
        report.drop(INVALID_LINE, where, message)
    return report


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
    bad = BadLines(on_bad_rows)
    rows = load_rows(_specs(datasets), seed=seed, bad=bad)
    examples, report = prepare_preference_examples(
        rows,
        tokenizer,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        on_error=on_bad_rows,
    )
    return examples, _count_skipped_lines(report, bad)


def load_sft_examples(
    datasets: Sequence[str | DatasetSpec],
    tokenizer: Any,
    *,
    seed: int = 0,
    max_length: int = 1024,
    on_bad_rows: str = "raise",
) -> tuple[list[dict[str, Any]], DataReport]:
    """Tokenized chat examples of ``datasets`` (labels only on assistant tokens), and their report."""
    bad = BadLines(on_bad_rows)
    rows = load_rows(_specs(datasets), seed=seed, bad=bad)
    examples, report = prepare_sft_examples(rows, tokenizer, max_length=max_length, on_error=on_bad_rows)
    return examples, _count_skipped_lines(report, bad)
