"""Tests of the pure objectives against docs/objectives.md (MMPO, entropy ablation, DPO, SimPO).

Expected values come from small reference functions below, written with plain Python ``math``
straight from the formulas of docs/objectives.md (no torch), so they are independent of the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmpo.objectives import (
    NORMALIZE_DELTA,
    batch_loss,
    dpo_loss,
    entropy_surrogate,
    minmax_range,
    mmpo_loss,
    mmpo_prior_rewards,
    simpo_loss,
)

# --------------------------------------------------------------------------------------------
# Reference formulas in plain Python (docs/objectives.md), one float per pair.
# --------------------------------------------------------------------------------------------


def ref_logsigmoid(x: float) -> float:
    # log(sigma(x)) = min(x, 0) - log1p(exp(-|x|)), stable for any finite x.
    return min(x, 0.0) - math.log1p(math.exp(-abs(x)))


def ref_sigmoid(x: float) -> float:
    return math.exp(ref_logsigmoid(x))


def ref_logsumexp2(a: float, b: float) -> float:
    top = max(a, b)
    return top + math.log(math.exp(a - top) + math.exp(b - top))


def ref_mmpo(logp_w, logp_l, ref_w, ref_l, *, beta, eps_w, eps_l, normalize, aux, norm_range=None):
    """docs/objectives.md "MMPO" steps 1-6; returns (losses, s_w, s_l) as lists of floats."""
    r_w = [eps_w + beta * x for x in ref_w]
    r_l = [eps_l + beta * x for x in ref_l]
    if normalize == "minmax":
        low, high = norm_range if norm_range is not None else (min(r_w + r_l), max(r_w + r_l))
        delta = 1e-6
        r_w = [(r - low + delta) / (high - low + delta) for r in r_w]
        r_l = [(r - low + delta) / (high - low + delta) for r in r_l]
    s_w = [lp + r for lp, r in zip(logp_w, r_w)]
    s_l = [lp + r for lp, r in zip(logp_l, r_l)]
    losses = []
    for a, b in zip(s_w, s_l):
        loss = -ref_logsumexp2(a, b)
        if aux:
            loss -= ref_logsigmoid(a - b)
        losses.append(loss)
    return losses, s_w, s_l


def ref_entropy_surrogate(entropies, logps, mask, *, length_normalize):
    """docs/objectives.md "Entropy ablation": E = sum_t (H_t + H_t * c_t) over masked t, c_t exclusive prefix."""
    values = []
    for h_row, lp_row, m_row in zip(entropies, logps, mask):
        total, prefix = 0.0, 0.0
        for h, lp, m in zip(h_row, lp_row, m_row):
            if m:
                total += h + h * prefix
                prefix += lp
        if length_normalize:
            total /= max(sum(m_row), 1)
        values.append(total)
    return values


def t(values, dtype=torch.float64, requires_grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=requires_grad)


# A batch with distinct rewards, in which some pairs are ranked correctly and some are not.
LOGP_W = [-12.0, -30.5, -7.25, -55.0]
LOGP_L = [-14.0, -29.0, -7.25, -80.0]
REF_W = [-11.0, -33.0, -6.0, -50.0]
REF_L = [-15.5, -27.0, -9.0, -70.0]


def assert_values(actual: torch.Tensor, expected: list[float], tol: float) -> None:
    assert actual.shape == (len(expected),)
    for got, want in zip(actual.tolist(), expected):
        assert got == pytest.approx(want, rel=tol, abs=tol)


# --------------------------------------------------------------------------------------------
# 1. Values against the formulas.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("normalize", ["minmax", "none"])
@pytest.mark.parametrize("aux", [True, False])
@pytest.mark.parametrize("beta, eps_w, eps_l", [(0.01, 0.9, 0.1), (0.5, 0.7, 0.2)])
def test_mmpo_values_match_spec(dtype, tol, normalize, aux, beta, eps_w, eps_l):
    out = mmpo_loss(
        t(LOGP_W, dtype),
        t(LOGP_L, dtype),
        t(REF_W, dtype),
        t(REF_L, dtype),
        beta=beta,
        chosen_reward=eps_w,
        rejected_reward=eps_l,
        normalize=normalize,
        aux_loss=aux,
    )
    losses, s_w, s_l = ref_mmpo(
        LOGP_W, LOGP_L, REF_W, REF_L, beta=beta, eps_w=eps_w, eps_l=eps_l, normalize=normalize, aux=aux
    )
    assert_values(out.losses, losses, tol)
    assert_values(out.chosen_rewards, s_w, tol)
    assert_values(out.rejected_rewards, s_l, tol)
    assert_values(out.chosen_weight, [ref_sigmoid(a - b) for a, b in zip(s_w, s_l)], tol)
    assert out.accuracies.tolist() == [1.0 if a > b else 0.0 for a, b in zip(s_w, s_l)]


def test_mmpo_defaults_are_the_papers():
    """beta=0.01, eps_w=0.9, eps_l=0.1, minmax, aux on (the MMPO defaults)."""
    out = mmpo_loss(t(LOGP_W), t(LOGP_L), t(REF_W), t(REF_L))
    losses, _, _ = ref_mmpo(LOGP_W, LOGP_L, REF_W, REF_L, beta=0.01, eps_w=0.9, eps_l=0.1, normalize="minmax", aux=True)
    assert_values(out.losses, losses, 1e-10)


def test_mmpo_small_case_by_hand():
    # One pair, equal refs and eps: both rewards equal, so rn = 1 for both; s_w = s_l = -1 + 1 = 0.
    # -logsumexp([0, 0]) = -log 2; -logsigmoid(0) = +log 2.
    args = (t([-1.0]), t([-1.0]), t([-3.0]), t([-3.0]))
    kwargs = dict(chosen_reward=0.5, rejected_reward=0.5)
    with_aux = mmpo_loss(*args, **kwargs)
    without_aux = mmpo_loss(*args, aux_loss=False, **kwargs)
    assert with_aux.chosen_rewards.item() == pytest.approx(0.0, abs=1e-12)
    assert with_aux.losses.item() == pytest.approx(0.0, abs=1e-12)
    assert without_aux.losses.item() == pytest.approx(-math.log(2.0), abs=1e-12)
    assert with_aux.chosen_weight.item() == pytest.approx(0.5)
    # A tie is not an accurate pair: accuracy uses a strict ">".
    assert with_aux.accuracies.tolist() == [0.0]


def test_mmpo_minmax_normalizes_into_unit_interval():
    out = mmpo_loss(t(LOGP_W), t(LOGP_L), t(REF_W), t(REF_L), beta=0.5, aux_loss=False)
    rn = torch.cat([out.chosen_rewards - t(LOGP_W), out.rejected_rewards - t(LOGP_L)])
    # The smallest prior reward maps to delta/(range+delta) ~ 0, the largest to exactly 1.
    assert rn.max().item() == pytest.approx(1.0, abs=1e-12)
    assert 0.0 < rn.min().item() < 1e-6
    assert ((rn > 0) & (rn <= 1)).all()


@pytest.mark.parametrize("as_tensor", [True, False])
def test_mmpo_explicit_norm_range(as_tensor):
    """norm_range replaces the batch's own (min, max): the step-scope statistics of the engine."""
    low, high = -0.9, 0.65  # a wider range than this batch's own prior rewards (beta=0.05)
    norm_range = (torch.tensor(low), torch.tensor(high)) if as_tensor else (low, high)
    out = mmpo_loss(t(LOGP_W), t(LOGP_L), t(REF_W), t(REF_L), beta=0.05, norm_range=norm_range)
    losses, s_w, s_l = ref_mmpo(
        LOGP_W,
        LOGP_L,
        REF_W,
        REF_L,
        beta=0.05,
        eps_w=0.9,
        eps_l=0.1,
        normalize="minmax",
        aux=True,
        norm_range=(low, high),
    )
    assert_values(out.losses, losses, 1e-7)  # float32 torch.tensor(low) above: 1e-7 tolerance
    assert_values(out.chosen_rewards, s_w, 1e-7)
    assert_values(out.rejected_rewards, s_l, 1e-7)
    # It really differs from the batch's own normalization.
    own = mmpo_loss(t(LOGP_W), t(LOGP_L), t(REF_W), t(REF_L), beta=0.05)
    assert not torch.allclose(own.chosen_rewards, out.chosen_rewards)


