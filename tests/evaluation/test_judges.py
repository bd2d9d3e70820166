"""Judges over real HTTP against a fake OpenAI/Anthropic server on 127.0.0.1, and the judging loop."""

from __future__ import annotations

import re
import socket
import threading

import pytest
from judge_server import FakeJudgeServer, openai_reply

from mmpo.evaluation.judges import (
    AnthropicJudge,
    EndpointUnreachableError,
    FatalJudgeError,
    JudgeVerdict,
    MissingAPIKeyError,
    OpenAIJudge,
    ProgrammaticJudge,
)
from mmpo.evaluation.judging import judge_pairs
from mmpo.evaluation.winrate import win_rate

SECRET = "sk-test-very-secret-key-123"
FAST = {"backoff_base": 0.001, "max_backoff": 0.01}


@pytest.fixture
def server():
    srv = FakeJudgeServer()
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def api_keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)


def shown_outputs(prompt: str) -> tuple[str, str]:
    """The outputs labelled m and M in a rendered judge prompt."""
    first, second = re.findall(r'"output": """(.*?)"""', prompt, flags=re.DOTALL)
    return first, second


def user_prompt(body: dict) -> str:
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


def records(outputs: list[str], generator: str, instructions: list[str] | None = None) -> list[dict]:
    instructions = instructions or [f"instruction {i}" for i in range(len(outputs))]
    return [{"instruction": ins, "output": out, "generator": generator} for ins, out in zip(instructions, outputs)]


# ----------------------------------------------------------------------------------------- OpenAI


def test_openai_judge_weights_the_two_labels_by_probability(server):
    server.respond = lambda path, body, headers: (
        200,
        {},
        openai_reply("m", [("m", 0.6), ("M", 0.2), ("x", 0.1), (" m", 0.1)]),
    )
    judge = OpenAIJudge("gpt-4o-mini-2024-07-18", base_url=server.url + "/v1")
    verdict = judge.judge("Say hi", "hi", "hello")
    assert verdict.preference == pytest.approx(0.7 / 0.9)  # "m" and " m" both count for the first output
    assert verdict.error is None and verdict.raw == "m"
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == f"Bearer {SECRET}"
    body = request["body"]
    assert (body["logprobs"], body["top_logprobs"], body["max_tokens"], body["model"]) == (
        True,
        5,
        1,
        "gpt-4o-mini-2024-07-18",
    )
    assert shown_outputs(user_prompt(body)) == ("hi", "hello")
    assert "Say hi" in user_prompt(body)


def test_weighted_judge_without_logprobs_is_a_failure_retried_on_rerun(server, tmp_path):
    replies = iter(
        [
            openai_reply("M"),
            openai_reply("m", [("yes", 0.9), ("no", 0.1)]),
            openai_reply("m", [("m", 0.75), ("M", 0.25)]),
        ]
    )
    server.respond = lambda path, body, headers: (200, {}, next(replies))
    judge = OpenAIJudge("m1", base_url=server.url)
    for _ in range(2):  # no log-probs at all, then log-probs without either label: never a hard 0/1
        verdict = judge.judge("q", "a", "b")
        assert verdict.preference is None and "no log-probs" in verdict.error
    cache = tmp_path / "cache.jsonl"
    replies = iter([openai_reply("M"), openai_reply("m", [("m", 0.75), ("M", 0.25)])])
    first = judge_pairs(judge, records(["a"], "model"), records(["b"], "sft"), cache_path=cache, seed=3, **FAST)
    assert first[0]["preference"] is None and not cache.exists()  # the failure is not cached...
    second = judge_pairs(judge, records(["a"], "model"), records(["b"], "sft"), cache_path=cache, seed=3, **FAST)
    assert second[0]["preference"] == pytest.approx(0.25 if second[0]["flipped"] else 0.75)  # ...so a rerun asks again
    binary = OpenAIJudge("m1", base_url=server.url, use_logprobs=False)
    replies = iter([openai_reply("M")])
    assert binary.judge("q", "a", "b").preference == 0.0  # the binary judge reads the text: "M", the second wins
    assert binary.name == "openai-binary:m1" and judge.name == "openai:m1"


def test_identical_outputs_are_a_tie_without_a_call(server):
    server.respond = lambda path, body, headers: (200, {}, openai_reply("m", [("m", 0.9), ("M", 0.1)]))
    judge = OpenAIJudge("m1", base_url=server.url)
    rows = judge_pairs(judge, records(["same", "mine"], "model"), records(["same", "other"], "sft"), **FAST)
    assert rows[0]["preference"] == 0.5 and rows[0]["identical"] and rows[0]["error"] is None
    assert server.calls == 1 and "same" not in user_prompt(server.requests[0]["body"])
    assert rows[1]["preference"] == pytest.approx(0.1 if rows[1]["flipped"] else 0.9)


