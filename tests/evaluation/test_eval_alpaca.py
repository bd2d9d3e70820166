"""`mmpo eval`'s win-rate files against the real `alpaca_eval` client, and generations that follow their settings.

The judge is a real HTTP server on 127.0.0.1 speaking the OpenAI chat API: its preference for the
output shown first is a fixed function of the two outputs (a content term and a length term), so
any two clients asking about the same pair get the same log-probs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from judge_server import FakeJudgeServer, openai_reply
from transformers import AutoModelForCausalLM

from helpers import WORDS
from mmpo.evaluation.checkpoint_eval import EvalSettings, evaluate_checkpoint

PAPER_ANNOTATOR = "weighted_alpaca_eval_gpt-4o-mini-2024-07-18"


def _quality(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32 * 2 - 1


def respond(path, body, headers):
    prompt = next(m["content"] for m in body["messages"] if m["role"] == "user")
    first, second = re.findall(r'"output": """(.*?)"""', prompt, flags=re.DOTALL)
    # A judge with a strong taste for length: a clear signal for the GLM's length term.
    logit = 0.3 * (_quality(first) - _quality(second)) + 2.0 * math.tanh((len(first) - len(second)) / 4)
    p_first = min(max(1 / (1 + math.exp(-logit)), 1e-6), 1 - 1e-6)
    label = "m" if p_first >= 0.5 else "M"
    return 200, {}, openai_reply(label, [("m", p_first), ("M", 1 - p_first)])


@pytest.fixture()
def judge_endpoint(monkeypatch):
    server = FakeJudgeServer()
    server.respond = respond
    monkeypatch.setenv("OPENAI_API_KEY", "sk-loopback-test")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
    yield server
    server.close()


def chatty_model(tiny_model_dir, tokenizer, path: Path, seed: int) -> Path:
    """The tiny model with larger random weights: varied text of varied length, not one repeated token."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def checkpoint_dir(tmp_path, tiny_model_dir, tokenizer):
    return chatty_model(tiny_model_dir, tokenizer, tmp_path / "ckpt", seed=3)


@pytest.fixture()
def baseline_dir(tmp_path, tiny_model_dir, tokenizer):
    return chatty_model(tiny_model_dir, tokenizer, tmp_path / "sft", seed=4)


