"""Configs as plain values: YAML files in and out, unknown keys refused, the resume comparison and
the flat view that experiment trackers take as hyper-parameters."""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from mmpo.config.aliases import ALIAS_NAMES, translate
from mmpo.config.provenance import with_sources, with_values
from mmpo.config.training import ConfigError


def config_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def check_keys(cls: type, values: dict[str, Any], source: str) -> None:
    """Reject unknown keys, naming them and the closest known key."""
    known = config_fields(cls)
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known | ALIAS_NAMES), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown config key '{key}'{hint}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    # A broken or non-UTF-8 file raises yaml's / Python's own error: the command line's error handler
    # (mmpo.errors) names the file, the line and column or the encoding, with a hint.
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    return values


#: A number PyYAML (YAML 1.1) leaves as text: scientific notation without a dot, e.g. 5e-4.
_EXPONENT_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$")


def _is_float_field(hint: Any) -> bool:
    return hint is float or float in typing.get_args(hint)


def _clean(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """YAML lists become tuples, a lone string a one-item tuple, and numbers PyYAML leaves as strings
    (YAML 1.1 reads ``5e-4`` as text; it needs ``5.0e-4``) become floats."""
    hints = typing.get_type_hints(cls)
    clean = {}
    for key, value in values.items():
        hint = hints[key]
        if typing.get_origin(hint) is tuple or "tuple" in str(hint):
            value = tuple(value) if isinstance(value, list) else (value,) if isinstance(value, str) else value
        elif isinstance(value, str) and _is_float_field(hint) and _EXPONENT_NUMBER.match(value.strip()):
            value = float(value)  # any other text stays text: the type check names the key
        clean[key] = value
    return clean


def from_dict(cls: type, values: dict[str, Any], source: str = "config", base: Any = None) -> Any:
    """Build ``cls`` from plain values (YAML), on top of ``base`` (or the defaults).

    The values are recorded as coming from ``file:<source>`` (see ``mmpo.config.provenance``). TRL
    and alignment-handbook key names are read as ours (``mmpo.config.aliases``).
    """
    values, ignored = translate(values, config_fields(cls), source)
    if ignored:
        print(f"{source}: ignored (their trainer's bookkeeping, no effect here): {', '.join(ignored)}")
    check_keys(cls, values, source)
    clean = _clean(cls, values)
    if base is None:
        return with_sources(cls(**clean), dict.fromkeys(clean, f"file:{source}"))
    return with_values(base, f"file:{source}", **clean)


def to_dict(cfg: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def flat_hparams(cfg: Any) -> dict[str, str | int | float | bool]:
    """The config as scalars only (lists joined by commas, unset values as ''), which every tracker
    accepts as hyper-parameters (TensorBoard refuses lists and None)."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in to_dict(cfg).items():
        if isinstance(value, list):
            value = ",".join(map(str, value))
        flat[key] = "" if value is None else value
    return flat


# Keys whose change does not make a resumed run a different run.
RESUME_NEUTRAL_KEYS = {
    "resume",
    "resume_allow_data_change",
    "dry_run",
    "progress",
    "report_to",
    "run_name",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "epochs",
    "max_steps",
    "output_dir",
    "cache_dir",
}


def resume_mismatches(saved: dict[str, Any], current: Any) -> list[str]:
    """Keys whose value differs between a run's saved config and ``current``. A key the saved config
    lacks (written before the key existed) counts only if ``current`` moves it off its default."""
    now = to_dict(current)
    defaults = to_dict(type(current)())
    neutral = set(RESUME_NEUTRAL_KEYS)
    if now.get("global_batch_size") and saved.get("global_batch_size"):
        # The global batch is the setting; accumulation is derived from it and the number of processes.
        neutral.add("gradient_accumulation_steps")
    return sorted(k for k in set(saved) | set(now) if k not in neutral and saved.get(k, defaults.get(k)) != now.get(k))
