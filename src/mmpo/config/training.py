"""Run configurations: the dataclasses the CLI is generated from, their resolution and validation.

Every field has a one-line docstring; ``mmpo train --help`` shows them. Fields left ``None``
take the objective's default (``mmpo.config.defaults``) when the config is resolved. Each config
records where its values came from (``mmpo.config.provenance``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmpo.config.defaults import (
    AUTHORS_CODE_VARIANT,
    LORA_ALL_PROJECTIONS,
    OBJECTIVE_DEFAULTS,
    SFT_LEARNING_RATE,
    TRACKERS,
    bundled_path,
)
from mmpo.config.provenance import is_user_set, records_sources, with_values


class ConfigError(ValueError):
    """A configuration value or key that cannot work; raised before any long work starts."""


@records_sources
@dataclass
class CommonConfig:
    """Settings shared by SFT and preference training."""

    preset: str | None = None
    """The paper's settings: smollm2-135m, smollm2-360m, llama3.2-1b (also -instruct) or llama3-8b; fills what you do not set."""
    model: str = field(default_factory=lambda: str(bundled_path("sft_model")))
    """Model to train: a Hugging Face Hub id or a local folder (default: the bundled world's SFT model)."""
    output_dir: str = "runs/mmpo"
    """Run folder: checkpoints, metrics.jsonl, summary.json and config.yaml go here."""
    seed: int = 42
    """Seed for data order, initialization of new weights and sampling."""
    epochs: int = 1
    """Number of passes over the training data."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run all epochs)."""
    learning_rate: float | None = None
    """Peak learning rate (default: the objective's, see `mmpo.config.defaults.OBJECTIVE_DEFAULTS`)."""
    per_device_batch_size: int = 8
    """Examples (pairs, for preference training) per device per micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step; global batch = this x per-device batch x processes."""
    global_batch_size: int = 0
    """Examples per optimizer step over all processes; when set, accumulation is derived from it (0: not set)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of the optimizer steps spent in linear warm-up before the cosine decay."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """AdamW from torch, or 8-bit AdamW from bitsandbytes (must be installed)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; auto = float32 master weights (with bf16 autocast on GPU, see mixed_precision); bfloat16 = pure bf16 weights."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast of the forward pass over the weights (auto: bf16 on a GPU that supports it when the weights are float32, else no)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    """Attention kernel passed to transformers."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora: bool = False
    """Train LoRA adapters (PEFT) instead of all weights."""
    lora_r: int = 64
    """LoRA rank."""
    lora_alpha: int = 64
    """LoRA alpha (scaling = alpha / r)."""
    lora_dropout: float = 0.01
    """LoRA dropout."""
    lora_target_modules: tuple[str, ...] = LORA_ALL_PROJECTIONS
    """Module names that get LoRA adapters."""
    trust_remote_code: bool = False
    """Allow model code from the Hub to run (off unless you trust the model's repository)."""
    chat_template_path: str | None = None
    """A Jinja chat template file that replaces the tokenizer's own (saved with the checkpoints)."""
    logging_steps: int = 5
    """Write a metrics line every this many optimizer steps."""
    eval_steps: int = 0
    """Evaluate on the validation split every this many optimizer steps (0: only at each epoch's end)."""
    save_steps: int = 0
    """Also write a checkpoint every this many optimizer steps (0: only one per epoch)."""
    save_total_limit: int = 0
    """Keep only the newest N step checkpoints (epoch checkpoints are always kept; 0 = keep all)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in output_dir."""
    dry_run: bool = False
    """Print every resolved setting with its source, the data sizes, steps and a memory estimate; run nothing."""
    resume_allow_data_change: bool = False
    """With --resume: go on even if the training data changed since the run started (refused otherwise)."""
    report_to: tuple[str, ...] = ()
    """Experiment trackers through Accelerate: tensorboard, wandb, mlflow, trackio, comet_ml, aim, clearml, dvclive, swanlab, all or none."""
    run_name: str | None = None
    """Name of the run in trackers (default: the output folder's name)."""
    progress: bool = True
    """Show a progress bar."""
    on_bad_rows: Literal["raise", "skip"] = "raise"
    """Stop at the first malformed row (default), or skip such rows (they are counted and reported)."""
    # --- forward pass (speed) ---
    packing: bool = True
    """Pack several sequences per row instead of padding each (exact: attention and positions stay per sequence)."""
    logits_chunk_size: int = 256
    """Score completion tokens through the LM head this many at a time, never holding full-vocabulary logits (0: all at once)."""
    selective_recompute: bool = True
    """Keep only matmul/attention outputs for the backward pass and recompute norms and activations (exact, ~half the memory)."""
    flex_attention: bool = True
    """On CUDA: run the packed/shared-prompt layouts through FlexAttention block masks (exact; probed once per model)."""
    liger_head: bool = False
    """On CUDA with liger-kernel >= 0.8.5 installed: Liger's fused linear cross-entropy for the LM head."""
    group_by_length: bool = False
    """Put examples of similar length in the same step (still shuffled per epoch): less padding when packing is off."""


