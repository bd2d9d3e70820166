"""Reading a sweep folder into rows, and the study's statistics over them.

Every number comes from the files a sweep wrote: ``plan.json`` (which run plays which role),
``runs/<run>/config.yaml`` and ``metrics.jsonl`` (training curves), each checkpoint's
``eval/results.json`` (win-rate, harness accuracy, reward accuracy), ``baselines/*/results.json``
(the starting model) and ``tuning.json`` (hyper-parameter selection).

Vocabulary, as in the paper: *LM accuracy* is the lm-evaluation-harness average accuracy
(``harness.average_acc``); *win-rate* is the length-controlled win-rate against the starting
(SFT) model where the results have it, else the raw win-rate. Seeds are averaged before any
maximum is taken, so a lucky seed cannot make a peak.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmpo.config import ConfigError
from mmpo.study.plan import EVENTS_FILE, PLAN_FILE, TUNING_FILE
from mmpo.training.run_dir import read_metrics

OBJECTIVE_LABELS = {"mmpo": "MMPO", "dpo": "DPO", "simpo": "SimPO", "sft": "SFT (chosen)"}


# --------------------------------------------------------------------------------------------
# Reading the sweep


@dataclass
class CheckpointResult:
    """One evaluated checkpoint of one run."""

    run: str
    method: str  # "MMPO", "DPO", "SimPO", or "MMPO (<variant>)" for an ablation
    objective: str
    variant: str
    beta: float
    learning_rate: float
    seed: int
    epoch: float
    step: int
    win_rate: float | None  # length-controlled where available
    win_rate_raw: float | None
    win_rate_se: float | None
    lm_acc: float | None
    reward_accuracy: float | None
    results_file: str
    task_accuracy: float | None = None  # share of greedy answers the prompts' verifiers score right


@dataclass
class RunCurves:
    run: str
    method: str
    beta: float
    seed: int
    train: list[dict] = field(default_factory=list)  # {"step", "loss", "rewards/accuracies"}
    evals: list[dict] = field(default_factory=list)  # {"step", "epoch", "eval_rewards/accuracies"}


@dataclass
class SweepResults:
    sweep_dir: Path
    name: str
    checkpoints: list[CheckpointResult]
    curves: list[RunCurves]
    baseline_lm_acc: float | None
    tuning: list[dict]
    length_controlled: bool
    missing: list[str]
    wall_minutes: float | None = None  # first to last event of events.jsonl
    baseline_task_accuracy: float | None = None  # the starting model's, on the same prompts


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _method(objective: str, variant: str) -> str:
    label = OBJECTIVE_LABELS.get(objective, objective)
    return f"{label} ({variant})" if variant else label


def _win_rates(results: dict) -> tuple[float | None, float | None, float | None]:
    winrate = results.get("winrate") or {}
    raw = winrate.get("win_rate")
    lc = winrate.get("length_controlled_winrate")
    if lc is not None:
        return lc, raw, winrate.get("lc_standard_error_delta_method", winrate.get("lc_standard_error"))
    return raw, raw, winrate.get("standard_error")


def collect(sweep_dir: str | Path) -> SweepResults:
    """Read every result file of a sweep folder into rows (nothing is computed but lookups)."""
    sweep_dir = Path(sweep_dir)
    plan = _read_json(sweep_dir / PLAN_FILE)
    if plan is None:
        raise ConfigError(f"{sweep_dir} is not a sweep folder (no plan.json); run `mmpo sweep` first")
    checkpoints, curves, missing = [], [], []
    length_controlled = True
    baseline_task_accuracy = None
    for entry in plan["runs"]:
        experiments = [r for r in entry["roles"] if r["kind"] == "experiment"]
        if entry["kind"] != "train" or not experiments:
            continue
        variant = next((r["variant"] for r in experiments if r.get("variant")), "")
        cfg = entry["config"]
        run_dir = Path(cfg["output_dir"])
        if not run_dir.is_dir():  # a sweep folder moved elsewhere: runs are under it
            run_dir = sweep_dir / "runs" / entry["name"]
        saved = run_dir / "config.yaml"
        if saved.is_file():
            cfg = yaml.safe_load(saved.read_text())
        method = _method(cfg["objective"], variant)
        metrics = read_metrics(run_dir / "metrics.jsonl")
        evals_by_step = {r["step"]: r for r in metrics if "eval_rewards/accuracies" in r}
        curves.append(
            RunCurves(
                entry["name"],
                method,
                cfg["beta"],
                cfg["seed"],
                train=[r for r in metrics if "loss" in r],
                evals=[r for r in metrics if "eval_rewards/accuracies" in r],
            )
        )
        checkpoint_dirs = sorted((run_dir / "checkpoints").glob("*/eval/results.json")) if run_dir.is_dir() else []
        if not checkpoint_dirs:
            missing.append(entry["name"])
        for results_file in checkpoint_dirs:
            ckpt = results_file.parent.parent
            results = _read_json(results_file) or {}
            state = _read_json(ckpt / "trainer_state.json") or {}
            step = state.get("global_step", 0)
            epoch = round(state.get("epoch", 0.0), 2)
            win, raw, se = _win_rates(results)
            if results.get("winrate") and "length_controlled_winrate" not in results["winrate"]:
                length_controlled = False
            rewards = results.get("rewards") or {}
            reward_acc = rewards.get("reward_accuracy")
            if reward_acc is None and step in evals_by_step:  # the engine's evaluation at that step
                reward_acc = evals_by_step[step]["eval_rewards/accuracies"]
            harness = results.get("harness") or {}
            correct = (results.get("winrate") or {}).get("correct_rate") or {}
            if correct.get("baseline") is not None:
                baseline_task_accuracy = correct["baseline"]
            checkpoints.append(
                CheckpointResult(
                    run=entry["name"],
                    method=method,
                    objective=cfg["objective"],
                    variant=variant,
                    beta=cfg["beta"],
                    learning_rate=cfg["learning_rate"],
                    seed=cfg["seed"],
                    epoch=epoch,
                    step=step,
                    win_rate=win,
                    win_rate_raw=raw,
                    win_rate_se=se,
                    lm_acc=harness.get("average_acc"),
                    reward_accuracy=reward_acc,
                    results_file=str(results_file),
                    task_accuracy=correct.get("model"),
                )
            )
    baseline_accs = [
        (_read_json(p) or {}).get("harness", {}).get("average_acc")
        for p in sorted((sweep_dir / "baselines").glob("*/results.json"))
    ]
    baseline_accs = [a for a in baseline_accs if a is not None]
    tuning = _read_json(sweep_dir / TUNING_FILE) or []
    times = [r["time"] for r in read_metrics(sweep_dir / EVENTS_FILE) if "time" in r]
    wall = (max(times) - min(times)) / 60 if len(times) > 1 else None
    return SweepResults(
        sweep_dir,
        plan.get("name", sweep_dir.name),
        checkpoints,
        curves,
        baseline_accs[0] if baseline_accs else None,
        tuning,
        length_controlled,
        missing,
        wall,
        baseline_task_accuracy,
    )


# --------------------------------------------------------------------------------------------
# Aggregation: seeds first, then peaks and spreads


@dataclass
class Cell:
    """Seed statistics of one metric at one (method, beta, epoch)."""

    mean: float
    std: float | None  # None with one seed
    n: int
    values: list[float]


def _cell(values: Iterable[float | None]) -> Cell | None:
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    std = statistics.stdev(present) if len(present) > 1 else None
    return Cell(statistics.fmean(present), std, len(present), present)


def method_order(method: str) -> tuple[int, str]:
    """MMPO, DPO, SimPO first, then ablations and anything else by name."""
    order = list(OBJECTIVE_LABELS.values())
    return (order.index(method) if method in order else len(order), method)


def group_by_setting(points: list[CheckpointResult]) -> dict[tuple[str, float, float], list[CheckpointResult]]:
    groups: dict[tuple[str, float, float], list[CheckpointResult]] = defaultdict(list)
    for p in points:
        groups[(p.method, p.beta, p.epoch)].append(p)
    return dict(sorted(groups.items(), key=lambda kv: (method_order(kv[0][0]), kv[0][1], kv[0][2])))


def seed_means(points: list[CheckpointResult]) -> list[dict]:
    """One row per (method, beta, epoch): mean/std over seeds of win-rate, LM and reward accuracy."""
    rows = []
    for (method, beta, epoch), group in group_by_setting(points).items():
        rows.append(
            {
                "method": method,
                "beta": beta,
                "epoch": epoch,
                "win_rate": _cell(p.win_rate for p in group),
                "lm_acc": _cell(p.lm_acc for p in group),
                "win_rate_raw": _cell(p.win_rate_raw for p in group),
                "reward_accuracy": _cell(p.reward_accuracy for p in group),
                "task_accuracy": _cell(p.task_accuracy for p in group),
                "seeds": sorted({p.seed for p in group}),
            }
        )
    return rows


def main_methods(points: list[CheckpointResult]) -> list[str]:
    return sorted({p.method for p in points if not p.variant}, key=method_order)


def pareto_tables(points: list[CheckpointResult]) -> dict[str, list[dict]]:
    """Tables 1-2 of the paper, per method, over all betas and epochs (seed means):
    ``peak_lm_acc``: the win-rate at the setting of peak LM accuracy;
    ``peak_win_rate``: the LM accuracy at the setting of peak win-rate."""
    rows = seed_means([p for p in points if not p.variant])
    tables: dict[str, list[dict]] = {"peak_lm_acc": [], "peak_win_rate": []}
    for method in main_methods(points):
        mine = [r for r in rows if r["method"] == method]
        for table, key, other in (("peak_lm_acc", "lm_acc", "win_rate"), ("peak_win_rate", "win_rate", "lm_acc")):
            candidates = [r for r in mine if r[key] is not None]
            if not candidates:
                continue
            best = max(candidates, key=lambda r: r[key].mean)  # first (smallest beta, epoch) wins a tie
            tables[table].append(
                {
                    "method": method,
                    "beta": best["beta"],
                    "epoch": best["epoch"],
                    key: best[key].mean,
                    f"{key}_std": best[key].std,
                    other: best[other].mean if best[other] else None,
                    f"{other}_std": best[other].std if best[other] else None,
                    "win_rate_raw": best["win_rate_raw"].mean if best["win_rate_raw"] else None,
                    "seeds": len(best["seeds"]),
                }
            )
    return tables


def multi_beta_methods(points: list[CheckpointResult]) -> list[str]:
    """Methods run at two or more betas (the main methods, and any ablation run over a beta grid)."""
    betas: dict[str, set[float]] = defaultdict(set)
    for p in points:
        betas[p.method].add(p.beta)
    return sorted((m for m, b in betas.items() if len(b) > 1), key=method_order)


def beta_sensitivity(points: list[CheckpointResult]) -> list[dict]:
    """Per method and epoch: spread (max - min) and std across betas of the seed-mean win-rate and
    LM accuracy, next to the seed noise floor (mean over betas of the std across seeds)."""
    methods = multi_beta_methods(points)
    rows = seed_means([p for p in points if p.method in methods])
    out = []
    for method in methods:
        for epoch in sorted({r["epoch"] for r in rows if r["method"] == method}):
            mine = [r for r in rows if r["method"] == method and r["epoch"] == epoch]
            entry: dict[str, Any] = {"method": method, "epoch": epoch, "betas": [r["beta"] for r in mine]}
            for key in ("win_rate", "lm_acc", "reward_accuracy"):
                means = [r[key].mean for r in mine if r[key] is not None]
                seed_stds = [r[key].std for r in mine if r[key] is not None and r[key].std is not None]
                entry[f"{key}_spread"] = max(means) - min(means) if len(means) > 1 else None
                entry[f"{key}_beta_std"] = statistics.stdev(means) if len(means) > 1 else None
                entry[f"{key}_seed_std"] = statistics.fmean(seed_stds) if seed_stds else None
            out.append(entry)
    return out


def seed_spread(points: list[CheckpointResult]) -> list[dict]:
    """Final-epoch values per (method, beta) with their spread over seeds."""
    rows = seed_means(points)
    last = {}
    for r in rows:
        key = (r["method"], r["beta"])
        if key not in last or r["epoch"] > last[key]["epoch"]:
            last[key] = r
    return [r for r in rows if last[(r["method"], r["beta"])] is r]


def ablation_rows(points: list[CheckpointResult]) -> list[dict]:
    """Each ablation next to its objective's default run at the same beta and seeds, per epoch."""
    variants = [p for p in points if p.variant]
    if not variants:
        return []
    # The ablation beta(s): where two or more variants were run (an ablation also run over a beta
    # grid belongs to the sensitivity panel, not here); with a single variant, all its betas.
    labels: dict[float, set[str]] = defaultdict(set)
    for p in variants:
        labels[p.beta].add(p.variant)
    shared = {b for b, v in labels.items() if len(v) > 1}
    if shared:
        variants = [p for p in variants if p.beta in shared]
    keep = set()
    for p in variants:
        keep |= {
            (q.run, q.epoch)
            for q in points
            if not q.variant and q.objective == p.objective and q.beta == p.beta and q.seed == p.seed
        }
    chosen = variants + [q for q in points if (q.run, q.epoch) in keep]
    return seed_means(chosen)
