"""This package's own pairwise judges: OpenAI-compatible, Anthropic and programmatic.

A judge answers one question: given an instruction and two outputs shown as A and B, how likely
is A the better one? (:class:`JudgeVerdict.preference` in [0, 1]; 0.5 is a tie.) The judging loop
(order randomization, retries, cache, progress) is :func:`mmpo.evaluation.judging.judge_pairs`.

These judges use their own prompt (:data:`PAIRWISE_USER_TEMPLATE`) and their own names
(``openai:MODEL``, ``openai-binary:MODEL``, ``anthropic:MODEL``). The paper's annotator,
AlpacaEval's ``weighted_alpaca_eval_gpt-4o-mini-2024-07-18``, is run by AlpacaEval itself:
:mod:`mmpo.evaluation.alpaca_annotator`.

Transport is the official ``openai`` / ``anthropic`` SDK (base URL from ``OPENAI_BASE_URL`` /
``ANTHROPIC_BASE_URL``, key from ``OPENAI_API_KEY`` / ``ANTHROPIC_API_KEY``), with the SDK's own
retries off: the judging loop retries every judge the same way and stops all threads on a fatal
error. SDK errors become :class:`TransientJudgeError` (rate limit, server error, timeout: retried),
:class:`FatalJudgeError` (missing or rejected key, endpoint unreachable after the retries: stops
the run) or :class:`JudgeError` (this example only). A reply that arrives but cannot be read comes
back as a verdict with ``error`` set and the raw text kept.

API keys are read from the environment when the client is made and never appear in a ``repr``,
the judge identity, the cache or an error message (error bodies are scrubbed in case a server
echoes the key).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

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
    "PAIRWISE_SYSTEM_PROMPT",
    "PAIRWISE_USER_TEMPLATE",
]


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

# Two outputs labelled "m" and "M" and a single-token answer naming the better one, so the
# log-probs of those two tokens give a continuous preference. The wording is this package's own.
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


# -------------------------------------------------------------------------------- SDK transport


def _api_key(env_var: str, judge_name: str) -> str:
    key = os.environ.get(env_var, "").strip()
    if not key:
        raise MissingAPIKeyError(
            f"{judge_name} needs an API key in the environment variable {env_var}, which is unset or empty"
        )
    return key


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "<redacted>") if secret else text


def _retry_after_seconds(headers: Any) -> float | None:
    try:
        return max(0.0, float(headers.get("retry-after")))
    except (TypeError, ValueError, AttributeError):
        return None  # absent or an HTTP date: fall back to our own back-off


def _import_sdk(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise FatalJudgeError(f"this judge needs the '{name}' package: pip install 'mmpo[judges]'") from None


def _translate_sdk_error(err: Exception, sdk, url: str, secret: str) -> JudgeError:
    """The SDK's exception (openai and anthropic share one hierarchy) as one of our judge errors."""
    detail = _scrub(str(err), secret)[:300]
    if isinstance(err, sdk.APITimeoutError):
        return TransientJudgeError(f"the judge endpoint {url} did not answer in time")
    if isinstance(err, sdk.APIConnectionError):
        return EndpointUnreachableError(f"cannot reach the judge endpoint {url}: {detail}")
    if isinstance(err, sdk.APIResponseValidationError):
        body = _scrub(getattr(getattr(err, "response", None), "text", "") or "", secret)[:200]
        return JudgeError(f"malformed reply from {url}: not JSON or not a completion: {body!r}")
    if isinstance(err, sdk.APIStatusError):
        status = err.status_code
        retry_after = _retry_after_seconds(err.response.headers)
        if status == 429:
            return RateLimitError(f"rate limited by {url} (HTTP 429): {detail}", retry_after)
        if status >= 500:
            return TransientJudgeError(f"server error from {url} (HTTP {status}): {detail}", retry_after)
        if status in (401, 403):
            return FatalJudgeError(f"{url} rejected the API key (HTTP {status}): {detail}")
        return JudgeError(f"request rejected by {url} (HTTP {status}): {detail}")
    return JudgeError(f"judge call to {url} failed: {type(err).__name__}: {detail}")


