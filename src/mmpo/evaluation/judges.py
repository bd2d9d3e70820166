"""Pairwise judges (OpenAI-compatible, Anthropic, programmatic) and a resumable judging loop.

A judge answers one question: given an instruction and two outputs shown as A and B, how likely
is A the better one? (:class:`JudgeVerdict.preference` in [0, 1]; 0.5 is a tie.)
:func:`judge_pairs` runs a judge over a model's outputs against a baseline's: it shows each pair in
a seeded random order (the verdict is un-flipped afterwards, so a position-biased judge does not
bias the win-rate), calls the judge from a few threads, retries transient failures with
exponential back-off (honouring ``Retry-After``), caches every verdict on disk so a rerun costs
nothing and resumes where it stopped, and records failures as errors, which the win-rate
excludes rather than counting as losses.

Transport failures are exceptions: :class:`TransientJudgeError` (rate limit, server error,
timeout, connection refused) is retried; :class:`FatalJudgeError` (missing or rejected API key,
an endpoint still unreachable after the retries) stops the whole run; any other
:class:`JudgeError` fails only its example. A reply that arrives but cannot be read comes back as
a verdict with ``error`` set (and the raw text kept for inspection).

API keys are read from the environment at call time and never stored on the judge, so they
cannot appear in a ``repr``, a log line, the cache or an error message (error bodies are also
scrubbed of the key in case a server echoes it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import requests

__all__ = [
    "JudgeVerdict",
    "Judge",
    "JudgeError",
    "TransientJudgeError",
    "RateLimitError",
    "FatalJudgeError",
    "MissingAPIKeyError",
    "EndpointUnreachableError",
    "OpenAIJudge",
    "AnthropicJudge",
    "ProgrammaticJudge",
    "JudgmentCache",
    "judge_pairs",
    "PAIRWISE_SYSTEM_PROMPT",
    "PAIRWISE_USER_TEMPLATE",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class JudgeVerdict:
    """``preference``: probability that the output shown as A is better (0.5 = tie; None = failed)."""

    preference: float | None
    raw: str = ""
    error: str | None = None


@runtime_checkable
class Judge(Protocol):
    """Anything with a stable ``identity`` (the cache key's judge part) and a ``judge`` method."""

    @property
    def identity(self) -> str: ...

    def judge(self, instruction: str, output_a: str, output_b: str, example: Mapping | None = None) -> JudgeVerdict: ...


class JudgeError(RuntimeError):
    """A judge call failed for this example only (bad request, unusable reply)."""


class TransientJudgeError(JudgeError):
    """Worth retrying: rate limit, server error, timeout, refused connection."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitError(TransientJudgeError):
    """HTTP 429."""


class FatalJudgeError(JudgeError):
    """Every call would fail the same way (missing/rejected key): stop the run."""


class MissingAPIKeyError(FatalJudgeError):
    pass


class EndpointUnreachableError(TransientJudgeError, FatalJudgeError):
    """Retried like a transient error; if it outlasts the retries, fatal."""


# ------------------------------------------------------------------------------- the judge prompt

# The pairwise format of AlpacaEval's ``weighted_alpaca_eval_*`` annotators (the paper's judges):
# two outputs labelled "m" and "M", and a single-token answer naming the better one, so the
# log-probs of those two tokens give a continuous preference. The wording here is our own; pass
# ``system_prompt``/``user_template`` to use AlpacaEval's exact template file instead.
PAIRWISE_SYSTEM_PROMPT = (
    "You are an impartial evaluator of AI assistants. You compare two responses to the same "
    "instruction and pick the one a careful human reader would prefer."
)
PAIRWISE_USER_TEMPLATE = """We are ranking language models by the quality of their answers. Below is an instruction and the outputs of two models, each labelled with a model identifier. Pick the output a thoughtful human would judge best.

## Instruction

{{
    "instruction": \"\"\"{instruction}\"\"\"
}}

## Model outputs (in no particular order)

{{
    {{
        "model_identifier": "m",
        "output": \"\"\"{output_1}\"\"\"
    }},
    {{
        "model_identifier": "M",
        "output": \"\"\"{output_2}\"\"\"
    }}
}}

## Task

Judge the outputs on quality, correctness and relevance to the instruction, then name the model that produced the best output. Your reply is read as the identifier of the best model, so reply with exactly one of the two identifiers and nothing else (no quotes, no spaces, no punctuation, no new lines): m or M.

## Best model identifier"""

FIRST_LABEL, SECOND_LABEL = "m", "M"
_LABEL_IN_TEXT = re.compile(r"[\s`'\"*\[\](){}.:]*([mM])[\s`'\"*\[\](){}.:]*")


def _render_prompt(user_template: str, instruction: str, output_1: str, output_2: str) -> str:
    return user_template.format(instruction=instruction, output_1=output_1, output_2=output_2)


def parse_binary_label(text: str) -> float | None:
    """1.0 if the reply names the first output ("m"), 0.0 for the second ("M"), None otherwise."""
    match = _LABEL_IN_TEXT.fullmatch(text or "")
    if match is None:
        return None
    return 1.0 if match.group(1) == FIRST_LABEL else 0.0


def _template_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------- HTTP

_thread_local = threading.local()


def _session() -> requests.Session:
    # A session per worker thread: connection reuse without sharing a Session across threads.
    if not hasattr(_thread_local, "session"):
        _thread_local.session = requests.Session()
    return _thread_local.session


def _api_key(env_var: str, judge_name: str) -> str:
    key = os.environ.get(env_var, "").strip()
    if not key:
        raise MissingAPIKeyError(f"{judge_name} needs an API key in the environment variable {env_var}, which is unset or empty")
    return key


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "<redacted>") if secret else text


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date; fall back to our own back-off


