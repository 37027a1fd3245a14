"""The judge stage against a scripted OpenAI-compatible server (a real HTTP server on 127.0.0.1): the -1 path, the
position swap and FastChat's tie rule, retries, and that a re-run asks only what is not cached."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from qllm.planning import compose_cell
from qllm.stages.judge import judge_key, judge_task
from qllm.store import cache
from scripted_judge import ScriptedJudge, user_text

IDS = (81, 91, 101, 111)  # task.limit=4: writing, roleplay, reasoning, math
RATING = {81: "Rating: [[8]]", 91: "I would give it a seven.", 101: "[[5]]", 111: "Rating: [9]"}


def _write_answers(path: Path, tag: str) -> Path:
    with open(path, "w") as f:
        for qid in IDS:
            f.write(json.dumps({"question_id": qid, "choices": [{"index": 0, "turns": [f"{tag}-{qid}-1",
                                                                                        f"{tag}-{qid}-2"]}]}) + "\n")
    return path


def _rule(first_call_fails: itertools.count):
    def rule(messages):
        if next(first_call_fails) == 0:
            return 503  # one transient failure: retried
        user = user_text(messages)
        qid = next(q for q in IDS if f"-{q}-1" in user)
        if "BASE" not in user:  # single grading of the evaluated answers
            return RATING[qid]
        quant_first = user.index("QUANT") < user.index("BASE")
        if qid == 81:
            return "[[A]]" if quant_first else "[[B]]"  # prefers the quantized answer in both orders: win
        if qid == 91:
            return "[[A]]"  # prefers whatever is shown first: the orders disagree, a tie
        if qid == 101:
            return "[[B]]" if quant_first else "[[A]]"  # prefers the baseline: loss
        return "[[C]]"  # 111: a tie
    return rule


@pytest.fixture
def cell(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QLLM_TEST_JUDGE_KEY", "sk-scripted-judge-key")
    judge = ScriptedJudge(_rule(itertools.count()))
    judge.__enter__()
    yield judge, compose_cell(["model=tiny-random-llama", "method=rtn", "task=mt_bench", "task.limit=4",
                               "judge=openai", f"judge.base_url={judge.url}", "judge.model=scripted",
                               "judge.api_key_env=QLLM_TEST_JUDGE_KEY", "judge.backoff_s=0.01",
                               f"data_dir={data_dir}", f"cache_dir={tmp_path / 'cache'}"])
    judge.__exit__()


def test_single_pairwise_retries_and_resume(cell, tmp_path):
    judge, c = cell
    answers, base = _write_answers(tmp_path / "a.jsonl", "QUANT"), _write_answers(tmp_path / "b.jsonl", "BASE")
    out = tmp_path / "out"
    out.mkdir()
    res = judge_task(c, "mt_bench", answers, base, out)
    assert res["asked"] == 8 + 16 and len(judge.requests) == 24 + 1  # 8 single, 2 x 8 pairwise, 1 retry
    assert set(judge.authorizations) == {"Bearer sk-scripted-judge-key"}
    single, pair = res["single"], res["pairwise"]
    assert single["parse_failures"] == 2 and single["n_judgments"] == 8  # question 91, both turns: kept as -1
    assert single["score"] == pytest.approx((8 + 8 + 5 + 5 + 9 + 9) / 6)
    assert single["categories"]["math"]["score"] == 9.0 and "roleplay" not in single["categories"]
    assert (pair["win"], pair["tie"], pair["loss"]) == (0.25, 0.5, 0.25)
    assert pair["position_bias"] == 0.25  # question 91: the verdict follows the order
    assert pair["categories"]["roleplay"]["win_rate_adjusted"] == 0.5
    records = [json.loads(line) for line in (out / "judgments_mt_bench.jsonl").read_text().splitlines()]
    assert sum(r["score"] == -1 for r in records if r["kind"] == "single") == 2
    swapped = [r for r in records if r["kind"] == "pair" and r["question_id"] == 81]
    assert {r["order"]: r["winner"] for r in swapped} == {"AB": "model_1", "BA": "model_1"}
    per_sample = [json.loads(line) for line in (out / "per_sample_mt_bench.jsonl").read_text().splitlines()]
    assert [r["score"] for r in per_sample if r["question_id"] == 91] == [None, None]

    # everything cached: nothing is asked again
    again = judge_task(c, "mt_bench", answers, base, out)
    assert again["asked"] == 0 and len(judge.requests) == 25 and again["single"] == single
    # five verdicts lost (as if judging had been killed before them): exactly those five are asked
    store = cache.judgments_dir(c.cache_dir, judge_key(c.judge))
    for f in sorted(store.glob("*/*.json"))[:5]:
        f.unlink()
    third = judge_task(c, "mt_bench", answers, base, out)
    assert third["asked"] == 5 and len(judge.requests) == 30 and third["pairwise"] == pair


def test_changed_answers_are_judged_again_unchanged_ones_not(cell, tmp_path):
    judge, c = cell
    answers, out = _write_answers(tmp_path / "a.jsonl", "QUANT"), tmp_path / "out"
    out.mkdir()
    judge_task(c, "mt_bench", answers, None, out)  # single grading only
    assert len(judge.requests) == 8 + 1
    lines = answers.read_text().splitlines()
    changed = json.loads(lines[0])
    changed["choices"][0]["turns"][1] = "QUANT-81-2 edited"
    answers.write_text("\n".join([json.dumps(changed), *lines[1:]]) + "\n")
    res = judge_task(c, "mt_bench", answers, None, out)
    assert res["asked"] == 1  # only turn 2 of question 81 shows the edited answer (turn 1's prompt does not)


def test_equal_answers_are_asked_once_and_mapped_per_order(data_dir, tmp_path):
    """A quantized model that gives its baseline's very answer: both orders of the match send the same chat; it is
    asked once, and the verdict is read for each order (the first shown always wins here: a tie)."""
    with ScriptedJudge(lambda m: "[[A]]" if "Assistant B" in user_text(m) else "[[4]]") as judge:
        c = compose_cell(["model=tiny-random-llama", "method=rtn", "task=mt_bench", "task.limit=4", "judge=openai",
                          f"judge.base_url={judge.url}", "judge.model=scripted", "judge.api_key_env=null",
                          f"data_dir={data_dir}", f"cache_dir={tmp_path / 'cache'}"])
        same = _write_answers(tmp_path / "a.jsonl", "SAME")
        out = tmp_path / "out"
        out.mkdir()
        res = judge_task(c, "mt_bench", same, same, out)
    assert len(judge.requests) == 8 + 8 and res["asked"] == 16  # 8 single, 8 matches x 1 distinct chat
    assert res["pairwise"]["tie"] == 1.0 and res["pairwise"]["position_bias"] == 1.0
    records = [json.loads(line) for line in (out / "judgments_mt_bench.jsonl").read_text().splitlines()]
    pairs = [r for r in records if r["kind"] == "pair"]
    assert {(r["order"], r["winner"]) for r in pairs} == {("AB", "model_1"), ("BA", "model_2")}