def prompt_file(tmp_path: Path, n: int) -> str:
    assert n <= 100  # distinct instructions: AlpacaEval pairs rows up by instruction
    path = tmp_path / "prompts.jsonl"
    rows = [
        {
            "instruction": f"Repeat the word {WORDS[i % 10]}{WORDS[i // 10]}.",
            "answer": WORDS[i % 10],
            "words": [WORDS[i % 10]],
        }  # a list-valued field: must not reach AlpacaEval's files
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def settings(baseline: Path, prompts: str, out: Path, **changes) -> EvalSettings:
    return EvalSettings(
        **{
            "baseline": str(baseline),
            "rewards": False,
            "harness": (),
            "prompts": prompts,
            "judge": ("openai:gpt-4o-mini-2024-07-18",),
            "max_new_tokens": 6,
            "batch_size": 8,
            "progress": False,
            "output": str(out),
            **changes,
        }
    )


def test_a_changed_max_new_tokens_regenerates_and_changes_the_numbers(
    tmp_path, baseline_dir, checkpoint_dir, judge_endpoint, monkeypatch, capsys
):
    monkeypatch.setenv("MMPO_CACHE", str(tmp_path / "cache"))
    prompts, out = prompt_file(tmp_path, 12), tmp_path / "eval"
    first = evaluate_checkpoint(checkpoint_dir, settings(baseline_dir, prompts, out, progress=True))
    bars = capsys.readouterr().err
    assert "generating (ckpt)" in bars and "generating (sft)" in bars and "judging (openai:gpt-4o-mini" in bars
    outputs_first = json.loads((out / "model_outputs.json").read_text())
    calls = judge_endpoint.calls

    capsys.readouterr()
    again = evaluate_checkpoint(checkpoint_dir, settings(baseline_dir, prompts, out))
    assert capsys.readouterr().out.count("generations: reusing") == 2  # model and baseline
    assert again["winrate"]["per_judge"] == first["winrate"]["per_judge"] and judge_endpoint.calls == calls

    longer = evaluate_checkpoint(checkpoint_dir, settings(baseline_dir, prompts, out, max_new_tokens=24))
    assert "generations: reusing" not in capsys.readouterr().out  # both sides generated anew
    outputs_longer = json.loads((out / "model_outputs.json").read_text())
    assert max(len(r["output"]) for r in outputs_longer) > max(len(r["output"]) for r in outputs_first)
    assert json.loads((out / "model_outputs.key.json").read_text())["settings"]["max_new_tokens"] == 24
    per_first = first["winrate"]["per_judge"]["openai:gpt-4o-mini-2024-07-18"]
    per_longer = longer["winrate"]["per_judge"]["openai:gpt-4o-mini-2024-07-18"]
    assert per_longer["win_rate"] != pytest.approx(per_first["win_rate"], abs=1e-6)
    assert per_longer["avg_length_a"] > per_first["avg_length_a"]
    saved = json.loads((out / "results.json").read_text())
    assert (
        saved["winrate"]["settings"]["max_new_tokens"] == 24
        and saved["winrate"]["win_rate"] == longer["winrate"]["win_rate"]
    )

    # results.json is rewritten: a part this run does not measure survives only while the checkpoint is unchanged.
    no_winrate = settings(baseline_dir, prompts, out, winrate=False)
    assert evaluate_checkpoint(checkpoint_dir, no_winrate)["winrate"] == saved["winrate"]
    config = checkpoint_dir / "config.json"
    config.write_text(config.read_text())  # the checkpoint is rewritten in place
    assert "winrate" not in evaluate_checkpoint(checkpoint_dir, no_winrate)
    assert "winrate" not in json.loads((out / "results.json").read_text())


def test_evaluation_log_lines_are_not_read_as_markup():
    code = (
        "import logging; from mmpo.evaluation.console import configure_logging; configure_logging(); "
        "logging.getLogger('mmpo.evaluation').info('row orca:train:17 judge [bold]x[/bold] path runs/[red]')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "orca:train:17" in done.stderr and "[bold]x[/bold]" in done.stderr and "runs/[red]" in done.stderr


def test_limit_zero_is_refused_before_any_work(tmp_path, tiny_model_dir):
    from mmpo.config import ConfigError

    with pytest.raises(ConfigError, match="--limit 0"):
        evaluate_checkpoint(tmp_path / "nowhere", EvalSettings(baseline=str(tiny_model_dir), limit=0))


def fake_hub_cache(root: Path, n_rows: int) -> Path:
    """A local Hub cache holding the one AlpacaEval data file its GLM code opens (instruction
    difficulties; the minimal GLM does not use their values)."""
    repo = root / "datasets--tatsu-lab--alpaca_eval"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    lines = ["model,index,instruction_difficulty"] + [f"gamed,{i},0.0" for i in range(n_rows)]
    (snapshot / "df_gamed.csv").write_text("\n".join(lines) + "\n")
    return root


def test_win_rates_equal_alpaca_eval_on_the_same_annotations(
    tmp_path, baseline_dir, checkpoint_dir, judge_endpoint, monkeypatch
):
    pytest.importorskip("alpaca_eval", reason="needs the [alpaca] extra: pip install 'mmpo[alpaca]'")
    monkeypatch.setenv("MMPO_CACHE", str(tmp_path / "cache"))
    n = 64
    prompts, out = prompt_file(tmp_path, n), tmp_path / "eval"
    ours = evaluate_checkpoint(
        checkpoint_dir,
        settings(baseline_dir, prompts, out, max_new_tokens=12, judge=(f"alpaca_eval:{PAPER_ANNOTATOR}",)),
    )
    per = ours["winrate"]["per_judge"][f"alpaca_eval:{PAPER_ANNOTATOR}"]
    model_file, reference_file = Path(ours["winrate"]["model_outputs"]), Path(ours["winrate"]["reference_outputs"])
    records = json.loads(model_file.read_text())
    assert {r["generator"] for r in records} == {"ckpt"} and all("words" not in r for r in records)
    n_identical = sum(a["output"] == b["output"] for a, b in zip(records, json.loads(reference_file.read_text())))
    assert per["n_identical"] == n_identical and per["n_total"] == n

    calls = judge_endpoint.calls
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(fake_hub_cache(tmp_path / "hub", n))}
    command = [
        sys.executable,
        "-m",
        "alpaca_eval.main",
        "evaluate",
        "--model_outputs",
        str(model_file),
        "--reference_outputs",
        str(reference_file),
        "--annotators_config",
        PAPER_ANNOTATOR,
        "--output_path",
        str(tmp_path / "alpaca_eval"),
        "--caching_path",
        str(tmp_path / "ae_cache.json"),
        "--precomputed_leaderboard",
        "None",
        "--is_cache_leaderboard",
        "False",
        "--metric_kwargs",
        "{'glm_name': 'length_controlled_minimal', 'save_weights_dir': None}",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert judge_endpoint.calls - calls == n - n_identical  # AlpacaEval asked the endpoint itself

    results_dir = tmp_path / "alpaca_eval" / PAPER_ANNOTATOR
    theirs = {r["instruction"]: r["preference"] for r in json.loads((results_dir / "annotations.json").read_text())}
    mine = {r["instruction"]: r["preference"] for r in json.loads(Path(per["annotations_file"]).read_text())}
    assert mine.keys() == theirs.keys() and len(mine) == n
    assert max(abs(mine[k] - theirs[k]) for k in mine) < 1e-9

    import pandas as pd

    board = pd.read_csv(results_dir / "leaderboard.csv", index_col=0).loc["ckpt"]
    assert per["win_rate"] == pytest.approx(board["win_rate"], abs=1e-9)
    assert per["standard_error"] == pytest.approx(board["standard_error"], abs=1e-9)
    assert abs(per["length_controlled_winrate"] - board["length_controlled_winrate"]) < 0.05
    assert per["lc_variant"] == "length_controlled_minimal"
    assert abs(per["glm_weights"]["length"]) > 1.0  # the length term really was at work


def test_a_judge_that_cannot_run_is_a_config_error_before_any_work(tmp_path, tiny_model_dir, monkeypatch):
    from mmpo.config import ConfigError

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        evaluate_checkpoint(tmp_path / "nowhere", EvalSettings(baseline=str(tiny_model_dir), judge=("anthropic:c",)))
