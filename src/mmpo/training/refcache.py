"""Reference log-probs: computed once, cached on disk, reused by epochs, restarts and other runs.

The cache key covers everything the numbers depend on: the reference weights (content hash),
their dtype, and the tokenized examples (which already encode the data, the chat template and
the truncation settings). Runs of a sweep on the same model and data share one entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from mmpo.data.order import length_sorted_batches

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("MMPO_CACHE", Path.home() / ".cache" / "mmpo")) / "reference_logps"


def cache_key(*, model_fingerprint: str, data_fingerprint: str, dtype: str) -> str:
    payload = json.dumps({"v": CACHE_VERSION, "model": model_fingerprint, "data": data_fingerprint, "dtype": dtype})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@torch.no_grad()
def compute_reference_logps(
    logps_fn: Callable[[list[dict]], tuple[torch.Tensor, torch.Tensor]],
    examples: list[dict],
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[int, tuple[float, float]]:
    """Summed log-probs ``{index: (chosen, rejected)}`` for this process's share of the examples."""
    results: dict[int, tuple[float, float]] = {}
    batches = length_sorted_batches(examples, batch_size)
    for batch in batches[rank::world_size]:
        chosen, rejected = logps_fn([examples[i] for i in batch])
        for i, c, r in zip(batch, chosen.tolist(), rejected.tolist()):
            results[i] = (c, r)
        if progress:
            progress(len(batch))
    return results


def load(path: Path, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None
    # Keyed by example id, not position: runs with other seeds see the same examples in another order.
    position = {row_id: i for i, row_id in enumerate(state.get("ids", []))}
    if len(position) != len(set(ids)) or any(row_id not in position for row_id in ids):
        return None
    order = torch.tensor([position[row_id] for row_id in ids], dtype=torch.long)
    return state["chosen"][order], state["rejected"][order]


def save(path: Path, ids: list[str], chosen: torch.Tensor, rejected: torch.Tensor, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"ids": ids, "chosen": chosen, "rejected": rejected, "meta": json.dumps(meta)}, tmp)
    os.replace(tmp, path)  # atomic: readers see the old file or the whole new one


def attach(examples: list[dict], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    for ex, c, r in zip(examples, chosen.tolist(), rejected.tolist()):
        ex["ref_chosen_logps"] = c
        ex["ref_rejected_logps"] = r
