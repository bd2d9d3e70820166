"""Reference log-probs: computed once, cached on disk, reused by epochs, restarts and other runs.

The cache key covers everything the numbers depend on: the reference weights (content hash),
their dtype, and the tokenized examples (which already encode the data, the chat template and
the truncation settings). Runs of a sweep on the same model and data share one entry.

An entry is shared by later runs, so it must not be able to poison them: it carries a sha256 of
its ids and values, and :func:`load` checks its structure, shapes and that checksum before using
it. A damaged entry (flipped bytes, another file under its name, a torn write) is reported and
recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from mmpo.data.order import length_sorted_batches

CACHE_VERSION = 2  # 2: entries carry a checksum


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


def checksum(ids: list[str], chosen: torch.Tensor, rejected: torch.Tensor) -> str:
    digest = hashlib.sha256("\n".join(ids).encode())
    for values in (chosen, rejected):
        digest.update(values.detach().to(torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def load(path: Path, ids: list[str], log: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The entry's (chosen, rejected) log-probs in the order of ``ids``; ``None`` when there is no
    entry, or when it is damaged (then ``log`` says why and the caller recomputes it)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        problem = _problem(state, ids)
    except Exception as error:  # unreadable: any exception of torch's unpickler or zip reader
        problem = f"unreadable ({type(error).__name__})"
    if problem is not None:
        log(f"reference cache entry {path} is damaged ({problem}); recomputing it")
        return None
    # Keyed by example id, not position: runs with other seeds see the same examples in another order.
    position = {row_id: i for i, row_id in enumerate(state["ids"])}
    order = torch.tensor([position[row_id] for row_id in ids], dtype=torch.long)
    return state["chosen"][order], state["rejected"][order]


def _problem(state: object, ids: list[str]) -> str | None:
    """Why ``state`` is not an intact entry for ``ids`` (``None`` if it is)."""
    if not isinstance(state, dict) or not {"ids", "chosen", "rejected", "checksum"} <= state.keys():
        return "not a cache entry"
    stored, chosen, rejected = state["ids"], state["chosen"], state["rejected"]
    if not isinstance(stored, list) or not all(isinstance(i, str) for i in stored):
        return "its ids are not a list of strings"
    for name, values in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(values, torch.Tensor):
            return f"{name} values are a {type(values).__name__}, not a tensor"
        if values.shape != (len(stored),):
            return f"{name} values have shape {tuple(values.shape)}, expected ({len(stored)},)"
        if values.dtype != torch.float64:
            return f"{name} values are {values.dtype}, expected torch.float64"
    if state["checksum"] != checksum(stored, chosen, rejected):
        return "checksum mismatch"
    if len(set(stored)) != len(stored) or set(stored) != set(ids):
        return "it holds other examples"  # cannot happen for a key computed from these examples
    return None


def save(path: Path, ids: list[str], chosen: torch.Tensor, rejected: torch.Tensor, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    chosen, rejected = chosen.to(torch.float64).contiguous(), rejected.to(torch.float64).contiguous()
    state = {
        "ids": list(ids),
        "chosen": chosen,
        "rejected": rejected,
        "meta": json.dumps(meta),
        "checksum": checksum(list(ids), chosen, rejected),
    }
    # An exclusive temporary file (nothing planted under its name is followed), then an atomic rename.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def attach(examples: list[dict], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    for ex, c, r in zip(examples, chosen.tolist(), rejected.tolist()):
        ex["ref_chosen_logps"] = c
        ex["ref_rejected_logps"] = r
