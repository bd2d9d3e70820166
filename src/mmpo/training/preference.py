"""Preference training (MMPO, DPO, SimPO): the recipe behind ``mmpo train``.

The objective and the forward options are built once per run (``PreferenceStep``); the reference
log-probs are computed once before the first step and cached on disk (``reference_logps``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from mmpo.config import ConfigError, TrainConfig, apply_preset, is_user_set, resolve, sources
from mmpo.data import examples_fingerprint, load_preference_examples
from mmpo.forward import ForwardOptions, PreferenceLogps, preference_logps
from mmpo.modeling import is_peft_model, load_model, load_tokenizer, model_context_length, weights_fingerprint
from mmpo.objectives import (
    ObjectiveOutput,
    batch_loss,
    chosen_nll_loss,
    dpo_loss,
    minmax_range,
    mmpo_loss,
    mmpo_prior_rewards,
    simpo_loss,
)
from mmpo.training import refcache
from mmpo.training.loop import (
    Recipe,
    RunResult,
    check_resume_data,
    final_model_dir,
    prepare_run_dir,
    publish_final_model,
    run,
)
from mmpo.training.run_dir import RunDir
from mmpo.training.setup import init_trackers, make_accelerator, mixed_precision, settle_batch

#: Per-pair metric names (TRL's) that every preference evaluation reports.
PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "losses",
)


def needs_reference(cfg: TrainConfig) -> bool:
    return cfg.objective in ("mmpo", "dpo")


def _reference_sums(examples: list[dict], length_normalize: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples' cached reference log-probs (per-token means with ``length_normalize``)."""
    ref_w = torch.tensor([ex["ref_chosen_logps"] for ex in examples], device=device, dtype=torch.float64)
    ref_l = torch.tensor([ex["ref_rejected_logps"] for ex in examples], device=device, dtype=torch.float64)
    if length_normalize:
        ref_w = ref_w / torch.tensor([max(len(ex["chosen_ids"]), 1) for ex in examples], device=device)
        ref_l = ref_l / torch.tensor([max(len(ex["rejected_ids"]), 1) for ex in examples], device=device)
    return ref_w, ref_l


def step_norm_range(cfg: TrainConfig, examples: list[dict]) -> tuple[float, float]:
    """Min-max statistics over every pair of an optimizer step (``normalize_scope="step"``)."""
    ref_w, ref_l = _reference_sums(examples, cfg.length_normalize)
    r_w, r_l = mmpo_prior_rewards(
        ref_w, ref_l, beta=cfg.beta, chosen_reward=cfg.chosen_reward, rejected_reward=cfg.rejected_reward
    )
    low, high = minmax_range(r_w, r_l)
    return float(low), float(high)


