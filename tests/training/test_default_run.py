"""`mmpo train` with no arguments: the numbers recorded before the package was restructured.

The expected values come from the default run of the earlier layout (same seed, CPU, one thread;
`mmpo train --output-dir DIR`, then `cat DIR/summary.json`). A change of structure must not change
what the default run computes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

RECORDED = {
    "objective": "mmpo",
    "beta": 0.01,
    "learning_rate": 0.0005,
    "steps": 250,
    "eval_reward_accuracy_before": 0.8033333420753479,  # 241 / 300 held-out pairs
    "eval_reward_accuracy_after": 0.9766666889190674,  # 293 / 300
    "eval_loss_after": 0.9086581468582153,
}
RECORDED_LOSS_CURVE_ENDS = (
    [1.098907607793808, 1.3250161491334438, 0.9148454524576664],
    [-0.7334932804107666, -0.4809193730354309, -0.19735465496778487],
)


@pytest.mark.slow
def test_default_train_reproduces_the_recorded_summary(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMPO_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    subprocess.run(
        [sys.executable, "-m", "mmpo.cli", "train", "--output-dir", str(out), "--no-progress"],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = json.loads((out / "summary.json").read_text())
    for key in ("objective", "beta", "learning_rate", "steps"):
        assert summary[key] == RECORDED[key], key
    for key in ("eval_reward_accuracy_before", "eval_reward_accuracy_after", "eval_loss_after"):
        assert summary[key] == pytest.approx(RECORDED[key], abs=1e-5), key
    curve = summary["train_loss_curve"]
    assert len(curve) == 50
    first, last = RECORDED_LOSS_CURVE_ENDS
    assert curve[:3] == pytest.approx(first, abs=1e-4) and curve[-3:] == pytest.approx(last, abs=1e-4)
