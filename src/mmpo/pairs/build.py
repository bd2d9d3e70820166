"""``mmpo pairs``: preference pairs from a model's own samples, graded by a programmatic verifier.

For each prompt, k completions are sampled (:mod:`mmpo.pairs.sampling`) and each is scored in
[0, 1] by the verifier (:mod:`mmpo.pairs.verifiers`). A pair is a higher-scored completion
(chosen) against a lower-scored one (rejected), largest score gap first. Prompts that give no pair
are counted by why: every sample right, every sample wrong, every sample equally partly right, or
fewer than two finished samples. By default only *finished* samples (that ended with an
end-of-turn token within ``max_new_tokens``) enter pairs: a reply cut off mid-sentence would be
trained as if it ended there, and its cut-off would reward brevity rather than correctness.

The output folder holds::

    sampling.json   settings, model, prompt set fingerprint (a rerun with other settings is refused)
    samples.jsonl   every prompt's k samples, appended batch by batch (an interrupted run resumes)
    graded.jsonl    every prompt's scores and outcome
    pairs.jsonl     the pairs, TRL's explicit-prompt format plus the prompt's metadata and provenance
    report.json     counts: pairs, outcomes, unfinished samples, mean score, per task
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmpo.config import ConfigError
from mmpo.pairs.sampling import SamplingSettings, batch_ranges, sample_completions
from mmpo.pairs.verifiers import resolve_verifier, score
from mmpo.world import bundled_path

SAMPLING_FILE, SAMPLES_FILE, GRADED_FILE, PAIRS_FILE, REPORT_FILE = (
    "sampling.json",
    "samples.jsonl",
    "graded.jsonl",
    "pairs.jsonl",
    "report.json",
)
OUTCOMES = ("pairs", "all_right", "all_wrong", "all_partial", "too_few_finished")
#: Columns of a prompt row that belong to an existing pair, not to the prompt: not carried over.
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class PairsOptions:
    """``mmpo pairs``: sample k answers per prompt, grade them, write preference pairs."""

    model: str = field(default_factory=lambda: str(bundled_path("sft_model")))
    """Model to sample from: a folder, Hub id or GGUF file (default: the bundled world's SFT model)."""
    prompts: str = field(default_factory=lambda: str(bundled_path("data/prefs_train.jsonl")))
    """Prompt file (.json/.jsonl) with an 'instruction' or 'prompt' column plus what the verifier reads (answer...)."""
    output_dir: str = "runs/pairs"
    """Folder for samples, pairs and the report; a rerun with the same settings resumes."""
    verifier: str = "task"
    """Built-in verifier (task: by each row's 'task'; world; add; multiply; capital) or module:function."""
    prompt_column: str | None = None
    """Column holding the prompt text (default: 'instruction' if the rows have it, else 'prompt')."""
    k: int = 4
    """Samples per prompt."""
    temperature: float = 0.7
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 48
    """Longest reply; one that is cut off here is 'unfinished'."""
    batch_size: int = 8
    """Prompts per generate call (each with its k samples); part of the seeding, so keep it to resume."""
    seed: int = 0
    """Sampling seed (per batch: seed and batch index) and tie-breaking seed for pair selection."""
    system_prompt: str | None = None
    """System message put before every prompt (default: none; the chat template may add its own)."""
    pairs_per_prompt: int = 1
    """Most pairs made from one prompt's samples (largest score gap first)."""
    require_finished: bool = True
    """Only samples that ended within max_new_tokens enter pairs."""
    limit: int | None = None
    """Use only the first N prompts."""
    dtype: str = "auto"
    """Weights dtype for sampling."""
    progress: bool = True
    """Show a progress bar."""

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(
            k=self.k,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            seed=self.seed,
            system_prompt=self.system_prompt,
        )


@dataclass
class PairsResult:
    output_dir: Path
    pairs_file: Path
    report: dict


def load_prompt_rows(path: str, column: str | None, limit: int | None) -> list[dict]:
    """Prompt rows as ``{"instruction": text, **metadata}`` (metadata of an existing pair dropped)."""
    from mmpo.evaluation.generate import load_instructions

    if column is None:
        try:
            rows = load_instructions(path, "instruction")
        except ValueError as first_error:
            try:
                rows = load_instructions(path, "prompt")
            except ValueError:
                raise ConfigError(
                    f"{first_error} (nor a 'prompt' column; name the column with prompt_column)"
                ) from None
    else:
        try:
            rows = load_instructions(path, column)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    rows = rows[:limit] if limit else rows
    return [
        {k: v for k, v in row.items() if k not in PAIR_COLUMNS and not k.startswith(("chosen_", "rejected_"))}
        for row in rows
    ]


def prompts_fingerprint(rows: Sequence[Mapping]) -> str:
    return hashlib.sha256(json.dumps([r["instruction"] for r in rows]).encode()).hexdigest()[:16]


def select_pairs(
    scores: Sequence[float], eligible: Sequence[bool], texts: Sequence[str], count: int, rng: random.Random
) -> list[tuple[int, int]]:
    """Up to ``count`` (chosen, rejected) sample indices with chosen scored higher, largest gap first.

    Ties in the gap are broken by ``rng``; two samples with the same text never form a pair.
    """
    usable = [i for i in range(len(scores)) if eligible[i]]
    candidates = [(i, j) for i in usable for j in usable if scores[i] > scores[j] and texts[i] != texts[j]]
    rng.shuffle(candidates)
    candidates.sort(key=lambda ij: scores[ij[1]] - scores[ij[0]])  # stable: shuffled order breaks ties
    return candidates[:count]


def outcome(scores: Sequence[float], eligible: Sequence[bool], pairs: Sequence[tuple[int, int]]) -> str:
    """Why a prompt did or did not give pairs (one of :data:`OUTCOMES`)."""
    if pairs:
        return "pairs"
    kept = [s for s, e in zip(scores, eligible) if e]
    if len(kept) < 2:
        return "too_few_finished"
    if min(kept) == 1.0:
        return "all_right"
    if max(kept) == 0.0:
        return "all_wrong"
    return "all_partial"  # equal scores strictly between 0 and 1, or identical texts


def _flat(values: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, Mapping) else {f"{prefix}{key}": value})
    return out


