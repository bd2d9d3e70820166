"""Win-rates from pairwise judgments: raw, length-controlled (AlpacaEval 2 LC), and averaged over judges.

Input is the list :func:`mmpo.evaluation.judging.judge_pairs` returns: one dict per example with
``preference`` (probability that the model's output, A, beats the baseline's, B; 0.5 is a tie;
``None`` when the judge call failed), ``output_a``, ``output_b`` and optionally ``difficulty``.
Failed judgments are excluded from every statistic and counted in ``n_errors``.

Length control follows Dubois et al. 2024 ("Length-Controlled AlpacaEval"). A logistic GLM with
*probability* targets predicts the judge's preference from

* the model/baseline identity term (with one model against one baseline, a constant 1),
* ``tanh(delta_len / std(delta_len))`` where ``delta_len`` is the model's output length (in
  characters, as AlpacaEval counts it) minus the baseline's, and
* where every row has one, an instruction-difficulty covariate.

The LC win-rate is the GLM's prediction with the length term set to zero, averaged over the
instructions (each at its own difficulty), times 100. Without difficulties this is the design of
AlpacaEval's ``length_controlled_minimal`` GLM; with them, of ``length_controlled_noreg``; the
result names it (``lc_variant``). It is *not* AlpacaEval's default ``length_controlled_v1``,
which also regularizes the fit towards precomputed annotations of "gamed" (verbose/concise)
versions of AlpacaEval's GPT-4 baseline; those exist only for that baseline. AlpacaEval fits with
cross-validated L1 regularization; here the fit is the plain maximum-likelihood GLM with a tiny
ridge that only keeps separable data finite (the two agree to a few hundredths of a point).

``lc_standard_error_delta_method`` is the standard error of the LC win-rate by the delta method
through the GLM's sandwich (robust) covariance, which stays honest when the targets are
probabilities. (AlpacaEval's ``lc_standard_error`` is something else: the standard error of the
mean of the per-instruction GLM predictions.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit

__all__ = [
    "WinRateError",
    "win_rate",
    "length_controlled_win_rate",
    "summarize_judgments",
    "average_over_judges",
]

#: Ridge strength (per example) of the GLM; small enough to leave non-separable fits unchanged.
GLM_RIDGE = 1e-4


class WinRateError(ValueError):
    """Judgments that cannot give a win-rate (none valid, malformed rows)."""


def _valid_rows(judgments: Sequence[Mapping]) -> tuple[list[Mapping], int]:
    valid, n_errors = [], 0
    for i, row in enumerate(judgments):
        if "preference" not in row:
            raise WinRateError(f"judgment {i} has no 'preference' key (keys: {sorted(row)})")
        pref = row["preference"]
        if pref is None or row.get("error"):
            n_errors += 1
            continue
        if not 0.0 <= float(pref) <= 1.0:
            raise WinRateError(f"judgment {i}: preference {pref!r} is outside [0, 1]")
        valid.append(row)
    if not valid:
        first = next((r.get("error") for r in judgments if r.get("error")), None)
        raise WinRateError(
            f"no valid judgments out of {len(judgments)} ({n_errors} failed"
            + (f"; first error: {first}" if first else "")
            + ")"
        )
    return valid, n_errors


def win_rate(judgments: Sequence[Mapping]) -> dict:
    """Raw win-rate of A over B: mean preference x 100 (a tie counts 0.5), with its standard error."""
    valid, n_errors = _valid_rows(judgments)
    prefs = np.array([float(r["preference"]) for r in valid])
    n = len(prefs)
    se = float(prefs.std(ddof=1) / np.sqrt(n)) * 100 if n > 1 else float("nan")
    return {
        "win_rate": float(prefs.mean()) * 100,
        "standard_error": se,
        "n_wins": int((prefs > 0.5).sum()),
        "n_losses": int((prefs < 0.5).sum()),
        "n_draws": int((prefs == 0.5).sum()),
        "n_total": n,
        "n_errors": n_errors,
    }


def _fit_probability_glm(
    X: np.ndarray, p: np.ndarray, ridge: float, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(Weighted) logistic regression with targets in [0, 1]; returns the weights and their sandwich covariance."""
    n, k = X.shape
    c = np.ones(n) if weights is None else np.asarray(weights, dtype=float)

    def objective(w):
        z = X @ w
        nll = -(c * (p * log_expit(z) + (1 - p) * log_expit(-z))).sum() + 0.5 * ridge * n * (w @ w)
        grad = X.T @ (c * (expit(z) - p)) + ridge * n * w
        return nll, grad

    def hessian(w):
        s = expit(X @ w)
        return (X * (c * s * (1 - s))[:, None]).T @ X + ridge * n * np.eye(k)

    fit = minimize(objective, np.zeros(k), jac=True, hess=hessian, method="trust-exact")
    w = fit.x
    bread = np.linalg.pinv(hessian(w))
    residuals = c * (expit(X @ w) - p)
    meat = (X * residuals[:, None] ** 2).T @ X
    return w, bread @ meat @ bread