def test_malformed_replies_are_recorded_as_errors_and_excluded(server):
    def respond(path, body, headers):
        shown = "".join(shown_outputs(user_prompt(body)))
        if "garbled" in shown:
            return 200, {}, openai_reply("I think the first one is better")
        if "notjson" in shown:
            return 200, {}, "<html>bad gateway page</html>"
        return 200, {}, openai_reply("m", [("m", 0.9), ("M", 0.1)])

    server.respond = respond
    judge = OpenAIJudge("m1", base_url=server.url)
    rows = judge_pairs(
        judge, records(["garbled a", "notjson b", "fine c"], "model"), records(["x", "y", "z"], "sft"), **FAST
    )
    garbled, notjson, fine = rows
    assert garbled["preference"] is None
    assert "no log-probs" in garbled["error"] and "first one" in garbled["raw"]
    assert notjson["preference"] is None and "not JSON" in notjson["error"]
    assert fine["error"] is None and fine["preference"] == pytest.approx(0.1 if fine["flipped"] else 0.9)
    summary = win_rate(rows)
    assert summary["n_total"] == 1 and summary["n_errors"] == 2
    assert server.calls == 3  # an unusable reply is not retried within the run


def test_rate_limit_is_retried_honouring_retry_after(server):
    replies = iter(
        [
            (429, {"Retry-After": "0"}, {"error": {"message": "slow down"}}),
            (503, {}, "overloaded"),
            (200, {}, openai_reply("m", [("m", 0.8), ("M", 0.2)])),
        ]
    )
    server.respond = lambda path, body, headers: next(replies)
    judge = OpenAIJudge("m1", base_url=server.url)
    rows = judge_pairs(judge, records(["good"], "model"), records(["bad"], "sft"), max_retries=5, **FAST)
    assert server.calls == 3
    expected = 0.2 if rows[0]["flipped"] else 0.8
    assert rows[0]["preference"] == pytest.approx(expected) and rows[0]["error"] is None


def test_rate_limit_exhausted_is_an_error_not_a_loss(server):
    server.respond = lambda path, body, headers: (429, {"Retry-After": "0"}, {"error": {"message": "quota"}})
    judge = OpenAIJudge("m1", base_url=server.url)
    rows = judge_pairs(judge, records(["a", "b"], "model"), records(["c", "d"], "sft"), max_retries=2, **FAST)
    assert server.calls == 2 * 3  # first try + 2 retries, per example
    assert all(r["preference"] is None and "rate limit exhausted 2 retries" in r["error"] for r in rows)


def test_cache_makes_a_rerun_free_and_resumes(server, tmp_path):
    def respond(path, body, headers):
        first, second = shown_outputs(user_prompt(body))
        # A content-aware judge: the output containing "good" wins with probability 0.9.
        p_first = 0.9 if "good" in first else 0.1
        if "fail" in first + second and not respond.recovered:
            return 400, {}, {"error": {"message": "bad request"}}
        return 200, {}, openai_reply("m", [("m", p_first), ("M", 1 - p_first)])

    respond.recovered = False
    server.respond = respond
    judge = OpenAIJudge("m1", base_url=server.url)
    model = records(["good 0", "good 1", "good fail 2", "good 3"], "model")
    sft = records(["meh 0", "meh 1", "meh 2", "meh 3"], "sft")
    cache = tmp_path / "cache.jsonl"

    first = judge_pairs(judge, model, sft, cache_path=cache, **FAST)
    assert server.calls == 4
    assert first[2]["error"] and "HTTP 400" in first[2]["error"]
    assert all(r["preference"] == pytest.approx(0.9) for i, r in enumerate(first) if i != 2)

    respond.recovered = True
    second = judge_pairs(judge, model, sft, cache_path=cache, **FAST)
    assert server.calls == 5  # only the failed example is asked again
    assert [r["cached"] for r in second] == [True, True, False, True]
    assert all(r["preference"] == pytest.approx(0.9) for r in second)

    third = judge_pairs(judge, model, sft, cache_path=cache, **FAST)
    assert server.calls == 5 and all(r["cached"] for r in third)
    assert SECRET not in cache.read_text()

    # Another seed shows some pairs the other way round: a different cache key, so those are asked anew.
    reordered = judge_pairs(judge, model, sft, cache_path=cache, seed=1, **FAST)
    n_reordered = sum(a["flipped"] != b["flipped"] for a, b in zip(reordered, third))
    assert server.calls == 5 + n_reordered
    assert all(r["preference"] == pytest.approx(0.9) for r in reordered)


