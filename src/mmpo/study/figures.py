"""The study's figures (matplotlib, written as PNG): win-rate vs LM accuracy, beta sensitivity,
ablations and training curves. Each returns its path, or None when there is nothing to draw."""

from __future__ import annotations

from pathlib import Path

from mmpo.study.results import (
    OBJECTIVE_LABELS,
    CheckpointResult,
    RunCurves,
    ablation_rows,
    method_order,
    multi_beta_methods,
    seed_means,
    seed_spread,
)

METHOD_COLORS = {"MMPO": "tab:blue", "DPO": "tab:orange", "SimPO": "tab:green"}
EXTRA_COLORS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
BETA_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")


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


def _scatter(
    ax,
    rows: list[dict],
    method: str,
    color: str,
    baseline_acc: float | None,
    label_betas: bool,
    baseline_x: float = 50.0,
) -> None:
    betas = sorted({r["beta"] for r in rows if r["method"] == method})
    for i, beta in enumerate(betas):
        line = [
            r
            for r in rows
            if r["method"] == method and r["beta"] == beta and r["win_rate"] is not None and r["lm_acc"] is not None
        ]
        line.sort(key=lambda r: r["epoch"])
        if not line:
            continue
        xs, ys = [r["win_rate"].mean for r in line], [r["lm_acc"].mean * 100 for r in line]
        ax.plot(xs, ys, "-", color=color, alpha=0.5, linewidth=1)
        ax.scatter(
            xs,
            ys,
            color=color,
            marker=BETA_MARKERS[i % len(BETA_MARKERS)],
            s=40,
            label=f"β={beta:g}" if label_betas else None,
            zorder=3,
            edgecolors="black",
            linewidths=0.4,
        )
        for r, x, y in zip(line, xs, ys):
            ax.annotate(f"{r['epoch']:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if baseline_acc is not None:
        ax.scatter([baseline_x], [baseline_acc * 100], marker="*", color="black", s=90, zorder=4, label="SFT model")


def scatter_figure(
    points: list[CheckpointResult],
    methods: list[str],
    path: Path,
    baseline_acc: float | None,
    title: str,
    colors: dict[str, str],
    win_label: str = "win-rate",
    x_label: str | None = None,
    baseline_x: float = 50.0,
) -> Path | None:
    """Win-rate (x) vs LM accuracy (y), one panel per method: one colour per method, one marker
    per beta, a beta's epochs connected (each point's epoch written next to it). Another x metric
    can be put in ``win_rate`` with its ``x_label`` and the starting model's value ``baseline_x``."""
    rows = [r for r in seed_means([p for p in points if p.method in methods])]
    if not any(r["win_rate"] and r["lm_acc"] for r in rows):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(methods), figsize=(4.2 * len(methods), 3.8), sharex=True, sharey=True, squeeze=False
    )
    for ax, method in zip(axes[0], methods):
        _scatter(ax, rows, method, colors[method], baseline_acc, label_betas=True, baseline_x=baseline_x)
        ax.set_title(method, color=colors[method])
        ax.set_xlabel(x_label or f"{win_label} vs SFT (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel("LM accuracy (%)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ablation_figure(
    points: list[CheckpointResult],
    path: Path,
    baseline_acc: float | None,
    colors: dict[str, str],
    win_label: str = "win-rate",
) -> Path | None:
    rows = ablation_rows(points)
    if not rows:
        return None
    methods = sorted({r["method"] for r in rows}, key=method_order)
    several_betas = len({r["beta"] for r in rows}) > 1
    plt = _pyplot()
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(10, 4))
    for method in methods:
        for beta in sorted({r["beta"] for r in rows if r["method"] == method}):
            line = sorted(
                (r for r in rows if r["method"] == method and r["beta"] == beta and r["win_rate"] and r["lm_acc"]),
                key=lambda r: r["epoch"],
            )
            if not line:
                continue
            xs, ys = [r["win_rate"].mean for r in line], [r["lm_acc"].mean * 100 for r in line]
            label = f"{method} β={beta:g}" if several_betas else method
            default = method in OBJECTIVE_LABELS.values()  # dashed and hollow, drawn on top: an
            # ablation that trains identically (e.g. no normalization with the aux term) stays visible
            ax.plot(
                xs,
                ys,
                "--o" if default else "-o",
                color=colors[method],
                label=label,
                markersize=7 if default else 5,
                markerfacecolor="none" if default else colors[method],
                zorder=5 if default else 3,
            )
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
        bars.bar(
            i + width / 2,
            acc,
            width,
            color=colors[method],
            alpha=0.45,
            hatch="//",
            label="LM accuracy" if i == 0 else None,
        )
    bars.set_xticks(range(len(methods)))
    bars.set_xticklabels(methods, rotation=20, ha="right", fontsize=7)
    bars.set_ylabel("% (final epoch)")
    bars.set_title(f"final epoch: {win_label} (solid) and LM accuracy (hatched)", fontsize=9)
    bars.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sensitivity_figure(
    points: list[CheckpointResult], path: Path, colors: dict[str, str], win_label: str = "win-rate"
) -> Path | None:
    """Final-epoch win-rate, LM accuracy and validation reward accuracy against beta (log axis),
    seed mean with a bar of one standard deviation over seeds."""
    methods = multi_beta_methods(points)
    rows = seed_spread([p for p in points if p.method in methods])
    if not rows:
        return None
    plt = _pyplot()
    panels = (
        ("win_rate", f"{win_label} vs SFT (%)", 1.0),
        ("lm_acc", "LM accuracy (%)", 100.0),
        ("reward_accuracy", "validation reward accuracy (%)", 100.0),
    )
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
            axes[0][col].plot(
                [r["step"] for r in c.train],
                [r["loss"] for r in c.train],
                color=color,
                linewidth=0.8,
                alpha=0.8,
                label=f"β={c.beta:g}" if first_seed else None,
            )
            axes[1][col].plot(
                [r["step"] for r in c.evals],
                [r["eval_rewards/accuracies"] * 100 for r in c.evals],
                "-o",
                color=color,
                linewidth=0.8,
                markersize=3,
                alpha=0.8,
            )
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
