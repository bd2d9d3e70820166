"""AlpacaEval's ``length_controlled_v1`` from a local df_gamed.csv, checked against ``alpaca_eval``'s own GLM."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from mmpo.evaluation.lc_v1 import length_controlled_v1_win_rate
from mmpo.evaluation.winrate import WinRateError


def synthetic(n: int, seed: int = 0):
    """Judgments of a length-loving judge on ``n`` instructions of varied difficulty, and gamed annotations."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 1, n)
    len_a, len_b = rng.integers(50, 400, n), rng.integers(50, 400, n)
    delta = len_a - len_b
    prefs = expit(0.4 + 1.2 * np.tanh(delta / delta.std(ddof=1)) - 0.7 * difficulty)
    judgments = [
        {"index": i, "preference": float(p), "output_a": "a" * la, "output_b": "b" * lb, "error": None}
        for i, (p, la, lb) in enumerate(zip(prefs, len_a, len_b))
    ]
    lines = ["model,index,instruction_difficulty,preference,std_delta_len,not_gamed_baseline"]
    for model, sign in (("verbose", -1.0), ("concise", 1.0)):  # first block: row label == index, as AlpacaEval's file
        sdl = sign * rng.uniform(0.3, 2.0, n)
        gamed_prefs = expit(-1.2 * np.tanh(sdl) - 0.7 * difficulty - 0.2)
        lines += [
            f"{model},{i},{float(difficulty[i])!r},{float(gamed_prefs[i])!r},{float(sdl[i])!r},False" for i in range(n)
        ]
    return judgments, "\n".join(lines) + "\n"


def test_v1_agrees_with_alpaca_eval(tmp_path, monkeypatch):
    alpaca_eval = pytest.importorskip("alpaca_eval", reason="needs the [alpaca] extra: pip install 'mmpo[alpaca]'")
    from alpaca_eval.metrics.glm_winrate import get_length_controlled_winrate

    n = 160
    judgments, gamed = synthetic(n)
    path = tmp_path / "df_gamed.csv"
    path.write_text(gamed)
    ours = length_controlled_v1_win_rate(judgments, path)

    # AlpacaEval reads the same file from a Hub cache: lay one out and point its cache directory there.
    snapshot = tmp_path / "hub" / "datasets--tatsu-lab--alpaca_eval" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "df_gamed.csv").write_text(gamed)
    (tmp_path / "hub" / "datasets--tatsu-lab--alpaca_eval" / "refs").mkdir()
    (tmp_path / "hub" / "datasets--tatsu-lab--alpaca_eval" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(alpaca_eval.constants, "DEFAULT_CACHE_DIR", str(tmp_path / "hub"))
    annotations = [
        {
            "preference": 1 + r["preference"],
            "output_1": r["output_b"],
            "output_2": r["output_a"],
            "generator_1": "sft",
            "generator_2": "model",
            "annotator": "test",
        }
        for r in judgments
    ]
    theirs = get_length_controlled_winrate(annotations, glm_name="length_controlled_v1", save_weights_dir=None)
    assert abs(ours["length_controlled_winrate_v1"] - theirs["length_controlled_winrate"]) < 0.05
    assert ours["glm_weights_v1"]["difficulty"] == pytest.approx(-0.7, abs=0.2)


def test_v1_data_problems_are_named(tmp_path):
    judgments, gamed = synthetic(10)
    with pytest.raises(WinRateError, match="not found"):
        length_controlled_v1_win_rate(judgments, tmp_path / "missing.csv")
    (tmp_path / "short.csv").write_text("\n".join(gamed.splitlines()[:6]) + "\n")  # indexes 0..4 only
    with pytest.raises(WinRateError, match="no instruction difficulty for prompt index 5"):
        length_controlled_v1_win_rate(judgments, tmp_path / "short.csv")
    (tmp_path / "other.csv").write_text("model,index\nx,0\n")
    with pytest.raises(WinRateError, match="missing column"):
        length_controlled_v1_win_rate(judgments, tmp_path / "other.csv")


def test_eval_names_a_missing_v1_data_file_before_any_work(tmp_path):
    from mmpo.config import ConfigError
    from mmpo.evaluation.checkpoint_eval import EvalSettings, evaluate_checkpoint

    with pytest.raises(ConfigError, match="--lc-v1-data .*not found"):
        evaluate_checkpoint(tmp_path / "nowhere", EvalSettings(lc_v1_data=str(tmp_path / "df_gamed.csv")))
