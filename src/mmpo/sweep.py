"""Sweeps: the paper's study as a grid of independent, resumable runs.

A sweep config (YAML) names a ``base`` training config, evaluation settings, optional stage-wise
``tuning`` and ``experiments`` blocks whose keys are grids::

    name: study
    output_dir: runs/study
    base: {epochs: 3, per_device_batch_size: 16}        # TrainConfig values of every run
    eval: {max_new_tokens: 32, limit: 100}             # EvalSettings of every checkpoint (false: none)
    tuning:                                            # the paper's selection, stage by stage
      set: {epochs: 1}
      stages:
        - {learning_rate: {mmpo: [1e-4, 5e-4], dpo: [1e-4, 5e-4]}}
        - {beta: {mmpo: [0.01, 0.1]}}
        - {chosen_reward: {mmpo: [0.7, 0.9]}, gamma: {simpo: [0.5, 1.0]}}
    experiments:
      - name: main
        objective: [mmpo, dpo]
        beta: {mmpo: [0.01, 0.1], dpo: [0.1, 0.5]}     # a list is a grid; a dict is per objective
        seed: [1, 2, 3]
      - name: ablations
        objective: mmpo
        beta: 0.01
        variants: {no_aux_loss: {aux_loss: false}, no_normalize: {normalize: none}}

Every run is a folder ``<sweep>/runs/<name>/`` whose name spells out its settings, so the same
settings always map to the same folder: runs shared by two blocks are trained once, and a rerun
finds finished work by looking at the folders. A run is trained with a checkpoint per epoch
(``resume=True``: a killed run continues from its last checkpoint), then every epoch checkpoint
is evaluated by :func:`mmpo.evaluation.checkpoint_eval.evaluate_checkpoint` into
``checkpoints/epoch-K/eval/results.json``; parts already there are never recomputed.

Tuning (SPEC.md "Training protocol"): stage k trains its candidates on top of the values chosen
in stages before it and selects by validation reward accuracy (the run's last evaluation in
``metrics.jsonl``); the chosen values become the defaults of the experiment runs of that
objective (a block's own values win). Runs whose settings depend on an unfinished stage wait.

Execution: ``run_sweep`` trains the ready runs in this process (``workers=1``) or as ``workers``
subprocesses ``mmpo sweep run-one`` (one per GPU when there are GPUs, else one thread each). On a cluster,
``write_plan`` lists one independent command per run (``commands.txt``); a SLURM job array or
Ray runs them (``examples/slurm``, ``examples/ray``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmpo.training import checkpoint
from mmpo.training import run_dir as run_files
from mmpo.config import (
    OBJECTIVE_DEFAULTS,
    ConfigError,
    TrainConfig,
    check_keys,
    from_dict,
    load_yaml,
    resolve,
    resume_mismatches,
    to_dict,
)
from mmpo.evaluation.checkpoint_eval import EvalSettings
from mmpo.config.presets import preset_values

OBJECTIVES = tuple(OBJECTIVE_DEFAULTS)
SWEEP_KEYS = ("name", "output_dir", "base", "eval", "evaluate_baseline", "tuning", "experiments")
BLOCK_META_KEYS = ("name", "variants")
#: Settings that do not change what a run computes, so they never appear in its name.
NAME_NEUTRAL = {"output_dir", "resume", "progress", "cache_dir", "report_to", "logging_steps", "preset"}
#: Short names of settings in run folder names.
NAME_ALIASES = {"learning_rate": "lr", "chosen_reward": "epsw", "rejected_reward": "epsl", "length_normalize": "lnorm",
                "entropy_coef": "ent", "aux_loss": "aux", "normalize": "norm", "normalize_scope": "nscope",
                "per_device_batch_size": "bs", "gradient_accumulation_steps": "accum"}
PLAN_FILE, COMMANDS_FILE, EVENTS_FILE, TUNING_FILE = "plan.json", "commands.txt", "events.jsonl", "tuning.json"


# --------------------------------------------------------------------------------------------
# The sweep config


@dataclass
class Block:
    """One experiment block: a grid, optionally crossed with named variants (the ablations)."""

    name: str
    grid: dict[str, Any]
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"": {}})


@dataclass
class Tuning:
    stages: list[dict[str, Any]]
    overrides: dict[str, Any] = field(default_factory=dict)
    objectives: tuple[str, ...] = OBJECTIVES


@dataclass
class SweepConfig:
    name: str
    output_dir: str
    base: dict[str, Any]
    eval: dict[str, Any] | None  # None: checkpoints are not evaluated (``eval: false``)
    experiments: list[Block]
    tuning: Tuning | None = None
    evaluate_baseline: bool = True


def _objectives_of(value: Any, where: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v not in OBJECTIVES:
            raise ConfigError(f"{where}: unknown objective {v!r}; objectives are {', '.join(OBJECTIVES)}")
    return values


def _check_grid(grid: dict[str, Any], where: str) -> None:
    check_keys(TrainConfig, grid, where)
    if "output_dir" in grid:
        raise ConfigError(f"{where}: 'output_dir' is chosen by the sweep (set the sweep's output_dir)")
    for key, value in grid.items():
        if isinstance(value, dict):
            unknown = [k for k in value if k not in OBJECTIVES]
            if unknown:
                raise ConfigError(f"{where}: key '{key}' maps objectives to values, but {unknown} are not objectives "
                                  f"({', '.join(OBJECTIVES)})")
        if isinstance(value, list) and not value:
            raise ConfigError(f"{where}: key '{key}' has an empty list of values")


def sweep_from_dict(values: dict[str, Any], source: str = "sweep config") -> SweepConfig:
    """Validate a sweep config mapping (every key and value is checked before anything runs)."""
    unknown = [k for k in values if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{source}: unknown sweep key '{unknown[0]}'; sweep keys are {', '.join(SWEEP_KEYS)}")
    base = dict(values.get("base") or {})
    check_keys(TrainConfig, base, f"{source}: base")
    if "output_dir" in base:
        raise ConfigError(f"{source}: base: 'output_dir' is chosen by the sweep (set the sweep's output_dir)")
    eval_values = values.get("eval", {})
    if eval_values is False:
        eval_values = None
    elif not isinstance(eval_values or {}, dict):
        raise ConfigError(f"{source}: 'eval' must be a mapping of evaluation settings, or false")
    else:
        eval_values = dict(eval_values or {})
        check_keys(EvalSettings, eval_values, f"{source}: eval")
    blocks = []
    for i, raw in enumerate(values.get("experiments") or []):
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: experiments[{i}] must be a mapping")
        name = str(raw.get("name", f"block{i}"))
        where = f"{source}: experiments '{name}'"
        grid = {k: v for k, v in raw.items() if k not in BLOCK_META_KEYS}
        _check_grid(grid, where)
        _objectives_of(grid.get("objective", base.get("objective", "mmpo")), where)
        variants = raw.get("variants") or {"": {}}
        if not isinstance(variants, dict):
            raise ConfigError(f"{where}: 'variants' must map a label to the settings it changes")
        for label, overrides in variants.items():
            check_keys(TrainConfig, overrides or {}, f"{where}: variant '{label}'")
        blocks.append(Block(name, grid, {str(k): dict(v or {}) for k, v in variants.items()}))
    if not blocks:
        raise ConfigError(f"{source}: 'experiments' needs at least one block")
    if len({b.name for b in blocks}) != len(blocks):
        raise ConfigError(f"{source}: experiment block names must be unique")
    tuning = None
    if values.get("tuning"):
        raw = values["tuning"]
        unknown = [k for k in raw if k not in ("stages", "set", "objectives")]
        if unknown:
            raise ConfigError(f"{source}: tuning: unknown key '{unknown[0]}' (keys: stages, set, objectives)")
        overrides = dict(raw.get("set") or {})
        check_keys(TrainConfig, overrides, f"{source}: tuning.set")
        stages = [dict(s) for s in raw.get("stages") or []]
        for k, stage in enumerate(stages, 1):
            _check_grid(stage, f"{source}: tuning stage {k}")
            if "objective" in stage:
                raise ConfigError(f"{source}: tuning stage {k}: give per-objective values instead of 'objective'")
        objectives = tuple(_objectives_of(raw.get("objectives", list(OBJECTIVES)), f"{source}: tuning.objectives"))
        tuning = Tuning(stages, overrides, objectives)
    return SweepConfig(name=str(values.get("name", "sweep")), output_dir=str(values.get("output_dir", "runs/sweep")),
                       base=base, eval=eval_values, experiments=blocks, tuning=tuning,
                       evaluate_baseline=bool(values.get("evaluate_baseline", True)))


def _parse_assignment(text: str, flag: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"{flag} expects KEY=VALUE, got {text!r}")
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def load_sweep(path: str | Path | None, *, output_dir: str | None = None, set_values: list[str] = (),
               grid_values: list[str] = ()) -> SweepConfig:
    """A sweep from a YAML file (or the defaults: one MMPO/DPO/SimPO block on the bundled world),
    with ``--set KEY=VALUE`` base overrides and ``--grid KEY=[V1,V2]`` grids added to every block."""
    values = load_yaml(path) if path else {"experiments": [{"name": "main", "objective": list(OBJECTIVES)}]}
    values = dict(values)
    if output_dir:
        values["output_dir"] = output_dir
    base = dict(values.get("base") or {})
    for text in set_values:
        key, value = _parse_assignment(text, "--set")
        base[key] = value
    values["base"] = base
    if grid_values:
        blocks = [dict(b) for b in values.get("experiments") or []]
        for text in grid_values:
            key, value = _parse_assignment(text, "--grid")
            for block in blocks:
                block[key] = value
        values["experiments"] = blocks
    return sweep_from_dict(values, source=str(path or "sweep flags"))


# --------------------------------------------------------------------------------------------
# Expanding the grid into run configs


def _values_for(value: Any, objective: str) -> list[Any] | None:
    """A grid entry's values for one objective (None: the entry does not apply to it)."""
    if isinstance(value, dict):
        if objective not in value:
            return None
        value = value[objective]
    return list(value) if isinstance(value, list) else [value]


