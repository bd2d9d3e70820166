"""The judging loop: every model output against the baseline's, resumable, with retries.

:func:`judge_pairs` runs one of this package's judges (:mod:`mmpo.evaluation.judges`) over a
model's outputs against a baseline's: it shows each pair in a seeded random order (the verdict is
un-flipped afterwards, so a position-biased judge does not bias the win-rate), calls the judge from
a few threads, retries transient failures with exponential back-off (honouring ``Retry-After``),
caches every successful verdict on disk so a rerun costs nothing and resumes where it stopped, and
records failures as errors, which the win-rate excludes rather than counting as losses. Identical
outputs are a tie (0.5, AlpacaEval's 1.5) without a call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from mmpo.evaluation.judges import (
    FatalJudgeError,
    Judge,
    JudgeError,
    JudgeVerdict,
    RateLimitError,
    TransientJudgeError,
)

__all__ = ["JudgmentCache", "judge_pairs"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ cache


class JudgmentCache:
    """Append-only JSONL of successful verdicts, keyed by judge identity, instruction, both outputs
    and the order they were shown in. Each line is flushed as it is written, so an interrupted run
    loses nothing and a rerun resumes. Failed calls are not cached: a rerun tries them again."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        if self.path.exists():
            for line_no, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    entry = json.loads(line)
                    self._entries[entry["key"]] = entry
                except (ValueError, KeyError, TypeError):
                    log.warning(
                        "judgment cache %s: skipping unreadable line %d (an interrupted write?)", self.path, line_no
                    )
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(identity: str, instruction: str, shown_first: str, shown_second: str) -> str:
        payload = json.dumps([identity, instruction, shown_first, shown_second], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def get(self, key: str) -> JudgeVerdict | None:
        entry = self._entries.get(key)
        return None if entry is None else JudgeVerdict(entry["preference"], entry.get("raw", ""))

    def put(self, key: str, verdict: JudgeVerdict) -> None:
        entry = {"key": key, "preference": verdict.preference, "raw": verdict.raw}
        with self._lock:
            self._entries[key] = entry
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def __len__(self) -> int:
        return len(self._entries)


# ---------------------------------------------------------------------------------- judging loop


def _validate_pairs(records_a: Sequence[Mapping], records_b: Sequence[Mapping]) -> None:
    if len(records_a) != len(records_b):
        raise ValueError(
            f"records_a has {len(records_a)} records but records_b has {len(records_b)}; they must pair up one to one"
        )
    for side, records in (("records_a", records_a), ("records_b", records_b)):
        for i, record in enumerate(records):
            for key in ("instruction", "output"):
                if not isinstance(record.get(key), str):
                    raise ValueError(f"{side}[{i}] needs a string '{key}' (keys: {sorted(record)})")
    for i, (a, b) in enumerate(zip(records_a, records_b)):
        if a["instruction"] != b["instruction"]:
            raise ValueError(
                f"record {i}: the instructions differ between the two output sets "
                f"({a['instruction'][:60]!r} vs {b['instruction'][:60]!r}); both must follow the same prompt order"
            )


def _backoff_delay(attempt: int, err: TransientJudgeError, base: float, cap: float) -> float:
    if err.retry_after is not None:
        return min(err.retry_after, cap)
    return min(cap, base * 2**attempt) * random.uniform(0.5, 1.0)


def judge_pairs(
    judge: Judge,
    records_a: Sequence[Mapping],
    records_b: Sequence[Mapping],
    *,
    cache_path: str | Path | None = None,
    max_concurrency: int = 4,
    max_retries: int = 5,
    seed: int = 0,
    backoff_base: float = 1.0,
    max_backoff: float = 60.0,
    progress: bool = False,
) -> list[dict]:
    """Judge ``records_a[i]`` (the model) against ``records_b[i]`` (the baseline) for every i.

    Records are AlpacaEval-style dicts with ``instruction`` and ``output`` (and ``generator``);
    ``records_a[i]`` is passed to the judge as ``example`` (a programmatic judge grades from its
    metadata). Returns one dict per example: ``index``, ``instruction``, ``output_a``,
    ``output_b``, ``generator_a``, ``generator_b``, ``preference`` (probability that A is better,
    None on failure), ``flipped`` (B was shown first), ``raw``, ``error``, ``cached``, ``identical``
    (only when the two outputs are the same: 0.5 with no call) and, when the model's record has
    one, ``difficulty``.

    Raises :class:`MissingAPIKeyError` before any call when the key is missing, and
    :class:`FatalJudgeError` (e.g. :class:`EndpointUnreachableError`) when the run cannot go on;
    verdicts obtained so far are already in the cache then.
    """
    _validate_pairs(records_a, records_b)
    if max_concurrency < 1 or max_retries < 0:
        raise ValueError(f"max_concurrency must be >= 1 and max_retries >= 0 (got {max_concurrency}, {max_retries})")
    check_ready = getattr(judge, "check_ready", None)
    if check_ready is not None:
        check_ready()
    identity = judge.identity
    cache = JudgmentCache(cache_path) if cache_path is not None and getattr(judge, "cacheable", True) else None
    coin = random.Random(seed)
    flips = [coin.random() < 0.5 for _ in records_a]  # one seeded coin per example: show B first?
    stop = threading.Event()

    def judge_one(i: int) -> dict:
        a, b = records_a[i], records_b[i]
        shown = (b["output"], a["output"]) if flips[i] else (a["output"], b["output"])
        row = {
            "index": i,
            "instruction": a["instruction"],
            "generator_a": a.get("generator"),
            "generator_b": b.get("generator"),
            "output_a": a["output"],
            "output_b": b["output"],
            "preference": None,
            "flipped": flips[i],
            "raw": "",
            "error": None,
            "cached": False,
        }
        if "difficulty" in a:
            row["difficulty"] = a["difficulty"]
        if a["output"] == b["output"]:  # nothing to judge: a tie, as AlpacaEval records it, at no cost
            row.update(preference=0.5, raw="identical outputs: not sent to the judge", identical=True)
            return row
        key = JudgmentCache.key(identity, a["instruction"], *shown) if cache is not None else None
        verdict = cache.get(key) if cache is not None else None
        row["cached"] = verdict is not None
        if verdict is None:
            verdict = _call_with_retries(
                judge, a["instruction"], *shown, a, max_retries, backoff_base, max_backoff, stop
            )
            if cache is not None and verdict.error is None:
                cache.put(key, verdict)
        row["raw"], row["error"] = verdict.raw, verdict.error
        if verdict.error is None:
            p = float(verdict.preference)
            row["preference"] = 1.0 - p if flips[i] else p  # back to "A is better"
        return row

    rows: list[dict | None] = [None] * len(records_a)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records_a), desc=f"judging ({getattr(judge, 'name', judge.identity)})")
    with ThreadPoolExecutor(max_workers=max_concurrency) as pool:
        futures = {pool.submit(judge_one, i): i for i in range(len(records_a))}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    rows[futures[future]] = future.result()  # re-raises a fatal error
                    if bar is not None:
                        bar.update(1)
        except BaseException:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            if bar is not None:
                bar.close()
    n_errors = sum(r["error"] is not None for r in rows)
    if n_errors:
        first = next(r for r in rows if r["error"] is not None)
        log.warning(
            "%d of %d judgments failed and are excluded from the win-rate (first, example %d: %s)",
            n_errors,
            len(rows),
            first["index"],
            first["error"],
        )
    return rows


def _call_with_retries(
    judge: Judge,
    instruction: str,
    first: str,
    second: str,
    example: Mapping,
    max_retries: int,
    backoff_base: float,
    max_backoff: float,
    stop: threading.Event,
) -> JudgeVerdict:
    for attempt in range(max_retries + 1):
        if stop.is_set():
            raise FatalJudgeError("judging stopped after a fatal error in another example")
        try:
            return judge.judge(instruction, first, second, example)
        except TransientJudgeError as err:
            if attempt == max_retries:
                if isinstance(err, FatalJudgeError):
                    raise
                kind = "rate limit" if isinstance(err, RateLimitError) else "transient errors"
                return JudgeVerdict(None, "", f"{kind} exhausted {max_retries} retries: {err}")
            time.sleep(_backoff_delay(attempt, err, backoff_base, max_backoff))
        except FatalJudgeError:
            raise
        except JudgeError as err:
            return JudgeVerdict(None, "", str(err))
    raise AssertionError("unreachable")
