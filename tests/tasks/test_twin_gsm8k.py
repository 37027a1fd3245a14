"""GSM8K offline twin: lm-eval's gsm8k prompt, target, generation settings, answer extraction and scoring; few-shot
examples from the test split that never include the evaluated problem; the reasoning-steps difficulty label."""

from __future__ import annotations

import json

import pytest
from lm_eval.api.instance import Instance
from twins import assert_same_prompts, lm_eval_task_config, reference_task, twin_task

from qllm.planning import compose_cell
from qllm.tasks.twins.gsm8k import reasoning_steps

SEED = 1234  # qllm's eval.seed, passed to lm-eval as fewshot_random_seed


@pytest.fixture(scope="module")
def rows(data_dir) -> list[dict]:
    """The hub schema (openai/gsm8k main): the official file already is {question, answer}."""
    with open(data_dir / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def twin(data_dir):
    return twin_task("gsm8k_offline", "gsm8k_offline", data_dir)


@pytest.fixture(scope="module")
def reference(rows):
    # lm-eval's own gsm8k with its few-shot pool moved to the test split, as the twin does offline
    return reference_task("gsm8k", rows, overrides={"fewshot_split": "test"})


def test_gsm8k_offline_matches_lm_eval(twin, reference, rows):
    assert len(twin.eval_docs) == len(rows) == 1319
    assert_same_prompts(twin, reference, n=8)
    hub = lm_eval_task_config("gsm8k")
    for key in ("output_type", "generation_kwargs", "filter_list", "metric_list", "repeats", "num_fewshot"):
        assert twin.config[key] == hub[key], key
    assert (twin.config.fewshot_split, twin.config.test_split) == ("test", "test")


def test_gsm8k_offline_fewshot_context_matches_lm_eval(twin, reference):
    twin.set_fewshot_seed(SEED)
    reference.set_fewshot_seed(SEED)
    docs_t, docs_r = list(twin.eval_docs)[:4], list(reference.eval_docs)[:4]
    for a, b in zip(docs_t, docs_r):
        ctx = twin.fewshot_context(a, num_fewshot=5)
        assert ctx == reference.fewshot_context(b, num_fewshot=5)
        assert ctx.count("Question: ") == 6 and ctx.endswith(f"Question: {a['question']}\nAnswer:")
        assert ctx.count(a["question"]) == 1  # the evaluated problem is not among its own examples


def test_gsm8k_offline_fewshot_excludes_the_evaluated_problem(data_dir):
    """lm-eval 0.4.13 passes eval_doc to the sampler when fewshot_split == test_split, and the sampler drops it.
    With a pool of 6 problems and 5 shots, each problem's examples must be exactly the 5 others (without the
    exclusion, a random draw of 5 from 6 would include the problem itself 5 times out of 6)."""
    task = twin_task("gsm8k_offline", "gsm8k_offline", data_dir)
    pool = list(task.eval_docs)[:6]
    task.sampler.replace_df(pool)
    task.set_fewshot_seed(SEED)
    for doc in pool:
        ctx = task.fewshot_context(doc, num_fewshot=5)
        shots = ctx.split("\n\n")[:-1]
        assert len(shots) == 5
        assert sorted(s.split("\nAnswer:")[0] for s in shots) == sorted(
            f"Question: {d['question']}" for d in pool if d is not doc
        )
    # control: were the few-shot split another split than the evaluated one, lm-eval would not exclude the doc
    task.fewshot_cfg.split = "train"
    task.set_fewshot_seed(SEED)
    assert any(task.fewshot_context(doc, num_fewshot=5).count(doc["question"]) == 2 for doc in pool)


# ---- answer extraction: the twin's filter_list through lm-eval's own filter classes, then its exact_match ----


def _doc(target: str) -> dict:
    return {"question": "q", "answer": f"A step.\n#### {target}"}


def extract_and_score(task, doc: dict, output: str) -> dict:
    """{filter name: (extracted string, exact_match)} for one model output, as lm-eval computes them."""
    out = {}
    for ensemble in task._filters:  # built by lm-eval's build_filter_ensemble from the twin's filter_list
        inst = Instance("generate_until", doc, ("", {}), 0, resps=[output])
        ensemble.apply([inst])
        extracted = inst.filtered_resps[ensemble.name]
        out[ensemble.name] = (extracted, float(task.process_results(doc, [extracted])["exact_match"]))
    return out


CASES = [
    # target, model output, (strict-match extracted, correct), (flexible-extract extracted, correct)
    ("1234", "She has 1,234 apples.\n#### 1,234", ("1,234", 1), ("1,234", 1)),  # thousands comma ignored
    ("1234", "#### 1234.", ("1234.", 1), ("1234.", 1)),  # trailing period ignored
    ("1234", "In total $1,234.", ("[invalid]", 0), ("$1,234.", 1)),  # no marker: only flexible finds it
    ("18", "She makes $18 every day.", ("[invalid]", 0), ("$18", 1)),  # dollar sign ignored
    ("18", "#### $18", ("[invalid]", 0), ("$18", 1)),  # strict wants a digit right after "#### "
    ("18", "####18", ("[invalid]", 0), ("18", 1)),  # ... and the space
    ("18", "#### 18 dollars", ("18", 1), ("18", 1)),
    ("18", "#### 18.00", ("18.00", 0), ("18.00", 0)),  # no numeric comparison: "18.00" != "18"
    ("42", "The answer is 42.", ("[invalid]", 0), ("42.", 1)),
    ("42", "The answer is 42. Done in 2 steps.", ("[invalid]", 0), ("2", 0)),  # flexible takes the LAST number
    ("-5", "#### -5", ("-5", 1), ("-5", 1)),  # negative numbers
    ("-5", "It drops to -5 degrees.", ("[invalid]", 0), ("-5", 1)),
    ("-5", "#### 5", ("5", 0), ("5", 0)),  # the sign counts
    ("14", "3 + 4 = 7 and 7 * 2 = 14", ("[invalid]", 0), ("14", 1)),
    ("14", "#### 14 because 2 times 7 is 14, not 15", ("14", 1), ("15", 0)),  # strict: first after marker
    ("18", "No idea.", ("[invalid]", 0), ("[invalid]", 0)),
]


@pytest.mark.parametrize(("target", "output", "strict", "flexible"), CASES)
def test_gsm8k_offline_answer_extraction(twin, target, output, strict, flexible):
    assert [e.name for e in twin._filters] == ["strict-match", "flexible-extract"]
    got = extract_and_score(twin, _doc(target), output)
    assert got == {"strict-match": strict, "flexible-extract": flexible}


def test_gsm8k_offline_scores_real_references(twin, rows):
    # rows[0] ends "#### 18"; rows[2] "#### 70000" with "$130,000"-style amounts in its solution
    assert extract_and_score(twin, rows[0], " She makes 9 * 2 = $18.\n#### 18") == {
        "strict-match": ("18", 1), "flexible-extract": ("18", 1)}
    assert extract_and_score(twin, rows[2], " He made $70,000.\n#### 70,000\n\nThat is $70,000 profit.") == {
        "strict-match": ("70,000", 1), "flexible-extract": ("$70,000", 1)}
    # the gold solution itself (the few-shot target format) scores under both filters
    for doc in rows[:3]:
        assert {k: v[1] for k, v in extract_and_score(twin, doc, doc["answer"]).items()} == {
            "strict-match": 1, "flexible-extract": 1}


# ---- difficulty ----


def test_gsm8k_offline_difficulty_is_reasoning_steps(data_dir, rows):
    entry = compose_cell(["task=gsm8k_offline", "method=none", f"data_dir={data_dir}", "cache_dir=/nonexistent"]).tasks[
        "gsm8k_offline"]
    assert entry["difficulty"] == "py:qllm.tasks.twins.gsm8k.reasoning_steps"
    assert (entry["metric"], entry["num_fewshot"], entry["gen_kwargs"]) == ("exact_match,strict-match", 5, {})
    assert reasoning_steps(rows[0]) == 2  # Janet's ducks: 2 lines, then "#### 18"
    assert reasoning_steps(rows[2]) == 4  # house flipping: 4 lines, then "#### 70000"
    assert rows[1042]["answer"].count("\n") == 6 and reasoning_steps(rows[1042]) == 5  # a blank line is no step
    assert {reasoning_steps(r) for r in rows} == set(range(2, 10)) | {11}
