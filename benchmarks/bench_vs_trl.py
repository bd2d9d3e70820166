"""Our engine against TRL on the same model, pairs, batch, steps and optimizer (docs/performance.md).

    python benchmarks/bench_vs_trl.py --threads 1                      # CPU, tiny and 135M (~30 min on 2 cores)
    python benchmarks/bench_vs_trl.py --device cuda --sizes 135m 360m 1b --runs trl-dpo mmpo-dpo
    python benchmarks/bench_vs_trl.py --sizes --model models/SmolLM2-135M-Instruct \
        --pairs runs/smollm2-135m-real/pairs-train/pairs.jsonl --batch 8 --threads 2   # real weights and pairs
    python benchmarks/bench_vs_trl.py --help                           # options

Needs the ``bench`` extra (``pip install 'mmpo[bench]'``: trl, psutil).

Trains with TRL ``DPOTrainer`` (precomputed reference log-probs; ``trl-dpo`` without gradient
checkpointing, its fastest setting, ``trl-dpo-gc`` with TRL's default gradient checkpointing),
TRL's SimPO path (``trl.experimental.cpo.CPOTrainer``, ``loss_type="simpo"``, ``cpo_alpha=0``) and
our engine (``mmpo.training.train``) for DPO, SimPO and MMPO. Every configuration runs in a fresh
subprocess, so its memory peak is its own. Both sides get the same random-weight model (saved
once), the same pairs in the same order (TRL samples sequentially through the pairs arranged in
our engine's order), AdamW with the same settings and the same cosine schedule, and the same
precision scheme (``--precision``: float32, or float32 master weights with bf16 autocast, TRL's
``bf16=True``), so their per-step losses must agree: that shows they computed the same thing.

Step times are taken at the end of each optimizer step by torch's global optimizer hook, for both
trainers alike (``step_meter.py``), after warm-up steps. Memory: on CPU the peak RSS minus what
every method pays (the RSS before loading plus 16 bytes per parameter); on CUDA the peak of
``torch.cuda.max_memory_allocated`` over the timed steps minus the memory allocated right after
the first optimizer step. On CUDA each row also gets its MFU (``flops.py``). TRL 1.16's DPO has
no working ``padding_free`` (it warns and pads) and its Liger option excludes the fused loss, so
TRL runs padded with sdpa. The pairs: ``workload.py``. ``--model`` adds a row for a real model
folder (its own weights and tokenizer, e.g. the imported SmolLM2-135M-Instruct), and ``--pairs``
replaces the synthetic pairs with the first rows of a pairs file (e.g. those ``mmpo pairs`` wrote).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench_report import format_table, git_commit, loss_agreement
from step_meter import StepMeter
from workload import SHAPES, SIZES, bench_tokenizer, save_model, synthetic_pairs

RESULT_MARK = "MMPO_BENCH_RESULT "
OURS = ("mmpo-dpo", "mmpo-simpo", "mmpo-mmpo")
TRL = ("trl-dpo", "trl-dpo-gc", "trl-simpo")
RUNS = ("trl-dpo", "mmpo-dpo", "trl-simpo", "mmpo-simpo", "mmpo-mmpo")  # interleaved: load drift hits both
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
    device: str = "cpu"
    precision: str = "fp32"  # "fp32", or "mixed": float32 master weights + bf16 autocast
    forward: dict = field(default_factory=dict)  # our ForwardOptions overrides (share_prompt, packing, ...)


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _engine_order(spec: Spec, count: int) -> list[int]:
    from mmpo.data.order import epoch_order

    return epoch_order(count, spec.seed, 0)


def run_trl(spec: Spec) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        "gradient_checkpointing": spec.run == "trl-dpo-gc",  # TRL's default is on; off is its fastest
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": spec.precision == "mixed",  # autocast over float32 weights, as our engine's mixed precision
        "disable_tqdm": True,
        "seed": spec.seed,
        "use_cpu": spec.device == "cpu",
        "train_sampling_strategy": "sequential",
        "dataloader_num_workers": 0,
        "max_length": None if spec.run.startswith("trl-dpo") else 4096,
    }
    if spec.run.startswith("trl-dpo"):
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(beta=BETA["dpo"], precompute_ref_log_probs=True, padding_free=False, **common)
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

    with StepMeter(spec.device) as meter:
        trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r]
    return _summary(spec, meter, rss_start, records, tokens)


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
        mixed_precision="bf16" if spec.precision == "mixed" else "no",
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
    with StepMeter(spec.device) as meter:
        result = train(cfg)
    records = [r for r in result.metrics if "loss" in r]
    summary = _summary(spec, meter, rss_start, records, tokens)
    summary["attention"], summary["attention_refused"] = _attention_used()
    return summary


def _attention_used() -> tuple[str | None, dict[str, str]]:
    """The attention mode our forward pass settled on (the first the probe found exact; None: the
    padded path), and why the probe refused faster ones."""
    from mmpo.forward import probe

    verdicts = [(key, reason) for found in list(probe._results.values()) for key, reason in found.items()]
    training = [(key, reason) for key, reason in verdicts if key[3]]  # probed as it trains (not for the reference)
    used, refused = None, {}
    for (_options, mode, *_), reason in training or verdicts:  # in probing order: fastest first
        if reason is None:
            used = used or mode
        else:
            refused[mode] = reason[:500]
    return used, refused


def _summary(spec: Spec, meter: StepMeter, rss_start: int, records: list[dict], tokens_per_pair: list[int]) -> dict:
    """Throughput over the timed steps (step end to step end), memory, and the logged losses.

    Wall-clock time is what a user waits; CPU time (all threads of the process) is what the
    work cost on a CPU, and stays meaningful when other jobs share the machine."""
    total = spec.warmup + spec.steps
    if len(meter.ends) < total:
        raise RuntimeError(f"{spec.run}: saw {len(meter.ends)} optimizer steps, expected {total}")
    ends = meter.ends[spec.warmup - 1 : total]
    timed = [b[0] - a[0] for a, b in itertools.pairwise(ends)]
    cpu = [b[1] - a[1] for a, b in itertools.pairwise(ends)]
    seconds = sum(timed)
    losses = [r["loss"] for r in records]
    timed_pairs = spec.steps * spec.batch
    work_tokens = sum(tokens_per_pair[spec.warmup * spec.batch : total * spec.batch])
    peak = meter.peaks[total - 1]
    if spec.device == "cuda":
        baseline = meter.after_first_step  # weights, gradients, optimizer state
    else:
        baseline = rss_start + 16 * spec.params  # fp32 weights + gradients + AdamW's two moments
    return {
        "run": spec.run,
        "size": spec.size,
        "device": spec.device,
        "precision": spec.precision,
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
        "peak_rss" if spec.device == "cpu" else "peak_bytes": peak,
        "rss_start": rss_start,
        "baseline_bytes": baseline,
        "activation_bytes": peak - baseline,
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


def timed_step_flops(size: str, model_dir: Path, data_file: Path, spec_args) -> float:
    """Useful FLOPs of the timed steps (``flops.py``), from the engine's tokenization and order."""
    from flops import body_parameters, model_dims, step_flops
    from transformers import AutoConfig

    from mmpo.data import DatasetSpec, load_rows, prepare_preference_examples
    from mmpo.data.order import epoch_order
    from mmpo.modeling import load_tokenizer

    batch, warmup, steps, seed, params = spec_args
    examples, _ = prepare_preference_examples(
        load_rows([DatasetSpec.parse(str(data_file))], seed=seed), load_tokenizer(str(model_dir))
    )
    order = epoch_order(len(examples), seed, 0)
    timed = [examples[i] for i in order[warmup * batch : (warmup + steps) * batch]]
    config = AutoConfig.from_pretrained(model_dir)
    dims = model_dims(config)
    return step_flops(timed, body=body_parameters(params, dims, config.tie_word_embeddings), dims=dims)


