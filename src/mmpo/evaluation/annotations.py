"""Per-judge ``annotations.json`` in AlpacaEval's layout, for any judge.

AlpacaEval's rows put the baseline first: ``output_1``/``generator_1`` are the reference's,
``output_2``/``generator_2`` the model's, and ``preference`` is 1 + P(the model's output wins)
(1.5 a tie, missing for a failed annotation). ``alpaca_eval``'s metric functions read this file
as they read their own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["annotations_file_name", "to_alpaca_eval_annotations", "write_annotations"]


def annotations_file_name(judge_name: str) -> str:
    """A file name for a judge's annotations (judge names hold ':' and '/')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", judge_name).strip("_") + ".json"


def to_alpaca_eval_annotations(rows: Sequence[Mapping], annotator: str) -> list[dict]:
    """Judging rows (model = A, baseline = B) as AlpacaEval annotation rows (baseline = 1, model = 2)."""
    out = []
    for row in rows:
        if "annotation" in row:  # AlpacaEval's own annotator: keep its row as it made it
            out.append(dict(row["annotation"]))
            continue
        preference = row.get("preference")
        out.append(
            {
                "instruction": row["instruction"],
                "output_1": row["output_b"],
                "generator_1": row.get("generator_b"),
                "output_2": row["output_a"],
                "generator_2": row.get("generator_a"),
                "annotator": annotator,
                "preference": None if preference is None else 1.0 + float(preference),
                "preference_raw_completion": row.get("raw"),
                "error": row.get("error"),
            }
        )
    return out


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def write_annotations(rows: Sequence[Mapping], annotator: str, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(to_alpaca_eval_annotations(rows, annotator), indent=1, ensure_ascii=False, default=_plain) + "\n",
        encoding="utf-8",
    )
    return path
