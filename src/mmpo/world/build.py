"""Build the embedded world: data files, tokenizer, an SFT'd tiny Llama, and its measured quality.

``generate_world_data`` writes the data only (seconds). ``build_world`` also trains the
tokenizer and the model and writes ``world.json``; the shipped assets under
``src/mmpo/assets/world/`` come from ``mmpo world build --replace-packaged`` (a few
minutes on 2 cores).

A build never leaves a mix of old and new files (new data and tokenizer beside the old model):
it is written into a fresh sibling folder and switched into place in one step at the end
(``switch_into_place``). The packaged world is only ever rebuilt when asked explicitly.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from mmpo.config import ConfigError
from mmpo.world import ASSETS
from mmpo.world.model import build_tiny_llama
from mmpo.world.tasks import REJECTED_STYLE_WEIGHTS, SFT_STYLE_WEIGHTS, WORD_TASKS, WorldSizes, generate_rows, grade
from mmpo.world.tokenizer import train_tokenizer

DEFAULT_OUT = ASSETS  # the packaged world: rebuilt only with replace_packaged=True
TOKENIZER_VOCAB = 600
SFT_EPOCHS = 8  # 8 x 187 = 1496 steps of 32 conversations: ~3 min on 2 free cores
# Two layers learn to copy sooner (in SFT steps) than four, at half the cost per step.
MODEL_SHAPE = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 384, "max_positions": 128}


# ----------------------------------------------------------------------------- data


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Written to a temporary file and renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def generate_world_data(
    out_dir: str | Path = DEFAULT_OUT, seed: int = 0, sizes: WorldSizes = WorldSizes()
) -> dict[str, int]:
    """Write ``data/*.jsonl`` and ``tasks/*.jsonl`` under ``out_dir``; returns rows per file."""
    out_dir = Path(out_dir)
    counts = {}
    for name, rows in generate_rows(seed, sizes).items():
        write_jsonl(out_dir / f"{name}.jsonl", rows)
        counts[name] = len(rows)
    return counts


# ----------------------------------------------------------------------------- SFT


def run_sft(
    model,
    tokenizer,
    sft_file: Path,
    val_file: Path,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    run_dir: Path,
) -> tuple[torch.nn.Module, dict]:
    """SFT ``model`` on ``sft_file`` with the project engine; returns the trained model and stats."""
    from transformers import AutoModelForCausalLM

    from mmpo.config import SFTConfig
    from mmpo.training import sft

    cfg = SFTConfig(
        model="(built in memory)",
        dataset=(str(sft_file),),
        eval_dataset=(str(val_file),),
        output_dir=str(run_dir),
        seed=seed,
        epochs=epochs,
        learning_rate=lr,
        per_device_batch_size=batch_size,
        warmup_ratio=0.1,
        logging_steps=50,
        progress=True,
    )
    started = time.monotonic()
    result = sft(cfg, model=model, tokenizer=tokenizer)
    losses = [r["loss"] for r in result.metrics if "loss" in r]
    eval_losses = [r["eval_loss"] for r in result.metrics if "eval_loss" in r]
    stats = {
        "steps": result.global_step,
        "seconds": round(time.monotonic() - started, 1),
        "final_loss": round(losses[-1], 4),
        "eval_loss_before": round(eval_losses[0], 4),
        "eval_loss_after": round(eval_losses[-1], 4),
    }
    return AutoModelForCausalLM.from_pretrained(result.summary["final_checkpoint"]), stats


# ----------------------------------------------------------------------------- measurement


@torch.no_grad()
def greedy_answers(
    model, tokenizer, instructions: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 64
) -> list[str]:
    """Greedy completions of single-turn user ``instructions`` (decoded, special tokens dropped)."""
    model.eval()
    outputs: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(instructions), batch_size):
            prompts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
                )
                for text in instructions[i : i + batch_size]
            ]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def generation_quality(model, tokenizer, rows: Sequence[dict]) -> dict:
    """Fractions of greedy answers graded 2 (concise correct) and 1 (correct inside extra text)."""
    answers = greedy_answers(model, tokenizer, [r["instruction"] for r in rows])
    grades = [grade(r, a) for r, a in zip(rows, answers)]

    def fractions(idx: list[int]) -> dict:
        return {
            "concise_correct": round(sum(grades[i] == 2 for i in idx) / len(idx), 4),
            "contains_answer": round(sum(grades[i] == 1 for i in idx) / len(idx), 4),
        }

    result = fractions(list(range(len(rows))))
    result["per_task"] = {
        t: fractions([i for i, r in enumerate(rows) if r["task"] == t])
        for t in WORD_TASKS
        if any(r["task"] == t for r in rows)
    }
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
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["query"]}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        seqs = [prompt_ids + tokenizer(c, add_special_tokens=False)["input_ids"] for c in row["choices"]]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        scores = []
        for i, seq in enumerate(seqs):
            pos = torch.arange(len(prompt_ids), len(seq))
            scores.append(logps[i, pos - 1, torch.tensor(seq[len(prompt_ids) :])].sum().item())
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["gold"])
    return round(correct / len(rows), 4)


def measure(model, tokenizer, out_dir: Path) -> dict:
    return {
        "generation": generation_quality(model, tokenizer, read_jsonl(out_dir / "data/prompts_eval.jsonl")),
        "retention": {
            name: choice_accuracy(model, tokenizer, read_jsonl(out_dir / f"tasks/{name}.jsonl"))
            for name in ("world_facts", "world_copy")
        },
    }


# ----------------------------------------------------------------------------- where it goes


def output_folder(out_dir: str | Path | None, replace_packaged: bool) -> Path:
    """The folder a build replaces: ``out_dir``, or the packaged world only with ``replace_packaged``.

    A folder that exists must be empty or an earlier world (it has ``world.json``): the switch
    replaces the whole folder, and must never take unrelated files with it.
    """
    packaged = Path(ASSETS).resolve()
    if out_dir is None:
        if not replace_packaged:
            raise ConfigError(
                "mmpo world build: give --out DIR for the new world (the packaged world in "
                f"{packaged} is rebuilt only with --replace-packaged)"
            )
        return packaged
    out = Path(out_dir).expanduser().resolve()
    if out == packaged and not replace_packaged:
        raise ConfigError(
            f"mmpo world build: {out} is the packaged world; pass --replace-packaged to rebuild it, "
            "or choose another --out"
        )
    if out.is_dir() and any(out.iterdir()) and not (out / "world.json").is_file():
        raise ConfigError(
            f"mmpo world build: {out} exists and is not a world (no world.json); the build replaces "
            "the whole folder, so choose a new or empty one"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"mmpo world build: {out} is a file; choose a folder")
    return out


def staging_folder(out: Path) -> Path:
    """A fresh sibling of ``out`` (same file system, so the final switch is a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in out.parent.glob(f".{out.name}.building-*"):  # from a build that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    old = out.with_name(f".{out.name}.old")
    if old.is_dir() and not out.exists():  # killed between the two renames of the fallback switch
        os.rename(old, out)
    shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``; no Python API
    exposes it). False where the system does not offer it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def switch_into_place(new: Path, out: Path) -> None:
    """Make the finished build ``new`` the folder ``out``; readers see the old world or the new one."""
    if not out.exists():
        os.rename(new, out)
    elif _exchange(new, out):
        shutil.rmtree(new)  # now the old world
    else:  # two renames; a kill between them is undone by the next build (staging_folder)
        old = out.with_name(f".{out.name}.old")
        os.rename(out, old)
        os.rename(new, out)
        shutil.rmtree(old)
    try:
        fd = os.open(out.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


# ----------------------------------------------------------------------------- build


def build_world(
    out_dir: str | Path | None = None,
    seed: int = 0,
    *,
    sizes: WorldSizes = WorldSizes(),
    sft_epochs: int = SFT_EPOCHS,
    sft_lr: float = 1e-3,
    sft_batch_size: int = 32,
    vocab_size: int = TOKENIZER_VOCAB,
    replace_packaged: bool = False,
) -> dict:
    """Generate the data, train tokenizer and tiny Llama (SFT), measure, and write ``world.json``.

    Everything is built in a fresh folder and switched into ``out_dir`` at the end, so an
    interrupted build leaves the old world whole. ``out_dir=None`` means the packaged world,
    which is only replaced with ``replace_packaged=True``.
    """
    out = output_folder(out_dir, replace_packaged)
    staging = staging_folder(out)
    try:
        info = _build(
            staging,
            seed,
            sizes=sizes,
            sft_epochs=sft_epochs,
            sft_lr=sft_lr,
            sft_batch_size=sft_batch_size,
            vocab_size=vocab_size,
        )
        switch_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def _build(
    out_dir: Path, seed: int, *, sizes: WorldSizes, sft_epochs: int, sft_lr: float, sft_batch_size: int, vocab_size: int
) -> dict:
    started = time.monotonic()
    counts = generate_world_data(out_dir, seed, sizes)
    sft_file = out_dir / "data/sft_train.jsonl"

    texts = [m["content"] for row in read_jsonl(sft_file) for m in row["messages"]]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.save_pretrained(out_dir / "tokenizer")

    model = build_tiny_llama(tokenizer, seed=seed, **MODEL_SHAPE)
    with tempfile.TemporaryDirectory(prefix="mmpo-world-sft-") as run_dir:
        model, sft_stats = run_sft(
            model,
            tokenizer,
            sft_file,
            out_dir / "data/sft_val.jsonl",
            epochs=sft_epochs,
            lr=sft_lr,
            batch_size=sft_batch_size,
            seed=seed,
            run_dir=Path(run_dir),
        )
    model.save_pretrained(out_dir / "sft_model")
    tokenizer.save_pretrained(out_dir / "sft_model")

    info = {
        "seed": seed,
        "sizes": counts,
        "tasks": list(WORD_TASKS),
        "sft_styles": SFT_STYLE_WEIGHTS,
        "rejected_styles": REJECTED_STYLE_WEIGHTS,
        "tokenizer": {"vocab_size": len(tokenizer)},
        "model": {**MODEL_SHAPE, "parameters": sum(p.numel() for p in model.parameters())},
        "sft": {"epochs": sft_epochs, "lr": sft_lr, "batch_size": sft_batch_size, **sft_stats},
        "sft_quality": measure(model, tokenizer, out_dir),
        "torch_threads": torch.get_num_threads(),
    }
    info["build_seconds"] = round(time.monotonic() - started, 1)
    (out_dir / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
