"""``mmpo report <sweep-folder>``: the study's tables and figures, computed from its result files.

Every number comes from the files a sweep wrote: ``plan.json`` (which run plays which role),
``runs/<run>/config.yaml`` and ``metrics.jsonl`` (training curves), each checkpoint's
``eval/results.json`` (win-rate, harness accuracy, reward accuracy), ``baselines/*/results.json``
(the starting model) and ``tuning.json`` (hyper-parameter selection). Outputs, into one folder:
``report.md``, ``report.html``, ``report.json`` (every table's numbers), ``checkpoints.csv`` (one
row per evaluated checkpoint) and PNG figures.

Vocabulary, as in the paper: *LM accuracy* is the lm-evaluation-harness average accuracy
(``harness.average_acc``); *win-rate* is the length-controlled win-rate against the starting
(SFT) model where the results have it, else the raw win-rate. Seeds are averaged before any
maximum is taken, so a lucky seed cannot make a peak.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from mmpo.training.run_dir import read_metrics
from mmpo.config import ConfigError

METHOD_COLORS = {"MMPO": "tab:blue", "DPO": "tab:orange", "SimPO": "tab:green"}
EXTRA_COLORS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
BETA_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")
OBJECTIVE_LABELS = {"mmpo": "MMPO", "dpo": "DPO", "simpo": "SimPO"}


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
        return lc, raw, winrate.get("lc_standard_error")
    return raw, raw, winrate.get("standard_error")


def collect(sweep_dir: str | Path) -> SweepResults:
    """Read every result file of a sweep folder into rows (nothing is computed but lookups)."""
    sweep_dir = Path(sweep_dir)
    plan = _read_json(sweep_dir / "plan.json")
    if plan is None:
        raise ConfigError(f"{sweep_dir} is not a sweep folder (no plan.json); run `mmpo sweep` first")
    checkpoints, curves, missing = [], [], []
    length_controlled = True
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
        curves.append(RunCurves(entry["name"], method, cfg["beta"], cfg["seed"],
                                train=[r for r in metrics if "loss" in r],
                                evals=[r for r in metrics if "eval_rewards/accuracies" in r]))
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
            checkpoints.append(CheckpointResult(
                run=entry["name"], method=method, objective=cfg["objective"], variant=variant, beta=cfg["beta"],
                learning_rate=cfg["learning_rate"], seed=cfg["seed"], epoch=epoch, step=step, win_rate=win,
                win_rate_raw=raw, win_rate_se=se, lm_acc=harness.get("average_acc"), reward_accuracy=reward_acc,
                results_file=str(results_file)))
    baseline_accs = [(_read_json(p) or {}).get("harness", {}).get("average_acc")
                     for p in sorted((sweep_dir / "baselines").glob("*/results.json"))]
    baseline_accs = [a for a in baseline_accs if a is not None]
    tuning = _read_json(sweep_dir / "tuning.json") or []
    times = [r["time"] for r in read_metrics(sweep_dir / "events.jsonl") if "time" in r]
    wall = (max(times) - min(times)) / 60 if len(times) > 1 else None
    return SweepResults(sweep_dir, plan.get("name", sweep_dir.name), checkpoints, curves,
                        baseline_accs[0] if baseline_accs else None, tuning, length_controlled, missing, wall)


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
        rows.append({"method": method, "beta": beta, "epoch": epoch,
                     "win_rate": _cell(p.win_rate for p in group), "lm_acc": _cell(p.lm_acc for p in group),
                     "win_rate_raw": _cell(p.win_rate_raw for p in group),
                     "reward_accuracy": _cell(p.reward_accuracy for p in group),
                     "seeds": sorted({p.seed for p in group})})
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
            tables[table].append({"method": method, "beta": best["beta"], "epoch": best["epoch"],
                                  key: best[key].mean, f"{key}_std": best[key].std,
                                  other: best[other].mean if best[other] else None,
                                  f"{other}_std": best[other].std if best[other] else None,
                                  "win_rate_raw": best["win_rate_raw"].mean if best["win_rate_raw"] else None,
                                  "seeds": len(best["seeds"])})
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
        keep |= {(q.run, q.epoch) for q in points if not q.variant and q.objective == p.objective
                 and q.beta == p.beta and q.seed == p.seed}
    chosen = variants + [q for q in points if (q.run, q.epoch) in keep]
    return seed_means(chosen)


# --------------------------------------------------------------------------------------------
# Figures (matplotlib, written as PNG)


def method_colors(points: list[CheckpointResult]) -> dict[str, str]:
    """One colour per method for every figure: MMPO blue, DPO orange, SimPO green, ablations after."""
    colors, extra = {}, iter(EXTRA_COLORS * 3)
    for m in sorted({p.method for p in points}, key=method_order):
        colors[m] = METHOD_COLORS.get(m) or next(extra)
    return colors


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scatter(ax, rows: list[dict], method: str, color: str, baseline_acc: float | None, label_betas: bool) -> None:
    betas = sorted({r["beta"] for r in rows if r["method"] == method})
    for i, beta in enumerate(betas):
        line = [r for r in rows if r["method"] == method and r["beta"] == beta
                and r["win_rate"] is not None and r["lm_acc"] is not None]
        line.sort(key=lambda r: r["epoch"])
        if not line:
            continue
        xs, ys = [r["win_rate"].mean for r in line], [r["lm_acc"].mean * 100 for r in line]
        ax.plot(xs, ys, "-", color=color, alpha=0.5, linewidth=1)
        ax.scatter(xs, ys, color=color, marker=BETA_MARKERS[i % len(BETA_MARKERS)], s=40,
                   label=f"β={beta:g}" if label_betas else None, zorder=3, edgecolors="black", linewidths=0.4)
        for r, x, y in zip(line, xs, ys):
            ax.annotate(f"{r['epoch']:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if baseline_acc is not None:
        ax.scatter([50.0], [baseline_acc * 100], marker="*", color="black", s=90, zorder=4, label="SFT model")


def scatter_figure(points: list[CheckpointResult], methods: list[str], path: Path, baseline_acc: float | None,
                   title: str, colors: dict[str, str], win_label: str = "win-rate") -> Path | None:
    """Win-rate (x) vs LM accuracy (y), one panel per method: one colour per method, one marker
    per beta, a beta's epochs connected (each point's epoch written next to it)."""
    rows = [r for r in seed_means([p for p in points if p.method in methods])]
    if not any(r["win_rate"] and r["lm_acc"] for r in rows):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.8), sharex=True, sharey=True,
                             squeeze=False)
    for ax, method in zip(axes[0], methods):
        _scatter(ax, rows, method, colors[method], baseline_acc, label_betas=True)
        ax.set_title(method, color=colors[method])
        ax.set_xlabel(f"{win_label} vs SFT (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel("LM accuracy (%)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ablation_figure(points: list[CheckpointResult], path: Path, baseline_acc: float | None,
                    colors: dict[str, str], win_label: str = "win-rate") -> Path | None:
    rows = ablation_rows(points)
    if not rows:
        return None
    methods = sorted({r["method"] for r in rows}, key=method_order)
    several_betas = len({r["beta"] for r in rows}) > 1
    plt = _pyplot()
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(10, 4))
    for method in methods:
        for beta in sorted({r["beta"] for r in rows if r["method"] == method}):
            line = sorted((r for r in rows if r["method"] == method and r["beta"] == beta and r["win_rate"]
                           and r["lm_acc"]), key=lambda r: r["epoch"])
            if not line:
                continue
            xs, ys = [r["win_rate"].mean for r in line], [r["lm_acc"].mean * 100 for r in line]
            label = f"{method} β={beta:g}" if several_betas else method
            default = method in OBJECTIVE_LABELS.values()  # dashed and hollow, drawn on top: an
            # ablation that trains identically (e.g. no normalization with the aux term) stays visible
            ax.plot(xs, ys, "--o" if default else "-o", color=colors[method], label=label, markersize=7 if default else 5,
                    markerfacecolor="none" if default else colors[method], zorder=5 if default else 3)
            for r, x, y in zip(line, xs, ys):
                ax.annotate(f"{r['epoch']:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if baseline_acc is not None:
        ax.scatter([50.0], [baseline_acc * 100], marker="*", color="black", s=90, label="SFT model", zorder=4)
    ax.set_xlabel(f"{win_label} vs SFT (%)")
    ax.set_ylabel("LM accuracy (%)")
    ax.set_title("ablations: epochs connected (numbers = epoch)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    final = {}
    for r in rows:  # per method: its last epoch (at its smallest beta when there are several)
        best = final.get(r["method"])
        if best is None or (r["beta"], -r["epoch"]) < (best["beta"], -best["epoch"]):
            final[r["method"]] = r
    width = 0.38
    for i, method in enumerate(methods):
        r = final[method]
        win = r["win_rate"].mean if r["win_rate"] else 0.0
        acc = r["lm_acc"].mean * 100 if r["lm_acc"] else 0.0
        bars.bar(i - width / 2, win, width, color=colors[method], label="win-rate" if i == 0 else None)
        bars.bar(i + width / 2, acc, width, color=colors[method], alpha=0.45, hatch="//",
                 label="LM accuracy" if i == 0 else None)
    bars.set_xticks(range(len(methods)))
    bars.set_xticklabels(methods, rotation=20, ha="right", fontsize=7)
    bars.set_ylabel("% (final epoch)")
    bars.set_title(f"final epoch: {win_label} (solid) and LM accuracy (hatched)", fontsize=9)
    bars.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sensitivity_figure(points: list[CheckpointResult], path: Path, colors: dict[str, str],
                       win_label: str = "win-rate") -> Path | None:
    """Final-epoch win-rate, LM accuracy and validation reward accuracy against beta (log axis),
    seed mean with a bar of one standard deviation over seeds."""
    methods = multi_beta_methods(points)
    rows = seed_spread([p for p in points if p.method in methods])
    if not rows:
        return None
    plt = _pyplot()
    panels = (("win_rate", f"{win_label} vs SFT (%)", 1.0), ("lm_acc", "LM accuracy (%)", 100.0),
              ("reward_accuracy", "validation reward accuracy (%)", 100.0))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label, scale) in zip(axes, panels):
        for method in methods:
            line = sorted((r for r in rows if r["method"] == method and r[key] is not None), key=lambda r: r["beta"])
            if not line:
                continue
            xs = [r["beta"] for r in line]
            ys = [r[key].mean * scale for r in line]
            errs = [(r[key].std or 0.0) * scale for r in line]
            ax.errorbar(xs, ys, yerr=errs, fmt="-o", color=colors[method], label=method, capsize=3, markersize=4)
        ax.set_xscale("log")
        ax.set_xlabel("β (log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("β sensitivity at the final epoch (bars: ±1 std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def curves_figure(curves: list[RunCurves], path: Path) -> Path | None:
    """Per method: training loss by step (top) and validation reward accuracy by step (bottom), one
    line per run, coloured by beta."""
    main = [c for c in curves if " (" not in c.method and c.train]
    if not main:
        return None
    methods = [m for m in OBJECTIVE_LABELS.values() if any(c.method == m for c in main)]
    plt = _pyplot()
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(2, len(methods), figsize=(4.2 * len(methods), 6), squeeze=False)
    for col, method in enumerate(methods):
        mine = [c for c in main if c.method == method]
        betas = sorted({c.beta for c in mine})
        for c in mine:
            color = cmap(betas.index(c.beta) / max(1, len(betas) - 1))
            first_seed = c.seed == min(x.seed for x in mine if x.beta == c.beta)
            axes[0][col].plot([r["step"] for r in c.train], [r["loss"] for r in c.train], color=color, linewidth=0.8,
                              alpha=0.8, label=f"β={c.beta:g}" if first_seed else None)
            axes[1][col].plot([r["step"] for r in c.evals], [r["eval_rewards/accuracies"] * 100 for r in c.evals],
                              "-o", color=color, linewidth=0.8, markersize=3, alpha=0.8)
        axes[0][col].set_title(method)
        axes[0][col].set_ylabel("training loss")
        axes[0][col].legend(fontsize=7)
        axes[1][col].set_ylabel("validation reward accuracy (%)")
        axes[1][col].set_xlabel("optimizer step")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Markdown


def _num(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value * scale:.{digits}f}"


def _pm(cell: Cell | None, scale: float = 1.0, digits: int = 1) -> str:
    if cell is None:
        return "n/a"
    text = _num(cell.mean, scale, digits)
    return text + (f" ± {_num(cell.std, scale, digits)}" if cell.std is not None else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _sensitivity_sentence(sensitivity: list[dict]) -> list[str]:
    """One computed sentence per method: the final-epoch spread across beta next to the seed noise."""
    lines = []
    final: dict[str, dict] = {}
    for row in sensitivity:
        if row["method"] not in final or row["epoch"] > final[row["method"]]["epoch"]:
            final[row["method"]] = row
    for method, row in final.items():
        noise = row["win_rate_seed_std"]
        lines.append(f"- {method}, epoch {row['epoch']:g}: win-rate spread across β = {_num(row['win_rate_spread'])} "
                     f"points (seed std {_num(noise)}), LM-accuracy spread = {_num(row['lm_acc_spread'], 100, 2)} points "
                     f"(seed std {_num(row['lm_acc_seed_std'], 100, 2)}).")
    return lines


def markdown_report(results: SweepResults, figures: dict[str, Path | None], command: str | None,
                    notes: str | None) -> tuple[str, dict]:
    points = results.checkpoints
    win_label = "LC win-rate" if results.length_controlled else "win-rate"
    tables = pareto_tables(points)
    sensitivity = beta_sensitivity(points)
    seeds = seed_spread(points)
    ablations = ablation_rows(points)
    lines = [f"# Study report: {results.name}", ""]
    if command:
        lines += ["Reproduce:", "", "```bash", command, "```", ""]
    lines += [f"{len({p.run for p in points})} runs, {len(points)} evaluated checkpoints, read from "
              f"`{results.sweep_dir}`. *LM accuracy*: lm-evaluation-harness average accuracy (%). "
              f"*{win_label}*: against the starting (SFT) model (%), "
              + ("length-controlled." if results.length_controlled else "raw (no length-controlled value in the results).")
              + " Values are means over seeds (± standard deviation when there are several)."]
    if results.baseline_lm_acc is not None:
        lines.append(f"The SFT model's LM accuracy: {_num(results.baseline_lm_acc, 100, 2)}%.")
    if results.wall_minutes is not None:
        lines.append(f"Sweep wall time: {results.wall_minutes:.0f} min (first to last entry of `events.jsonl`, "
                     "training and evaluation; a pause between a kill and its resume counts too).")
    if results.missing:
        lines.append(f"Runs without evaluated checkpoints yet: {', '.join(results.missing)}.")
    lines.append("")
    if notes:
        lines += [notes.strip(), ""]

    lines += ["## Table 1: win-rate at the checkpoint of peak LM accuracy (over all β and epochs)", ""]
    raw = ["raw win-rate"] if results.length_controlled else []
    lines += _table(["method", "peak LM acc", win_label, *raw, "β", "epoch", "seeds"],
                    [[r["method"], _num(r["lm_acc"], 100, 2), _num(r["win_rate"]) + (f" ± {_num(r['win_rate_std'])}"
                      if r["win_rate_std"] is not None else ""), *([_num(r["win_rate_raw"])] if raw else []),
                      f"{r['beta']:g}", f"{r['epoch']:g}", str(r["seeds"])]
                     for r in tables["peak_lm_acc"]])
    lines += ["", "## Table 2: LM accuracy at the checkpoint of peak win-rate (over all β and epochs)", ""]
    lines += _table(["method", f"peak {win_label}", *raw, "LM acc", "β", "epoch", "seeds"],
                    [[r["method"], _num(r["win_rate"]), *([_num(r["win_rate_raw"])] if raw else []),
                      _num(r["lm_acc"], 100, 2) + (f" ± {_num(r['lm_acc_std'], 100, 2)}" if r["lm_acc_std"] is not None
                                                   else ""), f"{r['beta']:g}", f"{r['epoch']:g}", str(r["seeds"])]
                     for r in tables["peak_win_rate"]])
    lines += ["", "Peaks are taken over the seed means of every (β, epoch); a tie goes to the smallest β, then the "
              "earliest epoch. ± is the standard deviation over seeds at that setting."]
    if figures.get("scatter"):
        lines += ["", "## Win-rate vs LM accuracy per β and epoch", "",
                  f"![win-rate vs LM accuracy]({figures['scatter'].name})"]
        if figures.get("scatter_raw"):
            lines += ["", f"The same with the raw win-rate: ![raw win-rate vs LM accuracy]({figures['scatter_raw'].name})"]
    lines += ["", "## β sensitivity", "",
              "Spread = max − min over β of the seed-mean value; seed std = the mean over β of the standard "
              "deviation across seeds (the noise floor a spread should be compared with).", ""]
    lines += _sensitivity_sentence(sensitivity) + [""]
    lines += _table(["method", "epoch", f"{win_label} spread", "seed std", "LM acc spread", "seed std",
                     "reward acc spread", "seed std"],
                    [[r["method"], f"{r['epoch']:g}", _num(r["win_rate_spread"]), _num(r["win_rate_seed_std"]),
                      _num(r["lm_acc_spread"], 100, 2), _num(r["lm_acc_seed_std"], 100, 2),
                      _num(r["reward_accuracy_spread"], 100), _num(r["reward_accuracy_seed_std"], 100)]
                     for r in sensitivity])
    if figures.get("sensitivity"):
        lines += ["", f"![beta sensitivity]({figures['sensitivity'].name})"]
    if ablations:
        lines += ["", "## Ablations", ""]
        lines += _table(["method", "β", "epoch", win_label, "LM acc", "reward acc", "seeds"],
                        [[r["method"], f"{r['beta']:g}", f"{r['epoch']:g}", _pm(r["win_rate"]), _pm(r["lm_acc"], 100, 2),
                          _pm(r["reward_accuracy"], 100), str(len(r["seeds"]))] for r in ablations])
        if figures.get("ablation"):
            lines += ["", f"![ablations]({figures['ablation'].name})"]
    lines += ["", "## Seed spread (final epoch)", ""]
    raw_column = ["raw win-rate"] if results.length_controlled else []
    lines += _table(["method", "β", "seeds", win_label, f"{win_label} min–max", *raw_column, "LM acc", "reward acc"],
                    [[r["method"], f"{r['beta']:g}", str(len(r["seeds"])), _pm(r["win_rate"]),
                      (f"{_num(min(r['win_rate'].values))}–{_num(max(r['win_rate'].values))}" if r["win_rate"] else "n/a"),
                      *([_pm(r["win_rate_raw"])] if raw_column else []),
                      _pm(r["lm_acc"], 100, 2), _pm(r["reward_accuracy"], 100)] for r in seeds])
    if results.tuning:
        lines += ["", "## Hyper-parameter selection (validation reward accuracy, stage by stage)", ""]
        rows = []
        for stage in results.tuning:
            chosen = stage.get("selected")
            for c in stage["candidates"]:
                values = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in c["values"].items())
                mark = "**selected**" if chosen is not None and c["values"] == chosen else ""
                rows.append([str(stage["stage"]), OBJECTIVE_LABELS.get(stage["objective"], stage["objective"]), values,
                             _num(c["reward_accuracy"], 100), mark])
        lines += _table(["stage", "objective", "candidate", "val. reward acc", ""], rows)
    if figures.get("curves"):
        lines += ["", "## Training curves", "", f"![training curves]({figures['curves'].name})"]
    lines += ["", "## All checkpoints", "", "Every evaluated checkpoint, with the file its numbers come from: "
              "[`checkpoints.csv`](checkpoints.csv)."]
    data = {"pareto": _jsonable(tables), "beta_sensitivity": sensitivity, "seed_spread": _jsonable(seeds),
            "ablations": _jsonable(ablations), "tuning": results.tuning, "baseline_lm_acc": results.baseline_lm_acc,
            "win_rate_metric": "length_controlled_winrate" if results.length_controlled else "win_rate"}
    return "\n".join(lines) + "\n", data


def _jsonable(value: Any) -> Any:
    if isinstance(value, Cell):
        return asdict(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


HTML_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3}}img{{max-width:100%}}pre{{background:#f6f6f6;padding:.6em;overflow-x:auto}}</style>
</head><body>
{body}
</body></html>
"""


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, *, command: str | None = None,
                 notes: str | None = None) -> Path:
    """Write report.md, report.html, report.json, checkpoints.csv and the figures; returns report.md."""
    from markdown_it import MarkdownIt

    results = collect(sweep_dir)
    out = Path(out_dir) if out_dir else Path(sweep_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    points = results.checkpoints
    mains = main_methods(points)
    colors = method_colors(points)
    win_label = "LC win-rate" if results.length_controlled else "win-rate"
    figures = {
        "scatter": scatter_figure(points, mains, out / "winrate_vs_lm_accuracy.png", results.baseline_lm_acc,
                                  "seed means; markers = β, lines join a β's epochs (numbers = epoch)", colors,
                                  win_label),
        "sensitivity": sensitivity_figure(points, out / "beta_sensitivity.png", colors, win_label),
        "ablation": ablation_figure(points, out / "ablations.png", results.baseline_lm_acc, colors, win_label),
        "curves": curves_figure(results.curves, out / "training_curves.png"),
    }
    if results.length_controlled:  # the raw win-rate too: length control can remove a real effect
        raw_points = [replace(p, win_rate=p.win_rate_raw) for p in points]
        figures["scatter_raw"] = scatter_figure(raw_points, mains, out / "raw_winrate_vs_lm_accuracy.png",
                                                results.baseline_lm_acc, "as above, raw win-rate", colors,
                                                "raw win-rate")
    text, data = markdown_report(results, figures, command, notes)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(data, indent=1))
    html = MarkdownIt("commonmark").enable("table").render(text)
    (out / "report.html").write_text(HTML_PAGE.format(title=f"Study report: {results.name}", body=html))
    with open(out / "checkpoints.csv", "w", newline="") as handle:
        fields = list(CheckpointResult.__dataclass_fields__)
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for p in points:
            row = asdict(p)
            row["results_file"] = _relative(Path(p.results_file), Path(sweep_dir))
            writer.writerow(row)
    return out / "report.md"


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def command(argv: list[str], say: Callable[[Any], Any] = print) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="mmpo report", description=(
        "Markdown + HTML report of a sweep folder: the Pareto tables (win-rate at peak LM accuracy, LM accuracy "
        "at peak win-rate), win-rate vs LM accuracy scatter, beta sensitivity, ablations, seed spread, "
        "hyper-parameter selection and training curves. Every number is read from the sweep's result files."))
    parser.add_argument("sweep_dir")
    parser.add_argument("--out", help="output folder (default: <sweep>/report)")
    parser.add_argument("--command", help="the command that reproduces the sweep, shown at the top")
    parser.add_argument("--notes", help="a Markdown file inserted under the header (interpretation, caveats)")
    args = parser.parse_args(argv)
    notes = Path(args.notes).read_text() if args.notes else None
    command_text = args.command or (f"mmpo sweep --config {Path(args.sweep_dir) / 'sweep.yaml'}\n"
                                    f"mmpo report {args.sweep_dir}")
    path = write_report(args.sweep_dir, args.out, command=command_text, notes=notes)
    say(f"report: {path} (and report.html, report.json, checkpoints.csv, PNG figures in {path.parent})")
    return 0