def test_missing_key_fails_before_any_call(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    judge = OpenAIJudge("m1", base_url=server.url, api_key_env="OPENAI_API_KEY")
    with pytest.raises(MissingAPIKeyError, match="OPENAI_API_KEY"):
        judge_pairs(judge, records(["a"], "model"), records(["b"], "sft"))
    monkeypatch.setenv("MY_JUDGE_KEY", "")
    with pytest.raises(MissingAPIKeyError, match="MY_JUDGE_KEY"):
        judge = AnthropicJudge("c", base_url=server.url, api_key_env="MY_JUDGE_KEY")
        judge_pairs(judge, records(["a"], "m"), records(["b"], "s"))
    assert server.calls == 0


def test_unreachable_endpoint_stops_the_run_with_a_clear_error():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = OpenAIJudge("m1", base_url=f"http://127.0.0.1:{port}/v1", timeout=2)
    with pytest.raises(EndpointUnreachableError, match=f"cannot reach the judge endpoint http://127.0.0.1:{port}/v1"):
        judge_pairs(judge, records(["a", "b"], "model"), records(["c", "d"], "sft"), max_retries=1, **FAST)


def test_api_key_never_leaks_into_repr_or_errors(server):
    def respond(path, body, headers):  # a server that echoes the key it was sent
        return 401, {}, {"error": {"message": f"Incorrect API key provided: {headers.get('authorization')}"}}

    server.respond = respond
    judge = OpenAIJudge("m1", base_url=server.url)
    assert SECRET not in repr(judge) and SECRET not in judge.identity
    with pytest.raises(FatalJudgeError) as info:
        judge_pairs(judge, records(["a"], "model"), records(["b"], "sft"), **FAST)
    assert "HTTP 401" in str(info.value) and SECRET not in str(info.value)
    assert server.calls == 1  # a rejected key is not retried


# -------------------------------------------------------------------------------------- Anthropic


def anthropic_reply(text: str) -> dict:
    return {
        "id": "msg",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
    }


def test_anthropic_judge_binary_verdicts_and_headers(server):
    def respond(path, body, headers):
        first, second = shown_outputs(body["messages"][0]["content"])
        return 200, {}, anthropic_reply("m" if len(first) > len(second) else "M\n")

    server.respond = respond
    judge = AnthropicJudge("claude-haiku-4-5-20251001", base_url=server.url)
    assert judge.judge("q", "longer answer", "short").preference == 1.0
    assert judge.judge("q", "short", "longer answer").preference == 0.0
    request = server.requests[0]
    assert request["path"] == "/v1/messages"
    assert SECRET in request["headers"].get("x-api-key", request["headers"].get("authorization", ""))
    assert request["headers"]["anthropic-version"]  # the SDK's API version
    assert request["body"]["model"] == "claude-haiku-4-5-20251001"
    assert "system" in request["body"] and request["body"]["max_tokens"] >= 1


def test_anthropic_overload_retry_and_malformed_text(server):
    replies = iter(
        [
            (529, {}, {"type": "error", "error": {"type": "overloaded_error"}}),
            (200, {}, anthropic_reply("M")),
            (200, {}, anthropic_reply("Both are fine.")),
            (200, {}, {"type": "message", "content": "oops"}),
        ]
    )
    server.respond = lambda path, body, headers: next(replies)
    judge = AnthropicJudge("c", base_url=server.url)
    rows = judge_pairs(
        judge, records(["a", "b", "c"], "model"), records(["x", "y", "z"], "sft"), max_concurrency=1, **FAST
    )
    assert server.calls == 4
    assert rows[0]["preference"] == (1.0 if rows[0]["flipped"] else 0.0)
    assert rows[1]["preference"] is None and "expected 'm' or 'M'" in rows[1]["error"]
    assert rows[2]["preference"] is None and "malformed reply" in rows[2]["error"]


# -------------------------------------------------------------------------- order randomization


class PositionBiasedJudge:
    """Always prefers whatever it is shown first (an extreme position bias)."""

    identity = "test|always-first"

    def __init__(self):
        self.first_seen: list[str] = []
        self.lock = threading.Lock()

    def judge(self, instruction, output_a, output_b, example=None):
        with self.lock:
            self.first_seen.append(output_a)
        return JudgeVerdict(1.0, "m")


class QualityJudge:
    """Knows the truth: the output containing 'good' wins with probability 0.8."""

    identity = "test|quality"

    def judge(self, instruction, output_a, output_b, example=None):
        return JudgeVerdict(0.8 if "good" in output_a else 0.2, "")


def test_order_randomization_is_unflipped():
    n = 200
    model, sft = records([f"good {i}" for i in range(n)], "model"), records([f"meh {i}" for i in range(n)], "sft")
    rows = judge_pairs(QualityJudge(), model, sft, seed=7)
    flips = [r["flipped"] for r in rows]
    assert 60 < sum(flips) < 140  # both orders are used
    assert all(r["preference"] == pytest.approx(0.8) for r in rows)  # un-flipped back to "model is better"

    biased = PositionBiasedJudge()
    rows = judge_pairs(biased, model, sft, seed=7, max_concurrency=3)
    assert [r["flipped"] for r in rows] == flips  # the coin is seeded per example
    assert [r["preference"] for r in rows] == [0.0 if f else 1.0 for f in flips]
    assert sorted(biased.first_seen) == sorted(s["output"] if f else m["output"] for m, s, f in zip(model, sft, flips))
    assert abs(win_rate(rows)["win_rate"] - 50) < 10  # position bias averages out
    assert [r["flipped"] for r in judge_pairs(QualityJudge(), model, sft, seed=8)] != flips


def test_programmatic_judge_grades_from_example_metadata():
    def grade(example, output):
        return int(output.strip() == example["answer"])

    model = [
        {"instruction": "first letter of zorbat?", "output": "z", "answer": "z", "generator": "m"},
        {"instruction": "first letter of mipo?", "output": "q", "answer": "m", "generator": "m"},
        {"instruction": "repeat banop", "output": "banop", "answer": "banop", "generator": "m"},
    ]
    sft = [{"instruction": r["instruction"], "output": o, "generator": "s"} for r, o in zip(model, ["x", "m", "banop"])]
    rows = judge_pairs(ProgrammaticJudge(grade), model, sft)
    assert [r["preference"] for r in rows] == [1.0, 0.0, 0.5]
    assert ProgrammaticJudge(grade).judge("q", "a", "b").error  # no example metadata: an error, not a guess


def test_programmatic_verdicts_follow_the_metadata_not_a_cache(tmp_path):
    """Same instruction and outputs, new metadata (a corrected answer): the verdict follows it."""

    def grade(example, output):
        return int(output.strip() == example["answer"])

    sft = [{"instruction": "2 + 2?", "output": "5", "generator": "s"}]
    cache = tmp_path / "judge_cache.jsonl"
    first = judge_pairs(
        ProgrammaticJudge(grade), [{"instruction": "2 + 2?", "output": "4", "answer": "4"}], sft, cache_path=cache
    )
    again = judge_pairs(
        ProgrammaticJudge(grade), [{"instruction": "2 + 2?", "output": "4", "answer": "5"}], sft, cache_path=cache
    )
    assert [first[0]["preference"], again[0]["preference"]] == [1.0, 0.0]
    assert not again[0]["cached"] and not cache.exists()


def test_pairs_must_line_up():
    with pytest.raises(ValueError, match="record 1: the instructions differ"):
        judge_pairs(QualityJudge(), records(["a", "b"], "m", ["i0", "i1"]), records(["c", "d"], "s", ["i0", "other"]))
    with pytest.raises(ValueError, match="2 records but records_b has 1"):
        judge_pairs(QualityJudge(), records(["a", "b"], "m"), records(["c"], "s"))
    with pytest.raises(ValueError, match=r"records_b\[0\] needs a string 'output'"):
        judge_pairs(QualityJudge(), records(["a"], "m"), [{"instruction": "instruction 0"}])


def test_base_urls_come_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")

    def respond(path, body, headers):
        return 200, {}, anthropic_reply("m") if path == "/v1/messages" else openai_reply("m", [("m", 0.6), ("M", 0.4)])

    server.respond = respond
    assert AnthropicJudge("c").judge("q", "a", "b").preference == 1.0
    assert OpenAIJudge("g").judge("q", "a", "b").preference == pytest.approx(0.6)
    assert [r["path"] for r in server.requests] == ["/v1/messages", "/v1/chat/completions"]
    assert server.url in AnthropicJudge("c").identity  # the cache knows which endpoint answered
