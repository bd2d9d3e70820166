"""Reward accuracy of a checkpoint on a preference split, with each objective's own score.

The reference (SFT/baseline) log-probs come from the same on-disk cache training used, so a
checkpoint of a run on the same data costs one forward pass of the policy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml
from accelerate import Accelerator

from mmpo.config import ConfigError, TrainConfig, from_dict, resolve
from mmpo.data import DatasetSpec, load_rows, prepare_preference_examples
from mmpo.engine import evaluate_preference, needs_reference, reference_logps
from mmpo.modeling import load_model, load_tokenizer


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """``(model folder, run config file or None)`` for a run folder, checkpoint folder or model folder."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        from mmpo.checkpoint import latest_valid

        found = latest_valid(path)
        if found is None:
            raise ConfigError(f"{path} is a run folder without a complete checkpoint")
        path = found
    if (path / "model").is_dir():
        config = path / "config.yaml"
        return path / "model", config if config.is_file() else None
    if path.is_dir():
        for candidate in (path.parent / "config.yaml", path.parent.parent / "config.yaml"):
            if candidate.is_file():
                return path, candidate
        return path, None
    return path, None  # a Hub id


def run_config(config_file: Path | None, **overrides) -> TrainConfig:
    """The training config of a checkpoint (objective, beta, lengths...), with overrides."""
    cfg = TrainConfig()
    if config_file is not None:
        values = yaml.safe_load(config_file.read_text()) or {}
        cfg = from_dict(TrainConfig, values, source=str(config_file))
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    return resolve(cfg)


def reward_accuracy(model_dir: str | Path, cfg: TrainConfig, *, baseline: str | Path, dataset: list[str],
                    say=print) -> dict[str, float]:
    """Validation loss and reward metrics (``eval_rewards/accuracies`` ...) of ``model_dir`` on ``dataset``.

    ``baseline`` is the reference model (the SFT model the run started from).
    """
    accelerator = Accelerator()
    tokenizer = load_tokenizer(str(model_dir))
    rows = load_rows([DatasetSpec.parse(d) for d in dataset], seed=cfg.seed)
    examples, report = prepare_preference_examples(rows, tokenizer, max_prompt_length=cfg.max_prompt_length,
                                                   max_completion_length=cfg.max_completion_length,
                                                   on_error=cfg.on_bad_rows)
    say(f"reward data: {report.summary()}")
    pad = tokenizer.pad_token_id
    if needs_reference(cfg):
        reference = load_model(dataclasses.replace(cfg, model=str(baseline), lora=False))
        reference.to(accelerator.device)
        reference_logps(cfg, accelerator, reference, examples, pad, say)
        del reference
    policy = load_model(dataclasses.replace(cfg, model=str(model_dir), lora=False))
    policy.to(accelerator.device)
    metrics = evaluate_preference(cfg, accelerator, policy, examples, pad)
    return {"objective": cfg.objective, "beta": cfg.beta, "pairs": len(examples),
            "reward_accuracy": metrics["eval_rewards/accuracies"], **metrics}