def _grid_combinations(grid: dict[str, Any], objective: str) -> list[dict[str, Any]]:
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


def build_run_config(sweep: SweepConfig, sweep_dir: Path, objective: str, values: dict[str, Any],
                     where: str) -> TrainConfig:
    """A resolved TrainConfig: preset < base < ``values``; named output_dir under ``runs/``.

    The preset is expanded here rather than by the engine, so a value the sweep sets wins even
    when it equals the TrainConfig default (``apply_preset`` cannot tell that from "unset").
    """
    merged = {**sweep.base, **values, "objective": objective}
    preset = merged.pop("preset", None)
    if preset:
        merged = {**preset_values(preset, objective), **merged}
    merged.setdefault("cache_dir", str(sweep_dir / "cache" / "reference_logps"))
    merged.setdefault("progress", False)
    merged["resume"] = True
    cfg = from_dict(TrainConfig, merged, source=where)
    cfg = resolve(cfg)
    return dataclasses.replace(cfg, output_dir=str(sweep_dir / "runs" / run_name(sweep, cfg)))


def _reference_config(sweep: SweepConfig, objective: str) -> TrainConfig:
    merged = {**sweep.base, "objective": objective}
    preset = merged.pop("preset", None)
    if preset:
        merged = {**preset_values(preset, objective), **merged}
    return resolve(from_dict(TrainConfig, merged, source="base"))