@records_sources
@dataclass
class SFTConfig(CommonConfig):
    """Supervised fine-tuning on chat data (loss on assistant tokens only)."""

    model: str = field(default_factory=lambda: str(bundled_path("sft_model")))
    """Model to fine-tune: Hub id or local folder."""
    dataset: tuple[str, ...] = field(default_factory=lambda: (str(bundled_path("data/sft_train.jsonl")),))
    """Chat datasets, each 'PATH_OR_HUB_ID[:SPLIT][@WEIGHT]' (columns: messages, prompt/completion or instruction/output)."""
    eval_dataset: tuple[str, ...] = field(default_factory=lambda: (str(bundled_path("data/sft_val.jsonl")),))
    """Validation chat datasets, same form (empty: no validation)."""
    output_dir: str = "runs/sft"
    """Run folder."""
    learning_rate: float | None = SFT_LEARNING_RATE
    """Peak learning rate."""
    max_length: int = 1024
    """Truncate conversations to this many tokens (from the right)."""


@records_sources
@dataclass
class TrainConfig(CommonConfig):
    """Preference training with MMPO, DPO or SimPO."""

    objective: Literal["mmpo", "dpo", "simpo", "sft"] = "mmpo"
    """Preference objective (sft: the chosen answers' NLL, the baseline default MMPO equals up to a constant)."""
    variant: Literal["paper", "authors-code"] = "paper"
    """MMPO as in the paper, or as the authors' training code runs it (entropy bonus with coefficient beta, eps_w 1.0)."""
    dataset: tuple[str, ...] = field(default_factory=lambda: (str(bundled_path("data/prefs_train.jsonl")),))
    """Preference datasets, each 'PATH_OR_HUB_ID[:SPLIT][@WEIGHT]' (a weighted mixture when several)."""
    eval_dataset: tuple[str, ...] = field(default_factory=lambda: (str(bundled_path("data/prefs_test.jsonl")),))
    """Validation preference datasets, same form (empty: no validation)."""
    beta: float | None = None
    """Objective temperature (default: MMPO 0.01, DPO 0.1, SimPO 2.0)."""
    chosen_reward: float = OBJECTIVE_DEFAULTS["mmpo"]["chosen_reward"]
    """MMPO eps_w: prior reward offset of the chosen completion."""
    rejected_reward: float = OBJECTIVE_DEFAULTS["mmpo"]["rejected_reward"]
    """MMPO eps_l: prior reward offset of the rejected completion."""
    normalize: Literal["minmax", "none"] = "minmax"
    """MMPO in-batch normalization of prior rewards ('none' is the ablation)."""
    normalize_scope: Literal["micro", "step"] = "micro"
    """Min-max statistics over one device's micro-batch (authors' code) or the whole optimizer step."""
    aux_loss: bool = True
    """MMPO: add the DPO-style auxiliary term on the normalized scores (--no-aux-loss is the ablation)."""
    length_normalize: bool = False
    """Use per-token mean log-probs instead of sums (ablation; SimPO always uses means)."""
    entropy_coef: float = 0.0
    """Weight of the entropy surrogate subtracted from the loss (ablation; the paper uses beta)."""
    gamma: float = OBJECTIVE_DEFAULTS["simpo"]["gamma"]
    """SimPO target margin."""
    max_prompt_length: int = 1800
    """Truncate prompts from the left to this many tokens."""
    max_completion_length: int = 512
    """Truncate completions from the right to this many tokens."""
    precompute_ref: bool = True
    """Compute reference log-probs once before training and cache them on disk."""
    cache_dir: str | None = None
    """Reference log-prob cache folder (default: $MMPO_CACHE or ~/.cache/mmpo)."""
    # --- forward pass (speed) ---
    share_prompt: bool = True
    """Run prompt, chosen and rejected as one sequence (rejected cannot see chosen): the prompt is computed once (exact)."""


