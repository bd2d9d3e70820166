"""The study report as files: Markdown (with the tables), HTML, JSON (every table's numbers),
a CSV of every evaluated checkpoint, and the figures beside them."""

from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from mmpo.study.figures import ablation_figure, curves_figure, method_colors, scatter_figure, sensitivity_figure
from mmpo.study.results import (
    OBJECTIVE_LABELS,
    Cell,
    CheckpointResult,
    SweepResults,
    ablation_rows,
    beta_sensitivity,
    collect,
    main_methods,
    pareto_tables,
    seed_means,
    seed_spread,
)


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
        lines.append(
            f"- {method}, epoch {row['epoch']:g}: win-rate spread across β = {_num(row['win_rate_spread'])} "
            f"points (seed std {_num(noise)}), LM-accuracy spread = {_num(row['lm_acc_spread'], 100, 2)} points "
            f"(seed std {_num(row['lm_acc_seed_std'], 100, 2)})."
        )
    return lines


def markdown_report(
    results: SweepResults, figures: dict[str, Path | None], command: str | None, notes: str | None
) -> tuple[str, dict]:
    points = results.checkpoints
    win_label = "LC win-rate" if results.length_controlled else "win-rate"
    tables = pareto_tables(points)
    sensitivity = beta_sensitivity(points)
    seeds = seed_spread(points)
    ablations = ablation_rows(points)
    lines = [f"# Study report: {results.name}", ""]
    if command:
        lines += ["Reproduce:", "", "```bash", command, "```", ""]
    lines += [
        f"{len({p.run for p in points})} runs, {len(points)} evaluated checkpoints, read from "
        f"`{results.sweep_dir}`. *LM accuracy*: lm-evaluation-harness average accuracy (%). "
        f"*{win_label}*: against the starting (SFT) model (%), "
        + ("length-controlled." if results.length_controlled else "raw (no length-controlled value in the results).")
        + " Values are means over seeds (± standard deviation when there are several)."
    ]
    if results.baseline_lm_acc is not None:
        lines.append(f"The SFT model's LM accuracy: {_num(results.baseline_lm_acc, 100, 2)}%.")
    if results.baseline_task_accuracy is not None:
        lines.append(f"The starting model's task accuracy: {_num(results.baseline_task_accuracy, 100)}%.")
    if results.wall_minutes is not None:
        lines.append(
            f"Sweep wall time: {results.wall_minutes:.0f} min (first to last entry of `events.jsonl`, "
            "training and evaluation; a pause between a kill and its resume counts too)."
        )
    if results.missing:
        lines.append(f"Runs without evaluated checkpoints yet: {', '.join(results.missing)}.")
    lines.append("")
    if notes:
        lines += [notes.strip(), ""]

    settings = seed_means(points)
    if any(r["task_accuracy"] for r in settings):
        lines += _task_accuracy_table(settings, results.baseline_task_accuracy, win_label) + [""]
        if figures.get("scatter_task"):
            lines += [f"![task accuracy vs LM accuracy]({figures['scatter_task'].name})", ""]
    lines += ["## Table 1: win-rate at the checkpoint of peak LM accuracy (over all β and epochs)", ""]
    raw = ["raw win-rate"] if results.length_controlled else []
    lines += _table(
        ["method", "peak LM acc", win_label, *raw, "β", "epoch", "seeds"],
        [
            [
                r["method"],
                _num(r["lm_acc"], 100, 2),
                _num(r["win_rate"]) + (f" ± {_num(r['win_rate_std'])}" if r["win_rate_std"] is not None else ""),
                *([_num(r["win_rate_raw"])] if raw else []),
                f"{r['beta']:g}",
                f"{r['epoch']:g}",
                str(r["seeds"]),
            ]
            for r in tables["peak_lm_acc"]
        ],
    )
    lines += ["", "## Table 2: LM accuracy at the checkpoint of peak win-rate (over all β and epochs)", ""]
    lines += _table(
        ["method", f"peak {win_label}", *raw, "LM acc", "β", "epoch", "seeds"],
        [
            [
                r["method"],
                _num(r["win_rate"]),
                *([_num(r["win_rate_raw"])] if raw else []),
                _num(r["lm_acc"], 100, 2)
                + (f" ± {_num(r['lm_acc_std'], 100, 2)}" if r["lm_acc_std"] is not None else ""),
                f"{r['beta']:g}",
                f"{r['epoch']:g}",
                str(r["seeds"]),
            ]
            for r in tables["peak_win_rate"]
        ],
    )
    lines += [
        "",
        (
            "Peaks are taken over the seed means of every (β, epoch); a tie goes to the smallest β, then the "
            "earliest epoch. ± is the standard deviation over seeds at that setting."
        ),
    ]
    if figures.get("scatter"):
        lines += [
            "",
            "## Win-rate vs LM accuracy per β and epoch",
            "",
            f"![win-rate vs LM accuracy]({figures['scatter'].name})",
        ]
        if figures.get("scatter_raw"):
            lines += [
                "",
                f"The same with the raw win-rate: ![raw win-rate vs LM accuracy]({figures['scatter_raw'].name})",
            ]
    lines += [
        "",
        "## β sensitivity",
        "",
        (
            "Spread = max − min over β of the seed-mean value; seed std = the mean over β of the standard "
            "deviation across seeds (the noise floor a spread should be compared with)."
        ),
        "",
    ]
    lines += _sensitivity_sentence(sensitivity) + [""]
    lines += _table(
        [
            "method",
            "epoch",
            f"{win_label} spread",
            "seed std",
            "LM acc spread",
            "seed std",
            "reward acc spread",
            "seed std",
        ],
        [
            [
                r["method"],
                f"{r['epoch']:g}",
                _num(r["win_rate_spread"]),
                _num(r["win_rate_seed_std"]),
                _num(r["lm_acc_spread"], 100, 2),
                _num(r["lm_acc_seed_std"], 100, 2),
                _num(r["reward_accuracy_spread"], 100),
                _num(r["reward_accuracy_seed_std"], 100),
            ]
            for r in sensitivity
        ],
    )
    if figures.get("sensitivity"):
        lines += ["", f"![beta sensitivity]({figures['sensitivity'].name})"]
    if ablations:
        lines += ["", "## Ablations", ""]
        lines += _table(
            ["method", "β", "epoch", win_label, "LM acc", "reward acc", "seeds"],
            [
                [
                    r["method"],
                    f"{r['beta']:g}",
                    f"{r['epoch']:g}",
                    _pm(r["win_rate"]),
                    _pm(r["lm_acc"], 100, 2),
                    _pm(r["reward_accuracy"], 100),
                    str(len(r["seeds"])),
                ]
                for r in ablations
            ],
        )
        if figures.get("ablation"):
            lines += ["", f"![ablations]({figures['ablation'].name})"]
    lines += ["", "## Seed spread (final epoch)", ""]
    raw_column = ["raw win-rate"] if results.length_controlled else []
    lines += _table(
        ["method", "β", "seeds", win_label, f"{win_label} min–max", *raw_column, "LM acc", "reward acc"],
        [
            [
                r["method"],
                f"{r['beta']:g}",
                str(len(r["seeds"])),
                _pm(r["win_rate"]),
                (f"{_num(min(r['win_rate'].values))}–{_num(max(r['win_rate'].values))}" if r["win_rate"] else "n/a"),
                *([_pm(r["win_rate_raw"])] if raw_column else []),
                _pm(r["lm_acc"], 100, 2),
                _pm(r["reward_accuracy"], 100),
            ]
            for r in seeds
        ],
    )
    if results.tuning:
        lines += ["", "## Hyper-parameter selection (validation reward accuracy, stage by stage)", ""]
        rows = []
        for stage in results.tuning:
            chosen = stage.get("selected")
            for c in stage["candidates"]:
                values = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in c["values"].items())
                mark = "**selected**" if chosen is not None and c["values"] == chosen else ""
                rows.append(
                    [
                        str(stage["stage"]),
                        OBJECTIVE_LABELS.get(stage["objective"], stage["objective"]),
                        values,
                        _num(c["reward_accuracy"], 100),
                        mark,
                    ]
                )
        lines += _table(["stage", "objective", "candidate", "val. reward acc", ""], rows)
    if figures.get("curves"):
        lines += ["", "## Training curves", "", f"![training curves]({figures['curves'].name})"]
    lines += [
        "",
        "## All checkpoints",
        "",
        ("Every evaluated checkpoint, with the file its numbers come from: [`checkpoints.csv`](checkpoints.csv)."),
    ]
    data = {
        "settings": _jsonable(settings),
        "baseline_task_accuracy": results.baseline_task_accuracy,
        "pareto": _jsonable(tables),
        "beta_sensitivity": sensitivity,
        "seed_spread": _jsonable(seeds),
        "ablations": _jsonable(ablations),
        "tuning": results.tuning,
        "baseline_lm_acc": results.baseline_lm_acc,
        "win_rate_metric": "length_controlled_winrate" if results.length_controlled else "win_rate",
    }
    return "\n".join(lines) + "\n", data


