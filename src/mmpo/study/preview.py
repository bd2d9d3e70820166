"""The dry run: what a sweep will do and cost, as rows, a console table and summary lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmpo.study.estimate import estimate_gpu_memory, run_steps
from mmpo.study.plan import PlannedRun
from mmpo.study.status import run_status


def describe_run(run: PlannedRun, sweep_dir: Path) -> dict[str, Any]:
    """What a dry run shows for one run: optimizer steps, checkpoints, memory, status."""
    if run.kind == "baseline":
        return {"name": run.name, "objective": "baseline", "model": run.model, "status": run_status(run, sweep_dir)}
    cfg = run.config
    rows, steps, global_batch = run_steps(cfg)  # one device per run
    memory = estimate_gpu_memory(cfg)
    return {
        "name": run.name,
        "objective": cfg.objective,
        "beta": cfg.beta,
        "learning_rate": cfg.learning_rate,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "pairs": rows,
        "global_batch": global_batch,
        "steps": steps,
        "checkpoints": cfg.epochs,
        "evaluated": run.evaluate,
        "model": cfg.model,
        "memory_gib": memory.total_gib if memory else None,
        "memory_parts": {k: round(v, 2) for k, v in memory.parts.items()} if memory else None,
        "parameters": memory.parameters if memory else None,
        "status": "after tuning" if run.provisional else run_status(run, sweep_dir),
        "roles": [f"tune {r['stage']}" if r["kind"] == "tune" else r.get("block", r["kind"]) for r in run.roles],
    }


def plan_table(rows: list[dict[str, Any]]):
    """A rich Table of the runs (cells are plain text: run names are never read as markup)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="sweep plan", show_lines=False)
    for column in ("#", "run", "role", "steps", "ckpts", "est. GPU mem", "status"):
        table.add_column(
            column, justify="right" if column in ("#", "steps", "ckpts", "est. GPU mem") else "left", overflow="fold"
        )
    for i, row in enumerate(rows):
        if row["objective"] == "baseline":
            cells = [str(i), row["name"], "baseline", "", "", "", row["status"]]
        else:
            memory = f"~{row['memory_gib']:.1f} GiB" if row["memory_gib"] is not None else "?"
            cells = [
                str(i),
                row["name"],
                ", ".join(row["roles"]),
                str(row["steps"] if row["steps"] is not None else "?"),
                str(row["checkpoints"]) + ("" if row["evaluated"] else " (no eval)"),
                memory,
                row["status"],
            ]
        table.add_row(*(Text(c) for c in cells))
    return table


def plan_summary(rows: list[dict[str, Any]], waiting: list[str]) -> list[str]:
    trained = [r for r in rows if r["objective"] != "baseline"]
    steps = [r["steps"] for r in trained]
    lines = [
        f"{len(trained)} training runs, {sum(s for s in steps if s is not None)} optimizer steps"
        + (" (+ runs of unknown size)" if None in steps else "")
        + f", {sum(r['checkpoints'] for r in trained if r['evaluated'])} checkpoints to evaluate; "
        f"{sum(r['status'] == 'done' for r in rows)} of {len(rows)} entries already done."
    ]
    if any(r["status"] == "after tuning" for r in rows):
        lines.append(
            "Runs marked 'after tuning' are shown with default values for what tuning will choose; "
            "they run once the stages before them have finished."
        )
    lines += [f"waiting: {w}" for w in waiting]
    lines.append(
        "GPU memory is a rough estimate per run (weights, gradients, optimizer, activations at the "
        "maximum sequence length, logits; see mmpo.study.estimate_gpu_memory), not a measurement."
    )
    return lines
