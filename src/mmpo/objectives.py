"""Preference objectives as pure functions of per-sequence log-probabilities.

No model and no trainer here: every function takes 1-D tensors of **summed** completion
log-probs (one value per pair; callers pass per-token means for the length-normalization
ablation) and returns an :class:`ObjectiveOutput`. ``docs/objectives.md`` states them; the
formulas below follow it line by line.

All arithmetic runs in at least float32 so that bfloat16 inputs give the same answers as
float32 ones (bf16 has 8 bits of mantissa: -1000.5 and -1000 are the same number in it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ObjectiveOutput",
    "mmpo_loss",
    "dpo_loss",
    "simpo_loss",
    "chosen_nll_loss",
    "mmpo_prior_rewards",
    "minmax_range",
    "entropy_surrogate",
    "batch_loss",
    "NORMALIZE_DELTA",
    "OBJECTIVE_DEFAULTS",
]

#: ``delta`` of the in-batch min-max normalization (docs/objectives.md, MMPO step 2).
NORMALIZE_DELTA = 1e-6

#: The paper's defaults of each objective's hyper-parameters (docs/objectives.md); the one table
#: that the functions below, the configs and the presets read.
OBJECTIVE_DEFAULTS: dict[str, dict[str, float]] = {
    "mmpo": {"beta": 0.01, "chosen_reward": 0.9, "rejected_reward": 0.1},
    "dpo": {"beta": 0.1},
    "simpo": {"beta": 2.0, "gamma": 1.0},
    # Supervised fine-tuning on the chosen answers: no temperature; beta is carried only so every
    # objective has one (it changes nothing).
    "sft": {"beta": 1.0},
}


@dataclass
class ObjectiveOutput:
    """What every objective returns.

    ``losses`` has one entry per pair (the batch loss is ``losses.mean()``) and carries the
    gradient. ``chosen_rewards``/``rejected_rewards`` are detached scores whose comparison is the
    objective's reward accuracy. ``chosen_weight`` is MMPO's ``sigma(s_w - s_l)`` (Theorem 3.2),
    ``None`` for the baselines.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_weight: torch.Tensor | None = None

    @property
    def accuracies(self) -> torch.Tensor:
        """1.0 where the chosen completion out-scores the rejected one (strictly), else 0.0."""
        return (self.chosen_rewards > self.rejected_rewards).float()

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards


def _upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]


def _check_shapes(*tensors: torch.Tensor) -> None:
    shape = tensors[0].shape
    if len(shape) != 1:
        raise ValueError(f"objectives take 1-D tensors (one value per pair), got shape {tuple(shape)}")
    if shape[0] == 0:
        raise ValueError("empty batch: objectives need at least one pair")
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"all inputs must have the same shape, got {tuple(shape)} and {tuple(t.shape)}")