def test_minmax_range_of_prior_rewards_feeds_norm_range():
    """Statistics computed from a larger 'step' with the public helpers give the step-scope loss."""
    r_w, r_l = mmpo_prior_rewards(t(REF_W), t(REF_L), beta=0.05, chosen_reward=0.9, rejected_reward=0.1)
    assert r_w.tolist() == pytest.approx([0.9 + 0.05 * x for x in REF_W])
    assert r_l.tolist() == pytest.approx([0.1 + 0.05 * x for x in REF_L])
    low, high = minmax_range(r_w, r_l)
    all_r = r_w.tolist() + r_l.tolist()
    assert (low.item(), high.item()) == (min(all_r), max(all_r))
    # The micro-batch holding only the first two pairs, normalized with the step's statistics.
    part = mmpo_loss(t(LOGP_W[:2]), t(LOGP_L[:2]), t(REF_W[:2]), t(REF_L[:2]), beta=0.05, norm_range=(low, high))
    whole = mmpo_loss(t(LOGP_W), t(LOGP_L), t(REF_W), t(REF_L), beta=0.05)
    torch.testing.assert_close(part.losses, whole.losses[:2])


def test_mmpo_with_aux_term_reduces_to_minus_chosen_score():
    """A property of the formula: logsigmoid(a - b) = a - logsumexp([a, b]), so
    -logsumexp([s_w, s_l]) - logsigmoid(s_w - s_l) == -s_w exactly. With aux_loss=True the
    rejected completion gets no gradient at all (reported to the lead)."""
    logp_w, logp_l = t(LOGP_W, requires_grad=True), t(LOGP_L, requires_grad=True)
    out = mmpo_loss(logp_w, logp_l, t(REF_W), t(REF_L))
    torch.testing.assert_close(out.losses.detach(), -out.chosen_rewards)
    grad_w, grad_l = torch.autograd.grad(out.losses.sum(), [logp_w, logp_l])
    torch.testing.assert_close(grad_w, torch.full_like(grad_w, -1.0))
    torch.testing.assert_close(grad_l, torch.zeros_like(grad_l))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_values_match_spec(beta):
    out = dpo_loss(t(LOGP_W), t(LOGP_L), t(REF_W), t(REF_L), beta=beta)
    chosen = [beta * (p - r) for p, r in zip(LOGP_W, REF_W)]
    rejected = [beta * (p - r) for p, r in zip(LOGP_L, REF_L)]
    assert_values(out.losses, [-ref_logsigmoid(c - r) for c, r in zip(chosen, rejected)], 1e-10)
    assert_values(out.chosen_rewards, chosen, 1e-10)
    assert_values(out.rejected_rewards, rejected, 1e-10)
    assert out.accuracies.tolist() == [1.0 if c > r else 0.0 for c, r in zip(chosen, rejected)]
    assert out.chosen_weight is None