def run_name(sweep: SweepConfig, cfg: TrainConfig) -> str:
    """``<objective>-beta<b>-lr<lr>-seed<s>`` plus every other setting that differs from the base."""
    parts = [cfg.objective, f"beta{_format_value(cfg.beta)}", f"lr{_format_value(cfg.learning_rate)}",
             f"seed{cfg.seed}"]
    reference = to_dict(_reference_config(sweep, cfg.objective))
    mine = to_dict(cfg)
    for key in sorted(mine):
        if key in NAME_NEUTRAL or key in ("objective", "beta", "learning_rate", "seed"):
            continue
        if mine[key] != reference.get(key):
            parts.append(f"{NAME_ALIASES.get(key, key)}{_format_value(mine[key])}")
    return "-".join(parts)


# --------------------------------------------------------------------------------------------
# Run status


def _epoch_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints to evaluate: every epoch checkpoint, plus the final one if it is a step checkpoint."""
    complete = [p for p in checkpoint.list_checkpoints(run_dir) if checkpoint.verify(p, checksums=False) is None]
    chosen = [p for p in complete if p.name.startswith("epoch-")]
    if complete and complete[-1] not in chosen:
        state = checkpoint.read_trainer_state(complete[-1])
        if state.get("global_step") == _total_steps(state):
            chosen.append(complete[-1])
    return chosen


def training_finished(run_dir: str | Path) -> bool:
    """True when the run wrote its summary and its newest complete checkpoint is the last step."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        return False
    complete = [p for p in checkpoint.list_checkpoints(run_dir) if checkpoint.verify(p, checksums=False) is None]
    if not complete:
        return False
    state = checkpoint.read_trainer_state(complete[-1])
    return state.get("global_step", 0) >= (_total_steps(state) or float("inf"))


def _total_steps(state: dict) -> int | None:
    """The run's step count from a checkpoint's trainer state (HF layout: ``max_steps``; older: ``total_steps``)."""
    return state.get("max_steps", state.get("total_steps"))


def read_results(path: Path) -> dict:
    """A results.json, or {} when it is missing or was cut short by a kill (then it is redone)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def missing_eval_parts(results: dict, settings: EvalSettings) -> list[str]:
    wanted = [name for name, on in (("rewards", settings.rewards), ("winrate", settings.winrate),
                                    ("harness", bool(settings.harness))) if on]
    return [name for name in wanted if name not in results]


def validation_reward_accuracy(run_dir: str | Path) -> float | None:
    """The run's last validation reward accuracy in metrics.jsonl (what tuning selects by)."""
    evals = [r for r in run_files.read_metrics(Path(run_dir) / "metrics.jsonl") if "eval_rewards/accuracies" in r]
    return evals[-1]["eval_rewards/accuracies"] if evals else None


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
        return {"name": self.name, "kind": self.kind, "roles": self.roles, "evaluate": self.evaluate,
                "config": to_dict(self.config) if self.config is not None else None, "eval": self.eval_settings,
                "model": self.model}