def folder_parameters(model_dir: Path) -> int:
    """Parameters stored in a model folder's safetensors files (tied weights are stored once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                total += math.prod(handle.get_slice(name).get_shape())
    if not total:
        raise SystemExit(f"--model {model_dir}: no safetensors weights there (import a GGUF with `mmpo model import`)")
    return total


def bench_rows(args, count: int) -> list[dict]:
    """The first ``count`` rows of ``--pairs``, or as many synthetic pairs."""
    if not args.pairs:
        return synthetic_pairs(count, args.seed, tuple(args.prompt_range), tuple(args.completion_range))
    lines = [line for line in Path(args.pairs).read_text().splitlines() if line.strip()]
    if len(lines) < count:
        raise SystemExit(f"--pairs {args.pairs}: {len(lines)} rows, the run needs {count} (batch x (warm-up + steps))")
    rows = []
    for line in lines[:count]:
        row = json.loads(line)
        # Conversational, so that both trainers apply the chat template (TRL leaves plain strings as they are).
        as_turn = lambda value, role: [{"role": role, "content": value}] if isinstance(value, str) else value
        rows.append(
            {
                "prompt": as_turn(row["prompt"], "user"),
                "chosen": as_turn(row["chosen"], "assistant"),
                "rejected": as_turn(row["rejected"], "assistant"),
            }
        )
    return rows


def saved_model(size: str, tokenizer, model_dir: Path, args) -> int:
    """The random-weight model of ``size`` in ``model_dir`` (made once per work folder); its parameter count."""
    record = model_dir / "bench_model.json"
    if record.is_file() and json.loads(record.read_text()).get("seed") == args.seed:
        return json.loads(record.read_text())["params"]
    params = save_model(size, tokenizer, model_dir, seed=args.seed, device=args.device)
    record.write_text(json.dumps({"size": size, "seed": args.seed, "params": params}))
    return params


def with_mfu(result: dict, flops: float, peak: float | None) -> dict:
    seconds = sum(result["step_seconds"])
    result["useful_flops"] = flops
    result["achieved_flops_per_s"] = flops / seconds
    result["mfu"] = flops / seconds / peak if peak else None
    return result


def vs_trl(args) -> int:
    import importlib.util

    from mmpo.config import ConfigError

    missing = [name for name in ("trl", "psutil") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"benchmarks/bench_vs_trl.py needs {' and '.join(missing)}: pip install 'mmpo[bench]'")
    precision = args.precision or ("mixed" if args.device == "cuda" else "fp32")
    peak = None
    if args.device == "cuda":
        import torch
        from flops import card_peak

        peak = args.peak_tflops * 1e12 if args.peak_tflops else card_peak(torch.cuda.get_device_name())
    sizes = list(args.sizes) + ([Path(args.model).name] if args.model else [])
    shapes = {  # a real model folder counts as a real shape
        size: (args.batch, args.warmup, args.steps)
        if size in SHAPES or size not in SIZES
        else (args.tiny_batch, args.tiny_warmup, args.tiny_steps)
        for size in sizes
    }
    # Read once; a short pairs file fails here, before any model is made.
    rows_for = {size: bench_rows(args, batch * (warmup + steps)) for size, (batch, warmup, steps) in shapes.items()}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mmpo-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = bench_tokenizer() if any(size in SIZES for size in sizes) else None  # the synthetic models'
    forward = json.loads(args.forward) if args.forward else {}
    results, failures = [], []
    if args.merge and args.out and Path(args.out).is_file():  # keep earlier runs of other (size, run) pairs
        redo = {(size, run) for size in sizes for run in args.runs}
        earlier = json.loads(Path(args.out).read_text())
        results = [r for r in earlier["results"] if (r["size"], r["run"]) not in redo]
        failures = [f for f in earlier.get("failures", []) if (f["size"], f["run"]) not in redo]

    def save() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            record = {"command": " ".join(sys.argv), "commit": git_commit(), "results": results}
            Path(args.out).write_text(json.dumps({**record, "failures": failures}, indent=1))

    for size in sizes:
        batch, warmup, steps = shapes[size]
        if size in SIZES:
            model_dir = workdir / f"model-{size}"
            params = saved_model(size, tokenizer, model_dir, args)
        else:  # --model: its own weights and tokenizer
            model_dir = Path(args.model).resolve()
            params = folder_parameters(model_dir)
        data_file = workdir / f"pairs-{size}.jsonl"
        rows = rows_for[size]
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        flops = timed_step_flops(size, model_dir, data_file, (batch, warmup, steps, args.seed, params))
        print(
            f"[{size}] {params / 1e6:.1f}M parameters, {len(rows)} pairs, batch {batch}, "
            f"{warmup} warm-up + {steps} timed steps, {args.device} {precision}",
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
                device=args.device,
                precision=precision,
                forward=forward if run in OURS else {},
            )
            started = time.perf_counter()
            try:
                result = with_mfu(run_child(spec, timeout=args.timeout), flops, peak)
            except (RuntimeError, subprocess.TimeoutExpired) as error:  # the other runs still count
                failures.append({"size": size, "run": run, "error": str(error)[-2000:]})
                print(f"  {run:<11} FAILED: {str(error)[-2000:]}", flush=True)
                save()
                continue
            results.append(result)
            print(
                f"  {run:<11} {result['pairs_per_s']:.3f} pairs/s  step memory "
                f"{result['activation_bytes'] / 2**30:.2f} GiB  losses {[f'{x:.4f}' for x in result['losses']]}  "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            save()
    print()
    print(format_table(results))
    print()
    print("\n".join(loss_agreement(results)))
    return 1 if failures else 0


def parser() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(prog="python benchmarks/bench_vs_trl.py", description=__doc__.split("\n\n")[0])
    out.add_argument("--sizes", nargs="*", default=["tiny", "135m"], choices=list(SIZES))
    out.add_argument("--model", default=None, help="also bench this model folder (real weights and tokenizer)")
    out.add_argument("--pairs", default=None, help="a pairs JSONL to bench on instead of synthetic pairs")
    out.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(TRL + OURS))
    out.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    out.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "mixed"],
        help="fp32, or fp32 master weights + bf16 autocast (default: mixed on cuda, fp32 on cpu)",
    )
    out.add_argument(
        "--peak-tflops", type=float, default=None, help="the card's bf16 peak for MFU (default: known cards)"
    )
    out.add_argument("--batch", type=int, default=2, help="pairs per step at the real models' shapes (135m, 360m, 1b)")
    out.add_argument("--warmup", type=int, default=1, help="untimed steps first (real shapes)")
    out.add_argument("--steps", type=int, default=3, help="timed steps (real shapes)")
    out.add_argument("--tiny-batch", type=int, default=4, help="pairs per step at the small sizes (tiny, micro)")
    out.add_argument("--tiny-warmup", type=int, default=1)
    out.add_argument("--tiny-steps", type=int, default=4)
    out.add_argument("--prompt-range", type=int, nargs=2, default=[100, 400])
    out.add_argument("--completion-range", type=int, nargs=2, default=[100, 300])
    out.add_argument("--learning-rate", type=float, default=1e-4)
    out.add_argument("--seed", type=int, default=0)
    out.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    out.add_argument("--forward", default="", help="our forward options as JSON, e.g. '{\"share_prompt\": false}'")
    out.add_argument("--workdir", default=None, help="where models, data and run folders go (default: a temp dir)")
    out.add_argument("--out", default="benchmarks/results/vs_trl.json", help="results JSON (updated after every run)")
    out.add_argument("--merge", action="store_true", help="keep the results already in --out for other sizes/runs")
    out.add_argument("--timeout", type=float, default=1800, help="seconds allowed per configuration")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        return child_main(argv[1])
    return vs_trl(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
