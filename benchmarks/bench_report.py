"""Tables and loss agreement of ``bench_vs_trl.py`` results (one list of per-run dicts)."""

from __future__ import annotations

import subprocess
from pathlib import Path

#: Which TRL run each of ours is compared with (the MMPO row against TRL DPO: TRL has no MMPO).
BASELINE_OF = {"mmpo-dpo": "trl-dpo", "mmpo-simpo": "trl-simpo", "mmpo-mmpo": "trl-dpo"}


def format_table(results: list[dict]) -> str:
    """The CPU table (wall and CPU time, peak RSS), or the GPU one (CUDA memory, MFU)."""
    if any(r.get("device") == "cuda" for r in results):
        return format_gpu_table(results)
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


def format_gpu_table(results: list[dict]) -> str:
    gib = 2**30
    lines = [
        "| model | trainer | pairs/s | tokens/s | s/step | MFU | step memory GiB | peak GiB | speed vs TRL DPO | "
        "step memory vs TRL DPO | final loss |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_key = {(r["size"], r["run"]): r for r in results}
    for r in results:
        base = by_key.get((r["size"], BASELINE_OF.get(r["run"], "")))
        speed = memory = ""
        if base:
            speed = f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}x"
            memory = f"{r['activation_bytes'] / base['activation_bytes']:.2f}x"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        step = sum(r["step_seconds"]) / len(r["step_seconds"])
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else ""
        lines.append(
            f"| {r['size']} | {r['run']} | {r['pairs_per_s']:.2f} | {r['tokens_per_s']:.0f} | {step:.3f} | {mfu} | "
            f"{r['activation_bytes'] / gib:.2f} | {r['peak_bytes'] / gib:.2f} | {speed} | {memory} | {loss} |"
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
        note = (
            f"{size} {run} vs {base['run']}: losses {[f'{x:.5f}' for x in r['losses']]} vs "
            f"{[f'{x:.5f}' for x in base['losses']]} (max |diff| {max_loss_diff(r, base):.1e})"
        )
        if run == "mmpo-dpo":  # both log summed log-probs (TRL's CPO logs per-token means)
            note += f"; step-1 mean chosen/rejected logps {r['first_step_logps']} vs {base['first_step_logps']}"
        notes.append(note)
    return notes


def max_loss_diff(a: dict, b: dict) -> float:
    return max((abs(x - y) for x, y in zip(a["losses"], b["losses"])), default=float("nan"))


def git_commit() -> str | None:
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
