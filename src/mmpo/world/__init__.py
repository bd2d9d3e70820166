"""The embedded offline world: a tokenizer, a tiny model and checkable chat/preference data."""

from __future__ import annotations

from mmpo.config.defaults import WORLD_DIR as ASSETS
from mmpo.config.defaults import bundled_path

__all__ = ["ASSETS", "bundled_path"]
