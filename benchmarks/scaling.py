"""Cost of a training micro-step vs prompt length, completion length and batch size, padded path
against the fast path; writes a JSON file and the plot in docs/ (docs/performance.md).

    python benchmarks/scaling.py --out benchmarks/results/scaling.json --plot docs/performance_scaling.png
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

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
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
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

    def measure(examples, options):
        def forward():
            out = preference_logps(model, examples, pad_token_id=0, options=options)
            return dpo_loss(
                out.chosen_logps, out.rejected_logps, out.chosen_logps.detach() - 1, out.rejected_logps.detach()
            ).losses.mean()

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
            print(
                axis,
                value,
                {
                    k: f"{v['seconds']:.2f}s {v['saved_bytes'] / 2**20:.0f}MiB"
                    for k, v in row.items()
                    if isinstance(v, dict)
                },
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    plot_scaling(results, args.plot)
    print(f"wrote {args.out} and {args.plot}")
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
    fig.suptitle(
        "Cost of one DPO micro-step (forward + backward), 8-layer SmolLM2-proportioned model, CPU", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/scaling.json")
    parser.add_argument("--plot", default="docs/performance_scaling.png")
    return scaling(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
