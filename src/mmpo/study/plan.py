"""From a sweep config to the list of runs: grid expansion, run names, stage-wise tuning, plan files.

Every run is a folder ``<sweep>/runs/<name>/`` whose name spells out its settings, so the same
settings always map to the same folder: runs shared by two blocks are trained once, and a rerun
finds finished work by looking at the folders (:mod:`mmpo.study.status`).

Tuning (the paper's training protocol): stage k trains its candidates on top of the values
chosen in stages before it and selects by validation reward accuracy (the run's last evaluation
in ``metrics.jsonl``); the chosen values become the defaults of the experiment runs of that
objective (a block's own values win). Runs whose settings depend on an unfinished stage wait.

On a cluster, :func:`write_plan` lists one independent command per run (``commands.txt``); a
SLURM job array or Ray runs them (``examples/slurm``, ``examples/ray``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmpo.config import ConfigError, TrainConfig, apply_preset, from_dict, resolve, to_dict, with_values
from mmpo.evaluation.checkpoint_eval import EvalSettings
from mmpo.study.spec import OBJECTIVES, SweepConfig, block_objectives, sweep_to_dict
from mmpo.study.status import training_finished, validation_reward_accuracy
from mmpo.training.run_dir import atomic_write_text

# Files of a sweep folder (a run folder's own files are the engine's).
PLAN_FILE, COMMANDS_FILE, EVENTS_FILE, TUNING_FILE, SWEEP_FILE = (
    "plan.json",
    "commands.txt",
    "events.jsonl",
    "tuning.json",
    "sweep.yaml",
)
#: Settings that do not change what a run computes, so they never appear in its name.
NAME_NEUTRAL = {"output_dir", "resume", "progress", "cache_dir", "report_to", "logging_steps", "preset"}
#: Short names of settings in run folder names.
NAME_ALIASES = {
    "learning_rate": "lr",
    "chosen_reward": "epsw",
    "rejected_reward": "epsl",
    "length_normalize": "lnorm",
    "entropy_coef": "ent",
    "aux_loss": "aux",
    "normalize": "norm",
    "normalize_scope": "nscope",
    "per_device_batch_size": "bs",
    "gradient_accumulation_steps": "accum",
}


# --------------------------------------------------------------------------------------------
# Grid expansion and run names


def _values_for(value: Any, objective: str) -> list[Any] | None:
    """A grid entry's values for one objective (None: the entry does not apply to it)."""
    if isinstance(value, dict):
        if objective not in value:
            return None
        value = value[objective]
    return list(value) if isinstance(value, list) else [value]


def grid_combinations(grid: dict[str, Any], objective: str) -> list[dict[str, Any]]:
    keys, choices = [], []
    for key, value in grid.items():
        if key == "objective":
            continue
        values = _values_for(value, objective)
        if values is not None:
            keys.append(key)
            choices.append(values)
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(_format_value(v) for v in value)
    return str(value).replace("/", "_")


def build_run_config(
    sweep: SweepConfig, sweep_dir: Path, objective: str, values: dict[str, Any], where: str
) -> TrainConfig:
    """A resolved TrainConfig: preset < base < ``values``; named output_dir under ``runs/``.

    The sweep's values are recorded as set by the user, so the preset fills only the others, even
    where a sweep value equals the TrainConfig default (``mmpo.config.provenance``).
    """
    merged = {**sweep.base, **values, "objective": objective}
    merged.setdefault("cache_dir", str(sweep_dir / "cache" / "reference_logps"))
    merged.setdefault("progress", False)
    merged["resume"] = True
    cfg = resolve(apply_preset(from_dict(TrainConfig, merged, source=where)))
    return with_values(cfg, "sweep", output_dir=str(sweep_dir / "runs" / run_name(sweep, cfg)))


def run_name(sweep: SweepConfig, cfg: TrainConfig) -> str:
    """``<objective>-beta<b>-lr<lr>-seed<s>`` plus every other setting that differs from the base."""
    parts = [
        cfg.objective,
        f"beta{_format_value(cfg.beta)}",
        f"lr{_format_value(cfg.learning_rate)}",
        f"seed{cfg.seed}",
    ]
    base = {**sweep.base, "objective": cfg.objective}
    reference = to_dict(resolve(apply_preset(from_dict(TrainConfig, base, source="base"))))
    mine = to_dict(cfg)
    for key in sorted(mine):
        if key in NAME_NEUTRAL or key in ("objective", "beta", "learning_rate", "seed"):
            continue
        if mine[key] != reference.get(key):
            parts.append(f"{NAME_ALIASES.get(key, key)}{_format_value(mine[key])}")
    return "-".join(parts)