def _task_accuracy_table(settings: list[dict], baseline: float | None, win_label: str) -> list[str]:
    """Every (method, β, epoch): task accuracy first (what a verifier-graded study is about), then the rest."""
    lines = [
        "## Task accuracy, win-rate, retention and reward accuracy at every setting",
        "",
        (
            "*Task accuracy*: the share of greedy answers to the held-out prompts that the prompts' verifiers score "
            "right (%)"
            + (f"; the starting model: {_num(baseline, 100)}%" if baseline is not None else "")
            + f". *{win_label}*: by the programmatic judge against the starting model (%)."
        ),
        "",
    ]
    lines += _table(
        ["method", "β", "epoch", "task acc", win_label, "LM acc", "reward acc", "seeds"],
        [
            [
                r["method"],
                f"{r['beta']:g}",
                f"{r['epoch']:g}",
                _pm(r["task_accuracy"], 100),
                _pm(r["win_rate"]),
                _pm(r["lm_acc"], 100, 2),
                _pm(r["reward_accuracy"], 100),
                str(len(r["seeds"])),
            ]
            for r in settings
        ],
    )
    return lines


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


def write_report(
    sweep_dir: str | Path, out_dir: str | Path | None = None, *, command: str | None = None, notes: str | None = None
) -> Path:
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
        "scatter": scatter_figure(
            points,
            mains,
            out / "winrate_vs_lm_accuracy.png",
            results.baseline_lm_acc,
            "seed means; markers = β, lines join a β's epochs (numbers = epoch)",
            colors,
            win_label,
        ),
        "sensitivity": sensitivity_figure(points, out / "beta_sensitivity.png", colors, win_label),
        "ablation": ablation_figure(points, out / "ablations.png", results.baseline_lm_acc, colors, win_label),
        "curves": curves_figure(results.curves, out / "training_curves.png"),
    }
    if results.length_controlled:  # the raw win-rate too: length control can remove a real effect
        raw_points = [replace(p, win_rate=p.win_rate_raw) for p in points]
        figures["scatter_raw"] = scatter_figure(
            raw_points,
            mains,
            out / "raw_winrate_vs_lm_accuracy.png",
            results.baseline_lm_acc,
            "as above, raw win-rate",
            colors,
            "raw win-rate",
        )
    if any(p.task_accuracy is not None for p in points):
        task_points = [
            replace(p, win_rate=p.task_accuracy * 100 if p.task_accuracy is not None else None) for p in points
        ]
        base = results.baseline_task_accuracy
        figures["scatter_task"] = scatter_figure(
            task_points,
            mains,
            out / "task_accuracy_vs_lm_accuracy.png",
            results.baseline_lm_acc,
            "task accuracy of greedy answers on held-out prompts; seed means, lines join a β's epochs",
            colors,
            x_label="task accuracy (%)",
            baseline_x=base * 100 if base is not None else 50.0,
        )
    text, data = markdown_report(results, figures, command, notes)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(data, indent=1))
    body = MarkdownIt("commonmark").enable("table").render(text)
    title = html.escape(f"Study report: {results.name}")
    (out / "report.html").write_text(HTML_PAGE.format(title=title, body=body))
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