@dataclass
class Plan:
    sweep_dir: Path
    runs: list[PlannedRun]
    waiting: list[str]
    tuning: list[dict[str, Any]]

    def find(self, name: str | None = None, index: int | None = None) -> PlannedRun:
        if index is not None:
            if not 0 <= index < len(self.runs):
                raise ConfigError(f"run index {index} is outside the plan's {len(self.runs)} runs (0..{len(self.runs) - 1})")
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
        self.runs[name] = PlannedRun(name, cfg, [role], evaluate,
                                     to_dict(eval_settings_for(self.sweep, cfg)) if evaluate else None,
                                     provisional=provisional)


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
            combos = _grid_combinations(stage, objective)
            if combos == [{}]:
                continue  # this stage tunes nothing of this objective
            pending = objective in unfinished  # a dry run's look past an unfinished stage
            candidates = []
            for combo in combos:
                values = {**tuning.overrides, **selected[objective], **combo}
                cfg = build_run_config(sweep, builder.sweep_dir, objective, values, f"tuning stage {k} ({objective})")
                builder.add(cfg, {"kind": "tune", "stage": k, "objective": objective, "values": combo},
                            evaluate=False, provisional=pending)
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
        objectives = _objectives_of(block.grid.get("objective", sweep.base.get("objective", "mmpo")), block.name)
        for objective in objectives:
            pending = objective in unfinished
            if pending:
                builder.waiting.append(f"experiments '{block.name}' of {objective} (waiting for its tuning)")
                if not provisional:
                    continue
            for combo in _grid_combinations(block.grid, objective):
                for label, overrides in block.variants.items():
                    values = {**selected[objective], **combo, **overrides}
                    cfg = build_run_config(sweep, sweep_dir, objective, values, f"experiments '{block.name}'")
                    builder.add(cfg, {"kind": "experiment", "block": block.name, "variant": label,
                                      "objective": objective}, evaluate=sweep.eval is not None, provisional=pending)
                    if cfg.model not in models:
                        models.append(cfg.model)
    runs = list(builder.runs.values())
    if sweep.evaluate_baseline and sweep.eval is not None:
        baselines = []
        for i, model in enumerate(models):
            settings = eval_settings_for(sweep, None)
            settings = dataclasses.replace(settings, baseline=sweep.eval.get("baseline", model))
            name = f"baseline-{i}"
            baselines.append(PlannedRun(name, None, [{"kind": "baseline", "model": model}], True,
                                        to_dict(settings), kind="baseline", model=model))
        runs = runs + baselines  # last: the list only grows as tuning ends (stable array indices)
    return Plan(sweep_dir, runs, builder.waiting, records)


def write_plan(plan: Plan, sweep: SweepConfig) -> Path:
    """``plan.json``, ``tuning.json``, ``sweep.yaml`` and ``commands.txt`` (one command per run)."""
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    (plan.sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(_sweep_to_dict(sweep), sort_keys=False))
    payload = {"name": sweep.name, "runs": [r.to_json() for r in plan.runs], "waiting": plan.waiting}
    _atomic_write(plan.sweep_dir / PLAN_FILE, json.dumps(payload, indent=1))
    _atomic_write(plan.sweep_dir / TUNING_FILE, json.dumps(plan.tuning, indent=1))
    lines = [run_one_command(plan.sweep_dir, index=i) for i in range(len(plan.runs))]
    _atomic_write(plan.sweep_dir / COMMANDS_FILE, "".join(shlex.join(c) + "\n" for c in lines))
    return plan.sweep_dir / PLAN_FILE


def _sweep_to_dict(sweep: SweepConfig) -> dict:
    out = {"name": sweep.name, "output_dir": sweep.output_dir, "base": sweep.base, "eval": sweep.eval,
           "evaluate_baseline": sweep.evaluate_baseline}
    if sweep.tuning:
        out["tuning"] = {"objectives": list(sweep.tuning.objectives), "set": sweep.tuning.overrides,
                         "stages": sweep.tuning.stages}
    out["experiments"] = [{"name": b.name, **b.grid, **({"variants": b.variants} if b.variants != {"": {}} else {})}
                          for b in sweep.experiments]
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_plan(sweep_dir: str | Path) -> Plan:
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: write the plan first (mmpo sweep plan --config ...)")
    payload = json.loads(path.read_text())
    runs = []
    for entry in payload["runs"]:
        cfg = from_dict(TrainConfig, entry["config"], source=f"{path}: {entry['name']}") if entry["config"] else None
        runs.append(PlannedRun(entry["name"], cfg, entry["roles"], entry["evaluate"], entry["eval"], entry["kind"],
                               entry.get("model")))
    tuning = json.loads((sweep_dir / TUNING_FILE).read_text()) if (sweep_dir / TUNING_FILE).is_file() else []
    return Plan(sweep_dir, runs, payload.get("waiting", []), tuning)


def run_one_command(sweep_dir: Path, *, index: int | None = None, name: str | None = None) -> list[str]:
    target = ["--index", str(index)] if index is not None else ["--name", str(name)]
    return ["mmpo", "sweep", "run-one", str(sweep_dir), *target]


# --------------------------------------------------------------------------------------------
# Running one run (the unit a worker, a SLURM array task or a Ray task executes)


def log_event(sweep_dir: Path, run: str, event: str, **extra: Any) -> None:
    """Append to ``events.jsonl`` (one short line per write: safe from concurrent workers)."""
    line = json.dumps({"time": round(time.time(), 3), "run": run, "event": event, "pid": os.getpid(), **extra})
    with open(sweep_dir / EVENTS_FILE, "a") as handle:
        handle.write(line + "\n")


