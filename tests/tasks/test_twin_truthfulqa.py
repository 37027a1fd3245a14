"""TruthfulQA MC1/MC2 offline twins render lm-eval's truthfulqa_mc1/_mc2 prompt, choices and target, and score
like them, for the same documents."""

from __future__ import annotations

import json

import pytest
from twins import assert_same_prompts, reference_task, twin_task

N_DOCS = 817


@pytest.fixture(scope="module")
def hf_docs(data_dir) -> list[dict]:
    """The hub schema (truthful_qa/multiple_choice), rebuilt independently from the raw upstream rows."""
    raw = json.loads((data_dir / "truthfulqa" / "mc_task.json").read_text(encoding="utf-8"))
    return [
        {
            "question": r["question"],
            **{k: {"choices": list(r[k].keys()), "labels": list(r[k].values())}
               for k in ("mc1_targets", "mc2_targets")},
        }
        for r in raw
    ]


@pytest.mark.parametrize("variant", ["mc1", "mc2"])
def test_truthfulqa_offline_matches_lm_eval(variant, data_dir, hf_docs):
    twin = twin_task(f"truthfulqa_{variant}_offline", f"truthfulqa_{variant}_offline", data_dir)
    ref = reference_task(f"truthfulqa_{variant}", hf_docs)

    # lm-eval evaluates TruthfulQA on the hub's only split, `validation` (its test_split is null); so does the twin
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        assert twin.config[key] == ref.config[key], key
    assert twin.config.num_fewshot == ref.config.num_fewshot == 0
    assert len(twin.eval_docs) == N_DOCS
    assert [dict(d) for d in twin.eval_docs] == hf_docs  # the loader gives the hub rows, in file order

    # the harness compares test docs: point both at the evaluated split
    twin.config.test_split = ref.config.test_split = "validation"
    assert_same_prompts(twin, ref, n=N_DOCS)

    # scoring: the same metrics from the same (fake) log-likelihoods; MC2 goes through process_results_mc2
    assert twin.config.metric_list == ref.config.metric_list
    for doc in list(twin.eval_docs)[:5]:
        n = len(twin.doc_to_choice(doc))
        results = [(-1.0 - 0.7 * ((i * 3) % n), False) for i in range(n)]
        got, want = twin.process_results(doc, results), ref.process_results(doc, results)
        assert got.keys() == want.keys() and got.keys() >= {"acc"}
        assert got == pytest.approx(want)
    if variant == "mc2":
        doc = twin.eval_docs[0]  # 3 true answers first, then 3 false ones
        assert twin.process_results(doc, [(0.0, False)] * 6)["acc"] == pytest.approx(0.5)
