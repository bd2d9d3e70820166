"""What the real-model study costs on CPU: one training step with full fine-tuning vs LoRA, the
reference pass, and greedy generation, for SmolLM2-135M-Instruct on short pairs (docs/smolworld.md).

    OMP_NUM_THREADS=1 python benchmarks/real_model_costs.py --model models/SmolLM2-135M-Instruct

Pairs are the shape ``mmpo pairs`` gives on the real-model world: a train-split prompt (rendered
with the chat template, system prompt included) and two short replies. Steps are timed after one
warm-up step, with the engine's own micro-step (MMPO, batch 8, shared prompt, packing, chunked
log-probs, selective recompute: the defaults) and AdamW on the trainable weights. Variants take
turns (``--repeats`` rounds) and the median step is reported, so that load from other processes
on a shared machine falls on all of them alike; the load average is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmpo.config import TrainConfig, resolve
from mmpo.data import load_preference_examples
from mmpo.forward import ForwardOptions, preference_logps
from mmpo.modeling import load_model, load_tokenizer
from mmpo.pairs.sampling import SamplingSettings, sample_completions
from mmpo.smolworld.build import smolworld_path
from mmpo.training.preference import PreferenceStep


def short_pairs(count: int, seed: int) -> list[dict]:
    """Prompts of the real-model world with a right and a wrong reply in the model's usual style."""
    rows = [json.loads(line) for line in smolworld_path("data/prompts_train.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    pairs = []
    for row in rng.sample(rows, count):
        if row["task"] == "capital":
            right, wrong = f"The capital is {row['answer']}.", "The capital is Sydney."
        else:
            a, b = row["operands"]
            sign = "+" if row["task"] == "add" else "*"
            right, wrong = f"{a} {sign} {b} = {row['answer']}", f"{a} {sign} {b} = {int(row['answer']) + 1}"
        pairs.append({"prompt": row["instruction"], "chosen": right, "rejected": wrong})
    return pairs


def time_steps(cfg: TrainConfig, examples: list[dict], pad_id: int, steps: int) -> dict:
    model = load_model(cfg)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate)
    batch = cfg.per_device_batch_size
    seconds = []
    step_fn = PreferenceStep.from_config(cfg, pad_id)
    for step in range(steps + 1):
        chunk = examples[(step * batch) % len(examples) :][:batch]
        started = time.perf_counter()
        loss, _, _ = step_fn.loss(model, chunk)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            seconds.append(time.perf_counter() - started)
    return {"trainable_parameters": sum(p.numel() for p in trainable), "step_seconds": seconds}


@torch.no_grad()
def time_reference(cfg: TrainConfig, examples: list[dict], pad_id: int) -> float:
    model = load_model(dataclasses.replace(cfg, lora=False)).eval()
    started = time.perf_counter()
    for start in range(0, len(examples), 16):
        preference_logps(model, examples[start : start + 16], pad_token_id=pad_id, options=ForwardOptions())
    return (time.perf_counter() - started) / len(examples)


def time_generation(model_path: str, prompts: int, max_new_tokens: int) -> float:
    from mmpo.modeling import load_pretrained

    rows = [json.loads(line) for line in smolworld_path("data/prompts_heldout.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(model_path)
    model = load_pretrained(model_path, dtype=torch.float32, is_trainable=False)
    started = time.perf_counter()
    settings = SamplingSettings(k=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=16)
    sample_completions(model, tokenizer, [r["instruction"] for r in rows[:prompts]], settings)
    return (time.perf_counter() - started) / prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all variants, taking turns")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in short_pairs(args.batch * (args.steps + 1), 0)))
        examples, _ = load_preference_examples([str(path)], tokenizer)
    for ex in examples:  # the timing does not depend on the reference values
        ex["ref_chosen_logps"], ex["ref_rejected_logps"] = -20.0, -25.0
    tokens = [len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples]
    result = {
        "model": args.model,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "timed_steps": args.steps,
        "mean_tokens_per_pair": sum(tokens) / len(tokens),
        "load_average_before": os.getloadavg()[0],
    }
    base = {"model": args.model, "per_device_batch_size": args.batch, "dtype": "float32", "progress": False}
    variants = {
        "full": TrainConfig(**base, learning_rate=1e-5),
        "lora_r16": TrainConfig(**base, learning_rate=1e-4, lora=True, lora_r=16, lora_alpha=32),
        "lora_r64": TrainConfig(**base, learning_rate=1e-4, lora=True),
    }
    for _ in range(args.repeats):
        for name, cfg in variants.items():
            timed = time_steps(resolve(cfg), examples, tokenizer.pad_token_id, args.steps)
            entry = result.setdefault(name, {"trainable_parameters": timed["trainable_parameters"], "step_seconds": []})
            entry["step_seconds"] += timed["step_seconds"]
            entry["median_seconds_per_step"] = statistics.median(entry["step_seconds"])
            print(name, json.dumps(entry), flush=True)
    result["reference_seconds_per_pair"] = time_reference(resolve(variants["full"]), examples, tokenizer.pad_token_id)
    result["greedy_generation_seconds_per_prompt_32_tokens"] = time_generation(args.model, 32, 32)
    result["load_average_after"] = os.getloadavg()[0]
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