def run_status(run: PlannedRun, sweep_dir: Path) -> str:
    """``done``, ``evaluating`` (trained, evaluations missing), ``partial`` (started) or ``todo``."""
    if run.kind == "baseline":
        return "todo" if _baseline_missing(run, sweep_dir) else "done"
    run_dir = Path(run.config.output_dir)
    if not training_finished(run_dir):
        return "partial" if run_dir.exists() else "todo"
    if run.evaluate:
        settings = from_dict(EvalSettings, run.eval_settings, source="eval")
        for ckpt in _epoch_checkpoints(run_dir):
            if missing_eval_parts(read_results(ckpt / "eval" / "results.json"), settings):
                return "evaluating"
    return "done"


def _check_existing_config(run: PlannedRun) -> None:
    saved = Path(run.config.output_dir) / "config.yaml"
    if saved.is_file():
        mismatched = resume_mismatches(yaml.safe_load(saved.read_text()), run.config)
        if mismatched:
            raise ConfigError(f"run folder {saved.parent} holds a run with other settings ({', '.join(mismatched)}); "
                              "move it away or use another sweep output_dir")


def execute_run(run: PlannedRun, sweep_dir: Path, say: Callable[[str], Any] = print) -> None:
    """Train (or resume) one run, then evaluate each of its checkpoints that lacks results."""
    if run.kind == "baseline":
        return _execute_baseline(run, sweep_dir, say)
    from mmpo.training import train

    cfg = run.config
    run_dir = Path(cfg.output_dir)
    _check_existing_config(run)
    if not training_finished(run_dir):
        log_event(sweep_dir, run.name, "train_start")
        train(cfg)
        log_event(sweep_dir, run.name, "train_done")
    if not run.evaluate:
        return
    settings = from_dict(EvalSettings, run.eval_settings, source="eval")
    for ckpt in _epoch_checkpoints(run_dir):
        evaluate_missing(ckpt, settings, sweep_dir, run.name, say)


def evaluate_missing(ckpt: Path, settings: EvalSettings, sweep_dir: Path, run_name_: str, say) -> None:
    from mmpo.evaluation.checkpoint_eval import evaluate_checkpoint

    results_path = ckpt / "eval" / "results.json"
    results = read_results(results_path)
    missing = missing_eval_parts(results, settings)
    if not missing:
        return
    if results_path.is_file() and not results:
        results_path.unlink()  # cut short by a kill: start this checkpoint's results afresh
    if "winrate" in missing:
        _ensure_baseline_generations(settings, sweep_dir, say)
    only_missing = dataclasses.replace(settings, rewards="rewards" in missing, winrate="winrate" in missing,
                                       harness=settings.harness if "harness" in missing else ())
    log_event(sweep_dir, run_name_, "eval_start", checkpoint=ckpt.name, parts=missing)
    evaluate_checkpoint(ckpt, only_missing, say=say)
    log_event(sweep_dir, run_name_, "eval_done", checkpoint=ckpt.name, parts=missing)


def _ensure_baseline_generations(settings: EvalSettings, sweep_dir: Path, say) -> None:
    """Generate the baseline's answers once, under a file lock, before parallel runs need them."""
    from filelock import FileLock

    from mmpo.evaluation.checkpoint_eval import baseline_outputs
    from mmpo.evaluation.generate import load_instructions

    prompts = load_instructions(settings.prompts)
    if settings.limit:
        prompts = prompts[: settings.limit]
    (sweep_dir / "cache").mkdir(parents=True, exist_ok=True)
    with FileLock(str(sweep_dir / "cache" / "baseline_generations.lock")):
        baseline_outputs(settings, prompts, say)


def baseline_dir(run: PlannedRun, sweep_dir: Path) -> Path:
    return sweep_dir / "baselines" / run.name


def _baseline_missing(run: PlannedRun, sweep_dir: Path) -> bool:
    settings = from_dict(EvalSettings, run.eval_settings, source="eval")
    if not settings.harness:
        return False
    return "harness" not in read_results(baseline_dir(run, sweep_dir) / "results.json")


def _execute_baseline(run: PlannedRun, sweep_dir: Path, say) -> None:
    """The starting (SFT) model's retention, the sweep's zero point; and its generations, once."""
    from mmpo.evaluation.checkpoint_eval import evaluate_checkpoint

    settings = from_dict(EvalSettings, run.eval_settings, source="eval")
    if settings.winrate:
        _ensure_baseline_generations(settings, sweep_dir, say)
    if _baseline_missing(run, sweep_dir):
        log_event(sweep_dir, run.name, "eval_start", checkpoint="baseline", parts=["harness"])
        evaluate_checkpoint(run.model, dataclasses.replace(settings, rewards=False, winrate=False,
                                                           output=str(baseline_dir(run, sweep_dir))), say=say)
        log_event(sweep_dir, run.name, "eval_done", checkpoint="baseline", parts=["harness"])


# --------------------------------------------------------------------------------------------
# Running the sweep here: in this process, or as worker subprocesses (one per GPU)


