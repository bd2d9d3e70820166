"""Build the embedded world: data files, tokenizer, an SFT'd tiny Llama, and its measured quality.

``generate_world_data`` writes the data only (seconds). ``build_world`` also trains the
tokenizer and the model and writes ``world.json``; the shipped assets under
``src/mmpo/assets/world/`` come from ``python -m mmpo.world.build`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from mmpo.world.model import build_tiny_llama
from mmpo.world.tasks import WORD_TASKS, WorldSizes, generate_rows, grade
from mmpo.world.tokenizer import train_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "world"
TOKENIZER_VOCAB = 600
MODEL_SHAPE = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 384, "max_positions": 128}


# ----------------------------------------------------------------------------- data


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def generate_world_data(out_dir: str | Path = DEFAULT_OUT, seed: int = 0, sizes: WorldSizes = WorldSizes()) -> dict[str, int]:
    """Write ``data/*.jsonl`` and ``tasks/*.jsonl`` under ``out_dir``; returns rows per file."""
    out_dir = Path(out_dir)
    counts = {}
    for name, rows in generate_rows(seed, sizes).items():
        write_jsonl(out_dir / f"{name}.jsonl", rows)
        counts[name] = len(rows)
    return counts


def tokenize_sft(tokenizer, rows: Sequence[dict]) -> list[dict]:
    """SFT rows -> ``{"id", "input_ids", "labels"}`` with labels only on the final assistant turn."""
    examples = []
    for i, row in enumerate(rows):
        messages = row["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
        full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        if full[: len(prompt)] != prompt:
            raise ValueError(f"sft row {i}: prompt tokens are not a prefix of the conversation's tokens")
        labels = [-100] * len(prompt) + full[len(prompt):]
        examples.append({"id": f"world:sft_train:{i}", "input_ids": full, "labels": labels})
    return examples


# ----------------------------------------------------------------------------- SFT


def run_sft(model, tokenizer, examples: list[dict], *, epochs: float, lr: float, batch_size: int, seed: int,
            max_seconds: float | None = None) -> dict:
    """The one SFT call of the build (to be replaced by ``mmpo.engine.run_sft`` once it lands)."""
    return _sft_fallback(model, tokenizer, examples, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                         max_seconds=max_seconds)


def _pad_batch(examples: Sequence[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return ids, labels, mask


def _sft_fallback(model, tokenizer, examples, *, epochs, lr, batch_size, seed, max_seconds) -> dict:
    """Plain AdamW, cosine schedule with 5% warm-up, assistant-only loss. Temporary."""
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = max(1, round(steps_per_epoch * epochs))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))
    model.train()
    start, step, losses = time.monotonic(), 0, []
    order: list[int] = []
    while step < total:
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        ids, labels, mask = _pad_batch(batch, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        if max_seconds is not None and time.monotonic() - start > max_seconds:
            break
    model.eval()
    tail = losses[-max(1, steps_per_epoch // 4):]
    return {"steps": step, "seconds": round(time.monotonic() - start, 1), "final_loss": sum(tail) / len(tail)}


# ----------------------------------------------------------------------------- measurement


@torch.no_grad()
def greedy_answers(model, tokenizer, instructions: Sequence[str], *, max_new_tokens: int = 32,
                   batch_size: int = 64) -> list[str]:
    """Greedy completions of single-turn user ``instructions`` (decoded, special tokens dropped)."""
    model.eval()
    outputs: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(instructions), batch_size):
            prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=False) for text in instructions[i: i + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def generation_quality(model, tokenizer, rows: Sequence[dict]) -> dict:
    """Fractions of greedy answers graded 2 (concise correct) and 1 (correct inside extra text)."""
    answers = greedy_answers(model, tokenizer, [r["instruction"] for r in rows])
    grades = [grade(r, a) for r, a in zip(rows, answers)]

    def fractions(idx: list[int]) -> dict:
        return {"concise_correct": round(sum(grades[i] == 2 for i in idx) / len(idx), 4),
                "contains_answer": round(sum(grades[i] == 1 for i in idx) / len(idx), 4)}

    result = fractions(list(range(len(rows))))
    result["per_task"] = {t: fractions([i for i, r in enumerate(rows) if r["task"] == t])
                          for t in WORD_TASKS if any(r["task"] == t for r in rows)}
    return result


@torch.no_grad()
def choice_accuracy(model, tokenizer, rows: Sequence[dict]) -> float:
    """Multiple-choice accuracy: the choice with the highest summed log-likelihood after the prompt.

    The choice follows the rendered prompt (ending in the generation prompt) directly, without an
    end-of-turn token, as a log-likelihood harness scores continuations.
    """
    model.eval()
    correct = 0
    for row in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["query"]}],
                                               add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        seqs = [prompt_ids + tokenizer(c, add_special_tokens=False)["input_ids"] for c in row["choices"]]
        ids, _, mask = _pad_batch([{"input_ids": s, "labels": s} for s in seqs], tokenizer.pad_token_id)
        logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        scores = []
        for i, seq in enumerate(seqs):
            pos = torch.arange(len(prompt_ids), len(seq))
            scores.append(logps[i, pos - 1, torch.tensor(seq[len(prompt_ids):])].sum().item())
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["gold"])
    return round(correct / len(rows), 4)


def measure(model, tokenizer, out_dir: Path) -> dict:
    return {
        "generation": generation_quality(model, tokenizer, read_jsonl(out_dir / "data/prompts_eval.jsonl")),
        "retention": {name: choice_accuracy(model, tokenizer, read_jsonl(out_dir / f"tasks/{name}.jsonl"))
                      for name in ("world_facts", "world_copy")},
    }


# ----------------------------------------------------------------------------- build


def build_world(out_dir: str | Path = DEFAULT_OUT, seed: int = 0, *, sizes: WorldSizes = WorldSizes(),
                sft_epochs: float = 6.0, sft_lr: float = 3e-3, sft_batch_size: int = 32,
                sft_seconds: float | None = None, vocab_size: int = TOKENIZER_VOCAB) -> dict:
    """Generate the data, train tokenizer and tiny Llama (SFT), measure, and write ``world.json``."""
    out_dir = Path(out_dir)
    started = time.monotonic()
    torch.manual_seed(seed)
    counts = generate_world_data(out_dir, seed, sizes)
    sft_rows = read_jsonl(out_dir / "data/sft_train.jsonl")

    texts = [m["content"] for row in sft_rows for m in row["messages"]]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.save_pretrained(out_dir / "tokenizer")

    model = build_tiny_llama(tokenizer, seed=seed, **MODEL_SHAPE)
    sft = run_sft(model, tokenizer, tokenize_sft(tokenizer, sft_rows), epochs=sft_epochs, lr=sft_lr,
                  batch_size=sft_batch_size, seed=seed, max_seconds=sft_seconds)
    model.save_pretrained(out_dir / "sft_model")
    tokenizer.save_pretrained(out_dir / "sft_model")

    info = {
        "seed": seed,
        "sizes": counts,
        "tokenizer": {"vocab_size": len(tokenizer)},
        "model": {**MODEL_SHAPE, "parameters": sum(p.numel() for p in model.parameters())},
        "sft": {"epochs": sft_epochs, "lr": sft_lr, "batch_size": sft_batch_size, **sft},
        "sft_quality": measure(model, tokenizer, out_dir),
    }
    info["build_seconds"] = round(time.monotonic() - started, 1)
    (out_dir / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded mmpo world (data, tokenizer, SFT model).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-epochs", type=float, default=6.0)
    parser.add_argument("--data-only", action="store_true", help="write the data files only (no training)")
    args = parser.parse_args(argv)
    if args.data_only:
        print(json.dumps(generate_world_data(args.out, args.seed), indent=2))
    else:
        print(json.dumps(build_world(args.out, args.seed, sft_epochs=args.sft_epochs), indent=2))


if __name__ == "__main__":
    main()
