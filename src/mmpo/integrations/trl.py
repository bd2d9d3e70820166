"""MMPO inside TRL's own ``DPOTrainer``: a one-line change for TRL users.

::

    from mmpo.integrations.trl import MMPOTrainer          # instead of: from trl import DPOTrainer

    trainer = MMPOTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

:class:`MMPOTrainer` is a ``trl.DPOTrainer`` whose loss is MMPO (:func:`mmpo.objectives.mmpo_loss`,
plus :func:`mmpo.objectives.entropy_surrogate` for the entropy ablation). Everything else is
TRL's: dataset preparation and chat templates, reference log-probs (precomputed, a reference
model, or PEFT adapters switched off), optimizer, schedule, gradient accumulation, evaluation,
checkpoints, model card and the Hub. It logs TRL's metric names (``rewards/chosen`` etc., where
MMPO's rewards are its scores ``s = log pi + normalized prior``) plus ``mmpo/chosen_weight``
(``sigmoid(s_w - s_l)``, Theorem 3.2).

The MMPO settings are fields of :class:`MMPOConfig`, a ``DPOConfig`` with MMPO's defaults
(``beta=0.01``, ``chosen_reward=0.9``, ``rejected_reward=0.1``, ``normalize="minmax"``,
``aux_loss=True``, ``length_normalize=False``, ``entropy_coef=0.0``). A plain ``DPOConfig`` works
too (the one-line change): its ``beta`` is used and the other MMPO settings take their defaults.
The min-max statistics are those of each micro-batch (the authors' code; mmpo's
``normalize_scope="micro"``).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from packaging.version import Version

try:
    import trl
    from trl import DPOConfig, DPOTrainer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("mmpo.integrations.trl needs TRL: pip install 'mmpo[trl]'") from err

from mmpo.objectives import batch_loss, entropy_surrogate, mmpo_loss

__all__ = ["MIN_TRL_VERSION", "MMPOConfig", "MMPOSettings", "MMPOTrainer"]

# The subclass relies on DPOTrainer's batch layout (chosen then rejected rows, ``completion_mask``),
# its fused LM head (``fused_lm_head=True``) and ``compute_ref_log_probs``: TRL 1.16's API.
MIN_TRL_VERSION = "1.16.0"
if Version(trl.__version__) < Version(MIN_TRL_VERSION):  # pragma: no cover - depends on the installed TRL
    raise ImportError(
        f"mmpo.integrations.trl needs trl>={MIN_TRL_VERSION}, found {trl.__version__}: pip install 'mmpo[trl]'"
    )


_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
PAPER_BETA = 0.01


@dataclass
class MMPOConfig(DPOConfig):
    """``DPOConfig`` plus MMPO's settings (docs/objectives.md); every other field is TRL's."""

    beta: float = field(
        default=PAPER_BETA,
        metadata={"help": "MMPO: weight of the reference log-prob in the prior reward r = eps + beta * log pi_ref."},
    )
    chosen_reward: float = field(default=0.9, metadata={"help": "MMPO eps_w: prior reward offset of the chosen."})
    rejected_reward: float = field(default=0.1, metadata={"help": "MMPO eps_l: prior reward offset of the rejected."})
    normalize: str = field(
        default="minmax",
        metadata={"help": "In-batch min-max normalization of the prior rewards ('none' is the ablation)."},
    )
    aux_loss: bool = field(
        default=True, metadata={"help": "Add the DPO-style auxiliary term on the scores (False is the ablation)."}
    )
    length_normalize: bool = field(
        default=False, metadata={"help": "Use per-token mean log-probs (policy and reference) instead of sums."}
    )
    entropy_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the entropy surrogate subtracted from the loss (the paper uses beta)."},
    )


@dataclass(frozen=True)
class MMPOSettings:
    """The MMPO settings a trainer runs with (read from an ``MMPOConfig`` or a plain ``DPOConfig``)."""

    beta: float = PAPER_BETA
    chosen_reward: float = 0.9
    rejected_reward: float = 0.1
    normalize: str = "minmax"
    aux_loss: bool = True
    length_normalize: bool = False
    entropy_coef: float = 0.0

    @classmethod
    def from_args(cls, args: DPOConfig) -> MMPOSettings:
        defaults = cls()
        return cls(**{f.name: getattr(args, f.name, getattr(defaults, f.name)) for f in dataclasses.fields(cls)})


def check_args(args: DPOConfig) -> MMPOSettings:
    """The MMPO settings of ``args``, or a ``ValueError`` naming the setting that cannot work.

    Runs before TRL tokenizes the data or computes reference log-probs.
    """
    settings = MMPOSettings.from_args(args)
    problems = []
    if not settings.beta > 0:
        problems.append(f"beta must be > 0 (got {settings.beta})")
    if settings.normalize not in ("minmax", "none"):
        problems.append(f"normalize must be 'minmax' or 'none' (got {settings.normalize!r})")
    if not settings.chosen_reward > settings.rejected_reward:
        problems.append(
            f"chosen_reward must be > rejected_reward (got {settings.chosen_reward} and {settings.rejected_reward})"
        )
    if not settings.entropy_coef >= 0:
        problems.append(f"entropy_coef must be >= 0 (got {settings.entropy_coef})")
    # DPOConfig options that change TRL's DPO loss or its log-probs: MMPO replaces that loss.
    if list(args.loss_type) != ["sigmoid"] or args.loss_weights is not None:
        problems.append(
            f"loss_type={list(args.loss_type)} / loss_weights={args.loss_weights}: MMPOTrainer replaces "
            "TRL's DPO loss with MMPO, so leave loss_type and loss_weights at their defaults"
        )
    for name, default in (
        ("f_divergence_type", "reverse_kl"),
        ("ld_alpha", None),
        ("use_weighting", False),
        ("label_smoothing", 0.0),
    ):
        if getattr(args, name) != default:
            problems.append(
                f"{name}={getattr(args, name)!r} is a DPO-loss option MMPO does not have (leave it at {default!r})"
            )
    if problems:
        raise ValueError("MMPOTrainer: " + "; ".join(problems))
    return settings


class MMPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with the MMPO loss (module docstring). Same constructor as ``DPOTrainer``."""

    _tag_names: ClassVar[list[str]] = ["trl", "mmpo"]
    _name = "MMPO"
    _paper: ClassVar[dict[str, str]] = {
        "title": "Offline Preference Optimization via Maximum Marginal Likelihood Estimation",
        "id": "2510.22881",
        "citation": "@inproceedings{najafi2026mmpo,\n"
        "    title     = {{Offline Preference Optimization via Maximum Marginal Likelihood Estimation}},\n"
        "    author    = {Saeed Najafi and Alona Fyshe},\n"
        "    year      = 2026,\n"
        "    booktitle = {Proceedings of EACL 2026},\n"
        "}",
    }

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, *rest: Any, **kwargs: Any):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = MMPOConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-MMPO")
        self.mmpo = check_args(args)
        if not isinstance(args, MMPOConfig) and self.mmpo.beta != PAPER_BETA:
            warnings.warn(
                f"MMPOTrainer runs with the DPOConfig's beta={self.mmpo.beta}; MMPO's paper value is "
                f"{PAPER_BETA} (MMPOConfig's default)",
                stacklevel=2,
            )
        super().__init__(model, ref_model, args, *rest, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The MMPO loss of one micro-batch (TRL's layout: chosen rows, then rejected rows)."""
        mode = "train" if self.model.training else "eval"
        settings = self.mmpo
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:  # MoE router loss, as in DPOTrainer
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        mask = completion_mask[..., 1:]  # the targets: completion tokens (EOS included)
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        token_logps = outputs.log_probs[:, -mask.size(1) :]  # zero outside the completion
        chosen_logps, rejected_logps = token_logps.sum(dim=1).chunk(2, dim=0)

        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:  # the reference model, or this model with its PEFT adapters switched off (TRL decides)
            reference = self.ref_model if self.ref_model is not None else self.model
            ref_chosen, ref_rejected = self.compute_ref_log_probs(reference, inputs)
        ref_chosen, ref_rejected = ref_chosen.to(chosen_logps.device), ref_rejected.to(chosen_logps.device)

        policy_w, policy_l = chosen_logps, rejected_logps
        if settings.length_normalize:  # policy and reference alike become per-token means
            lengths_w, lengths_l = (n.clamp(min=1) for n in mask.sum(dim=1).chunk(2, dim=0))
            policy_w, policy_l = policy_w / lengths_w, policy_l / lengths_l
            ref_chosen, ref_rejected = ref_chosen / lengths_w, ref_rejected / lengths_l
        out = mmpo_loss(
            policy_w,
            policy_l,
            ref_chosen,
            ref_rejected,
            beta=settings.beta,
            chosen_reward=settings.chosen_reward,
            rejected_reward=settings.rejected_reward,
            normalize=settings.normalize,
            aux_loss=settings.aux_loss,
        )
        entropy_w = entropy_l = None
        if settings.entropy_coef > 0:
            surrogate = entropy_surrogate(
                outputs.entropy[:, -mask.size(1) :], token_logps, mask, length_normalize=settings.length_normalize
            )
            entropy_w, entropy_l = surrogate.chunk(2, dim=0)
        loss = batch_loss(
            out.losses, entropy_coef=settings.entropy_coef, chosen_entropy=entropy_w, rejected_entropy=entropy_l
        )
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        self._log_step_metrics(mode, inputs, outputs, mask, chosen_logps, rejected_logps, out)
        if return_outputs:  # TRL's deprecated path: logits need a second forward without the fused head
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _log_step_metrics(self, mode, inputs, outputs, mask, chosen_logps, rejected_logps, out) -> None:
        """TRL's DPO metrics under TRL's names (rewards are MMPO's scores) plus ``mmpo/chosen_weight``."""
        metrics, acc = self._metrics[mode], self.accelerator
        seq_len = mask.size(1)

        def gathered_sum(value: torch.Tensor) -> float:
            return acc.gather_for_metrics(value.detach()).sum().item()

        def gathered_mean(value: torch.Tensor) -> float:
            return acc.gather(value.detach()).float().mean().item()

        tokens = gathered_sum(mask.sum())
        entropy = gathered_sum((outputs.entropy[:, -seq_len:].detach() * mask).sum())
        metrics["entropy"].append(entropy / tokens if tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += int(gathered_sum(inputs["attention_mask"].sum())) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

        chosen_mask, rejected_mask = mask.bool().chunk(2, dim=0)
        chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
        for side, logits, side_mask in (
            ("chosen", chosen_logits, chosen_mask),
            ("rejected", rejected_logits, rejected_mask),
        ):
            count = gathered_sum(side_mask.sum())
            metrics[f"logits/{side}"].append(gathered_sum(logits[side_mask].sum()) / count if count > 0 else 0.0)
        chosen_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
        count = gathered_sum(chosen_mask.sum())
        metrics["mean_token_accuracy"].append(gathered_sum((chosen_top1 & chosen_mask).sum()) / count if count else 0.0)

        metrics["rewards/chosen"].append(gathered_mean(out.chosen_rewards))
        metrics["rewards/rejected"].append(gathered_mean(out.rejected_rewards))
        metrics["rewards/accuracies"].append(gathered_mean(out.accuracies))
        metrics["rewards/margins"].append(gathered_mean(out.margins))
        metrics["logps/chosen"].append(gathered_mean(chosen_logps))
        metrics["logps/rejected"].append(gathered_mean(rejected_logps))
        metrics["mmpo/chosen_weight"].append(gathered_mean(out.chosen_weight))
