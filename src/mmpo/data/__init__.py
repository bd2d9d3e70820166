"""Data pipeline: load rows (``loading``), turn them into messages (``formats``), tokenize (``tokenize``),
both in one call (``prepare``), and the order examples are trained in (``order``)."""

from mmpo.data.formats import (
    DataError,
    PreferenceConversation,
    RowError,
    normalize_preference_row,
    normalize_sft_row,
)
from mmpo.data.loading import DatasetSpec, load_dataset_rows, load_rows
from mmpo.data.prepare import load_preference_examples, load_sft_examples
from mmpo.data.tokenize import (
    DataReport,
    examples_fingerprint,
    prepare_preference_examples,
    prepare_sft_examples,
    require_chat_template,
)

__all__ = [
    "DataError",
    "DataReport",
    "DatasetSpec",
    "PreferenceConversation",
    "RowError",
    "examples_fingerprint",
    "load_dataset_rows",
    "load_preference_examples",
    "load_rows",
    "load_sft_examples",
    "normalize_preference_row",
    "normalize_sft_row",
    "prepare_preference_examples",
    "prepare_sft_examples",
    "require_chat_template",
]