def test_dpo_default_beta_and_tie_accuracy():
    # Pair 0: identical margins -> reward tie -> not accurate (strict >).
    logp_w, logp_l, ref_w, ref_l = [-5.0, -3.0], [-5.0, -9.0], [-5.0, -4.0], [-5.0, -8.0]
    out = dpo_loss(t(logp_w), t(logp_l), t(ref_w), t(ref_l))
    h = 0.1 * ((-3.0 + 4.0) - (-9.0 + 8.0))
    assert out.losses.tolist() == pytest.approx([math.log(2.0), -ref_logsigmoid(h)])
    assert out.accuracies.tolist() == [0.0, 1.0]


LENGTHS_W = [4, 16, 3, 40]
LENGTHS_L = [5, 12, 3, 64]


@pytest.mark.parametrize("beta, gamma", [(2.0, 1.0), (2.5, 1.6), (1.0, 0.0)])
def test_simpo_values_match_spec(beta, gamma):
    out = simpo_loss(t(LOGP_W), t(LOGP_L), torch.tensor(LENGTHS_W), torch.tensor(LENGTHS_L), beta=beta, gamma=gamma)
    chosen = [beta * p / n for p, n in zip(LOGP_W, LENGTHS_W)]
    rejected = [beta * p / n for p, n in zip(LOGP_L, LENGTHS_L)]
    assert_values(out.losses, [-ref_logsigmoid(c - r - gamma) for c, r in zip(chosen, rejected)], 1e-10)
    assert_values(out.chosen_rewards, chosen, 1e-10)
    assert_values(out.rejected_rewards, rejected, 1e-10)
    # Accuracy compares the rewards, without the margin gamma.
    assert out.accuracies.tolist() == [1.0 if c > r else 0.0 for c, r in zip(chosen, rejected)]