@dataclass
class SweepOutcome:
    done: list[str]
    failed: dict[str, str]
    waiting: list[str]


class RunBusy(RuntimeError):
    """Another process holds the run's lock (e.g. a duplicate array task); this one leaves it alone."""


def run_locked(run: PlannedRun, sweep_dir: Path, say: Callable[[str], Any] = print) -> None:
    """:func:`execute_run` under a per-run file lock, so two processes never work on one run folder.

    The lock is an OS file lock: it is released when its holder dies, even by SIGKILL.
    """
    from filelock import FileLock, Timeout

    (sweep_dir / "locks").mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(sweep_dir / "locks" / f"{run.name}.lock"), timeout=0):
            execute_run(run, sweep_dir, say)
    except Timeout:
        raise RunBusy(f"run {run.name} is being worked on by another process") from None


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the worker gets SIGKILL when the sweep process dies, so a killed sweep leaves no orphans."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_env(slot: int, workers: int, gpus: int) -> dict[str, str]:
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    else:  # share the cores instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    return env


def _run_subprocess(run: PlannedRun, sweep_dir: Path, slot: int, workers: int, gpus: int) -> str | None:
    """Run ``mmpo sweep run-one`` for ``run``; its output goes to ``logs/<run>.log``. None on success."""
    log_dir = sweep_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mmpo.cli", "sweep", "run-one", str(sweep_dir), "--name", run.name]
    with open(log_dir / f"{run.name}.log", "a") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=_worker_env(slot, workers, gpus),
                              preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    if proc.returncode == 0:
        return None
    return f"exit code {proc.returncode}; see {log_dir / (run.name + '.log')}"


def _run_here(run: PlannedRun, sweep_dir: Path, say) -> str | None:
    """Run in this process; the problem as text when it fails (one failing run must not stop the others)."""
    say(f"sweep: {run.name}")
    try:
        run_locked(run, sweep_dir, say)
    except RunBusy as err:
        return str(err)
    except Exception as err:
        problem = f"{type(err).__name__}: {err}"
        log_event(sweep_dir, run.name, "failed", error=problem)
        say(f"sweep: {run.name} failed: {problem}")
        return problem
    return None


def run_sweep(sweep: SweepConfig, *, sweep_dir: str | Path | None = None, workers: int = 1,
              say: Callable[[str], Any] = print) -> SweepOutcome:
    """Run everything not yet done: in this process (``workers=1``) or as ``workers`` subprocesses.

    The plan is made again whenever a run ends, so a finished tuning stage makes the next stage's
    runs ready at once. Entries run in plan order. Failed runs are
    reported, not retried in the same call; calling again retries them.
    """
    sweep_dir = Path(sweep_dir or sweep.output_dir)
    failed: dict[str, str] = {}
    gpus = gpu_count() if workers > 1 else 0
    free_slots = list(range(workers))
    running: dict[Future, tuple[str, int]] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while True:
            plan = make_plan(sweep, sweep_dir)
            write_plan(plan, sweep)
            busy = {name for name, _ in running.values()}
            todo = [r for r in plan.runs if r.name not in failed and r.name not in busy
                    and run_status(r, sweep_dir) != "done"]
            if workers <= 1:
                if not todo:
                    break
                problem = _run_here(todo[0], sweep_dir, say)
                if problem:
                    failed[todo[0].name] = problem
                continue
            for run in todo[: len(free_slots)]:
                slot = free_slots.pop(0)
                say(f"sweep: {run.name} (worker {slot}" + (f", GPU {slot % gpus})" if gpus else ")"))
                running[pool.submit(_run_subprocess, run, sweep_dir, slot, workers, gpus)] = (run.name, slot)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name, slot = running.pop(future)
                free_slots.append(slot)
                problem = future.result()
                if problem:
                    failed[name] = problem
                    say(f"sweep: {name} failed: {problem}")
    done = [r.name for r in plan.runs if run_status(r, sweep_dir) == "done"]
    return SweepOutcome(done, failed, plan.waiting)


# --------------------------------------------------------------------------------------------
# Dry run: steps, checkpoints and a rough GPU memory estimate per run

#: Row counts of the paper's Hub datasets (SPEC.md), so a dry run needs no download.
KNOWN_DATASET_ROWS = {
    ("HuggingFaceH4/orca_dpo_pairs", "train_prefs"): 12359, ("HuggingFaceH4/orca_dpo_pairs", "test_prefs"): 500,
    ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"): 61135,
    ("HuggingFaceH4/ultrafeedback_binarized", "test_prefs"): 2000,
}
#: Shapes of the presets' models (their config.json), so a dry run needs no download.
KNOWN_MODEL_SHAPES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                                tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM2-360M-Instruct": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                                num_attention_heads=15, num_key_value_heads=5, vocab_size=49152,
                                                tie_word_embeddings=True),
    "meta-llama/Llama-3.2-1B-Instruct": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                             tie_word_embeddings=True),
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                                tie_word_embeddings=False),
}