@dataclass(frozen=True)
class PreferenceStep:
    """One micro-batch of preference training: forward pass, objective, metrics. Built once per run."""

    cfg: TrainConfig
    pad_token_id: int
    options: ForwardOptions

    @classmethod
    def from_config(cls, cfg: TrainConfig, pad_token_id: int) -> PreferenceStep:
        return cls(cfg, pad_token_id, ForwardOptions.from_config(cfg))

    def objective(self, logps: PreferenceLogps, examples: list[dict], norm_range=None) -> ObjectiveOutput:
        """The configured objective on policy log-probs and the examples' cached reference."""
        cfg = self.cfg
        if cfg.objective == "sft":
            return chosen_nll_loss(logps.chosen_logps, logps.rejected_logps)
        if cfg.objective == "simpo":
            return simpo_loss(
                logps.chosen_logps,
                logps.rejected_logps,
                logps.chosen_lengths,
                logps.rejected_lengths,
                beta=cfg.beta,
                gamma=cfg.gamma,
            )
        ref_w, ref_l = _reference_sums(examples, cfg.length_normalize, logps.chosen_logps.device)
        pol_w, pol_l = logps.means() if cfg.length_normalize else (logps.chosen_logps, logps.rejected_logps)
        if cfg.objective == "dpo":
            return dpo_loss(pol_w, pol_l, ref_w, ref_l, beta=cfg.beta)
        return mmpo_loss(
            pol_w,
            pol_l,
            ref_w,
            ref_l,
            beta=cfg.beta,
            chosen_reward=cfg.chosen_reward,
            rejected_reward=cfg.rejected_reward,
            normalize=cfg.normalize,
            aux_loss=cfg.aux_loss,
            norm_range=norm_range,
        )

    def loss(self, model, examples: list[dict], norm_range=None) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """Loss, per-pair metric tensors and token count of one micro-batch."""
        cfg = self.cfg
        logps = preference_logps(
            model,
            examples,
            pad_token_id=self.pad_token_id,
            options=self.options,
            compute_entropy=cfg.entropy_coef > 0,
            length_normalize=cfg.length_normalize,
        )
        out = self.objective(logps, examples, norm_range)
        loss = batch_loss(
            out.losses,
            entropy_coef=cfg.entropy_coef,
            chosen_entropy=logps.chosen_entropy,
            rejected_entropy=logps.rejected_entropy,
        )
        metrics = {
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/accuracies": out.accuracies,
            "rewards/margins": out.margins,
            "logps/chosen": logps.chosen_logps.detach(),
            "logps/rejected": logps.rejected_logps.detach(),
            "losses": out.losses.detach(),
        }
        if out.chosen_weight is not None:
            metrics["mmpo/chosen_weight"] = out.chosen_weight
        return loss, metrics, logps.num_tokens

    def __call__(self, model, batch: list[dict], step_examples: list[dict]):
        """The loop's micro-step: with ``normalize_scope="step"`` the min-max range spans the whole step."""
        cfg = self.cfg
        norm_range = None
        if cfg.objective == "mmpo" and cfg.normalize == "minmax" and cfg.normalize_scope == "step":
            norm_range = step_norm_range(cfg, step_examples)
        return self.loss(model, batch, norm_range)