def test_simpo_defaults():
    out = simpo_loss(t([-8.0]), t([-9.0]), torch.tensor([4]), torch.tensor([3]))
    h = 2.0 * (-8.0 / 4) - 2.0 * (-9.0 / 3) - 1.0  # = -4 + 6 - 1 = 1
    assert out.losses.item() == pytest.approx(-ref_logsigmoid(h))
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-1.0)))


# --------------------------------------------------------------------------------------------
# 2. Theorem 3.2 with autograd on a tiny differentiable policy.
# --------------------------------------------------------------------------------------------


class TinyPolicy(torch.nn.Module):
    """Token log-probs from a linear next-token model over fixed random context features."""

    def __init__(self, feature_dim: int = 6, vocab: int = 11):
        super().__init__()
        self.head = torch.nn.Linear(feature_dim, vocab, dtype=torch.float64)

    def sequence_logps(self, features, tokens, mask):
        token_logps = torch.log_softmax(self.head(features), dim=-1).gather(-1, tokens[..., None])[..., 0]
        return (token_logps * mask).sum(-1)


def tiny_policy_batch(num_pairs: int = 3, length: int = 5, feature_dim: int = 6, vocab: int = 11):
    gen = torch.Generator().manual_seed(0)
    policy = TinyPolicy(feature_dim, vocab)
    with torch.no_grad():
        for p in policy.parameters():
            # Small weights keep the two scores of a pair close, so both Theorem 3.2 weights matter.
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    # Completions of different lengths (padding masked out); a pair's two sides share a length.
    lengths = torch.randint(2, length + 1, (num_pairs,), generator=gen)
    mask = (torch.arange(length) < lengths[:, None]).double()

    def side():
        features = torch.randn(num_pairs, length, feature_dim, generator=gen, dtype=torch.float64)
        tokens = torch.randint(vocab, (num_pairs, length), generator=gen)
        return features, tokens, mask

    return policy, side(), side()