def resolve(cfg: CommonConfig) -> CommonConfig:
    """Fill objective-dependent defaults (beta, learning rate) and the variant's settings; check every value."""
    check_types(cfg)  # before reading values whose type may be wrong (YAML strings)
    updates: dict[str, Any] = {}
    if isinstance(cfg, TrainConfig):
        defaults = OBJECTIVE_DEFAULTS[cfg.objective]
        if cfg.beta is None:
            updates["beta"] = defaults["beta"]
        if cfg.learning_rate is None:
            updates["learning_rate"] = defaults["learning_rate"]
    elif cfg.learning_rate is None:
        updates["learning_rate"] = SFT_LEARNING_RATE
    cfg = with_values(cfg, "objective default", **updates)
    if isinstance(cfg, TrainConfig) and cfg.objective == "mmpo" and cfg.variant == "authors-code":
        variant = {}
        if not is_user_set(cfg, "entropy_coef"):
            variant["entropy_coef"] = cfg.beta  # the authors' trainer ties the entropy bonus to beta
        if not is_user_set(cfg, "chosen_reward"):
            variant["chosen_reward"] = AUTHORS_CODE_VARIANT["chosen_reward"]
        cfg = with_values(cfg, "variant authors-code", **variant)
    validate(cfg)
    return cfg


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the field type ``hint`` (YAML gives strings for typos like '0.1')."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return None if value in args else f"must be one of {', '.join(map(repr, args))}"
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [_type_problem(value, a) for a in args if a is not type(None)]
        return None if any(p is None for p in problems) else problems[0]
    if origin is tuple:
        ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
        return None if ok else "must be a list of strings"
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        return None if math.isfinite(value) else "must be a finite number"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    return None


def check_types(cfg: CommonConfig) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        problem = _type_problem(getattr(cfg, f.name), hints[f.name])
        if problem:
            raise ConfigError(f"config key '{f.name}': {problem} (got {getattr(cfg, f.name)!r})")