# --------------------------------------------------------------------------------------------
# The plan


@dataclass
class PlannedRun:
    """One unit of work: a training run (then its evaluations), or a starting model's evaluation."""

    name: str
    config: TrainConfig | None  # None for a baseline entry
    roles: list[dict[str, Any]]  # why it is in the sweep: tuning stage, experiment block/variant
    evaluate: bool
    eval_settings: dict[str, Any] | None = None
    kind: str = "train"  # "train" or "baseline"
    model: str | None = None  # the model a baseline entry evaluates
    provisional: bool = False  # dry runs only: settings still depend on unfinished tuning

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "roles": self.roles,
            "evaluate": self.evaluate,
            "config": to_dict(self.config) if self.config is not None else None,
            "eval": self.eval_settings,
            "model": self.model,
        }


@dataclass
class Plan:
    sweep_dir: Path
    runs: list[PlannedRun]
    waiting: list[str]
    tuning: list[dict[str, Any]]

    def find(self, name: str | None = None, index: int | None = None) -> PlannedRun:
        if index is not None:
            if not 0 <= index < len(self.runs):
                raise ConfigError(
                    f"run index {index} is outside the plan's {len(self.runs)} runs (0..{len(self.runs) - 1})"
                )
            return self.runs[index]
        for run in self.runs:
            if run.name == name:
                return run
        raise ConfigError(f"no run named {name!r} in {self.sweep_dir / PLAN_FILE}")


def eval_settings_for(sweep: SweepConfig, cfg: TrainConfig | None) -> EvalSettings:
    """The sweep's eval section; the baseline and reward split default to the run's model and eval data."""
    values = dict(sweep.eval or {})
    if cfg is not None:
        values.setdefault("baseline", cfg.model)
        if cfg.eval_dataset:
            values.setdefault("reward_dataset", list(cfg.eval_dataset))
    return from_dict(EvalSettings, values, source="eval")


class _PlanBuilder:
    def __init__(self, sweep: SweepConfig, sweep_dir: Path, provisional: bool):
        self.sweep, self.sweep_dir = sweep, sweep_dir
        self.provisional = provisional  # also plan runs that wait for tuning, with the values so far
        self.runs: dict[str, PlannedRun] = {}
        self.waiting: list[str] = []

    def add(self, cfg: TrainConfig, role: dict[str, Any], evaluate: bool, provisional: bool = False) -> None:
        name = Path(cfg.output_dir).name
        existing = self.runs.get(name)
        if existing is not None:
            if to_dict(existing.config) != to_dict(cfg):  # pragma: no cover - names spell out every difference
                raise ConfigError(f"two different runs would share the folder {name}")
            existing.roles.append(role)
            existing.provisional = existing.provisional and provisional
            if evaluate and not existing.evaluate:
                existing.evaluate = True
                existing.eval_settings = to_dict(eval_settings_for(self.sweep, cfg))
            return
        self.runs[name] = PlannedRun(
            name,
            cfg,
            [role],
            evaluate,
            to_dict(eval_settings_for(self.sweep, cfg)) if evaluate else None,
            provisional=provisional,
        )


def _tuning_plan(builder: _PlanBuilder) -> tuple[dict[str, dict[str, Any]], set[str], list[dict]]:
    """Plan the tuning stages; returns the selected values per objective, the objectives still
    tuning, and the record of each stage (candidates, accuracies, choice)."""
    sweep, tuning = builder.sweep, builder.sweep.tuning
    selected: dict[str, dict[str, Any]] = {o: {} for o in OBJECTIVES}
    unfinished: set[str] = set()
    records: list[dict] = []
    if tuning is None:
        return selected, unfinished, records
    for objective in tuning.objectives:
        for k, stage in enumerate(tuning.stages, 1):
            combos = grid_combinations(stage, objective)
            if combos == [{}]:
                continue  # this stage tunes nothing of this objective
            pending = objective in unfinished  # a dry run's look past an unfinished stage
            candidates = []
            for combo in combos:
                values = {**tuning.overrides, **selected[objective], **combo}
                cfg = build_run_config(sweep, builder.sweep_dir, objective, values, f"tuning stage {k} ({objective})")
                builder.add(
                    cfg,
                    {"kind": "tune", "stage": k, "objective": objective, "values": combo},
                    evaluate=False,
                    provisional=pending,
                )
                run_dir = Path(cfg.output_dir)
                accuracy = validation_reward_accuracy(run_dir) if training_finished(run_dir) else None
                candidates.append({"run": run_dir.name, "values": combo, "reward_accuracy": accuracy})
            if pending:
                continue
            record = {"stage": k, "objective": objective, "keys": sorted(combos[0]), "candidates": candidates}
            records.append(record)
            if any(c["reward_accuracy"] is None for c in candidates):
                unfinished.add(objective)
                builder.waiting.append(f"tuning stages after {k} of {objective} (waiting for stage {k})")
                if builder.provisional:
                    continue
                break
            best = max(candidates, key=lambda c: c["reward_accuracy"])  # first listed wins a tie
            record["selected"] = best["values"]
            selected[objective].update(best["values"])
    return selected, unfinished, records