class SamplesLog:
    """``sampling.json`` + ``samples.jsonl``: what was sampled so far, checked against the current settings."""

    def __init__(self, folder: Path, header: dict):
        self.folder, self.header = folder, header
        self.path = folder / SAMPLES_FILE

    def load(self) -> dict[int, list[dict]]:
        """Samples already on disk, by prompt index; refuses a folder made with other settings."""
        settings_file = self.folder / SAMPLING_FILE
        if not settings_file.is_file():
            return {}
        saved = json.loads(settings_file.read_text())
        if saved != self.header:
            before, now = _flat(saved), _flat(self.header)
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise ConfigError(
                f"{self.folder} holds samples made with other settings ({', '.join(changed)} differ): "
                "use another output folder, or delete this one to start over"
            )
        done: dict[int, list[dict]] = {}
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8")
            complete = text[: text.rfind("\n") + 1]
            if complete != text:  # a line cut off by an interruption: drop it, so appends start on a new line
                self.path.write_text(complete, encoding="utf-8")
            for line in complete.splitlines():
                record = json.loads(line)
                done[record["index"]] = record["samples"]
        return done

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / SAMPLING_FILE).write_text(json.dumps(self.header, indent=1) + "\n")

    def append(self, batch_index: int, indices: range, samples: list[list[dict]]) -> None:
        lines = "".join(
            json.dumps({"index": i, "batch": batch_index, "samples": s}, ensure_ascii=False) + "\n"
            for i, s in zip(indices, samples)
        )
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()


def _summary(graded: list[dict], n_pairs_by_task: Counter) -> dict:
    scores = [s for g in graded for s in g["scores"]]
    finished_scores = [s for g in graded for s, f in zip(g["scores"], g["finished"]) if f]
    per_task: dict[str, dict] = {}
    by_task: dict[str, list[dict]] = defaultdict(list)
    for g in graded:
        by_task[str(g.get("task"))].append(g)
    for task, rows in sorted(by_task.items()):
        task_scores = [s for g in rows for s in g["scores"]]
        per_task[task] = {
            "prompts": len(rows),
            "mean_score": sum(task_scores) / len(task_scores),
            "pairs": n_pairs_by_task[task],
            "outcomes": dict(Counter(g["outcome"] for g in rows)),
        }
    return {
        "prompts": len(graded),
        "samples": len(scores),
        "unfinished_samples": sum(not f for g in graded for f in g["finished"]),
        "pairs": sum(n_pairs_by_task.values()),
        "outcomes": {name: sum(g["outcome"] == name for g in graded) for name in OUTCOMES},
        "mean_score": sum(scores) / len(scores) if scores else None,
        "mean_score_finished": sum(finished_scores) / len(finished_scores) if finished_scores else None,
        "per_task": per_task,
    }


