"""AlpacaEval's own annotator (the paper's judge), run by the installed ``alpaca-eval`` package.

``alpaca_eval:weighted_alpaca_eval_gpt-4o-mini-2024-07-18`` (or any annotator configuration the
package ships) runs ``alpaca_eval.annotators.PairwiseAnnotator`` itself: its configuration file,
prompt template, decoding parameters, output-order randomization (seeded on the instruction, with
AlpacaEval's default seed), completion parser and its 1.5 for identical outputs all come from the
installed package at run time; nothing of them is copied here. This module only feeds it our
records (baseline as ``output_1``, model as ``output_2``, exactly as ``alpaca_eval evaluate`` does)
and turns its annotations into the judging rows the win-rate functions read.

The judge endpoint is any OpenAI-compatible server: the OpenAI client is built from the
environment (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``). Annotations are cached in AlpacaEval's own
JSON cache; failed ones (no parsable reply, no log-probs) are not stored, so a rerun retries them.

Needs the optional extra: ``pip install 'mmpo[alpaca]'`` (alpaca-eval 0.6.6 imports
``pkg_resources``, hence ``setuptools<81``).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmpo.evaluation.judges import FatalJudgeError, MissingAPIKeyError

__all__ = ["PAPER_ANNOTATOR", "AlpacaEvalAnnotator", "import_alpaca_eval"]

log = logging.getLogger(__name__)

#: The paper's annotator configuration in the alpaca-eval package.
PAPER_ANNOTATOR = "weighted_alpaca_eval_gpt-4o-mini-2024-07-18"
INSTALL_HINT = "pip install 'mmpo[alpaca]'  (alpaca-eval==0.6.6 with setuptools<81)"


def import_alpaca_eval():
    """``alpaca_eval`` with its annotators loaded, or one clear error saying how to install it."""
    root = logging.getLogger()
    level = root.level
    try:
        import alpaca_eval
        import alpaca_eval.annotators
    except ImportError as err:
        hint = " (setuptools >= 81 no longer ships pkg_resources)" if "pkg_resources" in str(err) else ""
        raise FatalJudgeError(
            f"AlpacaEval's annotator needs the alpaca-eval package: {INSTALL_HINT}; importing it failed: {err}{hint}"
        ) from None
    finally:
        root.setLevel(level)  # keep the caller's logging as it was
    return alpaca_eval


def _annotator_configs_dir() -> Path:
    return Path(import_alpaca_eval().__file__).parent / "evaluators_configs"


def _load_config(name: str) -> dict:
    path = _annotator_configs_dir() / name / "configs.yaml"
    if not path.is_file():
        known = sorted(p.parent.name for p in _annotator_configs_dir().glob("*/configs.yaml"))
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        raise FatalJudgeError(
            f"alpaca-eval has no annotator configuration '{name}'"
            + (f" (close matches: {', '.join(close)})" if close else "")
        )
    return yaml.safe_load(path.read_text())


@dataclass
class AlpacaEvalAnnotator:
    """AlpacaEval's annotator ``config`` (a folder name under the package's ``evaluators_configs``)."""

    config: str = PAPER_ANNOTATOR

    @property
    def name(self) -> str:
        return f"alpaca_eval:{self.config}"

    @property
    def identity(self) -> str:
        return f"alpaca_eval|{self.config}|{import_alpaca_eval().__version__}"

    def _uses_openai(self) -> bool:
        return all(c.get("fn_completions") == "openai_completions" for c in _load_config(self.config).values())

    def check_ready(self) -> None:
        """The package imports, the configuration exists, and an OpenAI key is set when it calls OpenAI."""
        import_alpaca_eval()
        if self._uses_openai() and not os.environ.get("OPENAI_API_KEY", "").strip():
            raise MissingAPIKeyError(
                f"{self.name} needs an API key in the environment variable OPENAI_API_KEY, "
                "which is unset or empty (OPENAI_BASE_URL picks the endpoint)"
            )

    def annotate(
        self,
        records_model: Sequence[Mapping],
        records_baseline: Sequence[Mapping],
        *,
        cache_path: str | Path,
        work_dir: str | Path,
    ) -> list[dict]:
        """Judge ``records_model[i]`` against ``records_baseline[i]``; rows as :func:`judge_pairs` returns them.

        ``preference`` is AlpacaEval's preference minus 1 (the probability that the model's output
        wins); ``annotation`` keeps AlpacaEval's own row for the ``annotations.json`` file.
        """
        self.check_ready()
        from alpaca_eval.annotators import PairwiseAnnotator

        level = logging.getLogger().level
        decoding: dict[str, Any] = {}
        if self._uses_openai():
            # An explicit client config: the OpenAI client reads key and base URL from the
            # environment, and AlpacaEval does not warn about a missing config file on every call.
            client_config = Path(work_dir) / "openai_client_config.yaml"
            client_config.parent.mkdir(parents=True, exist_ok=True)
            client_config.write_text(yaml.safe_dump({"default": [{}]}))
            decoding["client_config_path"] = str(client_config)
        _forget_failed_annotations(Path(cache_path))
        try:
            annotator = PairwiseAnnotator(annotators_config=self.config, caching_path=str(cache_path))
            annotated = annotator.annotate_head2head(
                outputs_1=[dict(r) for r in records_baseline],
                outputs_2=[dict(r) for r in records_model],
                is_ordered=True,
                **decoding,
            )
        except FatalJudgeError:
            raise
        except Exception as err:  # the SDK's auth/connection errors surface here, after its own retries
            key = os.environ.get("OPENAI_API_KEY", "")
            message = (
                f"{type(err).__name__}: {err}".replace(key, "<redacted>") if key else f"{type(err).__name__}: {err}"
            )
            raise FatalJudgeError(
                f"AlpacaEval's annotator {self.config} failed: {message[:500]} "
                f"(annotations finished so far are cached in {cache_path})"
            ) from None
        finally:
            logging.getLogger().setLevel(level)
        if len(annotated) != len(records_model):
            raise FatalJudgeError(
                f"AlpacaEval's annotator returned {len(annotated)} rows for {len(records_model)} pairs"
            )
        return [_row(i, a, m, b) for i, (a, m, b) in enumerate(zip(annotated, records_model, records_baseline))]


def _forget_failed_annotations(cache_path: Path) -> None:
    """Drop the cache's failed rows (AlpacaEval stores them as -1 and would never ask again)."""
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    if not cache_path.is_file():
        return
    rows = json.loads(cache_path.read_text() or "[]")
    kept = [r for r in rows if not _missing(r.get("preference")) and r.get("preference") != -1]
    if len(kept) != len(rows):
        log.info("%s: %d failed annotations will be asked again", cache_path, len(rows) - len(kept))
        cache_path.write_text(json.dumps(kept, indent=2))


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _row(index: int, annotation: Mapping, model: Mapping, baseline: Mapping) -> dict:
    if annotation["output_2"] != model["output"] or annotation["output_1"] != baseline["output"]:
        raise FatalJudgeError(f"AlpacaEval's annotation {index} does not belong to pair {index} (order lost)")
    preference = annotation.get("preference")
    failed = _missing(preference)
    switched = annotation.get("is_switched_outputs")
    row = {
        "index": index,
        "instruction": model["instruction"],
        "generator_a": model.get("generator"),
        "generator_b": baseline.get("generator"),
        "output_a": model["output"],
        "output_b": baseline["output"],
        "preference": None if failed else float(preference) - 1.0,
        "flipped": None if _missing(switched) else bool(switched),
        "raw": ""
        if _missing(annotation.get("preference_raw_completion"))
        else str(annotation["preference_raw_completion"])[:500],
        "error": (
            "AlpacaEval's annotator gave no annotation (unparsable reply or no log-probs); a rerun retries it"
            if failed
            else None
        ),
        "annotation": {k: (None if _missing(v) else v) for k, v in annotation.items()},
    }
    if annotation["output_1"] == annotation["output_2"]:
        row["identical"] = True
    if "difficulty" in model:
        row["difficulty"] = model["difficulty"]
    return row
