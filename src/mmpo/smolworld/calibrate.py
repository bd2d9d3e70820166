"""Measure a model on the task families and retention tasks: how often is it right, and is it brevity?

    python -m mmpo.smolworld.calibrate --model models/SmolLM2-135M-Instruct --out src/mmpo/assets/smolworld/calibration

For each family, on ``per_family`` seeded train-split prompts: greedy accuracy, accuracy of k
samples at the sampling temperature, the share of prompts whose finished samples disagree (those
give preference pairs), replies cut off at ``max_new_tokens``, and the mean reply length of right
and of wrong finished samples (if right replies were much shorter, the verifier would be rewarding
brevity). Retention: lm-eval accuracy on the multiple-choice tasks. Writes ``<out>.json`` and
``<out>.md`` (with the command that produced them).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mmpo.pairs.sampling import SamplingSettings, sample_completions
from mmpo.smolworld.families import FAMILIES, make_prompts


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def measure_family(
    model,
    tokenizer,
    name: str,
    *,
    per_family: int,
    seed: int,
    k: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
) -> dict:
    rows = make_prompts([name], "train", seed=seed, per_family=per_family)
    verify = FAMILIES[name].verify
    texts = [r["instruction"] for r in rows]
    greedy = sample_completions(
        model,
        tokenizer,
        texts,
        SamplingSettings(k=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed),
    )
    sampled = sample_completions(
        model,
        tokenizer,
        texts,
        SamplingSettings(k=k, temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed),
    )
    greedy_right = [verify(rows[i], greedy[i][0]["text"]) for i in range(len(rows))]
    right_lengths, wrong_lengths, mixed, all_samples = [], [], 0, []
    for i, row in enumerate(rows):
        finished_scores = []
        for sample in sampled[i]:
            s = verify(row, sample["text"])
            all_samples.append((s, sample["finished"]))
            if sample["finished"]:
                finished_scores.append(s)
                (right_lengths if s == 1.0 else wrong_lengths).append(sample["new_tokens"])
        mixed += int(len(set(finished_scores)) > 1)
    return {
        "prompts": len(rows),
        "greedy_accuracy": _mean(greedy_right),
        "greedy_unfinished": _mean([float(not greedy[i][0]["finished"]) for i in range(len(rows))]),
        "sampled_accuracy": _mean([s for s, _ in all_samples]),
        "sampled_unfinished": _mean([float(not f) for _, f in all_samples]),
        "sampled_accuracy_finished": _mean([s for s, f in all_samples if f]),
        "prompts_with_pairs": mixed / len(rows),
        "mean_tokens_right": _mean(right_lengths),
        "mean_tokens_wrong": _mean(wrong_lengths),
        "greedy_examples": [
            {
                "instruction": rows[i]["instruction"],
                "answer": rows[i]["answer"],
                "output": greedy[i][0]["text"],
                "right": greedy_right[i],
            }
            for i in range(4)
        ],
    }


def _fmt(value: float | None, pct: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.0f}%" if pct else f"{value:.1f}"


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# SmolLM2-135M-Instruct on the real-model world: measured rates",
        "",
        f"Produced by (about {result['seconds']:.0f} s, one thread):",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        (
            f"{s['per_family']} train-split prompts per family; greedy, and {s['k']} samples per prompt at temperature "
            f"{s['temperature']}; at most {s['max_new_tokens']} new tokens (a reply cut off there counts as wrong)."
        ),
        "",
        (
            "| family | greedy right | sampled right | sampled right (finished) | prompts with a pair "
            "| cut off (greedy / sampled) | tokens: right / wrong |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, f in result["families"].items():
        lines.append(
            f"| {name} | {_fmt(f['greedy_accuracy'])} | {_fmt(f['sampled_accuracy'])} | "
            f"{_fmt(f['sampled_accuracy_finished'])} | {_fmt(f['prompts_with_pairs'])} | "
            f"{_fmt(f['greedy_unfinished'])} / {_fmt(f['sampled_unfinished'])} | "
            f"{_fmt(f['mean_tokens_right'], False)} / {_fmt(f['mean_tokens_wrong'], False)} |"
        )
    if result.get("retention"):
        lines += [
            "",
            "Retention (lm-eval, zero-shot, chat template applied):",
            "",
            "| task | acc | acc_norm |",
            "| --- | --- | --- |",
        ]
        for task, m in result["retention"]["tasks"].items():
            lines.append(f"| {task} | {m['acc']:.3f} | {m['acc_norm']:.3f} |")
    lines += ["", "Greedy examples:", ""]
    for name, f in result["families"].items():
        for e in f["greedy_examples"][:2]:
            mark = "right" if e["right"] else "wrong"
            lines.append(f"- {name}: {json.dumps(e['instruction'])} -> {json.dumps(e['output'])} ({mark})")
    return "\n".join(lines) + "\n"


def calibrate(
    model_path: str,
    families: Sequence[str],
    *,
    per_family: int = 48,
    seed: int = 0,
    k: int = 4,
    temperature: float = 0.7,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    tasks_dir: str | None = None,
    command: str = "",
) -> dict:
    import torch

    from mmpo.modeling import load_pretrained, load_tokenizer

    started = time.time()
    tokenizer = load_tokenizer(model_path)
    model = load_pretrained(model_path, dtype=torch.float32, is_trainable=False)
    settings = {
        "per_family": per_family,
        "seed": seed,
        "k": k,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
    }
    result: dict = {"model": model_path, "command": command, "settings": settings, "families": {}}
    for name in families:
        result["families"][name] = measure_family(
            model,
            tokenizer,
            name,
            per_family=per_family,
            seed=seed,
            k=k,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        print(name, {k_: v for k_, v in result["families"][name].items() if k_ != "greedy_examples"}, flush=True)
    if tasks_dir:
        from mmpo.evaluation.harness import run_harness

        names = sorted(p.stem for p in Path(tasks_dir).glob("*.jsonl"))
        result["retention"] = run_harness(
            model_path,
            names,
            local_tasks_dir=tasks_dir,
            apply_chat_template=True,
            seed=seed,
            dtype="float32",
            batch_size=16,
        )
    result["seconds"] = time.time() - started
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m mmpo.smolworld.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder or GGUF file")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated family names")
    parser.add_argument("--per-family", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tasks-dir", default=None, help="retention tasks folder (<name>.jsonl); none: skip")
    parser.add_argument("--out", required=True, help="output path without suffix: writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    command = "python -m mmpo.smolworld.calibrate " + shlex.join(argv)
    result = calibrate(
        args.model,
        families,
        per_family=args.per_family,
        seed=args.seed,
        k=args.k,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        tasks_dir=args.tasks_dir,
        command=command,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