def _post_json(url: str, *, headers: dict, body: dict, timeout: float, secret: str) -> dict:
    """POST ``body``; return the decoded JSON reply or raise the matching :class:`JudgeError`."""
    try:
        response = _session().post(url, headers=headers, json=body, timeout=timeout)
    except requests.exceptions.ConnectionError as err:
        raise EndpointUnreachableError(f"cannot reach the judge endpoint {url}: {_scrub(str(err), secret)[:300]}") from None
    except requests.exceptions.Timeout:
        raise TransientJudgeError(f"the judge endpoint {url} did not answer within {timeout:g} s") from None
    status = response.status_code
    detail = _scrub(response.text, secret)[:300]
    retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
    if status == 429:
        raise RateLimitError(f"rate limited by {url} (HTTP 429): {detail}", retry_after)
    if status >= 500:
        raise TransientJudgeError(f"server error from {url} (HTTP {status}): {detail}", retry_after)
    if status in (401, 403):
        raise FatalJudgeError(f"{url} rejected the API key (HTTP {status}): {detail}")
    if status >= 400:
        raise JudgeError(f"request rejected by {url} (HTTP {status}): {detail}")
    try:
        return response.json()
    except ValueError:
        raise JudgeError(f"malformed reply from {url}: not JSON: {detail[:200]!r}") from None


# ----------------------------------------------------------------------------------------- judges


@dataclass
class OpenAIJudge:
    """A judge on any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, ...).

    With ``use_logprobs`` (the paper's ``weighted_alpaca_eval_gpt-4o-mini-2024-07-18``) the
    preference is the probability mass of "m" over that of "m" and "M" among the top log-probs of
    the single output token; when the reply carries no usable log-probs it falls back to reading
    the token as a binary verdict.
    """

    model: str
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    use_logprobs: bool = True
    top_logprobs: int = 5
    temperature: float = 0.0
    timeout: float = 60.0
    system_prompt: str = PAIRWISE_SYSTEM_PROMPT
    user_template: str = PAIRWISE_USER_TEMPLATE
    extra_body: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{'weighted_' if self.use_logprobs else ''}openai:{self.model}"

    @property
    def identity(self) -> str:
        prompt = _template_hash(self.system_prompt, self.user_template)
        return f"openai|{self.base_url.rstrip('/')}|{self.model}|logprobs={self.use_logprobs}|t={self.temperature}|{prompt}"

    def check_ready(self) -> None:
        _api_key(self.api_key_env, f"OpenAIJudge({self.model})")

    def judge(self, instruction: str, output_a: str, output_b: str, example: Mapping | None = None) -> JudgeVerdict:
        key = _api_key(self.api_key_env, f"OpenAIJudge({self.model})")
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": _render_prompt(self.user_template, instruction, output_a, output_b)},
            ],
            "max_tokens": 1,
            "temperature": self.temperature,
        }
        if self.use_logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        body.update(self.extra_body)
        url = self.base_url.rstrip("/") + "/chat/completions"
        reply = _post_json(url, headers={"Authorization": f"Bearer {key}"}, body=body, timeout=self.timeout, secret=key)
        try:
            choice = reply["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            return JudgeVerdict(None, json.dumps(reply)[:500], "malformed reply: no choices[0].message.content")
        if self.use_logprobs:
            preference = _logprob_preference(choice)
            if preference is not None:
                return JudgeVerdict(preference, text)
        preference = parse_binary_label(text)
        if preference is None:
            return JudgeVerdict(None, text, f"malformed reply: expected 'm' or 'M', got {text[:80]!r}")
        return JudgeVerdict(preference, text)


def _logprob_preference(choice: Mapping) -> float | None:
    """P(first) / (P(first) + P(second)) from the first token's top log-probs; None if absent."""
    try:
        candidates = choice["logprobs"]["content"][0]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        return None
    mass = {FIRST_LABEL: 0.0, SECOND_LABEL: 0.0}
    for candidate in candidates or []:
        try:
            token, logprob = candidate["token"].strip(), float(candidate["logprob"])
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        if token in mass:  # case matters: "m" and "M" are the two labels
            mass[token] += math.exp(logprob)
    total = mass[FIRST_LABEL] + mass[SECOND_LABEL]
    return mass[FIRST_LABEL] / total if total > 0 else None


@dataclass
class AnthropicJudge:
    """A binary judge on Anthropic's Messages API (no log-probs there): the reply names m or M."""

    model: str
    base_url: str = "https://api.anthropic.com"
    api_key_env: str = "ANTHROPIC_API_KEY"
    anthropic_version: str = "2023-06-01"
    max_tokens: int = 5
    temperature: float = 0.0
    timeout: float = 60.0
    system_prompt: str = PAIRWISE_SYSTEM_PROMPT
    user_template: str = PAIRWISE_USER_TEMPLATE

    @property
    def name(self) -> str:
        return f"anthropic:{self.model}"

    @property
    def identity(self) -> str:
        prompt = _template_hash(self.system_prompt, self.user_template)
        return f"anthropic|{self.base_url.rstrip('/')}|{self.model}|t={self.temperature}|{prompt}"

    def check_ready(self) -> None:
        _api_key(self.api_key_env, f"AnthropicJudge({self.model})")

    def judge(self, instruction: str, output_a: str, output_b: str, example: Mapping | None = None) -> JudgeVerdict:
        key = _api_key(self.api_key_env, f"AnthropicJudge({self.model})")
        body = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "system": self.system_prompt,
            "messages": [{"role": "user", "content": _render_prompt(self.user_template, instruction, output_a, output_b)}],
        }
        headers = {"x-api-key": key, "anthropic-version": self.anthropic_version}
        url = self.base_url.rstrip("/") + "/v1/messages"
        reply = _post_json(url, headers=headers, body=body, timeout=self.timeout, secret=key)
        try:
            text = "".join(block["text"] for block in reply["content"] if block.get("type") == "text")
        except (KeyError, TypeError, AttributeError):
            return JudgeVerdict(None, json.dumps(reply)[:500], "malformed reply: no text content blocks")
        preference = parse_binary_label(text)
        if preference is None:
            return JudgeVerdict(None, text, f"malformed reply: expected 'm' or 'M', got {text[:80]!r}")
        return JudgeVerdict(preference, text)


