"""Our engine against TRL on the same model, pairs, batch, steps and optimizer (docs/performance.md).

    python benchmarks/bench_vs_trl.py --threads 1            # both model sizes (~30 min on 2 busy cores)
    python benchmarks/bench_vs_trl.py --sizes tiny --help    # options

Needs the ``bench`` extra (``pip install 'mmpo[bench]'``: trl, psutil).

Trains with TRL ``DPOTrainer`` (precomputed reference log-probs, no gradient checkpointing), TRL's
SimPO path (``trl.experimental.cpo.CPOTrainer``, ``loss_type="simpo"``, ``cpo_alpha=0``) and our
engine (``mmpo.training.train``) for DPO, SimPO and MMPO. Every configuration runs in a fresh
subprocess, so peak RSS is its own. Both sides get the same random-weight model (saved once), the
same pairs in the same order (TRL samples sequentially through the pairs arranged in our engine's
order), AdamW with the same settings and the same cosine schedule, so their per-step losses must
agree: that shows they computed the same thing. Step times are taken from step end to step end
(TRL: a ``TrainerCallback``; ours: the engine's ``metrics.jsonl`` line of each step, watched by a
thread), after warm-up steps. The pairs: ``workload.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from workload import bench_tokenizer, save_model, synthetic_pairs

RESULT_MARK = "MMPO_BENCH_RESULT "
OURS = ("mmpo-dpo", "mmpo-simpo", "mmpo-mmpo")
TRL = ("trl-dpo", "trl-simpo")
RUNS = ("trl-dpo", "mmpo-dpo", "trl-simpo", "mmpo-simpo", "mmpo-mmpo")  # interleaved: load drift hits both
BASELINE_OF = {"mmpo-dpo": "trl-dpo", "mmpo-simpo": "trl-simpo", "mmpo-mmpo": "trl-dpo"}
BETA = {"dpo": 0.1, "simpo": 2.0, "mmpo": 0.01}
SIMPO_GAMMA = 1.0


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
    common = {
        "output_dir": str(Path(spec.workdir) / f"{spec.size}-{spec.run}"),
        "per_device_train_batch_size": spec.batch,
        "gradient_accumulation_steps": 1,
        "max_steps": spec.warmup + spec.steps,
        "learning_rate": spec.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch_fused",  # TRL's default; our engine uses the same fused kernel
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,  # TRL defaults to bf16 autocast, which this comparison (fp32, like ours) must not use
        "disable_tqdm": True,
        "seed": spec.seed,
        "use_cpu": True,
        "train_sampling_strategy": "sequential",
        "dataloader_num_workers": 0,
        "max_length": None if spec.run == "trl-dpo" else 4096,
    }
    if spec.run == "trl-dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(beta=BETA["dpo"], precompute_ref_log_probs=True, **common)
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        data = trainer.train_dataset
        tokens = [
            2 * len(p) + len(c) + len(r)
            for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
        ]
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
    from mmpo.modeling import load_tokenizer
    from mmpo.training import train

    objective = spec.run.split("-", 1)[1]
    run_dir = Path(spec.workdir) / f"{spec.size}-{spec.run}"
    cfg = TrainConfig(
        model=spec.model_dir,
        dataset=(spec.data_file,),
        eval_dataset=(),
        objective=objective,
        per_device_batch_size=spec.batch,
        gradient_accumulation_steps=1,
        max_steps=spec.warmup + spec.steps,
        learning_rate=spec.learning_rate,
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        dtype="float32",
        attn_implementation="sdpa",
        logging_steps=1,
        output_dir=str(run_dir),
        cache_dir=str(run_dir / "refcache"),
        progress=False,
        seed=spec.seed,
        beta=BETA[objective],
        gamma=SIMPO_GAMMA,
        **spec.forward,
    )
    examples, _ = prepare_preference_examples(
        load_rows([DatasetSpec.parse(spec.data_file)], seed=spec.seed), load_tokenizer(spec.model_dir)
    )
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
    ends = step_ends[spec.warmup - 1 : total]
    timed = [b[0] - a[0] for a, b in itertools.pairwise(ends)]
    cpu = [b[1] - a[1] for a, b in itertools.pairwise(ends)]
    seconds = sum(timed)
    losses = [r["loss"] for r in records]
    timed_pairs = spec.steps * spec.batch
    work_tokens = sum(tokens_per_pair[spec.warmup * spec.batch : total * spec.batch])
    peak = peaks[total - 1]
    fixed = rss_start + 16 * spec.params  # fp32 weights + gradients + AdamW's two moments
    return {
        "run": spec.run,
        "size": spec.size,
        "params": spec.params,
        "batch": spec.batch,
        "warmup": spec.warmup,
        "steps": spec.steps,
        "threads": spec.threads,
        "step_seconds": timed,
        "step_cpu_seconds": cpu,
        "pairs_per_s": timed_pairs / seconds,
        "pairs_per_cpu_s": timed_pairs / sum(cpu),
        "tokens_per_s": work_tokens / seconds,
        "first_step_logps": [records[0].get("logps/chosen"), records[0].get("logps/rejected")] if records else None,
        "peak_rss": peak,
        "rss_start": rss_start,
        "activation_bytes": peak - fixed,
        "losses": losses,
        "final_loss": losses[total - 1] if losses else None,
        "tokens_per_pair_mean": sum(tokens_per_pair) / len(tokens_per_pair),
        "forward": spec.forward,
    }


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
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "_child", json.dumps(asdict(spec))],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
    raise RuntimeError(f"{spec.run} ({spec.size}) failed with exit code {proc.returncode}:\n{tail}")


def format_table(results: list[dict]) -> str:
    gib = 2**30
    lines = [
        (
            "| model | trainer | pairs/s (wall) | pairs per CPU-s | tokens/s (wall) | s/step | peak RSS GiB | "
            "activation GiB | speed vs TRL (wall / CPU) | activation mem vs TRL | final loss |"
        ),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_key = {(r["size"], r["run"]): r for r in results}
    for r in results:
        base = by_key.get((r["size"], BASELINE_OF.get(r["run"], "")))
        speed = memory = ""
        if base:
            speed = (
                f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}x / {r['pairs_per_cpu_s'] / base['pairs_per_cpu_s']:.2f}x"
            )
            memory = f"{r['activation_bytes'] / base['activation_bytes']:.2f}x"
            if r["run"] == "mmpo-mmpo":
                speed, memory = f"({speed} of TRL DPO)", f"({memory})"
        step = sum(r["step_seconds"]) / len(r["step_seconds"])
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else ""
        lines.append(
            f"| {r['size']} | {r['run']} | {r['pairs_per_s']:.3f} | {r['pairs_per_cpu_s']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {step:.2f} | {r['peak_rss'] / gib:.2f} | "
            f"{r['activation_bytes'] / gib:.2f} | {speed} | {memory} | {loss} |"
        )
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
        note = (
            f"{size} {run} vs {base['run']}: losses {[f'{x:.5f}' for x in r['losses']]} vs "
            f"{[f'{x:.5f}' for x in base['losses']]} (max |diff| {max(diffs):.1e})"
        )
        if run == "mmpo-dpo":  # both log summed log-probs (TRL's CPO logs per-token means)
            note += f"; step-1 mean chosen/rejected logps {r['first_step_logps']} vs {base['first_step_logps']}"
        notes.append(note)
    return notes


def _git_commit() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                check=False,
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def vs_trl(args) -> int:
    import importlib.util

    from mmpo.config import ConfigError

    missing = [name for name in ("trl", "psutil") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"benchmarks/bench_vs_trl.py needs {' and '.join(missing)}: pip install 'mmpo[bench]'")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mmpo-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = bench_tokenizer()
    forward = json.loads(args.forward) if args.forward else {}
    results = []
    if args.merge and args.out and Path(args.out).is_file():  # keep earlier runs of other (size, run) pairs
        redo = {(size, run) for size in args.sizes for run in args.runs}
        results = [r for r in json.loads(Path(args.out).read_text())["results"] if (r["size"], r["run"]) not in redo]
    for size in args.sizes:
        batch, warmup, steps = (
            (args.batch, args.warmup, args.steps)
            if size == "135m"
            else (args.tiny_batch, args.tiny_warmup, args.tiny_steps)
        )
        model_dir = workdir / f"model-{size}"
        params = save_model(size, tokenizer, model_dir, seed=args.seed)
        data_file = workdir / f"pairs-{size}.jsonl"
        rows = synthetic_pairs(
            batch * (warmup + steps), args.seed, tuple(args.prompt_range), tuple(args.completion_range)
        )
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(
            f"[{size}] {params / 1e6:.1f}M parameters, {len(rows)} pairs, batch {batch}, "
            f"{warmup} warm-up + {steps} timed steps",
            flush=True,
        )
        for run in args.runs:
            spec = Spec(
                run=run,
                size=size,
                model_dir=str(model_dir),
                data_file=str(data_file),
                workdir=str(workdir),
                batch=batch,
                warmup=warmup,
                steps=steps,
                params=params,
                threads=args.threads,
                seed=args.seed,
                learning_rate=args.learning_rate,
                forward=forward if run in OURS else {},
            )
            started = time.perf_counter()
            result = run_child(spec, timeout=args.timeout)
            results.append(result)
            print(
                f"  {run:<11} {result['pairs_per_s']:.3f} pairs/s  peak {result['peak_rss'] / 2**30:.2f} GiB  "
                f"losses {[f'{x:.4f}' for x in result['losses']]}  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(
                    json.dumps({"command": " ".join(sys.argv), "commit": _git_commit(), "results": results}, indent=1)
                )
    print()
    print(format_table(results))
    print()
    print("\n".join(loss_agreement(results)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        return child_main(argv[1])
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_vs_trl.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "135m"], choices=["tiny", "135m"])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--batch", type=int, default=2, help="pairs per step at the 135M shape")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (135M)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (135M)")
    parser.add_argument("--tiny-batch", type=int, default=4)
    parser.add_argument("--tiny-warmup", type=int, default=1)
    parser.add_argument("--tiny-steps", type=int, default=4)
    parser.add_argument("--prompt-range", type=int, nargs=2, default=[100, 400])
    parser.add_argument("--completion-range", type=int, nargs=2, default=[100, 300])
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--forward", default="", help="our forward options as JSON, e.g. '{\"share_prompt\": false}'")
    parser.add_argument("--workdir", default=None, help="where models, data and run folders go (default: a temp dir)")
    parser.add_argument(
        "--out", default="benchmarks/results/vs_trl.json", help="results JSON (updated after every run)"
    )
    parser.add_argument("--merge", action="store_true", help="keep the results already in --out for other sizes/runs")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per configuration")
    return vs_trl(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
