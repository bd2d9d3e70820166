"""`mmpo eval` on inputs that cannot work: one clear line each, before any model is loaded."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from mmpo.config import ConfigError, bundled_path
from mmpo.evaluation.rewards import resolve_checkpoint, run_config


def mmpo_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmpo.cli", "eval", *args], capture_output=True, text=True, timeout=300
    )


def test_a_run_folder_without_checkpoints_is_named_as_such(tmp_path):
    run = tmp_path / ("a-long-folder-name-so-that-the-message-is-wider-than-a-terminal" * 2) / "run"
    run.parent.mkdir()
    run.mkdir()
    (run / "config.yaml").write_text("objective: mmpo\n")
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="is a run folder without a complete checkpoint"):
        resolve_checkpoint(run)
    (run / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="is a run folder without a complete checkpoint"):
        resolve_checkpoint(run)
    proc = mmpo_eval(str(run), "--no-winrate", "--harness")
    assert proc.returncode == 2 and "run folder without a complete checkpoint" in proc.stderr
    assert proc.stderr.count("\n") == 1 and str(run) in proc.stderr  # one line, the path whole
    assert "tokenizer" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_damaged_run_config_is_one_clear_error(tmp_path):
    """A checkpoint whose run config.yaml is broken or not UTF-8: one line naming the file, exit 2."""
    run = tmp_path / "run"
    shutil.copytree(bundled_path("sft_model"), run / "model")
    config = run / "config.yaml"
    config.write_text("objective: [mmpo\n")
    with pytest.raises(yaml.YAMLError):
        run_config(config)
    proc = mmpo_eval(str(run), "--no-winrate", "--harness")
    assert proc.returncode == 2 and "is not valid YAML at line 2" in proc.stderr and "Traceback" not in proc.stderr
    config.write_bytes("objective: dpo\n".encode("utf-16"))
    proc = mmpo_eval(str(run), "--no-winrate", "--harness")
    assert proc.returncode == 2 and "is not UTF-8 text" in proc.stderr and "Traceback" not in proc.stderr


def test_limit_zero_is_refused(tmp_path):
    proc = mmpo_eval("--limit", "0", "--harness", "--no-rewards")
    assert proc.returncode == 2 and "limit" in proc.stderr and "Traceback" not in proc.stderr


def test_programmatic_judge_on_prompts_without_a_task_fails_before_generating(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "What is 2 + 2?", "task": "add", "answer": "4"}\n{"instruction": "Hi"}\n')
    model = bundled_path("sft_model")
    args = ["--baseline", str(model), "--prompts", str(prompts), "--no-rewards", "--harness"]
    proc = mmpo_eval(str(model), *args, "--output", str(tmp_path / "eval"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "prompt 1 of" in proc.stderr and "no gradable task" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("model_outputs.json"))  # nothing was generated
