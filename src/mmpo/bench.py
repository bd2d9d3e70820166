"""``mmpo bench``: our engine against TRL on the same model, pairs, batch, steps and optimizer.

Two commands:

* ``mmpo bench vs-trl`` - trains with TRL ``DPOTrainer`` (precomputed reference log-probs, no
  gradient checkpointing), TRL's SimPO path (``trl.experimental.cpo.CPOTrainer``,
  ``loss_type="simpo"``, ``cpo_alpha=0``) and our engine (``mmpo.training.train``) for DPO, SimPO
  and MMPO. Every configuration runs in a fresh subprocess, so peak RSS is its own. Both sides
  get the same random-weight model (saved once), the same pairs in the same order (TRL samples
  sequentially through the pairs arranged in our engine's order), AdamW with the same settings and
  the same cosine schedule, so their per-step losses must agree: that shows they computed the
  same thing. Step times are taken from step end to step end (TRL: a ``TrainerCallback``; ours:
  the engine's ``metrics.jsonl`` line of each step, watched by a thread), after warm-up steps.
* ``mmpo bench scaling`` - time and saved-activation bytes of one training micro-step (forward
  and backward) of the plain padded path against the fast path, as prompt length, completion
  length and batch size grow; writes a JSON file and a plot.

Pairs are synthetic, shaped like UltraFeedback (long prompts, completions of a few hundred
tokens): prompt, chosen and rejected lengths are drawn independently and uniformly from
``--prompt-range`` (default 100-400 tokens) and ``--completion-range`` (default 100-300), as
made-up words that are one token each, wrapped in the chat template (which adds a few tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULT_MARK = "MMPO_BENCH_RESULT "
OURS = ("mmpo-dpo", "mmpo-simpo", "mmpo-mmpo")
TRL = ("trl-dpo", "trl-simpo")
RUNS = ("trl-dpo", "mmpo-dpo", "trl-simpo", "mmpo-simpo", "mmpo-mmpo")  # interleaved: load drift hits both
BASELINE_OF = {"mmpo-dpo": "trl-dpo", "mmpo-simpo": "trl-simpo", "mmpo-mmpo": "trl-dpo"}
BETA = {"dpo": 0.1, "simpo": 2.0, "mmpo": 0.01}
SIMPO_GAMMA = 1.0


# --------------------------------------------------------------------------------------------
# Workload: tokenizer, pairs, models


def bench_words() -> list[str]:
    syllables = ["ka", "to", "mi", "ra", "ne", "lu", "so", "vi", "da", "pe", "ro", "zu"]
    return sorted({a + b + c for a in syllables for b in syllables for c in syllables[:4]})[:300]


def bench_tokenizer():
    """A real byte-level BPE tokenizer (with chat template) in which every bench word is one token."""
    from mmpo.world.tokenizer import train_tokenizer

    words, rng = bench_words(), random.Random(0)
    tokenizer = train_tokenizer([" ".join(rng.choice(words) for _ in range(50)) for _ in range(400)], vocab_size=1200)
    assert all(len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1 for w in words)
    return tokenizer


def synthetic_pairs(count: int, seed: int, prompt_range=(100, 400), completion_range=(100, 300)) -> list[dict]:
    """Conversational preference rows with UltraFeedback-like lengths (module docstring)."""
    words, rng = bench_words(), random.Random(seed)

    def text(low_high):
        return "".join(" " + rng.choice(words) for _ in range(rng.randint(*low_high)))

    return [{"id": f"bench:{i}",
             "prompt": [{"role": "user", "content": text(prompt_range)}],
             "chosen": [{"role": "assistant", "content": text(completion_range)}],
             "rejected": [{"role": "assistant", "content": text(completion_range)}]} for i in range(count)]


def model_config(size: str, tokenizer):
    from mmpo.world.model import smollm2_135m_config, tiny_llama_config

    if size == "tiny":  # ~5M parameters
        return tiny_llama_config(tokenizer, hidden_size=256, num_layers=6, num_heads=4, intermediate_size=768,
                                 max_positions=2048)
    if size == "135m":  # SmolLM2-135M's shape, random weights
        config = smollm2_135m_config()
        config.pad_token_id, config.eos_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, None
        return config
    raise ValueError(f"unknown model size {size!r} (tiny, 135m)")


def save_model(size: str, tokenizer, path: Path, seed: int = 0) -> int:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(size, tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# One configuration (runs in its own process)


@dataclass
class Spec:
    run: str
    size: str
    model_dir: str
    data_file: str
    workdir: str
    batch: int
    warmup: int
    steps: int
    params: int
    threads: int = 0  # torch intra-op threads (0: torch's default)
    seed: int = 0
    learning_rate: float = 1e-4
    forward: dict = field(default_factory=dict)  # our ForwardOptions overrides (share_prompt, packing, ...)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _engine_order(spec: Spec, count: int) -> list[int]:
    from mmpo.data.order import epoch_order

    return epoch_order(count, spec.seed, 0)


def run_trl(spec: Spec) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from mmpo.data import DatasetSpec, load_rows

    rows = load_rows([DatasetSpec.parse(spec.data_file)], seed=spec.seed)  # the engine's row order
    ordered = [rows[i] for i in _engine_order(spec, len(rows))]  # and its step order; TRL reads sequentially
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in ordered])
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    rss_start = current_rss()
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    common = dict(output_dir=str(Path(spec.workdir) / f"{spec.size}-{spec.run}"), per_device_train_batch_size=spec.batch,
                  gradient_accumulation_steps=1, max_steps=spec.warmup + spec.steps, learning_rate=spec.learning_rate,
                  lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                  optim="adamw_torch_fused",  # TRL's default; our engine uses the same fused kernel
                  gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
                  bf16=False,  # TRL defaults to bf16 autocast, which this comparison (fp32, like ours) must not use
                  disable_tqdm=True, seed=spec.seed, use_cpu=True, train_sampling_strategy="sequential",
                  dataloader_num_workers=0, max_length=None if spec.run == "trl-dpo" else 4096)
    if spec.run == "trl-dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(beta=BETA["dpo"], precompute_ref_log_probs=True, **common)
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        data = trainer.train_dataset
        tokens = [2 * len(p) + len(c) + len(r) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])]
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=BETA["simpo"], simpo_gamma=SIMPO_GAMMA, **common)
        trainer = CPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        data = trainer.train_dataset
        tokens = [len(c) + len(r) for c, r in zip(data["chosen_input_ids"], data["rejected_input_ids"])]

    step_ends: list[tuple[float, float]] = []
    peaks: list[int] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append((time.perf_counter(), time.process_time()))
            peaks.append(peak_rss())

    trainer.add_callback(StepTimer())
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r]
    return _summary(spec, step_ends, peaks, rss_start, records, tokens)


def run_ours(spec: Spec) -> dict:
    from mmpo.config import TrainConfig
    from mmpo.data import DatasetSpec, load_rows, prepare_preference_examples
    from mmpo.training import train
    from mmpo.modeling import load_tokenizer

    objective = spec.run.split("-", 1)[1]
    run_dir = Path(spec.workdir) / f"{spec.size}-{spec.run}"
    cfg = TrainConfig(model=spec.model_dir, dataset=(spec.data_file,), eval_dataset=(), objective=objective,
                      per_device_batch_size=spec.batch, gradient_accumulation_steps=1,
                      max_steps=spec.warmup + spec.steps, learning_rate=spec.learning_rate, warmup_ratio=0.0,
                      weight_decay=0.0, max_grad_norm=1.0, dtype="float32", attn_implementation="sdpa",
                      logging_steps=1, output_dir=str(run_dir), cache_dir=str(run_dir / "refcache"),
                      progress=False, seed=spec.seed, beta=BETA[objective], gamma=SIMPO_GAMMA, **spec.forward)
    examples, _ = prepare_preference_examples(load_rows([DatasetSpec.parse(spec.data_file)], seed=spec.seed),
                                              load_tokenizer(spec.model_dir))
    tokens = [2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples]
    rss_start = current_rss()

    step_ends: list[tuple[float, float]] = []
    peaks: list[int] = []
    done = threading.Event()

    def watch_metrics():  # the engine appends one line per optimizer step (logging_steps=1)
        path, seen, size = run_dir / "metrics.jsonl", 0, -1
        while not done.is_set():
            time.sleep(0.02)  # a cheap stat between reads: the watcher must not cost the trainer CPU
            if not path.exists() or path.stat().st_size == size:
                continue
            size = path.stat().st_size
            lines = path.read_text().count("\n")
            while seen < lines:
                seen += 1
                step_ends.append((time.perf_counter(), time.process_time()))
                peaks.append(peak_rss())

    watcher = threading.Thread(target=watch_metrics, daemon=True)
    watcher.start()
    result = train(cfg)
    time.sleep(0.05)
    done.set()
    watcher.join()
    records = [r for r in result.metrics if "loss" in r]
    return _summary(spec, step_ends, peaks, rss_start, records, tokens)


def _summary(spec: Spec, step_ends, peaks, rss_start, records, tokens_per_pair) -> dict:
    """Throughput over the timed steps (step end to step end), memory, and the logged losses.

    Wall-clock time is what a user waits; CPU time (all threads of the process) is what the
    work cost, and stays meaningful when other jobs share the machine."""
    total = spec.warmup + spec.steps
    if len(step_ends) < total:
        raise RuntimeError(f"{spec.run}: saw {len(step_ends)} step ends, expected {total}")
    ends = step_ends[spec.warmup - 1: total]
    timed = [b[0] - a[0] for a, b in zip(ends, ends[1:])]
    cpu = [b[1] - a[1] for a, b in zip(ends, ends[1:])]
    seconds = sum(timed)
    losses = [r["loss"] for r in records]
    timed_pairs = spec.steps * spec.batch
    work_tokens = sum(tokens_per_pair[spec.warmup * spec.batch: total * spec.batch])
    peak = peaks[total - 1]
    fixed = rss_start + 16 * spec.params  # fp32 weights + gradients + AdamW's two moments
    return {"run": spec.run, "size": spec.size, "params": spec.params, "batch": spec.batch, "warmup": spec.warmup,
            "steps": spec.steps, "threads": spec.threads, "step_seconds": timed, "step_cpu_seconds": cpu,
            "pairs_per_s": timed_pairs / seconds, "pairs_per_cpu_s": timed_pairs / sum(cpu),
            "tokens_per_s": work_tokens / seconds,
            "first_step_logps": [records[0].get("logps/chosen"), records[0].get("logps/rejected")] if records else None, "peak_rss": peak, "rss_start": rss_start,
            "activation_bytes": peak - fixed, "losses": losses, "final_loss": losses[total - 1] if losses else None,
            "tokens_per_pair_mean": sum(tokens_per_pair) / len(tokens_per_pair), "forward": spec.forward}


def child_main(spec_json: str) -> int:
    spec = Spec(**json.loads(spec_json))
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    result = run_trl(spec) if spec.run in TRL else run_ours(spec)
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# The side-by-side run


def run_child(spec: Spec, timeout: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-m", "mmpo.bench", "_child", json.dumps(asdict(spec))],
                          capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
    raise RuntimeError(f"{spec.run} ({spec.size}) failed with exit code {proc.returncode}:\n{tail}")


def format_table(results: list[dict]) -> str:
    gib = 2 ** 30
    lines = ["| model | trainer | pairs/s (wall) | pairs per CPU-s | tokens/s (wall) | s/step | peak RSS GiB | "
             "activation GiB | speed vs TRL (wall / CPU) | activation mem vs TRL | final loss |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    by_key = {(r["size"], r["run"]): r for r in results}
    for r in results:
        base = by_key.get((r["size"], BASELINE_OF.get(r["run"], "")))
        speed = memory = ""
        if base:
            speed = f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}x / {r['pairs_per_cpu_s'] / base['pairs_per_cpu_s']:.2f}x"
            memory = f"{r['activation_bytes'] / base['activation_bytes']:.2f}x"
            if r["run"] == "mmpo-mmpo":
                speed, memory = f"({speed} of TRL DPO)", f"({memory})"
        step = sum(r["step_seconds"]) / len(r["step_seconds"])
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else ""
        lines.append(f"| {r['size']} | {r['run']} | {r['pairs_per_s']:.3f} | {r['pairs_per_cpu_s']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {step:.2f} | {r['peak_rss'] / gib:.2f} | "
                     f"{r['activation_bytes'] / gib:.2f} | {speed} | {memory} | {loss} |")
    return "\n".join(lines)


def loss_agreement(results: list[dict]) -> list[str]:
    """Ours vs TRL for the same objective: per-step losses and the first step's mean log-probs."""
    by_key = {(r["size"], r["run"]): r for r in results}
    notes = []
    for (size, run), r in by_key.items():
        base = by_key.get((size, BASELINE_OF.get(run, "")))
        if base is None or run == "mmpo-mmpo":
            continue
        diffs = [abs(a - b) for a, b in zip(r["losses"], base["losses"])]
        note = (f"{size} {run} vs {base['run']}: losses {['%.5f' % x for x in r['losses']]} vs "
                f"{['%.5f' % x for x in base['losses']]} (max |diff| {max(diffs):.1e})")
        if run == "mmpo-dpo":  # both log summed log-probs (TRL's CPO logs per-token means)
            note += f"; step-1 mean chosen/rejected logps {r['first_step_logps']} vs {base['first_step_logps']}"
        notes.append(note)
    return notes


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def vs_trl(args) -> int:
    import importlib.util

    from mmpo.config import ConfigError

    missing = [name for name in ("trl", "psutil") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"mmpo bench vs-trl needs {' and '.join(missing)}: pip install 'mmpo[bench]'")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mmpo-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = bench_tokenizer()
    forward = json.loads(args.forward) if args.forward else {}
    results = []
    if args.merge and args.out and Path(args.out).is_file():  # keep earlier runs of other (size, run) pairs
        redo = {(size, run) for size in args.sizes for run in args.runs}
        results = [r for r in json.loads(Path(args.out).read_text())["results"] if (r["size"], r["run"]) not in redo]
    for size in args.sizes:
        batch, warmup, steps = (args.batch, args.warmup, args.steps) if size == "135m" else (
            args.tiny_batch, args.tiny_warmup, args.tiny_steps)
        model_dir = workdir / f"model-{size}"
        params = save_model(size, tokenizer, model_dir, seed=args.seed)
        data_file = workdir / f"pairs-{size}.jsonl"
        rows = synthetic_pairs(batch * (warmup + steps), args.seed, tuple(args.prompt_range), tuple(args.completion_range))
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"[{size}] {params / 1e6:.1f}M parameters, {len(rows)} pairs, batch {batch}, "
              f"{warmup} warm-up + {steps} timed steps", flush=True)
        for run in args.runs:
            spec = Spec(run=run, size=size, model_dir=str(model_dir), data_file=str(data_file), workdir=str(workdir),
                        batch=batch, warmup=warmup, steps=steps, params=params, threads=args.threads, seed=args.seed, learning_rate=args.learning_rate,
                        forward=forward if run in OURS else {})
            started = time.perf_counter()
            result = run_child(spec, timeout=args.timeout)
            results.append(result)
            print(f"  {run:<11} {result['pairs_per_s']:.3f} pairs/s  peak {result['peak_rss'] / 2**30:.2f} GiB  "
                  f"losses {['%.4f' % x for x in result['losses']]}  ({time.perf_counter() - started:.0f} s)", flush=True)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "commit": _git_commit(),
                                                      "results": results}, indent=1))
    print()
    print(format_table(results))
    print()
    print("\n".join(loss_agreement(results)))
    return 0


