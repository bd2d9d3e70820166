"""How far a planned run has got, read from its folder: nothing is recorded elsewhere, so a rerun
(or another machine) finds finished work by looking at the files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmpo.config import from_dict
from mmpo.evaluation.checkpoint_eval import EvalSettings
from mmpo.training import checkpoint
from mmpo.training.run_dir import METRICS_FILE, read_metrics

if TYPE_CHECKING:
    from mmpo.study.plan import PlannedRun

EVAL_PARTS = ("rewards", "winrate", "harness")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    return [p for p in checkpoint.list_checkpoints(run_dir) if checkpoint.verify(p, checksums=False) is None]


def epoch_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints to evaluate: every epoch checkpoint, plus the final one if it is a step checkpoint."""
    complete = complete_checkpoints(run_dir)
    chosen = [p for p in complete if p.name.startswith("epoch-")]
    if complete and complete[-1] not in chosen:
        state = checkpoint.read_trainer_state(complete[-1])
        if state.get("global_step") == total_steps(state):
            chosen.append(complete[-1])
    return chosen


def training_finished(run_dir: str | Path) -> bool:
    """True when the run wrote its summary and its newest complete checkpoint is the last step."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        return False
    complete = complete_checkpoints(run_dir)
    if not complete:
        return False
    state = checkpoint.read_trainer_state(complete[-1])
    return state.get("global_step", 0) >= (total_steps(state) or float("inf"))


def total_steps(state: dict) -> int | None:
    """The run's step count from a checkpoint's trainer state (HF layout: ``max_steps``; older: ``total_steps``)."""
    return state.get("max_steps", state.get("total_steps"))


def results_file(ckpt: Path) -> Path:
    """Where ``mmpo eval`` writes a checkpoint's results."""
    return ckpt / "eval" / "results.json"


def read_results(path: Path) -> dict:
    """A results.json, or {} when it is missing or was cut short by a kill (then it is redone)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def eval_settings(values: dict[str, Any]) -> EvalSettings:
    return from_dict(EvalSettings, values, source="eval")


def missing_eval_parts(results: dict, settings: EvalSettings) -> list[str]:
    wanted = {"rewards": settings.rewards, "winrate": settings.winrate, "harness": bool(settings.harness)}
    return [name for name in EVAL_PARTS if wanted[name] and name not in results]


def validation_reward_accuracy(run_dir: str | Path) -> float | None:
    """The run's last validation reward accuracy in metrics.jsonl (what tuning selects by)."""
    evals = [r for r in read_metrics(Path(run_dir) / METRICS_FILE) if "eval_rewards/accuracies" in r]
    return evals[-1]["eval_rewards/accuracies"] if evals else None


def baseline_dir(run: PlannedRun, sweep_dir: Path) -> Path:
    return sweep_dir / "baselines" / run.name


def baseline_missing(run: PlannedRun, sweep_dir: Path) -> bool:
    """A baseline entry lacks its harness results (its generations are made on demand)."""
    if not eval_settings(run.eval_settings).harness:
        return False
    return "harness" not in read_results(baseline_dir(run, sweep_dir) / "results.json")


def run_status(run: PlannedRun, sweep_dir: Path) -> str:
    """``done``, ``evaluating`` (trained, evaluations missing), ``partial`` (started) or ``todo``."""
    if run.kind == "baseline":
        return "todo" if baseline_missing(run, sweep_dir) else "done"
    run_dir = Path(run.config.output_dir)
    if not training_finished(run_dir):
        return "partial" if run_dir.exists() else "todo"
    if run.evaluate:
        settings = eval_settings(run.eval_settings)
        for ckpt in epoch_checkpoints(run_dir):
            if missing_eval_parts(read_results(results_file(ckpt)), settings):
                return "evaluating"
    return "done"
