"""Capability retention: zero-shot accuracy through lm-evaluation-harness (``lm_eval``).

``lm_eval`` does all the work (prompting, log-likelihood scoring, metrics); this module picks the
tasks, turns a folder of simple JSONL files into lm-eval tasks, runs ``simple_evaluate`` on a
model folder or LoRA adapter folder, and reduces the results to per-task ``acc``/``acc_norm`` and
their average.

The paper's ten tasks (:data:`PAPER_TASKS`) are lm-eval's built-ins; they download their data from
the Hugging Face Hub on first use, so they need network access (or a warm ``HF_DATASETS_CACHE``).
``mathqa`` needs a loading-script fix on ``datasets`` >= 4: its Hub dataset (``allenai/math_qa``) is
defined by a Python loading script, which ``datasets`` 4 stopped running, so point the task at a
script-free copy of the data (e.g. the Hub's parquet conversion, via an lm-eval task override) or
run it with ``datasets`` < 4. Local tasks run fully offline.

A local task is ``<name>.jsonl`` in ``local_tasks_dir``, one multiple-choice question per line::

    {"query": "Question: ...\\nAnswer:", "choices": ["a", "b", "c"], "gold": 1}

``acc`` scores the choice with the highest summed log-likelihood, ``acc_norm`` the highest
per-byte log-likelihood (lm-eval's definitions).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from mmpo.gguf_models import gguf_source

__all__ = ["PAPER_TASKS", "run_harness", "write_local_task_yamls", "summarize_lm_eval_results"]

log = logging.getLogger(__name__)

#: The ten zero-shot tasks of the paper's LM-accuracy average.
PAPER_TASKS = (
    "winogrande",
    "arc_easy",
    "piqa",
    "hellaswag",
    "openbookqa",
    "arc_challenge",
    "mmlu",
    "mathqa",
    "race",
    "commonsense_qa",
)


def _validate_local_task(path: Path) -> int:
    """Check every row of a local task file; returns the row count."""
    n = 0
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}: line {line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with query/choices/gold")
        if not isinstance(row.get("query"), str):
            raise ValueError(f"{where}: 'query' must be a string (keys: {sorted(row)})")
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: 'choices' must be a list of at least two strings")
        gold = row.get("gold")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise ValueError(
                f"{where}: 'gold' must be an integer index into 'choices' (0..{len(choices) - 1}), got {gold!r}"
            )
        n += 1
    if n == 0:
        raise ValueError(f"{path}: no rows")
    return n


def write_local_task_yamls(local_tasks_dir: str | Path, include_dir: str | Path) -> list[str]:
    """Write one lm-eval task YAML per ``<name>.jsonl`` into ``include_dir``; returns the task names."""
    source = Path(local_tasks_dir).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"local tasks folder not found: {source}")
    names = []
    for data_file in sorted(source.glob("*.jsonl")):
        _validate_local_task(data_file)
        config = {
            "task": data_file.stem,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data_file)}},  # absolute: lm-eval runs from anywhere
            "test_split": "test",
            "output_type": "multiple_choice",
            # Column names, not Jinja: a rendered template that looks like a number
            # ("0123456789") is literal_eval'ed by lm-eval; a column's text is used as is.
            "doc_to_text": "query",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
            "metadata": {"version": 1.0},
        }
        (Path(include_dir) / f"{data_file.stem}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        names.append(data_file.stem)
    if not names:
        raise ValueError(f"{source} holds no <name>.jsonl task files")
    return names


def _pretrained_args(model: str) -> str:
    """``pretrained=`` for a folder / Hub id; a GGUF file is its folder plus ``gguf_file=`` (lm-eval's HFLM)."""
    gguf = gguf_source(model)
    if gguf is not None:
        return f"pretrained={gguf.folder},gguf_file={gguf.file}"
    return f"pretrained={Path(model).resolve() if Path(model).exists() else model}"


def _model_args(model_path: str | Path, dtype: str) -> str:
    """lm-eval's ``model_args`` for a model folder / Hub id / GGUF file, or base + ``peft=`` for a LoRA adapter."""
    path = Path(model_path)
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        args = f"{_pretrained_args(base)},peft={path.resolve()}"
        if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
            args += f",tokenizer={path.resolve()}"
    else:
        args = _pretrained_args(str(model_path))
    return f"{args},dtype={dtype}"


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def _metric(entry: dict, name: str) -> float | None:
    value = entry.get(f"{name},none", entry.get(name))
    return float(value) if isinstance(value, (int, float)) else None


def summarize_lm_eval_results(results: dict, tasks: Sequence[str]) -> dict:
    """Per-task acc/acc_norm (with standard errors) and the averages from ``simple_evaluate``'s output.

    ``average_acc`` averages ``acc``; ``average_acc_norm`` averages ``acc_norm`` where a task
    reports it and ``acc`` where it does not (winogrande, mmlu).
    """
    per_task = {}
    for task in tasks:
        entry = results.get("results", {}).get(task) or results.get("groups", {}).get(task)
        if entry is None:
            raise KeyError(f"lm-eval returned no results for task '{task}'")
        per_task[task] = {
            "acc": _metric(entry, "acc"),
            "acc_stderr": _metric(entry, "acc_stderr"),
            "acc_norm": _metric(entry, "acc_norm"),
            "acc_norm_stderr": _metric(entry, "acc_norm_stderr"),
        }
    accs = [m["acc"] for m in per_task.values() if m["acc"] is not None]
    norms = [m["acc_norm"] if m["acc_norm"] is not None else m["acc"] for m in per_task.values()]
    norms = [v for v in norms if v is not None]
    return {
        "tasks": per_task,
        "average_acc": sum(accs) / len(accs) if accs else None,
        "average_acc_norm": sum(norms) / len(norms) if norms else None,
    }


@contextlib.contextmanager
def _quiet_git_probe():
    """lm-eval records ``git describe`` of the working folder, and git prints "fatal: not a git
    repository" outside one; run that probe with git's stderr discarded (same result otherwise)."""
    import lm_eval.evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    def git_hash_quietly():
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return get_commit_from_path(os.getcwd())

    original = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = git_hash_quietly
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = original


def run_harness(
    model_path: str | Path,
    tasks: Sequence[str] = PAPER_TASKS,
    *,
    local_tasks_dir: str | Path | None = None,
    batch_size: int | str = 8,
    apply_chat_template: bool = False,
    seed: int = 42,
    limit: int | float | None = None,
    dtype: str = "auto",
    device: str | None = None,
) -> dict:
    """Zero-shot lm-eval accuracy of a model folder, GGUF file or LoRA adapter folder on ``tasks``.

    ``tasks`` may name lm-eval built-ins and the ``<name>`` of any ``<name>.jsonl`` in
    ``local_tasks_dir``. Unknown names fail before anything runs, listing close matches. Returns
    ``{"tasks": {name: {acc, acc_stderr, acc_norm, acc_norm_stderr}}, "average_acc",
    "average_acc_norm", "config"}``. The paper ran with the chat template applied and seed 42.
    """
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks to run")
    is_gguf = gguf_source(str(model_path)) is not None  # a missing local .gguf file is a clear error here
    if not is_gguf and not Path(model_path).is_dir() and not _looks_like_hub_id(str(model_path)):
        raise FileNotFoundError(f"model folder not found: {model_path}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory(prefix="mmpo_lm_eval_tasks_") as include_dir:
        local_names = write_local_task_yamls(local_tasks_dir, include_dir) if local_tasks_dir is not None else []
        only_local = all(t in local_names for t in tasks)
        # Indexing lm-eval's ~15k built-in tasks takes ~20 s on 2 cores: skip it when every task is local.
        manager = TaskManager(include_path=include_dir if local_names else None, include_defaults=not only_local)
        known = set(manager.all_tasks)
        unknown = [t for t in tasks if t not in known]
        if unknown:
            hints = "; ".join(
                f"'{t}' (close matches: {', '.join(difflib.get_close_matches(t, known, n=5, cutoff=0.6)) or 'none'})"
                for t in unknown
            )
            raise ValueError(f"unknown lm-eval task(s): {hints}")

        config = {
            "model_args": _model_args(model_path, dtype),
            "tasks": tasks,
            "num_fewshot": 0,
            "batch_size": batch_size,
            "apply_chat_template": apply_chat_template,
            "seed": seed,
            "limit": limit,
            "device": device,
            "lm_eval_version": getattr(lm_eval, "__version__", None),
        }
        log.info("lm-eval: %s", config)
        with _quiet_git_probe():
            results = lm_eval.simple_evaluate(
                model="hf",
                model_args=config["model_args"],
                tasks=tasks,
                num_fewshot=0,
                batch_size=batch_size,
                device=device,
                limit=limit,
                apply_chat_template=apply_chat_template,
                task_manager=manager,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                log_samples=False,
            )
    if results is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm-eval returned no results (is this a non-main process of a distributed run?)")
    summary = summarize_lm_eval_results(results, tasks)
    summary["config"] = config
    return summary
