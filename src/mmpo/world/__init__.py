"""The embedded offline world: a tokenizer, a tiny model and checkable chat/preference data."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "world"


def bundled_path(relative: str) -> Path:
    """Path of a shipped world artifact, e.g. ``bundled_path("sft_model")``."""
    return ASSETS / relative