@pytest.mark.parametrize("normalize", ["minmax", "none"])
def test_theorem_3_2_gradient_weighting(normalize):
    policy, chosen, rejected = tiny_policy_batch()
    params = list(policy.parameters())
    ref_w, ref_l = t([-10.0, -9.0, -14.0]), t([-12.0, -8.0, -10.0])
    logp_w = policy.sequence_logps(*chosen)
    logp_l = policy.sequence_logps(*rejected)
    out = mmpo_loss(logp_w, logp_l, ref_w, ref_l, beta=0.5, normalize=normalize, aux_loss=False)
    marginal = -out.losses  # aux off: the loss is exactly -logsumexp([s_w, s_l])
    weight = out.chosen_weight
    # The weights are non-trivial, so the check below distinguishes the two terms.
    assert ((weight > 1e-3) & (weight < 1 - 1e-3)).all()

    def grads(scalar):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, params, retain_graph=True)])

    total_expected = 0
    for i in range(len(weight)):
        expected = weight[i] * grads(logp_w[i]) + (1 - weight[i]) * grads(logp_l[i])
        torch.testing.assert_close(grads(marginal[i]), expected, rtol=1e-10, atol=1e-12)
        total_expected = total_expected + expected
    torch.testing.assert_close(grads(marginal.sum()), total_expected, rtol=1e-10, atol=1e-12)
    # sigma(s_l - s_w) is 1 - sigma(s_w - s_l): the weights of each pair sum to one.
    s_w, s_l = out.chosen_rewards, out.rejected_rewards
    torch.testing.assert_close(1 - weight, torch.sigmoid(s_l - s_w))


@pytest.mark.parametrize("normalize", ["minmax", "none"])
@pytest.mark.parametrize("aux", [True, False])
def test_mmpo_gradient_does_not_reach_reference_logps(normalize, aux):
    logp_w, logp_l = t(LOGP_W, requires_grad=True), t(LOGP_L, requires_grad=True)
    ref_w, ref_l = t(REF_W, requires_grad=True), t(REF_L, requires_grad=True)
    out = mmpo_loss(logp_w, logp_l, ref_w, ref_l, normalize=normalize, aux_loss=aux)
    out.losses.mean().backward()
    assert ref_w.grad is None and ref_l.grad is None
    assert logp_w.grad is not None and torch.isfinite(logp_w.grad).all()
    # And it equals the analytic gradient of the (constant-reward) loss w.r.t. the policy.
    sig = out.chosen_weight
    n = len(LOGP_W)
    if aux:
        expected_w, expected_l = -torch.ones(n, dtype=torch.float64) / n, torch.zeros(n, dtype=torch.float64)
    else:
        expected_w, expected_l = -sig / n, -(1 - sig) / n
    torch.testing.assert_close(logp_w.grad, expected_w)
    torch.testing.assert_close(logp_l.grad, expected_l)


def test_dpo_gradient_does_not_reach_reference_logps():
    ref_w, ref_l = t(REF_W, requires_grad=True), t(REF_L, requires_grad=True)
    logp_w = t(LOGP_W, requires_grad=True)
    dpo_loss(logp_w, t(LOGP_L), ref_w, ref_l).losses.sum().backward()
    assert ref_w.grad is None and ref_l.grad is None and logp_w.grad is not None


# --------------------------------------------------------------------------------------------
# 3. No NaN/inf for extreme inputs (values and gradients).
# --------------------------------------------------------------------------------------------

EXTREME_CASES = {
    "all_-1e4": ([-1e4, -1e4], [-1e4, -1e4], [-1e4, -1e4], [-1e4, -1e4]),
    "mix_-1e4_-1": ([-1e4, -1.0], [-1.0, -1e4], [-1.0, -1e4], [-1e4, -1.0]),
    "equal_prior_rewards": ([-3.0, -40.0], [-5.0, -2.0], [-7.0, -7.0], [-7.0, -7.0]),
    "one_pair": ([-1e4], [-1.0], [-1e4], [-1.0]),
    "one_pair_equal": ([-2.0], [-2.0], [-5.0], [-5.0]),
}


def _objectives():
    """Every objective configuration, as (name, fn(logp_w, logp_l, ref_w, ref_l))."""
    yield "dpo", lambda *a: dpo_loss(*a)
    yield "simpo", lambda lw, ll, rw, rl: simpo_loss(lw, ll, torch.tensor([7] * len(lw)), torch.tensor([3] * len(lw)))
    for normalize in ("minmax", "none"):
        for aux in (True, False):
            for beta in (0.01, 1.0):
                yield (
                    f"mmpo-{normalize}-aux{aux}-beta{beta}",
                    lambda *a, n=normalize, x=aux, b=beta: mmpo_loss(*a, beta=b, normalize=n, aux_loss=x),
                )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(EXTREME_CASES))