class _SDKClient:
    """One SDK client per judge, made on first use from the environment (thread-safe)."""

    def __init__(self, sdk_name: str, key_env: str, base_url: str | None, timeout: float, judge_name: str):
        self.sdk_name, self.key_env, self.base_url, self.timeout, self.judge_name = (
            sdk_name,
            key_env,
            base_url,
            timeout,
            judge_name,
        )
        self._lock = threading.Lock()
        self._client = None

    def __repr__(self) -> str:
        return f"<{self.sdk_name} client for {self.judge_name}>"

    def get(self):
        with self._lock:
            if self._client is None:
                sdk = _import_sdk(self.sdk_name)
                key = _api_key(self.key_env, self.judge_name)
                factory = sdk.OpenAI if self.sdk_name == "openai" else sdk.Anthropic
                # base_url None: the SDK reads OPENAI_BASE_URL / ANTHROPIC_BASE_URL itself.
                self._client = factory(api_key=key, base_url=self.base_url, timeout=self.timeout, max_retries=0)
            return self._client

    def url(self) -> str:
        return str(self.get().base_url).rstrip("/")

    def call(self, create: Callable[[Any], Any]):
        client = self.get()
        sdk = _import_sdk(self.sdk_name)
        try:
            return create(client)
        except sdk.APIError as err:
            raise _translate_sdk_error(err, sdk, self.url(), client.api_key) from None


# ----------------------------------------------------------------------------------------- judges


@dataclass
class OpenAIJudge:
    """This package's pairwise judge on any OpenAI-compatible chat endpoint (OpenAI, vLLM, ...).

    With ``use_logprobs`` the preference is the probability mass of "m" over that of "m" and "M"
    among the top log-probs of the single output token; a reply without usable log-probs is a
    failure (recorded, excluded, retried on a rerun), never a hard 0/1 verdict. Without
    ``use_logprobs`` the reply is read as a binary verdict. ``base_url`` None: ``OPENAI_BASE_URL``
    or the OpenAI API.
    """

    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    use_logprobs: bool = True
    top_logprobs: int = 5
    temperature: float = 0.0
    timeout: float = 60.0
    system_prompt: str = PAIRWISE_SYSTEM_PROMPT
    user_template: str = PAIRWISE_USER_TEMPLATE
    extra_body: dict = field(default_factory=dict)
    _client: _SDKClient = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self._client = _SDKClient("openai", self.api_key_env, self.base_url, self.timeout, self.name)

    @property
    def name(self) -> str:
        return f"{'openai' if self.use_logprobs else 'openai-binary'}:{self.model}"

    @property
    def identity(self) -> str:
        prompt = _template_hash(self.system_prompt, self.user_template)
        return f"openai|{self._client.url()}|{self.model}|logprobs={self.use_logprobs}|t={self.temperature}|{prompt}"

    def check_ready(self) -> None:
        self._client.get()

    def judge(self, instruction: str, output_a: str, output_b: str, example: Mapping | None = None) -> JudgeVerdict:
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
        extra = dict(self.extra_body)
        reply = self._client.call(lambda client: client.chat.completions.create(**body, extra_body=extra or None))
        if isinstance(reply, str):  # the SDK hands back a non-JSON body as text
            return JudgeVerdict(None, reply[:500], f"malformed reply: not JSON: {reply[:80]!r}")
        choices = getattr(reply, "choices", None)
        if not isinstance(choices, list) or not choices or getattr(choices[0], "message", None) is None:
            return JudgeVerdict(None, str(reply)[:500], "malformed reply: no choices[0].message")
        choice = choices[0]
        text = choice.message.content or ""
        if self.use_logprobs:
            preference = _logprob_preference(choice)
            if preference is None:
                return JudgeVerdict(
                    None, text, "no log-probs for 'm' or 'M' in the reply (a weighted judge needs them)"
                )
            return JudgeVerdict(preference, text)
        preference = parse_binary_label(text)
        if preference is None:
            return JudgeVerdict(None, text, f"malformed reply: expected 'm' or 'M', got {text[:80]!r}")
        return JudgeVerdict(preference, text)


