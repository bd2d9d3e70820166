"""The sweep config: the YAML schema of a study, validated key by key before anything runs.

A sweep config names a ``base`` training config, evaluation settings, optional stage-wise
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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmpo.config import OBJECTIVE_DEFAULTS, ConfigError, TrainConfig, check_keys, load_yaml
from mmpo.evaluation.checkpoint_eval import EvalSettings

OBJECTIVES = tuple(OBJECTIVE_DEFAULTS)
SWEEP_KEYS = ("name", "output_dir", "base", "eval", "evaluate_baseline", "tuning", "experiments")
BLOCK_META_KEYS = ("name", "variants")
TUNING_KEYS = ("stages", "set", "objectives")
#: The sweep without a config file: MMPO, DPO and SimPO at their defaults on the bundled world.
DEFAULT_SWEEP: dict[str, Any] = {"experiments": [{"name": "main", "objective": ["mmpo", "dpo", "simpo"]}]}


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


def objectives_of(value: Any, where: str) -> list[str]:
    """A grid's ``objective`` entry as a list, every name checked."""
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v not in OBJECTIVES:
            raise ConfigError(f"{where}: unknown objective {v!r}; objectives are {', '.join(OBJECTIVES)}")
    return values


def block_objectives(sweep: SweepConfig, block: Block) -> list[str]:
    return objectives_of(block.grid.get("objective", sweep.base.get("objective", "mmpo")), block.name)


def _check_grid(grid: dict[str, Any], where: str) -> None:
    check_keys(TrainConfig, grid, where)
    if "output_dir" in grid:
        raise ConfigError(f"{where}: 'output_dir' is chosen by the sweep (set the sweep's output_dir)")
    for key, value in grid.items():
        if isinstance(value, dict):
            unknown = [k for k in value if k not in OBJECTIVES]
            if unknown:
                raise ConfigError(
                    f"{where}: key '{key}' maps objectives to values, but {unknown} are not objectives "
                    f"({', '.join(OBJECTIVES)})"
                )
        if isinstance(value, list) and not value:
            raise ConfigError(f"{where}: key '{key}' has an empty list of values")


def _eval_section(values: dict[str, Any], source: str) -> dict[str, Any] | None:
    eval_values = values.get("eval", {})
    if eval_values is False:
        return None
    if not isinstance(eval_values or {}, dict):
        raise ConfigError(f"{source}: 'eval' must be a mapping of evaluation settings, or false")
    eval_values = dict(eval_values or {})
    check_keys(EvalSettings, eval_values, f"{source}: eval")
    return eval_values


def _blocks(values: dict[str, Any], base: dict[str, Any], source: str) -> list[Block]:
    blocks = []
    for i, raw in enumerate(values.get("experiments") or []):
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: experiments[{i}] must be a mapping")
        name = str(raw.get("name", f"block{i}"))
        where = f"{source}: experiments '{name}'"
        grid = {k: v for k, v in raw.items() if k not in BLOCK_META_KEYS}
        _check_grid(grid, where)
        objectives_of(grid.get("objective", base.get("objective", "mmpo")), where)
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
    return blocks


def _tuning(raw: dict[str, Any], source: str) -> Tuning:
    unknown = [k for k in raw if k not in TUNING_KEYS]
    if unknown:
        raise ConfigError(f"{source}: tuning: unknown key '{unknown[0]}' (keys: {', '.join(TUNING_KEYS)})")
    overrides = dict(raw.get("set") or {})
    check_keys(TrainConfig, overrides, f"{source}: tuning.set")
    stages = [dict(s) for s in raw.get("stages") or []]
    for k, stage in enumerate(stages, 1):
        _check_grid(stage, f"{source}: tuning stage {k}")
        if "objective" in stage:
            raise ConfigError(f"{source}: tuning stage {k}: give per-objective values instead of 'objective'")
    objectives = tuple(objectives_of(raw.get("objectives", list(OBJECTIVES)), f"{source}: tuning.objectives"))
    return Tuning(stages, overrides, objectives)


def sweep_from_dict(values: dict[str, Any], source: str = "sweep config") -> SweepConfig:
    """Validate a sweep config mapping (every key and value is checked before anything runs)."""
    unknown = [k for k in values if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{source}: unknown sweep key '{unknown[0]}'; sweep keys are {', '.join(SWEEP_KEYS)}")
    base = dict(values.get("base") or {})
    check_keys(TrainConfig, base, f"{source}: base")
    if "output_dir" in base:
        raise ConfigError(f"{source}: base: 'output_dir' is chosen by the sweep (set the sweep's output_dir)")
    eval_values = _eval_section(values, source)
    blocks = _blocks(values, base, source)
    tuning = _tuning(values["tuning"], source) if values.get("tuning") else None
    return SweepConfig(
        name=str(values.get("name", "sweep")),
        output_dir=str(values.get("output_dir", "runs/sweep")),
        base=base,
        eval=eval_values,
        experiments=blocks,
        tuning=tuning,
        evaluate_baseline=bool(values.get("evaluate_baseline", True)),
    )


def sweep_to_dict(sweep: SweepConfig) -> dict[str, Any]:
    """The mapping :func:`sweep_from_dict` reads back (what ``sweep.yaml`` in a sweep folder holds)."""
    out = {
        "name": sweep.name,
        "output_dir": sweep.output_dir,
        "base": sweep.base,
        "eval": sweep.eval,
        "evaluate_baseline": sweep.evaluate_baseline,
    }
    if sweep.tuning:
        out["tuning"] = {
            "objectives": list(sweep.tuning.objectives),
            "set": sweep.tuning.overrides,
            "stages": sweep.tuning.stages,
        }
    out["experiments"] = [
        {"name": b.name, **b.grid, **({"variants": b.variants} if b.variants != {"": {}} else {})}
        for b in sweep.experiments
    ]
    return out


def _parse_assignment(text: str, flag: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"{flag} expects KEY=VALUE, got {text!r}")
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def load_sweep(
    path: str | Path | None,
    *,
    output_dir: str | None = None,
    set_values: list[str] | tuple[str, ...] = (),
    grid_values: list[str] | tuple[str, ...] = (),
) -> SweepConfig:
    """A sweep from a YAML file (or :data:`DEFAULT_SWEEP`), with ``--set KEY=VALUE`` base overrides
    and ``--grid KEY=[V1,V2]`` grids added to every block."""
    values = dict(load_yaml(path) if path else DEFAULT_SWEEP)
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