def test_extreme_inputs_give_finite_values_and_gradients(case, dtype):
    for name, objective in _objectives():
        logp_w, logp_l, ref_w, ref_l = (t(v, dtype, requires_grad=True) for v in EXTREME_CASES[case])
        out = objective(logp_w, logp_l, ref_w, ref_l)
        loss = out.losses.mean()
        assert torch.isfinite(out.losses).all(), (name, out.losses)
        assert torch.isfinite(out.chosen_rewards).all() and torch.isfinite(out.rejected_rewards).all(), name
        if out.chosen_weight is not None:
            assert torch.isfinite(out.chosen_weight).all(), name
        grads = torch.autograd.grad(loss, [logp_w, logp_l])
        assert all(torch.isfinite(g).all() for g in grads), (name, grads)


def test_equal_prior_rewards_normalize_to_one():
    logp_w, logp_l, ref_w, ref_l = EXTREME_CASES["equal_prior_rewards"]
    # eps_w == eps_l so every prior reward is the same number: every rn is exactly 1.
    out = mmpo_loss(t(logp_w), t(logp_l), t(ref_w), t(ref_l), chosen_reward=0.3, rejected_reward=0.3)
    torch.testing.assert_close(out.chosen_rewards, t(logp_w) + 1.0)
    torch.testing.assert_close(out.rejected_rewards, t(logp_l) + 1.0)


def test_extreme_values_match_spec():
    logp_w, logp_l, ref_w, ref_l = EXTREME_CASES["mix_-1e4_-1"]
    for aux in (True, False):
        out = mmpo_loss(t(logp_w), t(logp_l), t(ref_w), t(ref_l), aux_loss=aux)
        expected, _, _ = ref_mmpo(
            logp_w, logp_l, ref_w, ref_l, beta=0.01, eps_w=0.9, eps_l=0.1, normalize="minmax", aux=aux
        )
        assert_values(out.losses, expected, 1e-10)


# --------------------------------------------------------------------------------------------
# 4. bfloat16 inputs give the float32 answers (internal arithmetic is at least float32).
# --------------------------------------------------------------------------------------------

# All exactly representable in bfloat16 (checked below). Pair 0 and 1 have equal policy
# log-probs, so their loss depends only on the small normalized rewards: bf16 arithmetic on
# -1000 + rn would round rn away.
BF16_LOGP_W = [-1000.0, -1000.0, -12.5, -3.25]
BF16_LOGP_L = [-1000.0, -1000.0, -13.0, -96.0]
BF16_REF_W = [-1024.0, -640.0, -11.0, -4.5]
BF16_REF_L = [-960.0, -900.0, -16.0, -80.0]


def _bf16_exact(values):
    bf16 = torch.tensor(values, dtype=torch.bfloat16)
    assert bf16.float().tolist() == values, "test inputs must be exact in bfloat16"
    return bf16


