"""benchmarks/gpu_check.sh end to end in its CPU dry mode: every phase runs and reports what a GPU
run would (exactness of every layout and attention mode, TRL side by side with equal losses, cost
growth), into the JSON and Markdown a GPU run writes."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers import REPO

pytest.importorskip("trl")


@pytest.mark.slow  # ~30 s on 2 cores: six Python processes importing torch, transformers and TRL
def test_dry_run_writes_every_result(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
        "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels"),
    }  # a checkout may hold wheels for the GPU's Python
    env.pop("PYTHONPATH", None)  # the script puts the checkout's src/ first itself
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_check.json",
        "gpu_check.log",
        "gpu_check.md",
        "gpu_scaling.png",
    ]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and [p["status"] for p in report["phases"]] == ["ok", "ok", "ok"]

    exact = report["results"]["exactness"]
    assert exact["passed"] and exact["automatic_choice"] == "segmented"
    by_mode = {row["attention"]: row for row in exact["rows"]}
    assert set(by_mode) == {"padded", "flex", "segmented", "mask"}
    assert not by_mode["flex"]["gradients"] and by_mode["segmented"]["gradients"]  # no CPU flex backward
    assert all(row["logps_error"] <= 2 * row["padded_logps_error"] + 1e-3 for row in exact["rows"])

    runs = {r["run"]: r for r in report["results"]["vs_trl"]["results"]}
    assert set(runs) == {"trl-dpo", "mmpo-dpo"}
    ours, trl = runs["mmpo-dpo"], runs["trl-dpo"]
    assert ours["precision"] == trl["precision"] == "mixed" and ours["attention"] == "segmented"
    assert len(ours["losses"]) == len(trl["losses"]) == 3
    assert max(abs(a - b) for a, b in zip(ours["losses"], trl["losses"])) < 1e-3  # same computation (bf16)
    assert all(r["pairs_per_s"] > 0 and r["activation_bytes"] > 0 for r in runs.values())

    sweeps = report["results"]["scaling"]["sweeps"]
    assert set(sweeps) == {"prompt", "completion", "batch"}
    assert all(len(row) == 3 for rows in sweeps.values() for row in rows)  # the axis value and both paths

    text = (out / "gpu_check.md").read_text()
    for heading in ("## Exactness against the padded path", "## Side by side with TRL", "## How the cost grows"):
        assert heading in text
    assert "| micro | mmpo-dpo |" in text and "dry run, CPU" in text
    assert (out / "gpu_scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "=== scaling" in (out / "gpu_check.log").read_text()
