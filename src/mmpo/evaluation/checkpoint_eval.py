"""``mmpo eval``: the paper's two axes (plus reward accuracy) for one checkpoint, in one JSON file.

1. reward accuracy on a preference split (each objective's own score);
2. win-rate of the checkpoint's generations against the baseline (SFT) model's, raw and
   length-controlled, per judge and averaged over judges;
3. capability retention through lm-evaluation-harness.

Everything lands in ``<checkpoint>/eval/``: ``results.json``, the AlpacaEval-compatible
``model_outputs.json`` and ``reference_outputs.json`` (each with a ``.key.json`` saying what made
it), one ``annotations/<judge>.json`` per judge and the judges' caches. Generations are reused
only when the weights, prompts and generation settings are the same (:mod:`.generations`);
``results.json`` is rewritten on every run, keeping a part measured earlier only when this run
does not measure it and the checkpoint's files are unchanged since.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpo.config import ConfigError
from mmpo.training.run_dir import RESULTS_FILE, atomic_write_text
from mmpo.world import bundled_path

WORLD_TASKS_DIR = bundled_path("tasks")
WORLD_PROMPTS = bundled_path("data/prompts_eval.jsonl")
WORLD_PREFS_TEST = bundled_path("data/prefs_test.jsonl")
PARTS = ("rewards", "winrate", "harness")


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
    """Judges: alpaca_eval:CONFIG (AlpacaEval's own annotator, e.g. the paper's
    alpaca_eval:weighted_alpaca_eval_gpt-4o-mini-2024-07-18), programmatic (each prompt row's
    verifier, by its task; also reports task accuracy), and this package's openai:MODEL (log-prob
    weighted), openai-binary:MODEL, anthropic:MODEL."""
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
    """Use only the first N prompts / harness documents (quick checks); at least 1."""
    seed: int = 42
    """Seed for sampling, this package's judges' order randomization and the harness (AlpacaEval's annotator
    keeps its own)."""
    progress: bool = True
    """Show progress bars while generating and judging."""
    lc_v1_data: str | None = None
    """A local copy of AlpacaEval's df_gamed.csv (tatsu-lab/alpaca_eval dataset repo): also report AlpacaEval's
    length_controlled_v1 LC win-rate (only meaningful on the 805 AlpacaEval prompts, in order)."""
    output: str | None = None
    """Folder for results.json, generations and the judge cache (default: <checkpoint>/eval)."""


def parse_judge(spec: str):
    """``alpaca_eval[:CONFIG]`` | ``programmatic`` | ``openai:MODEL`` | ``openai-binary:MODEL`` | ``anthropic:MODEL``.

    Endpoints and keys come from the environment: ``OPENAI_BASE_URL``/``OPENAI_API_KEY`` (also
    for AlpacaEval's annotator), ``ANTHROPIC_BASE_URL``/``ANTHROPIC_API_KEY``.
    """
    from mmpo.evaluation.alpaca_annotator import PAPER_ANNOTATOR, AlpacaEvalAnnotator
    from mmpo.evaluation.judges import AnthropicJudge, OpenAIJudge, ProgrammaticJudge

    kind, _, model = spec.partition(":")
    if kind == "programmatic":
        # Each prompt row's own verifier (its ``task``): the bundled world's tasks and the real-model families.
        from mmpo.pairs.verifiers import verify_by_task

        return ProgrammaticJudge(verify_by_task, label="programmatic")
    if kind == "alpaca_eval":
        return AlpacaEvalAnnotator(model or PAPER_ANNOTATOR)
    if kind not in ("openai", "openai-binary", "anthropic"):
        raise ConfigError(
            f"unknown judge '{spec}'; use alpaca_eval:CONFIG, programmatic, openai:MODEL, "
            "openai-binary:MODEL or anthropic:MODEL"
        )
    if not model:
        raise ConfigError(f"judge '{spec}': name a model, e.g. {kind}:gpt-4o-mini-2024-07-18")
    if kind in ("openai", "openai-binary"):
        return OpenAIJudge(model, use_logprobs=kind == "openai")
    return AnthropicJudge(model)


def check_settings(s: EvalSettings) -> None:
    """Bad settings fail here, before any model is loaded."""
    if s.limit is not None and s.limit < 1:
        raise ConfigError(f"--limit {s.limit}: use at least 1 prompt/document, or leave --limit out to use them all")
    if s.max_new_tokens < 1 or s.batch_size < 1 or s.temperature < 0 or not 0 < s.top_p <= 1:
        raise ConfigError(
            f"need --max-new-tokens >= 1, --batch-size >= 1, --temperature >= 0 and 0 < --top-p <= 1 "
            f"(got {s.max_new_tokens}, {s.batch_size}, {s.temperature}, {s.top_p})"
        )
    if s.lc_v1_data and not Path(s.lc_v1_data).is_file():
        raise ConfigError(f"--lc-v1-data {s.lc_v1_data}: file not found (AlpacaEval's df_gamed.csv)")
    if s.winrate and not s.judge:
        raise ConfigError("--winrate needs at least one --judge (or pass --no-winrate)")


def check_gradable(prompts: list[dict], source: str) -> None:
    """The programmatic judge needs every prompt row to name a task with a verifier; said before generating."""
    from mmpo.pairs.verifiers import KNOWN_TASKS, task_verifier

    for i, row in enumerate(prompts):
        if task_verifier(row) is None or "answer" not in row:
            raise ConfigError(
                f"--judge programmatic: prompt {i} of {source} has no gradable task (task {row.get('task')!r}; "
                f"it needs an 'answer', and a 'task' if any, in {', '.join(KNOWN_TASKS)}); use another judge for these"
            )


def generation_settings(s: EvalSettings) -> dict[str, Any]:
    return {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed}


def eval_prompts(s: EvalSettings) -> list[dict]:
    from mmpo.evaluation.generate import load_instructions

    prompts = load_instructions(s.prompts)
    return prompts[: s.limit] if s.limit else prompts


def baseline_outputs(s: EvalSettings, prompts: list[dict], say) -> list[dict]:
    """The baseline's answers from the shared cache, generated there first if missing."""
    from mmpo.evaluation.generations import generate_or_reuse

    return generate_or_reuse(
        s.baseline,
        prompts,
        generation_settings(s),
        None,
        generator=baseline_name(s.baseline, ""),
        batch_size=s.batch_size,
        progress=s.progress,
        say=say,
        shared_cache=True,
    )


def generator_name(model_dir: Path) -> str:
    """``<run>-<checkpoint>`` for a run's checkpoint (``runs/mmpo/checkpoints/epoch-1/model``), else the folder name."""
    if model_dir.name == "model" and model_dir.parent.parent.name == "checkpoints":
        return f"{model_dir.parent.parent.parent.name}-{model_dir.parent.name}"
    return model_dir.name or str(model_dir)


def baseline_name(baseline: str, model_generator: str) -> str:
    name = Path(baseline.rstrip("/")).name or baseline
    return f"{name}-baseline" if name == model_generator else name


def checkpoint_files_fingerprint(model_dir: Path) -> str:
    """Names, sizes and modification times of the checkpoint's files: changes when it is rewritten."""
    if not model_dir.is_dir():
        return str(model_dir)  # a Hub id
    listing = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def _run_judge(
    judge, model_records: list[dict], graded: list[dict], base_records: list[dict], out_dir: Path, s: EvalSettings
) -> list[dict]:
    """``graded``: the model's records merged into their whole prompt rows (what this package's judges see)."""
    from mmpo.evaluation.alpaca_annotator import AlpacaEvalAnnotator
    from mmpo.evaluation.judging import judge_pairs

    if isinstance(judge, AlpacaEvalAnnotator):
        cache_dir = out_dir / "alpaca_eval_cache"
        return judge.annotate(
            model_records, base_records, cache_path=cache_dir / f"{judge.config}.json", work_dir=cache_dir
        )
    return judge_pairs(
        judge, graded, base_records, cache_path=out_dir / "judge_cache.jsonl", seed=s.seed, progress=s.progress
    )


def measure_winrate(model_dir: Path, judges: list, s: EvalSettings, out_dir: Path, say) -> dict:
    """Generate (or reuse) both output sets, judge them with every judge, summarize."""
    from mmpo.evaluation.annotations import annotations_file_name, write_annotations
    from mmpo.evaluation.generations import generate_or_reuse
    from mmpo.evaluation.winrate import average_over_judges, summarize_judgments

    prompts = eval_prompts(s)
    programmatic = any(j.startswith("programmatic") for j in s.judge)
    if programmatic:
        check_gradable(prompts, s.prompts)
    model_gen = generator_name(model_dir)
    base_gen = baseline_name(s.baseline, model_gen)
    model_path, ref_path = out_dir / "model_outputs.json", out_dir / "reference_outputs.json"
    common = {"batch_size": s.batch_size, "progress": s.progress, "say": say}
    model_records = generate_or_reuse(
        str(model_dir), prompts, generation_settings(s), model_path, generator=model_gen, **common
    )
    base_records = generate_or_reuse(
        s.baseline, prompts, generation_settings(s), ref_path, generator=base_gen, shared_cache=True, **common
    )
    # The files keep scalar metadata only (AlpacaEval's format); graders get the prompt rows whole
    # (a verifier may read lists such as the operands or the accepted spellings).
    graded = [{**row, **record} for row, record in zip(prompts, model_records)]
    graded_base = [{**row, **record} for row, record in zip(prompts, base_records)]
    per_judge = {}
    for judge in judges:
        rows = _run_judge(judge, model_records, graded, base_records, out_dir, s)
        summary = summarize_judgments(rows)
        if s.lc_v1_data:
            from mmpo.evaluation.lc_v1 import length_controlled_v1_win_rate

            summary.update(length_controlled_v1_win_rate(rows, s.lc_v1_data))
        summary["n_identical"] = sum(bool(r.get("identical")) for r in rows)
        path = write_annotations(rows, judge.name, out_dir / "annotations" / annotations_file_name(judge.name))
        summary["annotations_file"] = str(path)
        per_judge[judge.name] = summary
        failed = sum(1 for r in rows if r.get("error"))
        if failed:
            say(f"judge {judge.name}: {failed} judgments failed; they are excluded and a rerun retries them")
    part = average_over_judges(per_judge)
    if programmatic:
        # Task accuracy: the share of answers the verifier scores 1 (the world's tasks: exactly the concise answer).
        from mmpo.pairs.verifiers import verify_by_task

        def share_right(rows: list[dict]) -> float:
            return sum(verify_by_task(r, r["output"]) == 1 for r in rows) / len(rows)

        part["correct_rate"] = {"model": share_right(graded), "baseline": share_right(graded_base)}
    part.update(
        model_outputs=str(model_path),
        reference_outputs=str(ref_path),
        generator=model_gen,
        baseline_generator=base_gen,
        settings={**generation_settings(s), "prompts": s.prompts, "n_prompts": len(prompts), "judges": list(s.judge)},
    )
    return part


def evaluate_checkpoint(
    checkpoint: str | Path, settings: EvalSettings | None = None, say=print, **run_overrides: Any
) -> dict:
    """Evaluate one checkpoint (run folder, checkpoint folder or model folder); returns and writes the results."""
    from mmpo.evaluation.console import configure_logging
    from mmpo.evaluation.judges import FatalJudgeError
    from mmpo.evaluation.rewards import resolve_checkpoint, reward_accuracy, run_config

    configure_logging()
    s = settings or EvalSettings()
    check_settings(s)
    judges = [parse_judge(j) for j in s.judge] if s.winrate else []
    for judge in judges:  # missing keys and packages fail here, before any model is loaded
        check = getattr(judge, "check_ready", None)
        if check:
            try:
                check()
            except FatalJudgeError as err:
                raise ConfigError(f"judge {judge.name}: {err}") from None
    model_dir, config_file = resolve_checkpoint(checkpoint)
    if not (Path(model_dir) / "tokenizer_config.json").is_file() and Path(model_dir).is_dir():
        raise ConfigError(f"{model_dir} has no tokenizer files; save the tokenizer with the model")
    out_dir = (
        Path(s.output) if s.output else (Path(model_dir).parent / "eval" if config_file else Path(model_dir) / "eval")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / RESULTS_FILE
    files = checkpoint_files_fingerprint(Path(model_dir))
    measuring = {"rewards": s.rewards, "winrate": bool(judges), "harness": bool(s.harness)}
    results: dict[str, Any] = {
        "checkpoint": str(model_dir),
        "checkpoint_files": files,
        "baseline": s.baseline,
        **_kept_parts(result_path, files, measuring, say),
    }

    def save():
        atomic_write_text(result_path, json.dumps(results, indent=1))

    save()  # from here on the file never shows another run's parts for what this run measures
    if s.rewards:
        cfg = run_config(config_file, **run_overrides)
        results["rewards"] = reward_accuracy(
            model_dir, cfg, baseline=s.baseline, dataset=list(s.reward_dataset), say=say
        )
        save()
    if judges:
        results["winrate"] = measure_winrate(Path(model_dir), judges, s, out_dir, say)
        save()
    if s.harness:
        from mmpo.evaluation.harness import run_harness

        results["harness"] = run_harness(
            str(model_dir),
            harness_task_names(s),
            local_tasks_dir=s.local_tasks_dir,
            apply_chat_template=s.harness_chat_template,
            seed=s.seed,
            limit=s.limit,
        )
    results["results_file"] = str(result_path)
    save()
    return results


def _kept_parts(result_path: Path, files: str, measuring: dict[str, bool], say) -> dict:
    """Parts of the previous results this run does not measure, if the checkpoint is unchanged."""
    try:
        previous = json.loads(result_path.read_text()) if result_path.is_file() else {}
    except ValueError:
        previous = {}
    if previous.get("checkpoint_files") != files:
        return {}
    kept = {part: previous[part] for part in PARTS if part in previous and not measuring[part]}
    if kept:
        say(f"keeping {', '.join(kept)} from the previous evaluation of these same checkpoint files")
    return kept


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
    """Plain-text summary lines (judge names and paths as they are: print them without markup)."""
    lines = [f"checkpoint: {results['checkpoint']}"]
    if "rewards" in results:
        r = results["rewards"]
        lines.append(
            f"reward accuracy ({r['objective']}, {r['pairs']} pairs): {r['reward_accuracy']:.3f}   "
            f"eval loss {r['eval_loss']:.4f}"
        )
    if "winrate" in results:
        w = results["winrate"]
        for name, per in w["per_judge"].items():
            lc = per.get("length_controlled_winrate", float("nan"))
            lines.append(
                f"win-rate vs baseline, judge {name}: {per['win_rate']:.1f}% (standard error "
                f"{per['standard_error']:.1f})   LC {lc:.1f}% ({per.get('lc_variant', 'n/a')})"
                + (
                    f"   LC v1 {per['length_controlled_winrate_v1']:.1f}%"
                    if "length_controlled_winrate_v1" in per
                    else ""
                )
            )
        if len(w["per_judge"]) > 1:
            lines.append(
                f"win-rate averaged over judges: {w.get('win_rate', float('nan')):.1f}%   "
                f"LC {w.get('length_controlled_winrate', float('nan')):.1f}%"
            )
        if "correct_rate" in w:
            c = w["correct_rate"]
            lines.append(f"correct answers (verifier): model {c['model']:.1%}  baseline {c['baseline']:.1%}")
        lines.append(f"outputs: {w['model_outputs']} (reference: {w['reference_outputs']})")
    if "harness" in results:
        h = results["harness"]
        tasks = ", ".join(f"{k} {v['acc']:.3f}" for k, v in h["tasks"].items())
        lines.append(f"harness accuracy: average {h['average_acc']:.3f} ({tasks})")
    lines.append(f"results: {results['results_file']}")
    return lines
