"""``mmpo eval``: the paper's two axes (plus reward accuracy) for one checkpoint, in one JSON file.

1. reward accuracy on a preference split (each objective's own score);
2. win-rate of the checkpoint's generations against the baseline (SFT) model's, raw and
   length-controlled, per judge and averaged over judges;
3. capability retention through lm-evaluation-harness.

Each part writes into ``<checkpoint>/eval/`` as it finishes (generations, judge cache), so an
interrupted evaluation resumes without redoing finished parts. Baseline generations are cached
by model fingerprint and settings, so evaluating many checkpoints generates the baseline once.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpo.config import ConfigError
from mmpo.world import bundled_path

WORLD_TASKS_DIR = bundled_path("tasks")
WORLD_PROMPTS = bundled_path("data/prompts_eval.jsonl")
WORLD_PREFS_TEST = bundled_path("data/prefs_test.jsonl")


@dataclass
class EvalSettings:
    """What ``mmpo eval`` measures and how."""

    baseline: str = field(default_factory=lambda: str(bundled_path("sft_model")))
    """Baseline model for win-rate and reference for reward accuracy: the SFT model the run started from."""
    rewards: bool = True
    """Measure reward accuracy on a preference split."""
    reward_dataset: tuple[str, ...] = (str(WORLD_PREFS_TEST),)
    """Preference split(s) for reward accuracy, 'PATH_OR_HUB_ID[:SPLIT][@WEIGHT]'."""
    winrate: bool = True
    """Generate answers and judge them against the baseline's."""
    prompts: str = str(WORLD_PROMPTS)
    """Prompt set: a JSON/JSONL file with an 'instruction' column, or tatsu-lab/alpaca_eval (805 prompts)."""
    judge: tuple[str, ...] = ("programmatic",)
    """Judges: programmatic (world tasks), openai:MODEL (log-prob weighted), openai-binary:MODEL, anthropic:MODEL."""
    max_new_tokens: int = 512
    """Generation length limit."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy). The paper used 0.01 with top_p 0.95."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    batch_size: int = 16
    """Generation batch size."""
    harness: tuple[str, ...] = ("local",)
    """lm-eval tasks: names, 'paper' (the paper's ten tasks), 'local' (every task in local_tasks_dir); empty: skip."""
    local_tasks_dir: str | None = str(WORLD_TASKS_DIR)
    """Folder of local multiple-choice tasks (<name>.jsonl with query/choices/gold)."""
    harness_chat_template: bool = True
    """Apply the chat template in the harness (as the paper did)."""
    limit: int | None = None
    """Use only the first N prompts / harness documents (quick checks)."""
    seed: int = 42
    """Seed for the judge's order randomization, sampling and the harness."""
    output: str | None = None
    """Folder for results.json, generations and the judge cache (default: <checkpoint>/eval)."""


def parse_judge(spec: str):
    """``programmatic`` | ``openai:MODEL`` | ``openai-binary:MODEL`` | ``anthropic:MODEL``.

    The OpenAI-compatible base URL comes from ``OPENAI_BASE_URL`` (default api.openai.com); keys
    only from the environment (``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``).
    """
    from mmpo.evaluation.judges import AnthropicJudge, OpenAIJudge, ProgrammaticJudge

    kind, _, model = spec.partition(":")
    if kind == "programmatic":
        from mmpo.world.tasks import grade

        return ProgrammaticJudge(grade, label="programmatic:world")
    if kind not in ("openai", "openai-binary", "anthropic"):
        raise ConfigError(f"unknown judge '{spec}'; use programmatic, openai:MODEL, openai-binary:MODEL or anthropic:MODEL")
    if not model:
        raise ConfigError(f"judge '{spec}': name a model, e.g. openai:gpt-4o-mini-2024-07-18")
    if kind in ("openai", "openai-binary"):
        base_url = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
        return OpenAIJudge(model, base_url=base_url, use_logprobs=kind == "openai")
    return AnthropicJudge(model)


def _generation_key(model_dir: str, prompts: list[dict], s: EvalSettings) -> str:
    from mmpo.modeling import weights_fingerprint
    from mmpo.evaluation.generate import load_generation_model

    model = load_generation_model(model_dir, device="cpu")
    payload = json.dumps({"model": weights_fingerprint(model), "prompts": [p["instruction"] for p in prompts],
                          "max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                          "seed": s.seed})
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _generate(model_dir: str, prompts: list[dict], s: EvalSettings, path: Path, name: str, say) -> list[dict]:
    from mmpo.evaluation.generate import generate_outputs, write_model_outputs

    if path.is_file():
        records = json.loads(path.read_text())
        if [r["instruction"] for r in records] == [p["instruction"] for p in prompts]:
            say(f"generations: reusing {path}")
            return records
    say(f"generating {len(prompts)} answers with {name}")
    records = generate_outputs(model_dir, None, prompts, generator_name=name, max_new_tokens=s.max_new_tokens,
                               temperature=s.temperature, top_p=s.top_p, batch_size=s.batch_size, seed=s.seed)
    write_model_outputs(records, path)
    return records


def baseline_outputs(s: EvalSettings, prompts: list[dict], say) -> list[dict]:
    from mmpo.training.refcache import default_cache_dir

    cache = default_cache_dir().parent / "generations" / f"{_generation_key(s.baseline, prompts, s)}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    return _generate(s.baseline, prompts, s, cache, "baseline", say)


def evaluate_checkpoint(checkpoint: str | Path, settings: EvalSettings | None = None, say=print,
                        **run_overrides: Any) -> dict:
    """Evaluate one checkpoint (run folder, checkpoint folder or model folder); returns and writes the results."""
    from mmpo.evaluation.rewards import resolve_checkpoint, reward_accuracy, run_config

    s = settings or EvalSettings()
    judges = [parse_judge(j) for j in s.judge] if s.winrate else []
    for judge in judges:  # missing keys and bad endpoints fail here, before generation
        check = getattr(judge, "check_ready", None)
        if check:
            check()
    model_dir, config_file = resolve_checkpoint(checkpoint)
    if not (Path(model_dir) / "tokenizer_config.json").is_file() and Path(model_dir).is_dir():
        raise ConfigError(f"{model_dir} has no tokenizer files; save the tokenizer with the model")
    out_dir = Path(s.output) if s.output else (Path(model_dir).parent / "eval" if config_file else Path(model_dir) / "eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / "results.json"
    results: dict[str, Any] = json.loads(result_path.read_text()) if result_path.is_file() else {}
    results.update({"checkpoint": str(model_dir), "baseline": s.baseline})

    def save():
        result_path.write_text(json.dumps(results, indent=1))

    if s.rewards:
        cfg = run_config(config_file, **run_overrides)
        results["rewards"] = reward_accuracy(model_dir, cfg, baseline=s.baseline, dataset=list(s.reward_dataset), say=say)
        save()

    if judges:
        from mmpo.evaluation.generate import load_instructions
        from mmpo.evaluation.judges import judge_pairs
        from mmpo.evaluation.winrate import average_over_judges, summarize_judgments

        prompts = load_instructions(s.prompts)
        if s.limit:
            prompts = prompts[: s.limit]
        model_records = _generate(str(model_dir), prompts, s, out_dir / "model_outputs.json", "model", say)
        base_records = baseline_outputs(s, prompts, say)
        per_judge = {}
        for judge in judges:
            rows = judge_pairs(judge, model_records, base_records, cache_path=out_dir / "judge_cache.jsonl", seed=s.seed)
            per_judge[judge.name] = summarize_judgments(rows)
            failed = sum(1 for r in rows if r.get("error"))
            if failed:
                say(f"judge {judge.name}: {failed} calls failed; they are excluded and a rerun retries them")
        results["winrate"] = average_over_judges(per_judge)
        if any(j.startswith("programmatic") for j in s.judge):
            from mmpo.world.tasks import grade

            results["winrate"]["concise_correct_rate"] = {
                "model": sum(grade(r, r["output"]) == 2 for r in model_records) / len(model_records),
                "baseline": sum(grade(r, r["output"]) == 2 for r in base_records) / len(base_records),
            }
        save()

    if s.harness:
        from mmpo.evaluation.harness import run_harness

        results["harness"] = run_harness(str(model_dir), harness_task_names(s), local_tasks_dir=s.local_tasks_dir,
                                         apply_chat_template=s.harness_chat_template, seed=s.seed, limit=s.limit)
        save()
    results["results_file"] = str(result_path)
    save()
    return results


def harness_task_names(s: EvalSettings) -> list[str]:
    from mmpo.evaluation.harness import PAPER_TASKS

    names: list[str] = []
    for name in s.harness:
        if name == "paper":
            names += list(PAPER_TASKS)
        elif name == "local":
            if not s.local_tasks_dir:
                raise ConfigError("--harness local needs --local-tasks-dir")
            names += sorted(p.stem for p in Path(s.local_tasks_dir).glob("*.jsonl"))
        else:
            names.append(name)
    return names


def summary_lines(results: dict) -> list[str]:
    lines = [f"checkpoint: {results['checkpoint']}"]
    if "rewards" in results:
        r = results["rewards"]
        lines.append(f"reward accuracy ({r['objective']}, {r['pairs']} pairs): {r['reward_accuracy']:.3f}   "
                     f"eval loss {r['eval_loss']:.4f}")
    if "winrate" in results:
        w = results["winrate"]
        for name, per in w["per_judge"].items():
            lines.append(f"win-rate vs baseline [{name}]: {per['win_rate']:.1f}% ± {per['standard_error']:.1f}   "
                         f"LC {per.get('length_controlled_winrate', float('nan')):.1f}%")
        if len(w["per_judge"]) > 1:
            lines.append(f"win-rate averaged over judges: {w.get('win_rate', float('nan')):.1f}%   "
                         f"LC {w.get('length_controlled_winrate', float('nan')):.1f}%")
        if "concise_correct_rate" in w:
            c = w["concise_correct_rate"]
            lines.append(f"concise correct answers: model {c['model']:.1%}  baseline {c['baseline']:.1%}")
    if "harness" in results:
        h = results["harness"]
        tasks = ", ".join(f"{k} {v['acc']:.3f}" for k, v in h["tasks"].items())
        lines.append(f"harness accuracy: average {h['average_acc']:.3f} ({tasks})")
    lines.append(f"results: {results['results_file']}")
    return lines