def count_rows(specs: tuple[str, ...]) -> int | None:
    """Rows a dataset mixture yields (weights applied); None when a Hub dataset's size is unknown."""
    from mmpo.data import DatasetSpec
    from mmpo.data.loading import load_dataset_rows

    total = 0.0
    for text in specs:
        spec = DatasetSpec.parse(text)
        path = Path(spec.path).expanduser()
        if path.is_file() and path.suffix == ".jsonl":
            with open(path, "rb") as handle:
                rows = sum(1 for line in handle if line.strip())
        elif path.exists():
            rows = len(load_dataset_rows(spec))
        elif (spec.path, spec.split) in KNOWN_DATASET_ROWS:
            rows = KNOWN_DATASET_ROWS[(spec.path, spec.split)]
        else:
            return None
        total += int(spec.weight) * rows + round((spec.weight % 1) * rows)
    return int(total)


def _model_config(model: str):
    from transformers import AutoConfig, LlamaConfig

    if model in KNOWN_MODEL_SHAPES:
        return LlamaConfig(**KNOWN_MODEL_SHAPES[model])
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError):
        return None


@dataclass
class MemoryEstimate:
    total_gib: float
    parts: dict[str, float]  # GiB each (unrounded: round when showing)
    parameters: int
    trainable: int


BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}  # auto: bf16 on a GPU