def make_plan(sweep: SweepConfig, sweep_dir: str | Path | None = None, *, provisional: bool = False) -> Plan:
    """Every run that can be configured now (tuning results so far decide the experiment runs).

    ``provisional``: also list the runs that wait for tuning, with the values chosen so far and
    defaults for the rest (marked ``provisional``; a dry run's estimate of the whole sweep).
    """
    sweep_dir = Path(sweep_dir or sweep.output_dir)
    builder = _PlanBuilder(sweep, sweep_dir, provisional)
    selected, unfinished, records = _tuning_plan(builder)
    models = []
    for block in sweep.experiments:
        for objective in block_objectives(sweep, block):
            pending = objective in unfinished
            if pending:
                builder.waiting.append(f"experiments '{block.name}' of {objective} (waiting for its tuning)")
                if not provisional:
                    continue
            for combo in grid_combinations(block.grid, objective):
                for label, overrides in block.variants.items():
                    values = {**selected[objective], **combo, **overrides}
                    cfg = build_run_config(sweep, sweep_dir, objective, values, f"experiments '{block.name}'")
                    builder.add(
                        cfg,
                        {"kind": "experiment", "block": block.name, "variant": label, "objective": objective},
                        evaluate=sweep.eval is not None,
                        provisional=pending,
                    )
                    if cfg.model not in models:
                        models.append(cfg.model)
    runs = list(builder.runs.values())
    if sweep.evaluate_baseline and sweep.eval is not None:
        baselines = []
        for i, model in enumerate(models):
            settings = eval_settings_for(sweep, None)
            settings = dataclasses.replace(settings, baseline=sweep.eval.get("baseline", model))
            baselines.append(
                PlannedRun(
                    f"baseline-{i}",
                    None,
                    [{"kind": "baseline", "model": model}],
                    True,
                    to_dict(settings),
                    kind="baseline",
                    model=model,
                )
            )
        runs = runs + baselines  # last: the list only grows as tuning ends (stable array indices)
    return Plan(sweep_dir, runs, builder.waiting, records)


# --------------------------------------------------------------------------------------------
# Plan files: what a cluster (or a later `mmpo sweep run-one`) reads


def run_one_command(sweep_dir: Path, *, index: int | None = None, name: str | None = None) -> list[str]:
    target = ["--index", str(index)] if index is not None else ["--name", str(name)]
    return ["mmpo", "sweep", "run-one", str(sweep_dir), *target]


def write_plan(plan: Plan, sweep: SweepConfig) -> Path:
    """``plan.json``, ``tuning.json``, ``sweep.yaml`` and ``commands.txt`` (one command per run)."""
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    (plan.sweep_dir / SWEEP_FILE).write_text(yaml.safe_dump(sweep_to_dict(sweep), sort_keys=False))
    payload = {"name": sweep.name, "runs": [r.to_json() for r in plan.runs], "waiting": plan.waiting}
    atomic_write_text(plan.sweep_dir / PLAN_FILE, json.dumps(payload, indent=1))
    atomic_write_text(plan.sweep_dir / TUNING_FILE, json.dumps(plan.tuning, indent=1))
    lines = [run_one_command(plan.sweep_dir, index=i) for i in range(len(plan.runs))]
    atomic_write_text(plan.sweep_dir / COMMANDS_FILE, "".join(shlex.join(c) + "\n" for c in lines))
    return plan.sweep_dir / PLAN_FILE


def load_plan(sweep_dir: str | Path) -> Plan:
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: write the plan first (mmpo sweep plan --config ...)")
    payload = json.loads(path.read_text())
    runs = []
    for entry in payload["runs"]:
        cfg = from_dict(TrainConfig, entry["config"], source=f"{path}: {entry['name']}") if entry["config"] else None
        runs.append(
            PlannedRun(
                entry["name"], cfg, entry["roles"], entry["evaluate"], entry["eval"], entry["kind"], entry.get("model")
            )
        )
    tuning = json.loads((sweep_dir / TUNING_FILE).read_text()) if (sweep_dir / TUNING_FILE).is_file() else []
    return Plan(sweep_dir, runs, payload.get("waiting", []), tuning)
