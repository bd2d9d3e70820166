"""``trainer_state.json`` in Hugging Face Trainer's layout, built from mmpo's metrics records.

Tools written for HF Trainer runs (``transformers.TrainerState.load_from_json``, the model-card
helpers, loss-curve plotters, TRL/Axolotl dashboards) read ``log_history``, ``global_step``,
``epoch`` and the rest from this file. The state is built with ``transformers.TrainerState``
itself, so it has exactly that class's fields and loads with it.

``log_history`` holds mmpo's ``metrics.jsonl`` records (training windows: ``loss``,
``grad_norm``, ``learning_rate``, TRL's ``rewards/*`` and ``logps/*`` names,
``mmpo/chosen_weight``; evaluations: the same names with an ``eval_`` prefix), each with its
``step`` and ``epoch``, as HF Trainer logs them. Event records (a skipped non-finite step) are
not metrics and are left out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["hf_trainer_state", "write_trainer_state"]


def _log_entry(record: Mapping[str, Any]) -> dict[str, float | int] | None:
    """An HF ``log_history`` entry (numbers only), or ``None`` for a record that is not metrics."""
    if "event" in record or not isinstance(record.get("step"), int):
        return None
    entry = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return entry if len(entry) > 2 else None  # more than step and epoch


def _best(entries: list[dict], metric: str, greater_is_better: bool) -> dict | None:
    """The evaluation with the best ``metric`` after training started (HF never counts step 0)."""
    evaluated = [e for e in entries if e["step"] > 0 and isinstance(e.get(metric), (int, float))]
    evaluated = [e for e in evaluated if math.isfinite(e[metric])]
    if not evaluated:
        return None
    # First best wins on ties, as HF Trainer keeps the earlier checkpoint.
    return (max if greater_is_better else min)(evaluated, key=lambda e: e[metric])


def hf_trainer_state(
    records: Sequence[Mapping[str, Any]],
    *,
    global_step: int,
    steps_per_epoch: int,
    total_steps: int,
    per_device_batch_size: int,
    logging_steps: int,
    eval_steps: int = 0,
    save_steps: int = 0,
    metric_for_best: str = "eval_loss",
    greater_is_better: bool | None = None,
    checkpoint_of_step: Mapping[int, str] | None = None,
    num_input_tokens_seen: int = 0,
    train_runtime: float | None = None,
    global_batch_size: int | None = None,
) -> dict[str, Any]:
    """The run's state at ``global_step`` as HF Trainer writes it (a JSON-ready dict).

    ``records`` are the run's metrics records (``MetricsLog.records``); those after
    ``global_step`` are left out, so a checkpoint's state holds its own history only.
    ``eval_steps``/``save_steps`` of 0 mean "at each epoch's end" in mmpo and are written as
    ``steps_per_epoch``. ``best_metric``/``best_global_step`` come from the evaluations after
    step 0 by ``metric_for_best`` (lower is better for names ending in "loss", as in HF, unless
    ``greater_is_better`` says otherwise); ``checkpoint_of_step`` maps steps to checkpoint
    folders for ``best_model_checkpoint``. With ``train_runtime`` (seconds) the history ends
    with HF's training summary entry (``train_loss``, ``train_runtime``, throughput).
    """
    from transformers import TrainerState

    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    entries = [e for e in map(_log_entry, records) if e is not None and e["step"] <= global_step]
    if greater_is_better is None:
        greater_is_better = not metric_for_best.endswith("loss")
    best = _best(entries, metric_for_best, greater_is_better)
    if train_runtime is not None:
        entries.append(_train_summary(entries, global_step, steps_per_epoch, train_runtime, global_batch_size))
    state = TrainerState(
        epoch=global_step / steps_per_epoch,
        global_step=global_step,
        max_steps=total_steps,
        logging_steps=logging_steps,
        eval_steps=eval_steps or steps_per_epoch,
        save_steps=save_steps or steps_per_epoch,
        train_batch_size=per_device_batch_size,
        num_train_epochs=math.ceil(total_steps / steps_per_epoch),
        num_input_tokens_seen=num_input_tokens_seen,
        total_flos=0.0,
        log_history=entries,
        best_metric=None if best is None else best[metric_for_best],
        best_global_step=None if best is None else best["step"],
        best_model_checkpoint=None if best is None else (checkpoint_of_step or {}).get(best["step"]),
    )
    return dataclasses.asdict(state)


def _train_summary(
    entries: list[dict], global_step: int, steps_per_epoch: int, runtime: float, global_batch_size: int | None
) -> dict[str, float | int]:
    """HF Trainer's last ``log_history`` entry; ``train_loss`` averages the logged training losses
    weighted by the steps each logging window covers (HF averages over all steps)."""
    weighted, steps, previous = 0.0, 0, 0
    for entry in entries:
        if "loss" in entry and "eval_loss" not in entry:
            span = entry["step"] - previous
            weighted, steps, previous = weighted + entry["loss"] * span, steps + span, entry["step"]
    summary: dict[str, float | int] = {
        "epoch": global_step / steps_per_epoch,
        "step": global_step,
        "total_flos": 0.0,
        "train_runtime": runtime,
        "train_steps_per_second": global_step / runtime if runtime > 0 else 0.0,
    }
    if steps:
        summary["train_loss"] = weighted / steps
    if global_batch_size:
        summary["train_samples_per_second"] = global_step * global_batch_size / runtime if runtime > 0 else 0.0
    return summary


def write_trainer_state(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` as HF Trainer does (``TrainerState.save_to_json``: sorted keys, indent 2)."""
    from transformers import TrainerState

    path = Path(path)
    TrainerState(**state).save_to_json(str(path))
    return path