# --------------------------------------------------------------------------------------------
# Scaling with prompt length, completion length and batch size


def retained_bytes(fn) -> int:
    """CPU memory allocated while ``fn`` runs and still held when it returns (for a forward pass:
    what autograd keeps for the backward pass), from the profiler's allocation records."""
    import torch

    with torch.profiler.profile(profile_memory=True) as prof:
        result = fn()
    del result
    return sum(event.self_cpu_memory_usage for event in prof.events())


def scaling(args) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmpo.forward import ForwardOptions, preference_logps
    from mmpo.objectives import dpo_loss

    # SmolLM2-135M's proportions at a size that sweeps in minutes: LM head ~20% of the FLOPs.
    config = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=683, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    rng = random.Random(0)

    def pairs(batch, prompt, completion):
        vary = lambda n: rng.randint(max(1, n // 2), n + n // 2)  # noqa: E731 - lengths vary, as in real data
        ids = lambda n: [rng.randrange(1, config.vocab_size) for _ in range(n)]  # noqa: E731
        return [{"prompt_ids": ids(vary(prompt)), "chosen_ids": ids(vary(completion)),
                 "rejected_ids": ids(vary(completion))} for _ in range(batch)]

    def measure(examples, options):
        def forward():
            out = preference_logps(model, examples, pad_token_id=0, options=options)
            return dpo_loss(out.chosen_logps, out.rejected_logps, out.chosen_logps.detach() - 1,
                            out.rejected_logps.detach()).losses.mean()

        def step():
            model.zero_grad(set_to_none=True)
            forward().backward()

        saved = retained_bytes(forward)
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        return min(times), saved

    base = {"batch": 4, "prompt": 256, "completion": 128}
    sweeps = {"prompt": [64, 128, 256, 512, 1024], "completion": [32, 64, 128, 256, 512], "batch": [1, 2, 4, 8, 16]}
    paths = {"padded (plain)": None, "fast (shared prompt + packing + chunked)": ForwardOptions()}
    results = {"config": config.to_dict(), "base": base, "sweeps": {}}
    for axis, values in sweeps.items():
        results["sweeps"][axis] = []
        for value in values:
            setting = {**base, axis: value}
            examples = pairs(setting["batch"], setting["prompt"], setting["completion"])
            row = {axis: value}
            for label, options in paths.items():
                seconds, saved = measure(examples, options)
                row[label] = {"seconds": seconds, "saved_bytes": saved}
            results["sweeps"][axis].append(row)
            print(axis, value, {k: f"{v['seconds']:.2f}s {v['saved_bytes'] / 2**20:.0f}MiB" for k, v in row.items()
                                if isinstance(v, dict)}, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    plot_scaling(results, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return 0


def plot_scaling(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_titles = {"prompt": "prompt length (tokens)", "completion": "completion length (tokens)", "batch": "pairs per batch"}
    fig, grid = plt.subplots(2, 3, figsize=(12, 6.5))
    for col, (axis, rows) in enumerate(results["sweeps"].items()):
        xs = [r[axis] for r in rows]
        for label in (k for k in rows[0] if k != axis):
            grid[0, col].plot(xs, [r[label]["seconds"] for r in rows], marker="o", label=label)
            grid[1, col].plot(xs, [r[label]["saved_bytes"] / 2**20 for r in rows], marker="o", label=label)
        others = ", ".join(f"{k} {v}" for k, v in results["base"].items() if k != axis)
        grid[0, col].set_title(f"vs {axes_titles[axis]}\n({others})", fontsize=10)
        grid[1, col].set_xlabel(axes_titles[axis])
        for row in range(2):
            grid[row, col].set_xscale("log", base=2)
            grid[row, col].grid(alpha=0.3)
    grid[0, 0].set_ylabel("seconds per training micro-step")
    grid[1, 0].set_ylabel("memory kept for backward (MiB)")
    grid[0, 0].legend(fontsize=8)
    fig.suptitle("Cost of one DPO micro-step (forward + backward), 8-layer SmolLM2-proportioned model, CPU", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        return child_main(argv[1])
    parser = argparse.ArgumentParser(prog="mmpo bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    side = sub.add_parser("vs-trl", help="train with TRL and with our engine side by side (needs the 'bench' extra)")
    side.add_argument("--sizes", nargs="+", default=["tiny", "135m"], choices=["tiny", "135m"])
    side.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    side.add_argument("--batch", type=int, default=2, help="pairs per step at the 135M shape")
    side.add_argument("--warmup", type=int, default=1, help="untimed steps first (135M)")
    side.add_argument("--steps", type=int, default=3, help="timed steps (135M)")
    side.add_argument("--tiny-batch", type=int, default=4)
    side.add_argument("--tiny-warmup", type=int, default=1)
    side.add_argument("--tiny-steps", type=int, default=4)
    side.add_argument("--prompt-range", type=int, nargs=2, default=[100, 400])
    side.add_argument("--completion-range", type=int, nargs=2, default=[100, 300])
    side.add_argument("--learning-rate", type=float, default=1e-4)
    side.add_argument("--seed", type=int, default=0)
    side.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    side.add_argument("--forward", default="", help='our forward options as JSON, e.g. \'{"share_prompt": false}\'')
    side.add_argument("--workdir", default=None, help="where models, data and run folders go (default: a temp dir)")
    side.add_argument("--out", default="benchmarks/results/vs_trl.json", help="results JSON (updated after every run)")
    side.add_argument("--merge", action="store_true", help="keep the results already in --out for other sizes/runs")
    side.add_argument("--timeout", type=float, default=1800, help="seconds allowed per configuration")
    scale = sub.add_parser("scaling", help="cost vs prompt length, completion length and batch size (plot)")
    scale.add_argument("--repeats", type=int, default=2)
    scale.add_argument("--out", default="benchmarks/results/scaling.json")
    scale.add_argument("--plot", default="docs/performance_scaling.png")
    args = parser.parse_args(argv)
    return vs_trl(args) if args.command == "vs-trl" else scaling(args)


if __name__ == "__main__":
    sys.exit(main())
