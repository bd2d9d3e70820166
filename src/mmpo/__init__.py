"""mmpo: offline preference optimization by maximum marginal likelihood (MMPO), with DPO and SimPO."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["ObjectiveOutput", "__version__", "dpo_loss", "mmpo_loss", "simpo_loss"]


def __getattr__(name: str) -> Any:
    # The losses import torch: loaded on first use, so `mmpo --help` and `mmpo --version` start fast.
    if name in ("ObjectiveOutput", "mmpo_loss", "dpo_loss", "simpo_loss"):
        from mmpo import objectives

        return getattr(objectives, name)
    raise AttributeError(f"module 'mmpo' has no attribute {name!r}")
