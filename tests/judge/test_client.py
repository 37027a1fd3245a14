"""The OpenAI-compatible client against a real HTTP server on 127.0.0.1 that answers from a script."""

from __future__ import annotations

import pytest

from qllm.judge.client import Client, JudgeError, check
from scripted_judge import ScriptedJudge

CHAT = [{"role": "user", "content": "rate this"}]


def test_retries_pass_transient_failures_with_backoff():
    replies = iter([503, 429, "Rating: [[6]]"])
    with ScriptedJudge(lambda m: next(replies)) as judge:
        c = Client(judge.url, "scripted", key="sk-test", retries=3, backoff_s=0.01)
        assert c.chat(CHAT) == "Rating: [[6]]"
    assert len(judge.requests) == 3
    assert judge.requests[0]["temperature"] == 0.0 and judge.requests[0]["max_tokens"] == 2048
    assert judge.authorizations == ["Bearer sk-test"] * 3


def test_retries_run_out_with_the_url_and_the_last_reason():
    with ScriptedJudge(lambda m: 500) as judge:
        with pytest.raises(JudgeError, match=r"failed 3 times; last: HTTP 500"):
            Client(judge.url, "scripted", retries=2, backoff_s=0.01).chat(CHAT)
    assert len(judge.requests) == 3


def test_a_refusal_is_not_retried():
    with ScriptedJudge(lambda m: 401) as judge:
        with pytest.raises(JudgeError, match="refused the request: HTTP 401"):
            Client(judge.url, "scripted", retries=5, backoff_s=0.01).chat(CHAT)
    assert len(judge.requests) == 1


def test_check_names_the_url_it_tried():
    with ScriptedJudge(lambda m: "x") as judge:
        check(judge.url, "sk")  # reachable: no error
        url = judge.url
    with pytest.raises(JudgeError, match=f"unreachable: GET {url}/models failed"):
        check(url, None, timeout_s=2)