def validate(cfg: CommonConfig) -> None:
    """Range checks of a config whose types are already checked (``resolve`` does both)."""

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}': {message} (got {getattr(cfg, key)!r})")

    need(cfg.learning_rate is None or cfg.learning_rate > 0, "learning_rate", "must be > 0")
    need(cfg.epochs >= 1, "epochs", "must be >= 1")
    need(cfg.per_device_batch_size >= 1, "per_device_batch_size", "must be >= 1")
    need(cfg.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
    need(cfg.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
    need(0 <= cfg.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
    need(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(cfg.lora_r >= 1, "lora_r", "must be >= 1")
    need(0 <= cfg.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
    need(cfg.logging_steps >= 1, "logging_steps", "must be >= 1")
    need(cfg.eval_steps >= 0, "eval_steps", "must be >= 0")
    need(cfg.save_steps >= 0, "save_steps", "must be >= 0")
    need(bool(cfg.dataset), "dataset", "needs at least one dataset")
    need(cfg.chat_template_path is None or Path(cfg.chat_template_path).is_file(), "chat_template_path", "no such file")
    need(cfg.max_steps == -1 or cfg.max_steps >= 1, "max_steps", "must be -1 (run all epochs) or >= 1")
    need(cfg.save_total_limit >= 0, "save_total_limit", "must be >= 0 (0 keeps every checkpoint)")
    need(
        cfg.global_batch_size >= 0, "global_batch_size", "must be >= 0 (0: per-device batch x accumulation x processes)"
    )
    for tracker in cfg.report_to:
        need(tracker in (*TRACKERS, "all", "none"), "report_to", f"trackers are {', '.join(TRACKERS)}, all or none")
    need("none" not in cfg.report_to or len(cfg.report_to) == 1, "report_to", "'none' cannot be combined with trackers")
    _refuse_settings_without_effect(cfg)
    if isinstance(cfg, TrainConfig):
        need(cfg.beta is None or cfg.beta > 0, "beta", "must be > 0")
        need(cfg.max_prompt_length >= 1, "max_prompt_length", "must be >= 1")
        need(cfg.max_completion_length >= 1, "max_completion_length", "must be >= 1")
        need(cfg.entropy_coef >= 0, "entropy_coef", "must be >= 0")
        need(
            cfg.chosen_reward > cfg.rejected_reward or cfg.objective != "mmpo",
            "chosen_reward",
            "MMPO needs chosen_reward > rejected_reward",
        )
    if isinstance(cfg, SFTConfig):
        need(cfg.max_length >= 2, "max_length", "must be >= 2")


def _refuse_settings_without_effect(cfg: CommonConfig) -> None:
    """A value the user set that the run would ignore is an error, not a silent no-op."""

    def ignored(key: str, reason: str) -> None:
        default = getattr(type(cfg)(), key)
        if is_user_set(cfg, key) and getattr(cfg, key) != default:
            raise ConfigError(f"config key '{key}' has no effect here: {reason} (got {getattr(cfg, key)!r})")

    if not cfg.lora:
        for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"):
            ignored(key, "LoRA is off (set lora: true)")
    if not cfg.eval_dataset:
        ignored("eval_steps", "there is no eval_dataset")
    if isinstance(cfg, TrainConfig):
        if cfg.objective != "mmpo":
            for key in ("chosen_reward", "rejected_reward", "normalize", "normalize_scope", "aux_loss", "variant"):
                ignored(key, f"only MMPO uses it, the objective is {cfg.objective}")
        if cfg.objective != "simpo":
            ignored("gamma", f"only SimPO uses it, the objective is {cfg.objective}")
        if cfg.objective == "sft":
            ignored("length_normalize", "the sft objective sums the chosen answer's token NLL")
        if cfg.objective == "simpo":
            ignored("length_normalize", "SimPO always uses per-token means")
            ignored("precompute_ref", "SimPO has no reference model")
        if cfg.normalize == "none":
            ignored("normalize_scope", "normalize is 'none'")


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch splits into processes, micro-batches and accumulation steps."""

    per_device: int
    accumulation: int
    processes: int
    note: str | None = None  # said once at start-up when the layout is not what one might expect

    @property
    def global_batch(self) -> int:
        return self.per_device * self.accumulation * self.processes


def batch_layout(cfg: CommonConfig, processes: int, preset_global_batch: int | None = None) -> BatchLayout:
    """Derive gradient accumulation from ``global_batch_size`` (when set) and the number of processes.

    An explicit ``gradient_accumulation_steps`` wins over a global batch that came from a preset;
    when that makes the global batch differ from the preset's, the layout says so.
    """
    per_device, accumulation = cfg.per_device_batch_size, cfg.gradient_accumulation_steps
    if cfg.global_batch_size:
        if is_user_set(cfg, "gradient_accumulation_steps") and is_user_set(cfg, "global_batch_size"):
            if per_device * accumulation * processes != cfg.global_batch_size:
                raise ConfigError(
                    f"global_batch_size {cfg.global_batch_size} != per_device_batch_size {per_device} x "
                    f"gradient_accumulation_steps {accumulation} x {processes} processes: set one or the other"
                )
        elif not is_user_set(cfg, "gradient_accumulation_steps"):
            share = per_device * processes
            if cfg.global_batch_size % share:
                raise ConfigError(
                    f"global_batch_size {cfg.global_batch_size} is not a multiple of per_device_batch_size "
                    f"{per_device} x {processes} processes"
                )
            accumulation = cfg.global_batch_size // share
            note = (
                f"global batch {cfg.global_batch_size} = {per_device} per device x {accumulation} accumulation "
                f"x {processes} process{'es' if processes > 1 else ''}"
            )
            return BatchLayout(per_device, accumulation, processes, note)
    layout = BatchLayout(per_device, accumulation, processes)
    if preset_global_batch and layout.global_batch != preset_global_batch:
        return dataclasses.replace(
            layout,
            note=f"global batch {layout.global_batch} ({per_device} per device x {accumulation} accumulation x "
            f"{processes} processes) differs from the preset's {preset_global_batch}, because you set "
            "gradient_accumulation_steps",
        )
    return layout
