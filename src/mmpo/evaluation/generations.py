"""Generations keyed by everything that changes them, written as AlpacaEval-compatible files.

``model_outputs.json`` (the checkpoint's answers) and ``reference_outputs.json`` (the baseline's)
are lists of ``{"instruction", "output", "generator", **scalar metadata}``, what
``alpaca_eval evaluate --model_outputs ... --reference_outputs ...`` reads. Beside each, a
``*.key.json`` records what produced it: the weights fingerprint (a content hash, so a retrained
checkpoint in the same folder is new), the chat template, the prompt set, the generation settings
and the seed. A file is reused only when that key matches; any change regenerates. The baseline's
answers are also kept in a shared cache (``$MMPO_CACHE/generations``), so evaluating many
checkpoints against one baseline generates its answers once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["generate_or_reuse", "generation_cache_dir", "key_file"]

KEY_VERSION = 1


def generation_cache_dir() -> Path:
    from mmpo.training.refcache import default_cache_dir

    return default_cache_dir().parent / "generations"


def key_file(outputs_path: Path) -> Path:
    return outputs_path.with_suffix(".key.json")


def _generation_key(fingerprint: str, chat_template: str, prompts: Sequence[Mapping], settings: Mapping) -> dict:
    prompt_hash = hashlib.sha256(
        json.dumps([p["instruction"] for p in prompts], ensure_ascii=False).encode()
    ).hexdigest()
    described = {
        "version": KEY_VERSION,
        "weights_fingerprint": fingerprint,
        "chat_template_sha256": hashlib.sha256((chat_template or "").encode()).hexdigest()[:16],
        "prompts_sha256": prompt_hash[:16],
        "n_prompts": len(prompts),
        "settings": dict(settings),
    }
    described["key"] = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]
    return described


def _read_matching(path: Path, key: str, prompts: Sequence[Mapping]) -> list[dict] | None:
    """The records at ``path`` if its key file says they were made with ``key`` for these prompts."""
    keyed = key_file(path)
    if not (path.is_file() and keyed.is_file()):
        return None
    try:
        if json.loads(keyed.read_text()).get("key") != key:
            return None
        records = json.loads(path.read_text())
    except (ValueError, OSError):
        return None
    if [r.get("instruction") for r in records] != [p["instruction"] for p in prompts]:
        return None
    return records


def _write(records: Sequence[Mapping], path: Path, described: Mapping) -> None:
    from mmpo.evaluation.generate import write_model_outputs

    key_file(path).unlink(missing_ok=True)  # never a key beside outputs it does not describe
    write_model_outputs(records, path)
    key_file(path).write_text(json.dumps(described, indent=1) + "\n")


def generate_or_reuse(
    model_dir: str,
    prompts: Sequence[Mapping],
    settings: Mapping[str, Any],
    path: Path | None,
    *,
    generator: str,
    batch_size: int,
    progress: bool,
    say: Callable[[str], Any],
    shared_cache: bool = False,
) -> list[dict]:
    """The answers of ``model_dir`` to ``prompts`` at ``path``: reused when their key matches, else generated.

    ``settings``: ``max_new_tokens``, ``temperature``, ``top_p``, ``seed`` (and optionally
    ``dtype``, ``system_prompt``), everything decoding depends on; all of it goes into the key.

    ``shared_cache`` also looks up (and stores) them in :func:`generation_cache_dir` by key, for
    the baseline (``path`` None: there only). The records' ``generator`` is set to ``generator``.
    """
    from mmpo.evaluation.generate import generate_outputs, load_generation_model
    from mmpo.modeling import load_tokenizer, weights_fingerprint

    tokenizer = load_tokenizer(model_dir)
    model = load_generation_model(model_dir, dtype=settings.get("dtype", "auto"))
    # The device is part of the key: greedy decoding on another device can pick other tokens.
    settings = {**settings, "device": next(model.parameters()).device.type}
    described = _generation_key(
        weights_fingerprint(model), getattr(tokenizer, "chat_template", "") or "", prompts, settings
    )
    key = described["key"]
    shared = generation_cache_dir() / f"{key}.json" if shared_cache else None
    records = _read_matching(path, key, prompts) if path is not None else None
    if records is not None:
        say(f"generations: reusing {path} (same weights, prompts and settings)")
    elif shared is not None and (records := _read_matching(shared, key, prompts)) is not None:
        say(f"generations: reusing {shared} (same weights, prompts and settings)")
    else:
        say(f"generating {len(prompts)} answers with {generator} ({model_dir})")
        records = generate_outputs(
            model,
            tokenizer,
            prompts,
            generator_name=generator,
            max_new_tokens=settings["max_new_tokens"],
            temperature=settings["temperature"],
            top_p=settings["top_p"],
            seed=settings["seed"],
            batch_size=batch_size,
            system_prompt=settings.get("system_prompt"),
            progress=progress,
        )
        if shared is not None:
            shared.parent.mkdir(parents=True, exist_ok=True)
            _write(records, shared, described)
    del model
    records = [{**r, "generator": generator} for r in records]
    if path is not None and _read_matching(path, key, prompts) != records:  # new, from the shared cache, or renamed
        _write(records, path, described)
    return records
