"""Raw and length-controlled win-rates on synthetic judgments with known effects."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from mmpo.evaluation.winrate import (
    WinRateError,
    average_over_judges,
    length_controlled_win_rate,
    summarize_judgments,
    win_rate,
)


def synthetic_judgments(n, *, quality, length_effect, model_length_ratio, binary, seed=0, difficulty_effect=0.0):
    """Judgments from a judge whose log-odds are ``quality + length_effect * tanh(std delta len)``."""
    rng = np.random.default_rng(seed)
    len_b = rng.integers(200, 1200, n)
    len_a = (len_b * model_length_ratio * rng.uniform(0.5, 1.5, n)).astype(int) + 1
    delta = len_a - len_b
    difficulty = rng.normal(0, 1, n)
    logits = quality + length_effect * np.tanh(delta / delta.std(ddof=1)) + difficulty_effect * difficulty
    p = expit(logits)
    prefs = (rng.random(n) < p).astype(float) if binary else p
    rows = [
        {"preference": float(pref), "output_a": "a" * la, "output_b": "b" * lb, "error": None, "difficulty": float(d)}
        for pref, la, lb, d in zip(prefs, len_a, len_b, difficulty)
    ]
    # What the model would win, averaged over these instructions, at equal lengths.
    truth = float(expit(quality + difficulty_effect * difficulty).mean() * 100)
    return rows, truth


def test_lc_removes_a_pure_length_preference():
    # Equal quality, a judge that likes longer outputs, and a model that writes ~1.4x longer.
    rows, truth = synthetic_judgments(2000, quality=0.0, length_effect=1.5, model_length_ratio=1.4, binary=True)
    raw = win_rate(rows)
    lc = length_controlled_win_rate([{k: v for k, v in r.items() if k != "difficulty"} for r in rows])
    assert truth == pytest.approx(50.0)
    assert raw["win_rate"] > 60  # the raw number is inflated by verbosity
    assert abs(lc["length_controlled_winrate"] - 50.0) < max(3 * lc["lc_standard_error_delta_method"], 1.0)
    assert abs(lc["length_controlled_winrate"] - 50.0) < 5
    assert lc["glm_weights"]["length"] == pytest.approx(1.5, abs=0.35)
    assert lc["glm_weights"]["difficulty"] is None


@pytest.mark.parametrize("quality", [-0.8, 0.7])
def test_lc_recovers_true_quality_under_length_bias(quality):
    rows, truth = synthetic_judgments(
        1500, quality=quality, length_effect=1.0, model_length_ratio=0.8, binary=False, seed=3
    )
    lc = length_controlled_win_rate(rows)
    # Probability targets from exactly this GLM family: the fit is essentially exact.
    assert lc["length_controlled_winrate"] == pytest.approx(truth, abs=0.5)
    assert lc["glm_weights"]["length"] == pytest.approx(1.0, abs=0.05)
    assert lc["lc_standard_error_delta_method"] < 0.5


def test_lc_uses_instruction_difficulty_when_given():
    rows, truth = synthetic_judgments(
        1500, quality=0.3, length_effect=1.0, model_length_ratio=1.2, binary=False, seed=5, difficulty_effect=-1.2
    )
    with_difficulty = length_controlled_win_rate(rows)
    assert with_difficulty["glm_weights"]["difficulty"] == pytest.approx(-1.2, abs=0.05)
    assert with_difficulty["length_controlled_winrate"] == pytest.approx(truth, abs=0.5)
    # An explicit difficulty list overrides the rows' keys.
    flat = length_controlled_win_rate(rows, difficulty=[0.0] * len(rows))
    assert flat["glm_weights"]["difficulty"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(WinRateError, match="difficulty has 3 values"):
        length_controlled_win_rate(rows, difficulty=[0.0, 1.0, 2.0])


def test_identical_generators_give_fifty_percent():
    outputs = ["short", "a much longer answer " * 5, "mid length one"] * 20
    rows = [{"preference": 0.5, "output_a": o, "output_b": o} for o in outputs]
    summary = summarize_judgments(rows)
    assert summary["length_controlled_winrate"] == 50.0
    assert summary["lc_standard_error_delta_method"] == 0.0
    assert summary["win_rate"] == 50.0 and summary["n_draws"] == len(rows)


def test_symmetric_judge_gives_about_fifty_percent_through_the_glm():
    # Different outputs but no quality or length preference: the fitted LC stays near 50.
    rows, _ = synthetic_judgments(1000, quality=0.0, length_effect=0.0, model_length_ratio=1.0, binary=False)
    lc = length_controlled_win_rate(rows)
    assert lc["length_controlled_winrate"] == pytest.approx(50.0, abs=0.01)


def test_raw_win_rate_counts_ties_as_half_and_excludes_errors():
    rows = [{"preference": p} for p in (1.0, 1.0, 0.0, 0.5, 0.75)]
    rows += [{"preference": None, "error": "rate limit exhausted"}, {"preference": 0.9, "error": "malformed reply"}]
    result = win_rate(rows)
    prefs = np.array([1.0, 1.0, 0.0, 0.5, 0.75])
    assert result["win_rate"] == pytest.approx(prefs.mean() * 100)
    assert result["standard_error"] == pytest.approx(prefs.std(ddof=1) / np.sqrt(5) * 100)
    assert (result["n_wins"], result["n_losses"], result["n_draws"]) == (3, 1, 1)
    assert result["n_total"] == 5 and result["n_errors"] == 2


def test_all_failed_judgments_raise_with_the_first_error():
    rows = [{"preference": None, "error": "cannot reach the judge endpoint"}] * 3
    with pytest.raises(WinRateError, match="no valid judgments out of 3.*cannot reach"):
        win_rate(rows)
    with pytest.raises(WinRateError, match="outside"):
        win_rate([{"preference": 1.5}])
    with pytest.raises(WinRateError, match="judgment 0 has no 'preference'"):
        win_rate([{"pref": 1.0}])


def test_average_over_judges():
    results = {
        "gpt": {
            "win_rate": 60.0,
            "standard_error": 3.0,
            "length_controlled_winrate": 55.0,
            "lc_standard_error_delta_method": 4.0,
        },
        "claude": {
            "win_rate": 50.0,
            "standard_error": 4.0,
            "length_controlled_winrate": 45.0,
            "lc_standard_error_delta_method": 3.0,
        },
    }
    avg = average_over_judges(results)
    assert avg["win_rate"] == pytest.approx(55.0)
    assert avg["length_controlled_winrate"] == pytest.approx(50.0)
    assert avg["standard_error"] == pytest.approx(2.5)  # sqrt(9 + 16) / 2
    assert avg["judges"] == ["claude", "gpt"]
    with pytest.raises(WinRateError):
        average_over_judges({})
