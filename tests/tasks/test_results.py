"""Result bookkeeping on hand-made lm-eval result dicts: primary metric, groups, scores, difficulty, suite average."""

from __future__ import annotations

import pytest

from qllm.records import EvalResult, TaskResult
from qllm.store.tracking import task_metrics
from qllm.tasks import results

ENTRY = {"metric": "acc", "higher_is_better": True, "num_fewshot": 5}


def group_result() -> dict:
    return {
        "results": {"g": {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "g"},
                    "g_a": {"acc,none": 0.25, "acc_stderr,none": 0.2}, "g_b": {"acc,none": 0.75}},
        "groups": {"g": {"acc,none": 0.5, "acc_stderr,none": 0.1}},
        "n-samples": {"g_a": {"original": 10, "effective": 4}, "g_b": {"original": 20, "effective": 4}},
        "samples": {
            "g_a": [{"doc_id": i, "doc": {"steps": i}, "acc": float(i % 2), "filter": "none"} for i in range(4)],
            "g_b": [{"doc_id": i, "doc": {"steps": i}, "acc": 1.0, "filter": "none"} for i in range(4)],
        },
    }


def test_group_summary_scores_and_subtasks():
    s = results.summarize_task(group_result(), "g", ENTRY)
    assert s.primary == {"metric": "acc", "value": 0.5} and s.score == 50.0
    assert s.n_samples == {"effective": 8, "original": 30}
    assert s.subtasks == {"g_a": {"acc,none": 0.25, "acc_stderr,none": 0.2}, "g_b": {"acc,none": 0.75}}


def test_group_without_aggregate_falls_back_to_size_weighted_mean():
    res = group_result()
    del res["groups"], res["results"]["g"]
    res["n-samples"]["g_b"]["effective"] = 12
    s = results.summarize_task(res, "g", ENTRY)
    assert s.primary["value"] == pytest.approx((0.25 * 4 + 0.75 * 12) / 16)


def test_perplexity_has_no_score_and_filters_are_kept():
    assert results.score(35.2, higher_is_better=False) is None
    assert results.score(0.31, higher_is_better=True) == pytest.approx(31.0)
    assert results.primary_key("exact_match,strict-match") == "exact_match,strict-match"
    assert results.primary_key("acc") == "acc,none"


def test_per_sample_records_and_difficulty_buckets():
    records = results.per_sample_records(group_result(), lambda doc: "hard" if doc["steps"] >= 2 else "easy")
    assert len(records) == 8 and records[0] == {"task": "g_a", "doc_id": 0, "filter": "none", "acc": 0.0, "pred": None,
                                                "difficulty": "easy"}
    buckets = results.by_difficulty(records, "acc")
    # easy: g_a docs 0,1 (0,1) + g_b docs 0,1 (1,1) -> 0.75; hard: g_a docs 2,3 (0,1) + g_b (1,1) -> 0.75
    assert buckets == {"easy": {"mean": 0.75, "n": 4.0}, "hard": {"mean": 0.75, "n": 4.0}}
    assert results.by_difficulty(results.per_sample_records(group_result(), "challenge"), "acc") == {
        "challenge": {"mean": 0.75, "n": 8.0}}


def test_suite_macro_average_and_mlflow_names():
    per_task = {"a": TaskResult(score=40.0), "b": TaskResult(score=60.0), "ppl": TaskResult(score=None)}
    assert results.suite_score(per_task) == {"score_macro": 50.0, "n_tasks_scored": 2.0}
    s = results.summarize_task(group_result(), "g", ENTRY)
    s.wall_s, s.by_difficulty = 1.0, {"easy": {"mean": 0.75, "n": 4.0}}
    m = task_metrics(EvalResult(tasks={"mmlu": s}, suite=results.suite_score({"mmlu": s})))
    assert m["mmlu/acc"] == 0.5 and m["mmlu/acc_stderr"] == 0.1 and m["mmlu/score"] == 50.0
    assert m["mmlu/g_a/acc"] == 0.25 and m["mmlu/difficulty/easy/acc"] == 0.75 and m["suite/score_macro"] == 50.0
    assert m["mmlu/n_samples"] == 8


def test_prediction_is_the_chosen_option_or_the_extracted_answer():
    from qllm.tasks.results import prediction

    assert prediction([[-3.0, False], [-1.5, True], [-2.0, False]]) == 1  # multiple choice: highest log-likelihood
    assert prediction([(-1.0, False), (-4.0, False)]) == 0
    assert prediction(["72"]) == "72" and prediction("[invalid]") == "[invalid]"  # generation, after its filter
    assert prediction([-12.5]) is None and prediction(None) is None  # perplexity: no answer to compare
