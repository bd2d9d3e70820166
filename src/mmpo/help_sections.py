"""``mmpo train --help`` / ``mmpo sft --help`` in sections (model, data, objective, optimization,
speed, logging, checkpoints) while the config dataclasses stay flat.

tyro draws one section per nested dataclass, so the parser is given a view of the config: one
nested dataclass per section holding its fields (help text from the fields' docstrings), with the
prefixes omitted, so the flags are the flat config's own. :func:`to_sections` and
:func:`from_sections` convert between the config and that view.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import typing
from dataclasses import field
from typing import Annotated, Any

import tyro

CONFIG_HELP = "YAML file of this command's settings (keys: the option names); flags given here override it."


#: Section of each training setting in ``mmpo train --help`` / ``mmpo sft --help``.
SECTIONS: dict[str, tuple[str, list[str]]] = {
    "model": (
        "The model, its loading and LoRA adapters.",
        [
            "preset",
            "model",
            "dtype",
            "mixed_precision",
            "attn_implementation",
            "trust_remote_code",
            "chat_template_path",
            "lora",
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "lora_target_modules",
        ],
    ),
    "data": (
        "Training and validation data, chat template and truncation.",
        ["dataset", "eval_dataset", "max_prompt_length", "max_completion_length", "max_length", "on_bad_rows"],
    ),
    "objective": (
        "The preference objective and its ablations.",
        [
            "objective",
            "variant",
            "beta",
            "chosen_reward",
            "rejected_reward",
            "normalize",
            "normalize_scope",
            "aux_loss",
            "length_normalize",
            "entropy_coef",
            "gamma",
        ],
    ),
    "optimization": (
        "Optimizer, schedule, batch and seed.",
        [
            "seed",
            "epochs",
            "max_steps",
            "learning_rate",
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "global_batch_size",
            "max_grad_norm",
            "weight_decay",
            "warmup_ratio",
            "optimizer",
        ],
    ),
    "speed": (
        "Speed and memory: exact shortcuts of the forward pass, the reference log-prob cache.",
        [
            "precompute_ref",
            "cache_dir",
            "gradient_checkpointing",
            "packing",
            "share_prompt",
            "logits_chunk_size",
            "selective_recompute",
            "flex_attention",
            "liger_head",
            "group_by_length",
        ],
    ),
    "logging": (
        "Metrics, evaluation during training, trackers and the progress bar.",
        ["logging_steps", "eval_steps", "report_to", "run_name", "progress"],
    ),
    "checkpoints": (
        "The run folder, checkpoints and resuming.",
        ["output_dir", "save_steps", "save_total_limit", "resume", "resume_allow_data_change", "dry_run"],
    ),
}
OTHER_SECTION = "other"


def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring (the string literal under it), subclasses overriding bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def section_of(name: str) -> str:
    return next((section for section, (_, names) in SECTIONS.items() if name in names), OTHER_SECTION)


@functools.cache
def sectioned_class(cls: type) -> type:
    """A dataclass of one nested dataclass per section holding ``cls``'s fields, with prefixes
    omitted: the same flags as ``cls`` itself, shown in sections by ``--help``."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls, include_extras=True)
    members: dict[str, list] = {}
    for f in dataclasses.fields(cls):
        members.setdefault(section_of(f.name), []).append(
            (f.name, Annotated[hints[f.name], tyro.conf.arg(help=docs.get(f.name))])
        )
    order = [s for s in [*SECTIONS, OTHER_SECTION] if s in members]
    sections = []
    for name in order:
        listed = SECTIONS.get(name, ("", []))[1]
        fields_in_order = sorted(members[name], key=lambda m: listed.index(m[0]) if m[0] in listed else len(listed))
        section = dataclasses.make_dataclass(name, fields_in_order)
        section.__doc__ = SECTIONS[name][0] if name in SECTIONS else "Other settings."
        sections.append((name, Annotated[section, tyro.conf.OmitArgPrefixes]))
    top = dataclasses.make_dataclass(
        f"{cls.__name__}Sections",
        [*sections, ("config", Annotated[str | None, tyro.conf.arg(help=CONFIG_HELP)], field(default=None))],
    )
    return top


def to_sections(cls: type, cfg: Any) -> Any:
    top = sectioned_class(cls)
    hints = typing.get_type_hints(top, include_extras=True)
    values = {}
    for f in dataclasses.fields(top):
        if f.name == "config":
            continue
        section = typing.get_args(hints[f.name])[0]
        values[f.name] = section(**{g.name: getattr(cfg, g.name) for g in dataclasses.fields(section)})
    return top(**values, config=None)


def from_sections(cls: type, parsed: Any) -> Any:
    values = {}
    for f in dataclasses.fields(parsed):
        if f.name != "config":
            section = getattr(parsed, f.name)
            values.update({g.name: getattr(section, g.name) for g in dataclasses.fields(section)})
    return cls(**values)
