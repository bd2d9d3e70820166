"""`mmpo eval` end to end on a tiny model: reward accuracy, win-rate by the programmatic judge,
lm-eval retention on a local task, results written and reused on a rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import WORDS
from mmpo.config import ConfigError, TrainConfig
from mmpo.evaluation.checkpoint_eval import EvalSettings, evaluate_checkpoint, summary_lines
from mmpo.training import train


@pytest.fixture()
def trained_run(tmp_path, tiny_model_dir, prefs, monkeypatch):
    monkeypatch.setenv("MMPO_CACHE", str(tmp_path / "cache"))
    result = train(
        TrainConfig(
            model=str(tiny_model_dir),
            dataset=(prefs[0],),
            eval_dataset=(prefs[1],),
            output_dir=str(tmp_path / "run"),
            per_device_batch_size=8,
            max_steps=2,
            learning_rate=1e-3,
            progress=False,
        )
    )
    return result.output_dir


def eval_files(tmp_path: Path) -> tuple[str, str]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"instruction": f"Repeat the word {w}.", "answer": w, "task": "repeat"}) + "\n"
            for w in WORDS[:6]
        )
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_copy.jsonl").write_text(
        "".join(
            json.dumps(
                {"query": f"Repeat the word {w}.", "choices": [w, WORDS[(i + 1) % 10], WORDS[(i + 2) % 10]], "gold": 0}
            )
            + "\n"
            for i, w in enumerate(WORDS)
        )
    )
    return str(prompts), str(tasks)


def test_eval_reports_three_axes_and_reuses_its_work(tmp_path, tiny_model_dir, prefs, trained_run, capsys):
    prompts, tasks = eval_files(tmp_path)
    settings = EvalSettings(
        baseline=str(tiny_model_dir),
        reward_dataset=(prefs[1],),
        prompts=prompts,
        max_new_tokens=6,
        harness=("local",),
        local_tasks_dir=tasks,
        batch_size=4,
    )
    results = evaluate_checkpoint(trained_run, settings)
    assert 0.0 <= results["rewards"]["reward_accuracy"] <= 1.0 and results["rewards"]["pairs"] == 12
    per_judge = results["winrate"]["per_judge"]["programmatic"]
    assert 0.0 <= per_judge["win_rate"] <= 100.0 and "length_controlled_winrate" in per_judge
    assert results["harness"]["tasks"]["tiny_copy"]["acc"] is not None
    saved = json.loads(Path(results["results_file"]).read_text())
    assert saved["rewards"] == results["rewards"] and Path(results["results_file"]).parent.name == "eval"
    assert any("win-rate" in line for line in summary_lines(results))
    # AlpacaEval-compatible files: the generator is named after the run and checkpoint, the baseline's beside it.
    checkpoint = Path(results["checkpoint"]).parent
    model_records = json.loads(Path(results["winrate"]["model_outputs"]).read_text())
    reference_records = json.loads(Path(results["winrate"]["reference_outputs"]).read_text())
    assert {r["generator"] for r in model_records} == {f"run-{checkpoint.name}"}
    assert {r["generator"] for r in reference_records} == {Path(tiny_model_dir).name}
    # task accuracy = the share of exactly-concise answers by the world's own grade (2 = concise)
    from mmpo.world.tasks import grade

    correct = results["winrate"]["correct_rate"]
    assert correct["model"] == sum(grade(r, r["output"]) == 2 for r in model_records) / len(model_records)
    assert correct["baseline"] == sum(grade(r, r["output"]) == 2 for r in reference_records) / len(reference_records)
    assert Path(results["winrate"]["reference_outputs"]).parent == Path(results["results_file"]).parent

    capsys.readouterr()
    again = evaluate_checkpoint(trained_run, EvalSettings(**{**settings.__dict__, "harness": (), "rewards": False}))
    out = capsys.readouterr().out
    assert "generations: reusing" in out  # model and baseline generations both reused
    assert again["winrate"]["per_judge"] == results["winrate"]["per_judge"]


def test_eval_of_a_folder_without_tokenizer_is_a_clear_error(tmp_path, tiny_model_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
    with pytest.raises(ConfigError, match="no tokenizer"):
        evaluate_checkpoint(bare, EvalSettings(baseline=str(tiny_model_dir), winrate=False, harness=()))


def test_eval_names_a_bad_judge_before_any_work(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="unknown judge"):
        evaluate_checkpoint(tmp_path, EvalSettings(judge=("gpt4",)))