def length_controlled_win_rate(
    judgments: Sequence[Mapping],
    *,
    difficulty: Sequence[float] | None = None,
    length_fn: Callable[[str], int] = len,
    ridge: float = GLM_RIDGE,
) -> dict:
    """AlpacaEval-2-style length-controlled win-rate of A over B (see the module docstring).

    ``difficulty`` (one number per judgment, failed ones included) overrides the judgments'
    ``difficulty`` keys; without either, the GLM has no difficulty term. Returns
    ``length_controlled_winrate`` and ``lc_standard_error_delta_method`` (both x 100), the
    ``lc_variant`` (AlpacaEval's name for this GLM design) and the fitted ``glm_weights``
    (``identity``, ``length``, ``difficulty``).
    """
    if difficulty is not None and len(difficulty) != len(judgments):
        raise WinRateError(f"difficulty has {len(difficulty)} values for {len(judgments)} judgments")
    if difficulty is not None:
        judgments = [{**row, "difficulty": d} for row, d in zip(judgments, difficulty)]
    valid, n_errors = _valid_rows(judgments)
    for i, row in enumerate(valid):
        if not isinstance(row.get("output_a"), str) or not isinstance(row.get("output_b"), str):
            raise WinRateError(f"valid judgment {i} lacks the string outputs 'output_a'/'output_b' needed for lengths")
    prefs = np.array([float(r["preference"]) for r in valid])
    delta = np.array([length_fn(r["output_a"]) - length_fn(r["output_b"]) for r in valid], dtype=float)
    base = {"n_total": len(valid), "n_errors": n_errors}

    if all(r["output_a"] == r["output_b"] for r in valid):
        # The model *is* the baseline (AlpacaEval's ``is_baseline`` case): 50% by construction.
        return {
            **base,
            "length_controlled_winrate": 50.0,
            "lc_standard_error_delta_method": 0.0,
            "lc_variant": "length_controlled_minimal",
            "glm_weights": {"identity": 0.0, "length": 0.0, "difficulty": 0.0},
        }

    std = delta.std(ddof=1) if len(delta) > 1 else 0.0
    length_term = np.tanh(delta / std) if std > 0 else np.zeros_like(delta)
    columns = [np.ones_like(delta), length_term]
    use_difficulty = all(r.get("difficulty") is not None for r in valid)
    if use_difficulty:
        d = np.array([float(r["difficulty"]) for r in valid])
        columns.append(d - d.mean())  # centred so the identity weight reads as the pair's log-odds
    X = np.stack(columns, axis=1)
    w, cov = _fit_probability_glm(X, prefs, ridge)

    X_equal_length = X.copy()
    X_equal_length[:, 1] = 0.0
    s = expit(X_equal_length @ w)
    lc = float(s.mean())
    grad = (X_equal_length * (s * (1 - s))[:, None]).mean(axis=0)  # d lc / d w
    se = float(np.sqrt(max(grad @ cov @ grad, 0.0)))
    return {
        **base,
        "length_controlled_winrate": lc * 100,
        "lc_standard_error_delta_method": se * 100,
        "lc_variant": "length_controlled_noreg" if use_difficulty else "length_controlled_minimal",
        "glm_weights": {
            "identity": float(w[0]),
            "length": float(w[1]),
            "difficulty": float(w[2]) if use_difficulty else None,
        },
    }


def summarize_judgments(judgments: Sequence[Mapping], *, difficulty: Sequence[float] | None = None) -> dict:
    """Raw and length-controlled win-rates plus average output lengths, in one dict."""
    summary = win_rate(judgments)
    summary.update(length_controlled_win_rate(judgments, difficulty=difficulty))
    valid, _ = _valid_rows(judgments)
    summary["avg_length_a"] = float(np.mean([len(r.get("output_a") or "") for r in valid]))
    summary["avg_length_b"] = float(np.mean([len(r.get("output_b") or "") for r in valid]))
    return summary


def average_over_judges(results: Mapping[str, Mapping]) -> dict:
    """The paper's headline number: each win-rate averaged over judges (``{judge_name: summary}``).

    Standard errors combine as ``sqrt(sum se^2) / k``, which treats the judges as independent;
    they judge the same outputs, so this is a rough guide rather than an exact error.
    """
    if not results:
        raise WinRateError("average_over_judges needs at least one judge's results")
    averaged: dict = {"judges": sorted(results), "per_judge": {k: dict(v) for k, v in results.items()}}
    for value_key, se_key in (
        ("win_rate", "standard_error"),
        ("length_controlled_winrate", "lc_standard_error_delta_method"),
        ("length_controlled_winrate_v1", None),
    ):
        present = [r for r in results.values() if value_key in r]
        if len(present) != len(results):
            continue  # only average a metric every judge has
        k = len(present)
        averaged[value_key] = float(np.mean([r[value_key] for r in present]))
        if se_key is None:
            continue
        ses = [r.get(se_key) for r in present]
        if all(s is not None and np.isfinite(s) for s in ses):
            averaged[se_key] = float(np.sqrt(np.sum(np.square(ses))) / k)
    return averaged