def reference_logps(step: PreferenceStep, accelerator: Accelerator, model, examples: list[dict], say=print) -> None:
    """Attach cached (or freshly computed) reference log-probs to every example.

    Called before the first optimizer step, when the policy *is* the reference (dropout off; LoRA
    adapters start at zero and are disabled anyway), so no second model is loaded.
    """
    if not examples:
        return
    cfg, pad_token_id, options = step.cfg, step.pad_token_id, step.options
    ids = [ex["id"] for ex in examples]
    key = refcache.cache_key(
        model_fingerprint=weights_fingerprint(model),
        data_fingerprint=examples_fingerprint(examples),
        dtype=f"{next(model.parameters()).dtype}+{mixed_precision(cfg)}",
    )
    path = (Path(cfg.cache_dir) if cfg.cache_dir else refcache.default_cache_dir()) / f"{key}.pt"
    cached = refcache.load(path, ids) if cfg.precompute_ref else None
    if cached is None:
        say(f"computing reference log-probs for {len(examples)} pairs")
        model.eval()

        def logps_fn(batch):
            # Same autocast as the training steps, so the policy equals the reference at step 0.
            with accelerator.autocast():
                if is_peft_model(model):
                    with model.disable_adapter():
                        out = preference_logps(model, batch, pad_token_id=pad_token_id, options=options)
                else:
                    out = preference_logps(model, batch, pad_token_id=pad_token_id, options=options)
            return out.chosen_logps.double(), out.rejected_logps.double()

        bar = None
        if cfg.progress and accelerator.is_local_main_process:
            from tqdm.auto import tqdm

            share = -(-len(examples) // accelerator.num_processes)
            bar = tqdm(total=share, desc="reference log-probs", unit="pair", dynamic_ncols=True, leave=False)
        mine = refcache.compute_reference_logps(
            logps_fn,
            examples,
            batch_size=cfg.per_device_batch_size * 2,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            progress=bar.update if bar is not None else None,
        )
        if bar is not None:
            bar.close()
        merged: dict[int, tuple[float, float]] = {}
        for part in gather_object([mine]) if accelerator.num_processes > 1 else [mine]:
            merged.update(part)
        chosen = torch.tensor([merged[i][0] for i in range(len(examples))], dtype=torch.float64)
        rejected = torch.tensor([merged[i][1] for i in range(len(examples))], dtype=torch.float64)
        if cfg.precompute_ref and accelerator.is_main_process:
            refcache.save(path, ids, chosen, rejected, {"model": cfg.model})
    else:
        say(f"reference log-probs: cache hit {path}")
        chosen, rejected = cached
    refcache.attach(examples, chosen, rejected)


def evaluate_preference(
    step: PreferenceStep, accelerator: Accelerator, model, examples: list[dict]
) -> dict[str, float]:
    """Validation loss and reward metrics (TRL's names with an ``eval_`` prefix)."""
    model.eval()
    size = step.cfg.per_device_batch_size
    batches = [examples[i : i + size] for i in range(0, len(examples), size)]
    collected: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for batch in batches[accelerator.process_index :: accelerator.num_processes]:
            _, metrics, _ = step.loss(model, batch)
            for key, value in metrics.items():
                collected.setdefault(key, []).append(value)
    local = {k: torch.cat(v) for k, v in collected.items()}
    if not local:  # more processes than batches: contribute nothing
        local = {k: torch.empty(0, device=accelerator.device) for k in PAIR_METRICS}
    gathered = {}
    for key, tensor in local.items():
        values = tensor.float().cpu()
        gathered[key] = torch.cat(gather_object([values]) if accelerator.num_processes > 1 else [values])
    out = {f"eval_{k}": float(v.mean()) for k, v in gathered.items() if k != "losses"}
    out["eval_loss"] = float(gathered["losses"].mean())
    return out


def require_examples(kind: str, report) -> None:
    if report.kept == 0:
        raise ConfigError(f"no usable {kind} examples: {report.summary()}")


def length_limits(cfg: TrainConfig, say=print) -> tuple[int, int]:
    """The prompt and completion limits that fit the model's context window.

    Limits you set that do not fit are an error; default limits that do not fit are lowered to it
    (prompt and completion sharing the window half and half at most) for this run, while the config
    keeps its values (so a resumed or re-planned run compares equal)."""
    window = model_context_length(cfg)
    if window is None or cfg.max_prompt_length + cfg.max_completion_length <= window:
        return cfg.max_prompt_length, cfg.max_completion_length
    defaults = TrainConfig()
    mine = [
        k
        for k in ("max_prompt_length", "max_completion_length")
        if is_user_set(cfg, k) and getattr(cfg, k) != getattr(defaults, k)
    ]
    if mine:
        raise ConfigError(
            f"max_prompt_length {cfg.max_prompt_length} + max_completion_length {cfg.max_completion_length} is "
            f"more than the model's context window ({window} positions, max_position_embeddings): lower {mine[0]}"
        )
    completion = min(cfg.max_completion_length, window // 2)
    prompt = min(cfg.max_prompt_length, window - completion)
    say(f"length limits lowered to the model's {window} positions: prompt {prompt}, completion {completion}")
    return prompt, completion


def describe_objective(cfg: TrainConfig) -> str | None:
    """A start-up line for settings whose effect is not what their names suggest."""
    if cfg.objective == "mmpo" and cfg.aux_loss:
        return (
            "note: MMPO with the auxiliary term: its per-pair loss equals -s_w, so its gradient is the chosen "
            "answer's negative log-likelihood (beta, eps and the normalization only shift the loss; the rejected "
            "answer gets no gradient). --no-aux-loss trains the marginal likelihood (docs/objectives.md)."
        )
    return None


def require_sft_stage(cfg: TrainConfig) -> None:
    """A preset that starts from the SFT stage's folder needs that stage to have run."""
    if sources(cfg)["model"] == "preset" and cfg.model.startswith("runs/") and not Path(cfg.model).exists():
        raise ConfigError(
            f"preset '{cfg.preset}' starts from the SFT stage's output {cfg.model}, which does not exist: run "
            f"`mmpo sft --preset {cfg.preset}` first, pass --model, or use --preset {cfg.preset}-instruct"
        )


def train(cfg: TrainConfig) -> RunResult:
    """Preference training (MMPO, DPO, SimPO, or SFT on the chosen answers) as configured; ``mmpo train``."""
    cfg = apply_preset(cfg)
    require_sft_stage(cfg)
    cfg = settle_batch(resolve(cfg))
    main_process = int(os.environ.get("RANK", "0")) == 0
    max_prompt_length, max_completion_length = length_limits(cfg, say=print if main_process else lambda _: None)
    options = ForwardOptions.from_config(cfg)  # built once; its checks run before any long work
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    say = accelerator.print
    run_dir = prepare_run_dir(cfg, accelerator)
    if describe_objective(cfg):
        say(describe_objective(cfg))

    # Data first: a malformed row fails in seconds, before any model is loaded.
    tokenizer = load_tokenizer(
        cfg.model, trust_remote_code=cfg.trust_remote_code, chat_template_path=cfg.chat_template_path
    )
    data_settings = dict(
        seed=cfg.seed,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        on_bad_rows=cfg.on_bad_rows,
    )
    train_examples, train_report = load_preference_examples(cfg.dataset, tokenizer, **data_settings)
    require_examples("training", train_report)
    check_resume_data(cfg, accelerator, train_examples)  # a changed dataset stops a resume here, in seconds
    say(f"train data: {train_report.summary()}")
    eval_examples, eval_report = [], None
    if cfg.eval_dataset:
        eval_examples, eval_report = load_preference_examples(cfg.eval_dataset, tokenizer, **data_settings)
        say(f"eval data: {eval_report.summary()}")

    model = load_model(cfg)
    model.to(accelerator.device)
    step = PreferenceStep(cfg, tokenizer.pad_token_id, options)
    if needs_reference(cfg):
        reference_logps(step, accelerator, model, train_examples, say)
        reference_logps(step, accelerator, model, eval_examples, say)

    evaluate = (lambda m: evaluate_preference(step, accelerator, m, eval_examples)) if eval_examples else None
    if accelerator.is_main_process:
        reports = {"train": train_report.to_dict(), "eval": eval_report.to_dict() if eval_report else None}
        run_dir.write_json(run_dir.data_report, reports)
    init_trackers(accelerator, cfg, "mmpo")
    result = run(
        cfg, accelerator, model, tokenizer, Recipe(cfg.objective, train_examples, step, evaluate, data_checked=True)
    )
    publish_final_model(cfg, accelerator, result, summarize(cfg, result))
    result.summary = summarize(cfg, result)
    if accelerator.is_main_process:
        run_dir.write_json(run_dir.summary, result.summary)
    return result


def summarize(cfg: TrainConfig, result: RunResult) -> dict[str, Any]:
    evals = [r for r in result.metrics if "eval_rewards/accuracies" in r]
    train_losses = [r["loss"] for r in result.metrics if "loss" in r and "eval_loss" not in r]
    run_dir = RunDir(cfg.output_dir)
    summary: dict[str, Any] = {
        "objective": cfg.objective,
        "beta": cfg.beta,
        "learning_rate": cfg.learning_rate,
        "steps": result.global_step,
        "output_dir": str(cfg.output_dir),
        "final_model": str(final_model_dir(cfg.output_dir)),
        "metrics_file": str(run_dir.metrics),
        "train_loss_curve": train_losses,
    }
    if evals:
        summary["eval_reward_accuracy_before"] = evals[0]["eval_rewards/accuracies"] if evals[0]["step"] == 0 else None
        summary["eval_reward_accuracy_after"] = evals[-1]["eval_rewards/accuracies"]
        summary["eval_loss_after"] = evals[-1]["eval_loss"]
    return summary


def with_model(cfg: TrainConfig, model: str) -> TrainConfig:
    """``cfg`` loading another model, without LoRA (a checkpoint folder or a reference model)."""
    return dataclasses.replace(cfg, model=model, lora=False)
