"""benchmarks/bench_vs_trl.py on a model folder of its own (``--model``) and a pairs file (``--pairs``):
the row is named after the folder, both trainers see the pairs through the chat template (the
file's plain-string rows are made conversational for TRL), so their per-step losses agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, write_prefs

pytest.importorskip("trl")


@pytest.mark.slow  # ~40 s on 2 cores: three Python processes importing torch, transformers and TRL
def test_a_model_folder_and_a_pairs_file(tiny_model_dir, tmp_path):
    pairs = write_prefs(tmp_path / "pairs.jsonl", 8)
    out = tmp_path / "vs_trl.json"
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_vs_trl.py"),
        "--sizes",
        "--model",
        str(tiny_model_dir),
        "--pairs",
        str(pairs),
        "--runs",
        "trl-dpo",
        "mmpo-dpo",
        "--batch",
        "2",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--threads",
        "1",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["run"]: r for r in json.loads(out.read_text())["results"]}
    assert set(runs) == {"trl-dpo", "mmpo-dpo"}
    assert {r["size"] for r in runs.values()} == {tiny_model_dir.name}
    ours, trl = runs["mmpo-dpo"], runs["trl-dpo"]
    assert len(ours["losses"]) == len(trl["losses"]) == 3
    assert max(abs(a - b) for a, b in zip(ours["losses"], trl["losses"])) < 1e-4  # same tokens, same math


def test_too_few_pairs_is_one_clear_message(tiny_model_dir, tmp_path):
    pairs = write_prefs(tmp_path / "pairs.jsonl", 3)
    command = [sys.executable, str(REPO / "benchmarks" / "bench_vs_trl.py"), "--sizes", "--model", str(tiny_model_dir)]
    command += [
        "--pairs",
        str(pairs),
        "--batch",
        "2",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "o"),
    ]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "3 rows, the run needs 8" in proc.stderr
    assert not (tmp_path / "o").exists()
