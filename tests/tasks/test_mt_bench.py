"""MT-Bench's protocol against FastChat's llm_judge (snapshot 0e6d3e4) on fixed inputs: the two-turn prompts, the
temperature per category, the judge prompt per category and turn (with references), the verdict parsers."""

from __future__ import annotations

import re

import pytest

from qllm.tasks import mt_bench

SETTINGS = {"questions": "mt_bench/question.jsonl", "references": "mt_bench/reference_answer/gpt-4.jsonl",
            "judge_prompts": "mt_bench/judge_prompts.jsonl"}
# fastchat/llm_judge/common.py, as published
FASTCHAT_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
FASTCHAT_ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")


def test_temperature_per_category_is_fastchats():
    assert mt_bench.TEMPERATURE == FASTCHAT_TEMPERATURE
    assert mt_bench.temperature("unknown-category") == 0.7  # gen_model_answer.py: 0.7 for unlisted categories
    assert mt_bench.gen_kwargs("writing", 1024) == {"until": [], "max_gen_toks": 1024, "do_sample": True,
                                                    "temperature": 0.7}
    assert mt_bench.gen_kwargs("stem", 64) == {"until": [], "max_gen_toks": 64, "do_sample": True, "temperature": 0.1}
    for greedy in ("math", "coding", "reasoning", "extraction"):
        assert mt_bench.gen_kwargs(greedy, 1024)["do_sample"] is False
    assert mt_bench.gen_kwargs("x", 8, {"x": 0.00005})["do_sample"] is False  # below 1e-4: greedy


def test_the_task_yaml_carries_fastchats_temperatures():
    from conftest import REPO
    import yaml

    entry = yaml.safe_load((REPO / "conf" / "task" / "mt_bench.yaml").read_text())["tasks"]["mt_bench"]
    assert entry["settings"]["temperature"] == FASTCHAT_TEMPERATURE
    assert entry["max_gen_toks"] == 1024 and entry["type"] == "dialogue"


class _ScriptedLM:
    """An LM with lm-eval's two methods the runner uses: a plain chat template, numbered answers."""

    def __init__(self):
        self.requests = []

    def apply_chat_template(self, chat: list[dict]) -> str:
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in chat) + "<assistant>"

    def generate_until(self, requests) -> list[str]:
        self.requests += requests
        return [f" answer {len(self.requests) - len(requests) + i} " for i in range(len(requests))]


def test_two_turn_prompts_hold_the_models_own_first_answer(data_dir):
    qs = mt_bench.questions(str(data_dir), SETTINGS, limit=8)
    assert len({q["category"] for q in qs}) == 8  # limit 8: one question per category
    lm = _ScriptedLM()
    records = mt_bench.generate_answers(lm, qs, 1024, "m", seed=0)
    assert len(lm.requests) == 16
    first, second = lm.requests[:8], lm.requests[8:]
    for q, r1, r2, rec in zip(qs, first, second, records):
        context1, kw1 = r1.args
        context2, kw2 = r2.args
        assert context1 == f"<user>{q['turns'][0]}</user><assistant>"
        answer1 = rec["choices"][0]["turns"][0]
        assert context2 == (f"<user>{q['turns'][0]}</user><assistant>{answer1}</assistant>"
                            f"<user>{q['turns'][1]}</user><assistant>")
        assert kw1 == kw2 == mt_bench.gen_kwargs(q["category"], 1024)
        assert rec["question_id"] == q["question_id"] and len(rec["choices"][0]["turns"]) == 2
    assert records[0]["choices"][0]["turns"] == ["answer 0", "answer 8"]  # stripped, as FastChat's output.strip()


def test_limit_takes_questions_round_robin_over_categories(data_dir):
    ids = [q["question_id"] for q in mt_bench.questions(str(data_dir), SETTINGS, limit=4)]
    assert ids == [81, 91, 101, 111]  # writing, roleplay, reasoning, math: the first of each, in file order
    assert len(mt_bench.questions(str(data_dir), SETTINGS)) == 80