def estimate_gpu_memory(cfg: TrainConfig) -> MemoryEstimate | None:
    """A rough peak-memory estimate of one training process (GiB). It is an estimate: real use
    depends on sequence lengths in the data, the attention kernel, fragmentation and the framework.

    weights (P x dtype bytes); gradients and AdamW's two moments for the trainable parameters
    (in the weights' dtype; 8-bit AdamW: 2 bytes per parameter; LoRA parameters are fp32);
    activations of one micro-batch (2 x per-device pairs sequences of max_prompt + max_completion
    tokens): ~34 bytes x tokens x hidden x layers in 16-bit without gradient checkpointing
    (Korthikanti et al. 2022, flash/SDPA attention), layer inputs only with it; the logits and
    their fp32 log-softmax; 1 GiB of CUDA context. The reference model is not loaded (its
    log-probs are precomputed).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = _model_config(cfg.model)
    if config is None:
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    width = BYTES[cfg.dtype]
    if cfg.lora:
        trainable = sum(cfg.lora_r * (m.in_features + m.out_features) for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in cfg.lora_target_modules)
        trainable_bytes = 4
    else:
        trainable, trainable_bytes = params, width
    state_bytes = 2 if cfg.optimizer == "adamw_8bit" else 2 * trainable_bytes
    hidden, layers = config.hidden_size, config.num_hidden_layers
    tokens = 2 * cfg.per_device_batch_size * (cfg.max_prompt_length + cfg.max_completion_length)
    per_token_layer = width if cfg.gradient_checkpointing else 17 * width  # 34 bytes at 16-bit
    gib = 1024 ** 3
    parts = {
        "weights": params * width / gib,
        "gradients": trainable * trainable_bytes / gib,
        "optimizer": trainable * state_bytes / gib,
        "activations": tokens * hidden * layers * per_token_layer / gib,
        "logits": tokens * config.vocab_size * (width + 8) / gib,
        "cuda_context": 1.0,
    }
    if cfg.lora:
        parts["weights"] += trainable * 4 / gib
    return MemoryEstimate(sum(parts.values()), parts, params, trainable)


def describe_run(run: PlannedRun, sweep_dir: Path) -> dict[str, Any]:
    """What a dry run shows for one run: optimizer steps, checkpoints, memory, status."""
    if run.kind == "baseline":
        return {"name": run.name, "objective": "baseline", "model": run.model, "status": run_status(run, sweep_dir)}
    cfg = run.config
    rows = count_rows(cfg.dataset)
    global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps  # one device per run
    steps = None
    if rows is not None:
        steps = (rows // global_batch) * cfg.epochs
        if cfg.max_steps > 0:
            steps = min(steps, cfg.max_steps)
    memory = estimate_gpu_memory(cfg)
    return {"name": run.name, "objective": cfg.objective, "beta": cfg.beta, "learning_rate": cfg.learning_rate,
            "seed": cfg.seed, "epochs": cfg.epochs, "pairs": rows, "global_batch": global_batch, "steps": steps,
            "checkpoints": cfg.epochs, "evaluated": run.evaluate, "model": cfg.model,
            "memory_gib": memory.total_gib if memory else None,
            "memory_parts": {k: round(v, 2) for k, v in memory.parts.items()} if memory else None,
            "parameters": memory.parameters if memory else None,
            "status": "after tuning" if run.provisional else run_status(run, sweep_dir),
            "roles": [f"tune {r['stage']}" if r["kind"] == "tune" else r.get("block", r["kind"]) for r in run.roles]}


def plan_table(rows: list[dict[str, Any]]):
    from rich.table import Table

    table = Table(title="sweep plan", show_lines=False)
    for column in ("#", "run", "role", "steps", "ckpts", "est. GPU mem", "status"):
        table.add_column(column, justify="right" if column in ("#", "steps", "ckpts", "est. GPU mem") else "left",
                         overflow="fold")
    for i, row in enumerate(rows):
        if row["objective"] == "baseline":
            table.add_row(str(i), row["name"], "baseline", "", "", "", row["status"])
            continue
        memory = f"~{row['memory_gib']:.1f} GiB" if row["memory_gib"] is not None else "?"
        table.add_row(str(i), row["name"], ", ".join(row["roles"]), str(row["steps"] if row["steps"] is not None else "?"),
                      str(row["checkpoints"]) + ("" if row["evaluated"] else " (no eval)"), memory, row["status"])
    return table


def plan_summary(rows: list[dict[str, Any]], waiting: list[str]) -> list[str]:
    trained = [r for r in rows if r["objective"] != "baseline"]
    steps = [r["steps"] for r in trained]
    lines = [f"{len(trained)} training runs, {sum(s for s in steps if s is not None)} optimizer steps"
             + (" (+ runs of unknown size)" if None in steps else "")
             + f", {sum(r['checkpoints'] for r in trained if r['evaluated'])} checkpoints to evaluate; "
             f"{sum(r['status'] == 'done' for r in rows)} of {len(rows)} entries already done."]
    if any(r["status"] == "after tuning" for r in rows):
        lines.append("Runs marked 'after tuning' are shown with default values for what tuning will choose; "
                     "they run once the stages before them have finished.")
    lines += [f"waiting: {w}" for w in waiting]
    lines.append("GPU memory is a rough estimate per run (weights, gradients, optimizer, activations at the "
                 "maximum sequence length, logits; see mmpo.sweep.estimate_gpu_memory), not a measurement.")
    return lines


def command(argv: list[str], say: Callable[[Any], Any] = print) -> int:
    """``mmpo sweep [run|plan] [--config FILE] ...`` and ``mmpo sweep run-one SWEEP_DIR --index I``."""
    import argparse

    action = argv[0] if argv and argv[0] in ("run", "plan", "run-one") else "run"
    rest = argv[1:] if argv and argv[0] == action else argv
    if action == "run-one":
        parser = argparse.ArgumentParser(prog="mmpo sweep run-one", description=(
            "Train and evaluate one run of a planned sweep (the unit of a SLURM array task or Ray task). "
            "Finished work is skipped; a busy run (locked by another process) is left alone."))
        parser.add_argument("sweep_dir")
        target = parser.add_mutually_exclusive_group(required=True)
        target.add_argument("--index", type=int, help="position in plan.json / line of commands.txt (0-based)")
        target.add_argument("--name", help="run name")
        args = parser.parse_args(rest)
        plan = load_plan(args.sweep_dir)
        run = plan.find(name=args.name, index=args.index)
        try:
            run_locked(run, plan.sweep_dir, say)
        except RunBusy as err:
            say(str(err))
        return 0

    parser = argparse.ArgumentParser(prog=f"mmpo sweep{' plan' if action == 'plan' else ''}", description=(
        "Grid of training runs (objectives x beta x learning rate x ablations x seeds), each trained with a "
        "checkpoint per epoch and every checkpoint evaluated; resumable (finished work is never redone). "
        "`mmpo sweep plan` writes plan.json and commands.txt (one independent command per run, for SLURM/Ray)."))
    parser.add_argument("--config", help="sweep YAML (see configs/sweeps/); default: MMPO/DPO/SimPO on the bundled world")
    parser.add_argument("--out", help="sweep folder (overrides the config's output_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="base training setting")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2]",
                        help="grid for every experiment block, e.g. --grid beta=[0.01,0.1]")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs at once, as subprocesses (one per GPU when there are GPUs); 1: in this process")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (runs, steps, checkpoints, memory) only")
    args = parser.parse_args(rest)
    sweep = load_sweep(args.config, output_dir=args.out, set_values=args.set, grid_values=args.grid)
    sweep_dir = Path(sweep.output_dir)
    if action == "plan" or args.dry_run:
        shown = make_plan(sweep, sweep_dir, provisional=True)
        rows = [describe_run(r, sweep_dir) for r in shown.runs]
        say(plan_table(rows))
        for line in plan_summary(rows, shown.waiting):
            say(line)
        if action == "plan":
            plan = make_plan(sweep, sweep_dir)
            write_plan(plan, sweep)
            say(f"wrote {sweep_dir / PLAN_FILE} and {sweep_dir / COMMANDS_FILE} ({len(plan.runs)} commands)")
        return 0
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1 (got {args.workers})")
    outcome = run_sweep(sweep, sweep_dir=sweep_dir, workers=args.workers, say=say)
    say(f"sweep {sweep.name}: {len(outcome.done)} entries done, {len(outcome.failed)} failed")
    for name, problem in outcome.failed.items():
        say(f"  failed: {name}: {problem}")
    for line in outcome.waiting:
        say(f"  waiting: {line}")
    say(f"report: mmpo report {sweep_dir}")
    return 1 if outcome.failed else 0
