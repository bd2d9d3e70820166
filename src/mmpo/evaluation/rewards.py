"""Reward accuracy of a checkpoint on a preference split, with each objective's own score.

The reference (SFT/baseline) log-probs come from the same on-disk cache training used, so a
checkpoint of a run on the same data costs one forward pass of the policy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from accelerate import Accelerator

from mmpo.config import ConfigError, TrainConfig, from_dict, load_yaml, resolve
from mmpo.data import load_preference_examples
from mmpo.modeling import load_model, load_tokenizer
from mmpo.training.preference import (
    PreferenceStep,
    evaluate_preference,
    length_limits,
    needs_reference,
    reference_logps,
    with_model,
)
from mmpo.training.run_dir import CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, MODEL_DIR


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """``(model folder, run config file or None)`` for a run folder, checkpoint folder or model folder."""
    path = Path(path)
    if (path / CHECKPOINTS_DIR).is_dir():
        from mmpo.training.checkpoint import latest_valid

        found = latest_valid(path)
        if found is None:
            raise ConfigError(f"{path} is a run folder without a complete checkpoint")
        path = found
    if (path / MODEL_DIR).is_dir():
        config = path / CONFIG_FILE
        return path / MODEL_DIR, config if config.is_file() else None
    is_model = any((path / name).is_file() for name in ("config.json", "adapter_config.json"))
    if path.is_dir() and not is_model and ((path / CONFIG_FILE).is_file() or (path / METRICS_FILE).is_file()):
        raise ConfigError(f"{path} is a run folder without a complete checkpoint (no epoch or save step finished yet)")
    if path.is_dir():
        for candidate in (path.parent / CONFIG_FILE, path.parent.parent / CONFIG_FILE):
            if candidate.is_file():
                return path, candidate
        return path, None
    return path, None  # a Hub id


def run_config(config_file: Path | None, **overrides) -> TrainConfig:
    """The training config of a checkpoint (objective, beta, lengths...), with overrides."""
    cfg = TrainConfig()
    if config_file is not None:
        cfg = from_dict(TrainConfig, load_yaml(config_file), source=str(config_file))
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    return resolve(cfg)


def reward_accuracy(
    model_dir: str | Path, cfg: TrainConfig, *, baseline: str | Path, dataset: list[str], say=print
) -> dict[str, float]:
    """Validation loss and reward metrics (``eval_rewards/accuracies`` ...) of ``model_dir`` on ``dataset``.

    ``baseline`` is the reference model (the SFT model the run started from).
    """
    accelerator = Accelerator()
    tokenizer = load_tokenizer(str(model_dir))
    max_prompt_length, max_completion_length = length_limits(with_model(cfg, str(model_dir)), say=say)
    examples, report = load_preference_examples(
        dataset,
        tokenizer,
        seed=cfg.seed,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        on_bad_rows=cfg.on_bad_rows,
    )
    say(f"reward data: {report.summary()}")
    step = PreferenceStep.from_config(cfg, tokenizer.pad_token_id)
    if needs_reference(cfg):
        reference = load_model(with_model(cfg, str(baseline)))
        reference.to(accelerator.device)
        reference_logps(step, accelerator, reference, examples, say)
        del reference
    policy = load_model(with_model(cfg, str(model_dir)))
    policy.to(accelerator.device)
    metrics = evaluate_preference(step, accelerator, policy, examples)
    return {
        "objective": cfg.objective,
        "beta": cfg.beta,
        "pairs": len(examples),
        "reward_accuracy": metrics["eval_rewards/accuracies"],
        **metrics,
    }