def _logprob_preference(choice: Any) -> float | None:
    """P(first) / (P(first) + P(second)) from the first token's top log-probs; None if absent."""
    try:
        candidates = choice.logprobs.content[0].top_logprobs
    except (AttributeError, IndexError, TypeError):
        return None
    mass = {FIRST_LABEL: 0.0, SECOND_LABEL: 0.0}
    for candidate in candidates or []:
        try:
            token, logprob = candidate.token.strip(), float(candidate.logprob)
        except (AttributeError, TypeError, ValueError):
            continue
        if token in mass:  # case matters: "m" and "M" are the two labels
            mass[token] += math.exp(logprob)
    total = mass[FIRST_LABEL] + mass[SECOND_LABEL]
    return mass[FIRST_LABEL] / total if total > 0 else None


@dataclass
class AnthropicJudge:
    """A binary judge on Anthropic's Messages API (no log-probs there): the reply names m or M.

    ``base_url`` None: ``ANTHROPIC_BASE_URL`` or Anthropic's API.
    """

    model: str
    base_url: str | None = None
    api_key_env: str = "ANTHROPIC_API_KEY"
    max_tokens: int = 5
    temperature: float = 0.0
    timeout: float = 60.0
    system_prompt: str = PAIRWISE_SYSTEM_PROMPT
    user_template: str = PAIRWISE_USER_TEMPLATE
    _client: _SDKClient = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self._client = _SDKClient("anthropic", self.api_key_env, self.base_url, self.timeout, self.name)

    @property
    def name(self) -> str:
        return f"anthropic:{self.model}"

    @property
    def identity(self) -> str:
        prompt = _template_hash(self.system_prompt, self.user_template)
        return f"anthropic|{self._client.url()}|{self.model}|t={self.temperature}|{prompt}"

    def check_ready(self) -> None:
        self._client.get()

    def judge(self, instruction: str, output_a: str, output_b: str, example: Mapping | None = None) -> JudgeVerdict:
        body = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "system": self.system_prompt,
            "messages": [
                {"role": "user", "content": _render_prompt(self.user_template, instruction, output_a, output_b)}
            ],
        }
        temperature = {"temperature": body.pop("temperature")}  # sent as a raw field: newer SDKs dropped the argument
        reply = self._client.call(lambda client: client.messages.create(**body, extra_body=temperature))
        if isinstance(reply, str):  # the SDK hands back a non-JSON body as text
            return JudgeVerdict(None, reply[:500], f"malformed reply: not JSON: {reply[:80]!r}")
        blocks = getattr(reply, "content", None)
        if not isinstance(blocks, list):
            return JudgeVerdict(None, str(reply)[:500], "malformed reply: no text content blocks")
        text = "".join(getattr(b, "text", "") or "" for b in blocks if getattr(b, "type", None) == "text")
        preference = parse_binary_label(text)
        if preference is None:
            return JudgeVerdict(None, text, f"malformed reply: expected 'm' or 'M', got {text[:80]!r}")
        return JudgeVerdict(preference, text)


@dataclass
class ProgrammaticJudge:
    """For tasks with checkable answers: A is better if ``grade_fn(example, A)`` is higher; equal = tie.

    Not cached: a verdict costs nothing to recompute and depends on the example's metadata, which
    the judgment cache's key does not hold."""

    grade_fn: Callable[[Mapping, str], int]
    label: str | None = None
    cacheable = False

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
