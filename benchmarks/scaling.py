"""Cost of a training micro-step vs prompt length, completion length and batch size, padded path
against the fast path; writes a JSON file and a plot (docs/performance.md).

    python benchmarks/scaling.py --out benchmarks/results/scaling.json --plot docs/performance_scaling.png
    python benchmarks/scaling.py --device cuda --size 360m --sweeps gpu --out scaling_gpu.json --plot ''

On CPU the memory is what the forward pass allocates and still holds when it returns (the
activations kept for the backward pass, from ``torch.profiler``'s allocation records); on CUDA it
is the peak allocated during the micro-step (forward and backward) above what was allocated
before it (the weights). CUDA runs use float32 master weights under bf16 autocast, the GPU
training default; the first settings of each path are run twice first (kernel compilation).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

#: (base setting, values of each axis) of a sweep; one axis moves at a time from the base.
SWEEPS = {
    "cpu": (
        {"batch": 4, "prompt": 256, "completion": 128},
        {"prompt": [64, 128, 256, 512, 1024], "completion": [32, 64, 128, 256, 512], "batch": [1, 2, 4, 8, 16]},
    ),
    "gpu": (
        {"batch": 8, "prompt": 512, "completion": 256},
        {"prompt": [128, 512, 2048], "completion": [64, 256, 1024], "batch": [2, 8, 32]},
    ),
    "dry": ({"batch": 2, "prompt": 16, "completion": 8}, {"prompt": [8, 16], "completion": [8], "batch": [2]}),
}


def retained_bytes(fn) -> int:
    """CPU memory allocated while ``fn`` runs and still held when it returns (for a forward pass:
    what autograd keeps for the backward pass), from the profiler's allocation records."""
    import torch

    with torch.profiler.profile(profile_memory=True) as prof:
        result = fn()
    del result
    return sum(event.self_cpu_memory_usage for event in prof.events())


def scaling_model(size: str, device: str):
    """SmolLM2-135M's proportions at a size that sweeps in minutes on CPU (LM head ~20% of the
    FLOPs), or one of the benchmark's sizes (``workload.py``), random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if size == "scaling":
        config = LlamaConfig(
            vocab_size=8192,
            hidden_size=256,
            intermediate_size=683,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
            pad_token_id=0,
        )
    else:
        from workload import bench_tokenizer, model_config

        config = model_config(size, bench_tokenizer())
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    return model.train()


def scaling(args) -> int:
    import torch

    from mmpo.forward import ForwardOptions, preference_logps
    from mmpo.objectives import dpo_loss

    model = scaling_model(args.size, args.device)
    config = model.config
    cuda = args.device == "cuda"
    rng = random.Random(0)

    def pairs(batch, prompt, completion):
        vary = lambda n: rng.randint(max(1, n // 2), n + n // 2)  # lengths vary, as in real data
        ids = lambda n: [rng.randrange(1, config.vocab_size) for _ in range(n)]
        return [
            {
                "prompt_ids": ids(vary(prompt)),
                "chosen_ids": ids(vary(completion)),
                "rejected_ids": ids(vary(completion)),
            }
            for _ in range(batch)
        ]

    def forward(examples, options):
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=cuda):
            out = preference_logps(model, examples, pad_token_id=0, options=options)
            return dpo_loss(
                out.chosen_logps, out.rejected_logps, out.chosen_logps.detach() - 1, out.rejected_logps.detach()
            ).losses.mean()

    def step(examples, options):
        model.zero_grad(set_to_none=True)
        forward(examples, options).backward()
        if cuda:
            torch.cuda.synchronize()

    def measure(examples, options):
        if cuda:
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(examples, options)
            memory = torch.cuda.max_memory_allocated() - before
        else:
            memory = retained_bytes(lambda: forward(examples, options))
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            step(examples, options)
            times.append(time.perf_counter() - started)
        return min(times), memory

    base, sweeps = SWEEPS[args.sweeps]
    paths = {"padded (plain)": None, "fast (shared prompt + packing + chunked)": ForwardOptions()}
    warm = pairs(base["batch"], base["prompt"], base["completion"])
    for options in paths.values():  # compile kernels (and the fast path's probe) before timing anything
        step(warm, options)
        step(pairs(base["batch"], base["prompt"] // 2, base["completion"]), options)
    results = {"config": config.to_dict(), "device": args.device, "size": args.size, "base": base, "sweeps": {}}
    for axis, values in sweeps.items():
        results["sweeps"][axis] = []
        for value in values:
            setting = {**base, axis: value}
            examples = pairs(setting["batch"], setting["prompt"], setting["completion"])
            row = {axis: value}
            for label, options in paths.items():
                seconds, memory = measure(examples, options)
                row[label] = {"seconds": seconds, "memory_bytes": memory}
            results["sweeps"][axis].append(row)
            print(
                axis,
                value,
                {
                    k: f"{v['seconds']:.3f}s {v['memory_bytes'] / 2**20:.0f}MiB"
                    for k, v in row.items()
                    if isinstance(v, dict)
                },
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot_scaling(results, args.plot)
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def plot_scaling(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_titles = {
        "prompt": "prompt length (tokens)",
        "completion": "completion length (tokens)",
        "batch": "pairs per batch",
    }
    fig, grid = plt.subplots(2, 3, figsize=(12, 6.5))
    for col, (axis, rows) in enumerate(results["sweeps"].items()):
        xs = [r[axis] for r in rows]
        for label in (k for k in rows[0] if k != axis):
            grid[0, col].plot(xs, [r[label]["seconds"] for r in rows], marker="o", label=label)
            memory = [r[label].get("memory_bytes", r[label].get("saved_bytes")) for r in rows]  # older files
            grid[1, col].plot(xs, [m / 2**20 for m in memory], marker="o", label=label)
        others = ", ".join(f"{k} {v}" for k, v in results["base"].items() if k != axis)
        grid[0, col].set_title(f"vs {axes_titles[axis]}\n({others})", fontsize=10)
        grid[1, col].set_xlabel(axes_titles[axis])
        for row in range(2):
            grid[row, col].set_xscale("log", base=2)
            grid[row, col].grid(alpha=0.3)
    grid[0, 0].set_ylabel("seconds per training micro-step")
    on_cpu = results.get("device", "cpu") == "cpu"
    grid[1, 0].set_ylabel("memory kept for backward (MiB)" if on_cpu else "step memory (MiB)")
    grid[0, 0].legend(fontsize=8)
    model = "8-layer SmolLM2-proportioned" if results.get("size", "scaling") == "scaling" else results["size"]
    fig.suptitle(
        f"Cost of one DPO micro-step (forward + backward), {model} model, {results.get('device', 'cpu')}", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", default="scaling", help="'scaling' (8 layers, d=256) or a workload.py size")
    parser.add_argument("--sweeps", default=None, choices=list(SWEEPS), help="default: cpu or gpu by --device")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/scaling.json")
    parser.add_argument("--plot", default="docs/performance_scaling.png", help="'' for none")
    args = parser.parse_args(argv)
    args.sweeps = args.sweeps or ("gpu" if args.device == "cuda" else "cpu")
    return scaling(args)


if __name__ == "__main__":
    raise SystemExit(main())