def mmpo_prior_rewards(
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_reward: float,
    rejected_reward: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = eps + beta * ref`` for chosen and rejected (docs/objectives.md step 1); constants, no gradient."""
    ref_w, ref_l = _upcast(ref_chosen_logps.detach(), ref_rejected_logps.detach())
    return chosen_reward + beta * ref_w, rejected_reward + beta * ref_l


def minmax_range(r_w: torch.Tensor, r_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` over the ``2B`` prior rewards of a batch (or of a whole optimizer step)."""
    both = torch.cat([r_w.reshape(-1), r_l.reshape(-1)])
    return both.min(), both.max()


def mmpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = OBJECTIVE_DEFAULTS["mmpo"]["beta"],
    chosen_reward: float = OBJECTIVE_DEFAULTS["mmpo"]["chosen_reward"],
    rejected_reward: float = OBJECTIVE_DEFAULTS["mmpo"]["rejected_reward"],
    normalize: str = "minmax",
    aux_loss: bool = True,
    norm_range: tuple[torch.Tensor | float, torch.Tensor | float] | None = None,
) -> ObjectiveOutput:
    """MMPO (Najafi & Fyshe, 2026), docs/objectives.md "MMPO" steps 1-6.

    ``norm_range`` overrides the ``(min, max)`` of the min-max normalization; the engine passes
    the statistics of the whole optimizer step for ``normalize_scope="step"``. By default the
    statistics are those of this micro-batch, as in the authors' code.
    """
    _check_shapes(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if normalize not in ("minmax", "none"):
        raise ValueError(f"normalize must be 'minmax' or 'none', got {normalize!r}")
    logp_w, logp_l = _upcast(policy_chosen_logps, policy_rejected_logps)
    r_w, r_l = mmpo_prior_rewards(
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        chosen_reward=chosen_reward,
        rejected_reward=rejected_reward,
    )
    r_w, r_l = r_w.to(logp_w.dtype), r_l.to(logp_w.dtype)
    if normalize == "minmax":
        low, high = minmax_range(r_w, r_l) if norm_range is None else norm_range
        low = torch.as_tensor(low, dtype=r_w.dtype, device=r_w.device)
        high = torch.as_tensor(high, dtype=r_w.dtype, device=r_w.device)
        scale = high - low + NORMALIZE_DELTA
        r_w = (r_w - low + NORMALIZE_DELTA) / scale
        r_l = (r_l - low + NORMALIZE_DELTA) / scale

    s_w = logp_w + r_w
    s_l = logp_l + r_l
    # Stable log-sum-exp of the two scores: the approximate marginal log-likelihood (Eq. 4-5).
    marginal = torch.logsumexp(torch.stack([s_w, s_l]), dim=0)
    losses = -marginal
    if aux_loss:
        losses = losses - F.logsigmoid(s_w - s_l)
    return ObjectiveOutput(
        losses=losses,
        chosen_rewards=s_w.detach(),
        rejected_rewards=s_l.detach(),
        chosen_weight=torch.sigmoid(s_w - s_l).detach(),
    )


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = OBJECTIVE_DEFAULTS["dpo"]["beta"],
) -> ObjectiveOutput:
    """DPO (Rafailov et al., 2023), docs/objectives.md Eq. 9."""
    _check_shapes(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logp_w, logp_l, ref_w, ref_l = _upcast(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps.detach(), ref_rejected_logps.detach()
    )
    chosen = beta * (logp_w - ref_w)
    rejected = beta * (logp_l - ref_l)
    losses = -F.logsigmoid(chosen - rejected)
    return ObjectiveOutput(losses=losses, chosen_rewards=chosen.detach(), rejected_rewards=rejected.detach())


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = OBJECTIVE_DEFAULTS["simpo"]["beta"],
    gamma: float = OBJECTIVE_DEFAULTS["simpo"]["gamma"],
) -> ObjectiveOutput:
    """SimPO (Meng et al., 2024), docs/objectives.md Eq. 8: length-normalized, reference-free, margin gamma."""
    _check_shapes(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    logp_w, logp_l = _upcast(policy_chosen_logps, policy_rejected_logps)
    n_w = chosen_lengths.to(logp_w.dtype).clamp(min=1)
    n_l = rejected_lengths.to(logp_w.dtype).clamp(min=1)
    chosen = beta * logp_w / n_w
    rejected = beta * logp_l / n_l
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return ObjectiveOutput(losses=losses, chosen_rewards=chosen.detach(), rejected_rewards=rejected.detach())


def chosen_nll_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor) -> ObjectiveOutput:
    """Supervised fine-tuning on the chosen answers: ``L = -logp_w`` (the rejected answer is ignored).

    The baseline default MMPO equals up to a constant: MMPO's loss with the auxiliary term is
    ``-logp_w - rn_w`` with ``rn_w`` a constant, so both have the same gradient. Rewards are the
    policy log-probs; its reward accuracy is ``logp_w > logp_l``.
    """
    _check_shapes(policy_chosen_logps, policy_rejected_logps)
    logp_w, logp_l = _upcast(policy_chosen_logps, policy_rejected_logps)
    return ObjectiveOutput(losses=-logp_w, chosen_rewards=logp_w.detach(), rejected_rewards=logp_l.detach())


def entropy_surrogate(
    token_entropies: torch.Tensor,
    token_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    length_normalize: bool = False,
) -> torch.Tensor:
    """Per-sequence entropy surrogate of docs/objectives.md "Entropy ablation" (Appendix B.2).

    ``E = sum_t (H_t + stopgrad(H_t) * c_t)`` with ``c_t`` the exclusive prefix sum of the
    completion's token log-probs. Its gradient is the score-function estimate of the gradient of
    the sequence entropy. Inputs are ``[N, T]``; ``mask`` is 1 on completion tokens only, so
    prompt and padding positions contribute nothing. Returns ``[N]``.
    """
    if not (token_entropies.shape == token_logps.shape == mask.shape):
        raise ValueError("token_entropies, token_logps and mask must have the same [N, T] shape")
    if token_entropies.dim() != 2:
        raise ValueError(f"entropy_surrogate takes [N, T] tensors, got shape {tuple(token_entropies.shape)}")
    entropies, logps = _upcast(token_entropies, token_logps)
    keep = mask.bool()
    # where(), not multiplication: -inf * 0 is NaN, and padding must contribute nothing.
    zero = torch.zeros((), dtype=entropies.dtype, device=entropies.device)
    entropies = torch.where(keep, entropies, zero)
    logps = torch.where(keep, logps, zero)
    prefix = torch.cumsum(logps, dim=-1) - logps  # exclusive: c_1 = 0
    per_token = entropies + entropies.detach() * prefix
    total = torch.where(keep, per_token, zero).sum(-1)
    if length_normalize:
        total = total / keep.sum(-1).clamp(min=1)
    return total


def batch_loss(
    losses: torch.Tensor,
    *,
    entropy_coef: float = 0.0,
    chosen_entropy: torch.Tensor | None = None,
    rejected_entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """The micro-batch loss (docs/objectives.md, MMPO step 5): the mean of the per-pair ``losses``, minus
    ``entropy_coef`` times the mean entropy surrogate over the batch's chosen and rejected
    completions (``[B]`` each, from :func:`entropy_surrogate`) when ``entropy_coef > 0``."""
    loss = losses.mean()
    if entropy_coef > 0:
        if chosen_entropy is None or rejected_entropy is None:
            raise ValueError("entropy_coef > 0 needs chosen_entropy and rejected_entropy")
        loss = loss - entropy_coef * torch.cat([chosen_entropy, rejected_entropy]).mean()
    return loss
