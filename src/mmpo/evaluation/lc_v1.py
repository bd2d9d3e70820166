"""AlpacaEval's default length-controlled GLM, ``length_controlled_v1``, from a local data file.

v1 adds two things to the pair's own GLM (:func:`mmpo.evaluation.winrate.length_controlled_win_rate`):
an instruction-difficulty covariate per AlpacaEval instruction, and regularization towards
AlpacaEval's precomputed annotations of "gamed" (verbose and concise) versions of its own
baseline, which enter the fit with weight ``lambda / 2 = 0.1`` each. Both come from
``df_gamed.csv`` in the ``tatsu-lab/alpaca_eval`` dataset repository, which ``alpaca_eval``
downloads from the Hub; here the user passes a local copy (``--lc-v1-data``). The formula is
AlpacaEval's: ``tanh(std_delta_len) + instruction_difficulty + not_gamed_baseline - 1``, with
``std_delta_len`` the baseline's length minus the model's over its standard deviation. The fit is
this package's maximum-likelihood GLM (AlpacaEval uses cross-validated L1); the win-rate is the
prediction at equal lengths, averaged over the instructions.

Only meaningful on AlpacaEval's 805 instructions in their order (row ``i`` is AlpacaEval's
instruction ``i``: the difficulties are looked up by that index), and its regularization pulls
towards AlpacaEval's GPT-4 baseline, whatever the baseline here.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.special import expit

from mmpo.evaluation.winrate import GLM_RIDGE, WinRateError, _fit_probability_glm, _valid_rows

__all__ = ["length_controlled_v1_win_rate", "GAMED_WEIGHT"]

#: AlpacaEval's ``regularize_to_baseline_lambda`` (0.2) split over its two gamed baselines.
GAMED_WEIGHT = 0.2 / 2
_COLUMNS = ("index", "instruction_difficulty", "preference", "std_delta_len", "not_gamed_baseline")


def _read_gamed(path: Path) -> tuple[np.ndarray, dict[int, float]]:
    """Design rows and targets of the gamed annotations, and the difficulty of each instruction index."""
    if not path.is_file():
        raise WinRateError(f"--lc-v1-data: {path} not found (df_gamed.csv from the tatsu-lab/alpaca_eval dataset repo)")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise WinRateError(f"{path}: missing column(s) {missing}; expected AlpacaEval's df_gamed.csv")
        rows = list(reader)
    difficulty: dict[int, float] = {}
    train = []
    for row in rows:
        index = int(float(row["index"]))
        difficulty.setdefault(index, float(row["instruction_difficulty"]))  # first occurrence, as AlpacaEval
        if row["preference"] in ("", "nan", "NaN"):
            continue
        not_gamed = 1.0 if row["not_gamed_baseline"].strip().lower() in ("true", "1", "1.0") else 0.0
        train.append(
            (
                np.tanh(float(row["std_delta_len"])),
                float(row["instruction_difficulty"]),
                not_gamed,
                float(row["preference"]),
            )
        )
    return np.array(train, dtype=float).reshape(-1, 4), difficulty


def length_controlled_v1_win_rate(judgments: Sequence[Mapping], gamed_file: str | Path) -> dict:
    """``length_controlled_winrate_v1`` (x 100) of A (the model) over B for judgments in AlpacaEval's prompt order."""
    valid, _ = _valid_rows(judgments)
    gamed, difficulty = _read_gamed(Path(gamed_file))
    positions = [int(r.get("index", i)) for i, r in enumerate(valid)]
    unknown = [i for i in positions if i not in difficulty]
    if unknown:
        raise WinRateError(
            f"--lc-v1-data has no instruction difficulty for prompt index {unknown[0]} "
            f"(it covers {len(difficulty)} AlpacaEval instructions)"
        )
    delta = np.array([len(r["output_b"]) - len(r["output_a"]) for r in valid], dtype=float)  # baseline - model
    std = delta.std(ddof=1) if len(delta) > 1 else 0.0
    own = np.stack(
        [
            np.tanh(delta / std) if std > 0 else np.zeros_like(delta),
            np.array([difficulty[i] for i in positions]),
            np.ones_like(delta),
        ],
        axis=1,
    )
    prefs = np.array([float(r["preference"]) for r in valid])
    X = np.concatenate([gamed[:, :3], own])
    p = np.concatenate([gamed[:, 3], prefs])
    weights = np.concatenate([np.where(gamed[:, 2] > 0, 1.0, GAMED_WEIGHT), np.ones(len(own))])
    w, _ = _fit_probability_glm(X, p, GLM_RIDGE, weights)
    at_equal_length = own.copy()
    at_equal_length[:, 0] = 0.0
    return {
        "length_controlled_winrate_v1": float(expit(at_equal_length @ w).mean()) * 100,
        "glm_weights_v1": {"length": float(w[0]), "difficulty": float(w[1]), "not_gamed_baseline": float(w[2])},
    }