@pytest.mark.parametrize(
    "objective",
    [
        pytest.param(lambda *a: mmpo_loss(*a, beta=0.5), id="mmpo-minmax"),
        pytest.param(lambda *a: mmpo_loss(*a, beta=0.01, aux_loss=False), id="mmpo-minmax-noaux"),
        pytest.param(lambda *a: mmpo_loss(*a, normalize="none", aux_loss=False), id="mmpo-none-noaux"),
        pytest.param(lambda *a: dpo_loss(*a), id="dpo"),
        pytest.param(
            lambda lw, ll, rw, rl: simpo_loss(lw, ll, torch.tensor([3, 5, 7, 2]), torch.tensor([9, 4, 6, 2])),
            id="simpo",
        ),
    ],
)
def test_bfloat16_inputs_match_float32(objective):
    bf16_inputs = [_bf16_exact(v) for v in (BF16_LOGP_W, BF16_LOGP_L, BF16_REF_W, BF16_REF_L)]
    fp32_inputs = [x.float() for x in bf16_inputs]
    from_bf16 = objective(*bf16_inputs)
    from_fp32 = objective(*fp32_inputs)
    torch.testing.assert_close(from_bf16.losses.float(), from_fp32.losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(from_bf16.chosen_rewards.float(), from_fp32.chosen_rewards, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(from_bf16.rejected_rewards.float(), from_fp32.rejected_rewards, rtol=1e-6, atol=1e-6)
    assert torch.equal(from_bf16.accuracies, from_fp32.accuracies)


def test_bfloat16_comparison_is_sensitive():
    """Sanity check of the inputs above: bf16 arithmetic would change the MMPO answer."""
    rn = torch.tensor([0.3, 0.7], dtype=torch.bfloat16)
    logp = torch.tensor([-1000.0, -1000.0], dtype=torch.bfloat16)
    assert torch.equal(logp + rn[0], logp + rn[1])  # rounding erases the reward difference
    out = mmpo_loss(*(_bf16_exact(v) for v in (BF16_LOGP_W, BF16_LOGP_L, BF16_REF_W, BF16_REF_L)), beta=0.5)
    assert out.chosen_rewards[0] != out.rejected_rewards[0]


def test_bfloat16_entropy_surrogate_matches_float32():
    entropies = _bf16_exact([[0.5, 1.25, 2.0, 3.5]])
    logps = _bf16_exact([[-4.0, -0.75, -300.0, -1.5]])
    mask = torch.tensor([[0, 1, 1, 1]])
    torch.testing.assert_close(
        entropy_surrogate(entropies, logps, mask).float(),
        entropy_surrogate(entropies.float(), logps.float(), mask),
        rtol=1e-6,
        atol=1e-6,
    )


# --------------------------------------------------------------------------------------------
# 5. Entropy surrogate.
# --------------------------------------------------------------------------------------------

# Two sequences: a prompt position first (mask 0), then completion, then padding (mask 0).
# Masked positions hold large garbage values that must not leak into anything.
ENT_H = [[7.0, 1.0, 2.0, 0.25, 9.0], [5.0, 0.5, 1.5, 3.0, 2.5]]
ENT_LOGP = [[-50.0, -0.5, -1.0, -2.0, 1e3], [-0.1, -3.0, -0.2, -0.7, -1.1]]
ENT_MASK = [[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]


@pytest.mark.parametrize("length_normalize", [False, True])
def test_entropy_surrogate_value(length_normalize):
    value = entropy_surrogate(t(ENT_H), t(ENT_LOGP), torch.tensor(ENT_MASK), length_normalize=length_normalize)
    assert_values(value, ref_entropy_surrogate(ENT_H, ENT_LOGP, ENT_MASK, length_normalize=length_normalize), 1e-12)


def test_entropy_surrogate_value_by_hand():
    # Row 0: t=1: 1.0 + 1.0*0 ; t=2: 2.0 + 2.0*(-0.5) ; t=3: 0.25 + 0.25*(-1.5)  -> 1.875 (3 tokens)
    value = entropy_surrogate(t(ENT_H), t(ENT_LOGP), torch.tensor(ENT_MASK))
    assert value[0].item() == pytest.approx(1.875)
    normalized = entropy_surrogate(t(ENT_H), t(ENT_LOGP), torch.tensor(ENT_MASK), length_normalize=True)
    assert normalized[0].item() == pytest.approx(1.875 / 3)


def test_entropy_surrogate_gradients_are_score_function_form():
    entropies = t(ENT_H, requires_grad=True)
    logps = t(ENT_LOGP, requires_grad=True)
    value = entropy_surrogate(entropies, logps, torch.tensor(ENT_MASK))
    grad_h, grad_logp = torch.autograd.grad(value.sum(), [entropies, logps])
    # dE/dlogp_k = sum of H_t over masked t > k (for masked k; zero elsewhere).
    expected_logp = [
        [(sum(h for h, m in zip(h_row[k + 1 :], m_row[k + 1 :]) if m) if m_row[k] else 0.0) for k in range(len(h_row))]
        for h_row, m_row in zip(ENT_H, ENT_MASK)
    ]
    torch.testing.assert_close(grad_logp, t(expected_logp))
    # dE/dH_t = 1 on masked positions (the prefix factor is stop-gradded), 0 elsewhere.
    torch.testing.assert_close(grad_h, t(ENT_MASK).to(torch.float64))


def test_entropy_surrogate_ignores_masked_positions():
    base = entropy_surrogate(t(ENT_H), t(ENT_LOGP), torch.tensor(ENT_MASK))
    scrambled_h = [row[:] for row in ENT_H]
    scrambled_logp = [row[:] for row in ENT_LOGP]
    for i, m_row in enumerate(ENT_MASK):
        for j, m in enumerate(m_row):
            if not m:
                scrambled_h[i][j] = -1e4 * (j + 1)
                scrambled_logp[i][j] = -1e4 * (i + 2)
    torch.testing.assert_close(entropy_surrogate(t(scrambled_h), t(scrambled_logp), torch.tensor(ENT_MASK)), base)
    # A bool mask is the same as an integer one; a fully masked row is 0, also normalized.
    torch.testing.assert_close(entropy_surrogate(t(ENT_H), t(ENT_LOGP), torch.tensor(ENT_MASK).bool()), base)
    empty = entropy_surrogate(t(ENT_H), t(ENT_LOGP), torch.zeros(2, 5), length_normalize=True)
    assert empty.tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------------------------
# 6. Bad inputs: one clear ValueError.
# --------------------------------------------------------------------------------------------

PAIR_OBJECTIVES = [
    pytest.param(mmpo_loss, id="mmpo"),
    pytest.param(dpo_loss, id="dpo"),
    pytest.param(simpo_loss, id="simpo"),
]


@pytest.mark.parametrize("objective", PAIR_OBJECTIVES)
def test_mismatched_shapes_raise(objective):
    with pytest.raises(ValueError, match=r"same shape.*\(3,\).*\(2,\)"):
        objective(t([-1.0, -2.0, -3.0]), t([-1.0, -2.0]), t([-1.0, -2.0, -3.0]), t([-1.0, -2.0, -3.0]))
    with pytest.raises(ValueError, match="same shape"):
        objective(t([-1.0, -2.0]), t([-1.0, -2.0]), t([-1.0, -2.0]), t([-1.0]))


@pytest.mark.parametrize("objective", PAIR_OBJECTIVES)
@pytest.mark.parametrize("shape", [(), (2, 2)])
def test_non_1d_inputs_raise(objective, shape):
    x = torch.full(shape, -1.0)
    with pytest.raises(ValueError, match=r"1-D"):
        objective(x, x, x, x)


def test_bogus_normalize_raises():
    x = t([-1.0, -2.0])
    with pytest.raises(ValueError, match=r"normalize.*'bogus'"):
        mmpo_loss(x, x, x, x, normalize="bogus")


def test_entropy_surrogate_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same"):
        entropy_surrogate(torch.zeros(2, 5), torch.zeros(2, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="same"):
        entropy_surrogate(torch.zeros(2, 5), torch.zeros(2, 5), torch.ones(1, 5))


def test_normalize_delta_is_the_specs():
    assert NORMALIZE_DELTA == 1e-6


def test_batch_loss_mean_minus_entropy_term():
    losses = t([1.0, 3.0])
    assert float(batch_loss(losses)) == 2.0
    # mean of [0.5, 1.5, 2.0, 4.0] = 2.0; 2.0 - 0.25 * 2.0 = 1.5
    value = batch_loss(losses, entropy_coef=0.25, chosen_entropy=t([0.5, 1.5]), rejected_entropy=t([2.0, 4.0]))
    assert float(value) == 1.5
    with pytest.raises(ValueError, match="needs chosen_entropy"):
        batch_loss(losses, entropy_coef=0.1)