@dataclass
class ProgrammaticJudge:
    """For tasks with checkable answers: A is better if ``grade_fn(example, A)`` is higher; equal = tie."""

    grade_fn: Callable[[Mapping, str], int]
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or f"programmatic:{getattr(self.grade_fn, '__qualname__', repr(self.grade_fn))}"

    @property
    def identity(self) -> str:
        module = getattr(self.grade_fn, "__module__", "")
        return f"programmatic|{module}.{getattr(self.grade_fn, '__qualname__', repr(self.grade_fn))}"

    def judge(self, instruction: str, output_a: str, output_b: str, example: Mapping | None = None) -> JudgeVerdict:
        if example is None:
            return JudgeVerdict(None, "", "ProgrammaticJudge needs the example's metadata (its record) to grade")
        grade_a, grade_b = self.grade_fn(example, output_a), self.grade_fn(example, output_b)
        preference = 1.0 if grade_a > grade_b else 0.0 if grade_a < grade_b else 0.5
        return JudgeVerdict(preference, f"grade_a={grade_a} grade_b={grade_b}")


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
                    log.warning("judgment cache %s: skipping unreadable line %d (an interrupted write?)", self.path, line_no)
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
    None on failure), ``flipped`` (B was shown first), ``raw``, ``error``, ``cached`` and, when
    the model's record has one, ``difficulty``.

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
    cache = JudgmentCache(cache_path) if cache_path is not None else None
    coin = random.Random(seed)
    flips = [coin.random() < 0.5 for _ in records_a]  # one seeded coin per example: show B first?
    stop = threading.Event()

    def judge_one(i: int) -> dict:
        a, b = records_a[i], records_b[i]
        shown = (b["output"], a["output"]) if flips[i] else (a["output"], b["output"])
        row = {
            "index": i, "instruction": a["instruction"],
            "generator_a": a.get("generator"), "generator_b": b.get("generator"),
            "output_a": a["output"], "output_b": b["output"],
            "preference": None, "flipped": flips[i], "raw": "", "error": None, "cached": False,
        }
        if "difficulty" in a:
            row["difficulty"] = a["difficulty"]
        key = JudgmentCache.key(judge.identity, a["instruction"], *shown) if cache is not None else None
        verdict = cache.get(key) if cache is not None else None
        row["cached"] = verdict is not None
        if verdict is None:
            verdict = _call_with_retries(judge, a["instruction"], *shown, a, max_retries, backoff_base, max_backoff, stop)
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
        log.warning("%d of %d judgments failed and are excluded from the win-rate (first, example %d: %s)",
                    n_errors, len(rows), first["index"], first["error"])
    return rows


def _call_with_retries(judge: Judge, instruction: str, first: str, second: str, example: Mapping,
                       max_retries: int, backoff_base: float, max_backoff: float, stop: threading.Event) -> JudgeVerdict:
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