@pytest.mark.parametrize("category, turn, pairwise, name", [
    ("writing", 1, False, "single-v1"), ("writing", 2, False, "single-v1-multi-turn"),
    ("math", 1, False, "single-math-v1"), ("reasoning", 2, False, "single-math-v1-multi-turn"),
    ("coding", 1, True, "pair-math-v1"), ("coding", 2, True, "pair-math-v1-multi-turn"),
    ("humanities", 1, True, "pair-v2"), ("extraction", 2, True, "pair-v2-multi-turn"),
])
def test_judge_prompt_per_category_and_turn(category, turn, pairwise, name):
    assert mt_bench.judge_prompt_name(category, turn, pairwise) == name


def test_judge_prompts_are_filled_as_fastchat_fills_them(data_dir):
    prompts = mt_bench.judge_prompts(str(data_dir), SETTINGS)
    refs = mt_bench.references(str(data_dir), SETTINGS)
    q = next(q for q in mt_bench.questions(str(data_dir), SETTINGS) if q["question_id"] == 111)  # math
    answer = ["The area is 3.", "The circle's area is 5 pi."]
    turn2 = mt_bench.single_messages(prompts["single-math-v1-multi-turn"], q, answer, 2, refs[111])
    p = prompts["single-math-v1-multi-turn"]
    assert turn2 == [{"role": "system", "content": p["system_prompt"]},
                     {"role": "user", "content": p["prompt_template"].format(
                         question_1=q["turns"][0], question_2=q["turns"][1], answer_1=answer[0],
                         answer_2=answer[1], ref_answer_1=refs[111][0], ref_answer_2=refs[111][1])}]
    assert refs[111][1] in turn2[1]["content"] and answer[1] in turn2[1]["content"]
    turn1 = mt_bench.single_messages(prompts["single-math-v1"], q, answer, 1, refs[111])
    assert refs[111][0] in turn1[1]["content"] and refs[111][1] not in turn1[1]["content"]
    assert turn1[0]["content"] == "You are a helpful assistant."
    writing = next(q for q in mt_bench.questions(str(data_dir), SETTINGS) if q["question_id"] == 81)
    pair = mt_bench.pair_messages(prompts["pair-v2"], writing, ["first A"], ["second B"], 1, None)
    user = pair[1]["content"]
    assert user.index("first A") < user.index("second B")  # A is shown first
    assert "[The Start of Assistant A's Answer]\nfirst A\n[The End of Assistant A's Answer]" in user


@pytest.mark.parametrize("text, rating", [
    ("The answer is helpful. Rating: [[8]]", 8.0),  # FastChat's format
    ("Rating: [[8.5]]", 8.5),
    ("[[10]]", 10.0),
    ("Rating: [7]", 7.0),  # the backup pattern
    ("first [[3]] then [[9]]", 3.0),  # the first match
    ("[[2]] beats the backup [5]", 2.0),  # [[n]] before [n], wherever they are
    ("Rating: [[7.]]", 7.0),
    ("Rating: 8/10", -1),  # malformed: no brackets
    ("Rating: [[eight]]", -1),
    ("[[-3]]", -1),  # no sign in FastChat's pattern
    ("", -1),
    ("[[A]]", -1),
])
def test_rating_parser(text, rating):
    assert mt_bench.parse_rating(text) == rating
    fastchat = FASTCHAT_ONE_SCORE.search(text) or re.search(r"\[(\d+\.?\d*)\]", text)
    assert (float(fastchat.groups()[0]) if fastchat else -1) == rating


@pytest.mark.parametrize("text, winner", [
    ("Assistant A is better. [[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie"),
    ("[[B]] but also [[A]]", "A"),  # FastChat tests A first
    ("A is better", "error"), ("[A]", "error"), ("", "error"),
])
def test_winner_parser(text, winner):
    assert mt_bench.parse_winner(text) == winner
