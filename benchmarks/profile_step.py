"""Where one training step of our engine spends its time at SmolLM2-135M's shape, and how much
matmul work TRL's DPO and our engine do on the benchmark's pairs (docs/performance.md).

    python benchmarks/profile_step.py            # ~2 minutes on one CPU thread

Prints: the peak fp32 matmul rate of one core (a lone 1536x576x1536 matmul), one DPO step of our
forward pass (shared prompt, packing, chunked log-probs, selective recompute) under
``torch.profiler`` (top ops by self time), and the FLOP count ``6 x parameters x tokens`` of the
``benchmarks/bench_vs_trl.py`` timed steps for both trainers: ours runs prompt + chosen + rejected once and
the LM head only on scored tokens (forward, recompute and backward: 8 x head parameters per
token); TRL runs two padded sequences per pair through the whole model.
"""

import json
import tempfile
import time
from pathlib import Path

import torch
from workload import bench_tokenizer, model_config, synthetic_pairs

from mmpo.data import load_rows, prepare_preference_examples
from mmpo.data.order import epoch_order
from mmpo.forward import ForwardOptions, preference_logps
from mmpo.objectives import dpo_loss


def matmul_peak() -> float:
    a, b = torch.randn(1536, 576), torch.randn(576, 1536)
    for _ in range(3):
        a @ b
    started, repeats = time.perf_counter(), 50
    for _ in range(repeats):
        a @ b
    return 2 * 1536 * 576 * 1536 * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    print(f"one-core fp32 matmul: {matmul_peak():.1f} GFLOP/s")
    tokenizer = bench_tokenizer()
    batch, warmup, steps = 2, 1, 5  # bench_vs_trl.py's defaults at the 135M shape
    with tempfile.TemporaryDirectory() as folder:  # loaded as the bench loads them (same row order)
        path = Path(folder) / "pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(batch * (warmup + steps), 0)))
        examples, _ = prepare_preference_examples(load_rows([str(path)], seed=0), tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config("135m", tokenizer))
    model.set_attn_implementation("sdpa")
    model.train()
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()

    order = epoch_order(len(examples), 0, 0)  # the order both trainers see the pairs in
    first = [examples[i] for i in order[warmup * batch : (warmup + 1) * batch]]  # the first timed step

    def step():
        model.zero_grad(set_to_none=True)
        out = preference_logps(model, first, pad_token_id=tokenizer.pad_token_id, options=ForwardOptions())
        dpo_loss(
            out.chosen_logps, out.rejected_logps, out.chosen_logps.detach() - 1, out.rejected_logps.detach()
        ).losses.mean().backward()

    step()  # warm-up
    with torch.profiler.profile() as prof:
        started = time.perf_counter()
        step()
        seconds = time.perf_counter() - started
    averages = prof.key_averages()
    print(f"one DPO step (the first timed one), {batch} pairs, {seconds:.1f} s under the profiler:")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12))
    mm_seconds = sum(e.self_cpu_time_total for e in averages if e.key == "aten::mm") / 1e6
    ours_step, _ = matmul_flops(first, params, head)
    print(f"aten::mm: {ours_step / 1e9:.0f} GFLOP in {mm_seconds:.1f} s = {ours_step / mm_seconds / 1e9:.1f} GFLOP/s")

    ours = trl = 0.0
    for s in range(warmup, warmup + steps):
        step_ours, step_trl = matmul_flops([examples[i] for i in order[s * batch : (s + 1) * batch]], params, head)
        ours, trl = ours + step_ours, trl + step_trl
    print(
        f"matmul work of the {steps} timed steps: TRL DPO {trl / 1e12:.2f} TFLOP, ours {ours / 1e12:.2f} TFLOP "
        f"(ratio {trl / ours:.2f})"
    )


def matmul_flops(pairs: list[dict], params: int, head: int) -> tuple[float, float]:
    """Matmul FLOPs of one training step on ``pairs``: (ours, TRL DPO's); see the module docstring."""
    tokens = sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in pairs)
    scored = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in pairs)
    longest = max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in pairs)
    return 6 * (params - head) * tokens + 8 * head * scored, 6 * params * 2 * len(pairs) * longest


if __name__ == "__main__":
    main()
