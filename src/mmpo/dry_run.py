"""``--dry-run``: what a run would do, with every setting's source, before anything is loaded.

It reads the config, the model's config file and local data files (to count rows); it loads no
weights, tokenizes nothing and writes nothing.
"""

from __future__ import annotations

import math
from typing import Any

from mmpo.config import CommonConfig, ConfigError, SFTConfig, TrainConfig, apply_preset, resolve, sources, to_dict
from mmpo.config.presets import preset_global_batch
from mmpo.config.training import batch_layout
from mmpo.study.estimate import count_rows, estimate_gpu_memory


def plan(cfg: CommonConfig, processes: int = 1) -> dict[str, Any]:
    """The resolved settings with their sources, data sizes, the batch layout and the step counts."""
    cfg = resolve(apply_preset(cfg))
    lengths, notes = None, []
    if isinstance(cfg, TrainConfig):
        from mmpo.training.preference import length_limits, require_sft_stage

        lengths = length_limits(cfg, say=lambda _message: None)
        try:
            require_sft_stage(cfg)
        except ConfigError as missing:
            notes.append(str(missing))
    layout = batch_layout(cfg, processes, preset_global_batch(cfg))
    origin = sources(cfg)
    if layout.accumulation != cfg.gradient_accumulation_steps:
        origin["gradient_accumulation_steps"] = "global_batch_size"
    settings = {**to_dict(cfg), "gradient_accumulation_steps": layout.accumulation}
    if lengths and lengths != (cfg.max_prompt_length, cfg.max_completion_length):
        settings["max_prompt_length"], settings["max_completion_length"] = lengths
        origin["max_prompt_length"] = origin["max_completion_length"] = "model context window"
    train_rows = count_rows(cfg.dataset)
    eval_rows = count_rows(cfg.eval_dataset) if cfg.eval_dataset else 0
    memory = estimate_gpu_memory(cfg) if isinstance(cfg, TrainConfig) else None
    steps_per_epoch = train_rows // layout.global_batch if train_rows is not None else None
    total = None
    if steps_per_epoch is not None:
        total = steps_per_epoch * cfg.epochs
        total = min(total, cfg.max_steps) if cfg.max_steps > 0 else total
    return {
        "kind": "sft" if isinstance(cfg, SFTConfig) else "preference",
        "settings": settings,
        "sources": origin,
        "processes": processes,
        "global_batch": layout.global_batch,
        "batch_note": layout.note,
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "warmup_steps": math.ceil(cfg.warmup_ratio * total) if total else None,
        "memory_gib": round(memory.total_gib, 1) if memory else None,
        "memory_parts": {k: round(v, 2) for k, v in memory.parts.items()} if memory else None,
        "notes": notes,
    }


def render(result: dict[str, Any]) -> str:
    """Plain text, one setting a line with its source."""
    width = max(len(k) for k in result["settings"])
    lines = [f"dry run ({result['kind']}): nothing is loaded, trained or written", ""]
    for key, value in result["settings"].items():
        lines.append(f"  {key:<{width}}  {value!r:<40}  [{result['sources'][key]}]")

    def counted(rows):
        return "on the Hub, size unknown offline" if rows is None else f"{rows} rows"

    lines += [
        "",
        f"train data: {counted(result['train_rows'])}; eval data: {counted(result['eval_rows'])}",
        f"global batch: {result['global_batch']} on {result['processes']} process(es)"
        + (f" - {result['batch_note']}" if result["batch_note"] else ""),
    ]
    if result["steps_per_epoch"] is not None:
        lines.append(
            f"steps: {result['steps_per_epoch']} per epoch, {result['total_steps']} in total "
            f"({result['warmup_steps']} warm-up), before rows dropped by validation or truncation"
        )
    if result["memory_gib"] is not None:
        parts = ", ".join(f"{k} {v}" for k, v in result["memory_parts"].items())
        lines.append(f"GPU memory per process: ~{result['memory_gib']} GiB, an estimate, not a measurement ({parts})")
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)