def grade_and_pair(
    rows: Sequence[Mapping], samples: Mapping[int, list[dict]], verifier: Callable, options: PairsOptions
) -> tuple[list[dict], list[dict], dict]:
    """Score every sample, choose pairs; returns (graded rows, pair rows, report counts)."""
    rng = random.Random(options.seed)
    provenance_base = {"model": options.model, "verifier": options.verifier, "sampling": asdict(options.sampling())}
    graded, pairs, n_pairs_by_task = [], [], Counter()
    for index, row in enumerate(rows):
        texts = [s["text"] for s in samples[index]]
        finished = [bool(s["finished"]) for s in samples[index]]
        scores = [score(verifier, row, text, f"prompt {index} sample {j}") for j, text in enumerate(texts)]
        eligible = finished if options.require_finished else [True] * len(texts)
        chosen_pairs = select_pairs(scores, eligible, texts, options.pairs_per_prompt, rng)
        graded.append(
            {
                "index": index,
                "instruction": row["instruction"],
                "task": row.get("task"),
                "scores": scores,
                "finished": finished,
                "outcome": outcome(scores, eligible, chosen_pairs),
            }
        )
        metadata = {k: v for k, v in row.items() if k != "instruction"}
        for i, j in chosen_pairs:
            pairs.append(
                {
                    "prompt": row["instruction"],
                    "chosen": texts[i],
                    "rejected": texts[j],
                    **metadata,
                    "provenance": {
                        **provenance_base,
                        "prompt_index": index,
                        "chosen_sample": i,
                        "rejected_sample": j,
                        "chosen_score": scores[i],
                        "rejected_score": scores[j],
                        "scores": scores,
                        "finished": finished,
                    },
                }
            )
            n_pairs_by_task[str(row.get("task"))] += 1
    return graded, pairs, _summary(graded, n_pairs_by_task)


def _write_jsonl(path: Path, rows: Sequence[Mapping]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def make_pairs(options: PairsOptions, say: Callable[[str], Any] = print) -> PairsResult:
    """Sample, grade and pair (see the module docstring); every input is checked before the model loads."""
    import torch

    from mmpo.modeling import load_pretrained, load_tokenizer, resolve_dtype

    settings = options.sampling()
    try:
        settings.check()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if options.pairs_per_prompt < 1:
        raise ConfigError(f"pairs_per_prompt must be >= 1 (got {options.pairs_per_prompt})")
    if options.k < 2:
        raise ConfigError(f"k must be >= 2 to compare samples (got {options.k})")
    verifier = resolve_verifier(options.verifier)
    rows = load_prompt_rows(options.prompts, options.prompt_column, options.limit)
    for index, row in enumerate(rows):  # a row the verifier cannot read fails now, not after sampling
        try:
            score(verifier, row, "", f"prompt {index}")
        except ValueError as err:
            raise ConfigError(f"{options.prompts}: {err}") from None

    out = Path(options.output_dir)
    header = {
        "model": options.model,
        "prompts": options.prompts,
        "prompts_fingerprint": prompts_fingerprint(rows),
        "prompt_count": len(rows),
        "sampling": asdict(settings),
        "dtype": options.dtype,
    }
    log = SamplesLog(out, header)
    samples = log.load()
    batches = batch_ranges(len(rows), settings.batch_size)
    done_batches = {b for b, r in enumerate(batches) if all(i in samples for i in r)}
    if len(done_batches) < len(batches):
        say(
            f"sampling {settings.k} answers for {len(rows) - sum(len(batches[b]) for b in done_batches)} prompts "
            f"with {options.model}" + (f" (resuming: {len(done_batches)} batches on disk)" if done_batches else "")
        )
        tokenizer = load_tokenizer(options.model)
        model = load_pretrained(options.model, dtype=resolve_dtype(options.dtype), is_trainable=False)
        if torch.cuda.is_available():
            model = model.to("cuda")
        log.start()
        samples.update(
            sample_completions(
                model,
                tokenizer,
                [r["instruction"] for r in rows],
                settings,
                skip_batches=done_batches,
                on_batch=log.append,
                progress=options.progress,
            )
        )
    else:
        say(f"all {len(rows)} prompts already sampled in {out}")

    graded, pairs, report = grade_and_pair(rows, samples, verifier, options)
    _write_jsonl(out / GRADED_FILE, graded)
    _write_jsonl(out / PAIRS_FILE, pairs)
    report = {
        **report,
        "model": options.model,
        "verifier": options.verifier,
        "prompts_file": options.prompts,
        "sampling": asdict(settings),
        "require_finished": options.require_finished,
        "pairs_per_prompt": options.pairs_per_prompt,
        "pairs_file": str(out / PAIRS_FILE),
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return PairsResult(output_dir=out, pairs_file=out / PAIRS_FILE, report=report)


def report_lines(report: Mapping) -> list[str]:
    """A few lines for the console (plain text: no markup)."""
    o = report["outcomes"]
    lines = [
        (
            f"{report['pairs']} pairs from {report['prompts']} prompts ({report['samples']} samples, "
            f"{report['unfinished_samples']} unfinished); mean score {report['mean_score']:.3f}"
        ),
        (
            f"no pair: {o['all_right']} all right, {o['all_wrong']} all wrong, {o['all_partial']} all equally partial, "
            f"{o['too_few_finished']} with fewer than two finished samples"
        ),
    ]
    for task, t in report["per_task"].items():
        lines.append(f"  {task}: {t['prompts']} prompts, mean score {t['mean_score']:.3f}, {t['pairs']} pairs")
    lines.append(f"pairs: {report['pairs_file']}")
    return lines
