"""The backend consistency check's arithmetic: agreement on answers, the paired delta and its CI, the verdict."""

from __future__ import annotations

import pytest

from qllm.report.consistency import compare_items, known_causes
from qllm.report.select import TaskSpec

SPEC = TaskSpec("arc", "commonsense", "acc_norm", ())


def _records(answers: list[int], correct: list[int]) -> list[dict]:
    return [{"task": "arc", "doc_id": i, "filter": "none", "acc_norm": float(c), "pred": a}
            for i, (a, c) in enumerate(zip(answers, correct))]


def test_identical_answers_agree_exactly():
    a = _records([0, 1, 2, 3] * 25, [1, 0, 1, 0] * 25)
    r = compare_items(a, [dict(x) for x in a], SPEC)
    assert r["n_items"] == 100 and r["agreement"] == 1.0 and r["delta"] == 0.0
    assert (r["ci_low"], r["ci_high"]) == (0.0, 0.0) and r["verdict"] == "agree within stderr"
    assert r["agreement_basis"] == "answer"


def test_a_few_changed_answers_lower_agreement_but_stay_within_stderr():
    a = _records([0] * 100, [1] * 50 + [0] * 50)
    b = _records([1] * 3 + [0] * 97, [0] + [1] * 49 + [1] + [0] * 49)  # one lost, one gained, one other miss
    r = compare_items(a, b, SPEC)
    assert r["agreement"] == pytest.approx(0.97) and r["n_disagree"] == 3
    assert r["delta"] == 0.0 and r["ci_low"] < 0 < r["ci_high"] and r["verdict"] == "agree within stderr"


def test_a_systematic_drop_is_a_disagreement():
    a = _records([0] * 100, [1] * 60 + [0] * 40)
    b = _records([1] * 30 + [0] * 70, [0] * 30 + [1] * 30 + [0] * 40)
    r = compare_items(a, b, SPEC)
    assert r["delta"] == pytest.approx(-0.30) and r["ci_high"] < 0 and r["verdict"] == "disagree"
    assert r["agreement"] == pytest.approx(0.70)


def test_items_only_one_side_has_are_left_out_and_old_runs_compare_correctness():
    a = [{k: v for k, v in x.items() if k != "pred"} for x in _records([0] * 10, [1] * 10)]
    b = _records([0] * 12, [1] * 12)
    r = compare_items(a, b, SPEC)
    assert r["n_items"] == 10 and r["agreement_basis"].startswith("correctness")


def test_known_causes_name_what_differs():
    hf = {"model.dtype": "float32", "eval.apply_chat_template": "False", "eval.max_length": "None"}
    vl = {"model.dtype": "float32", "eval.dtype": "bfloat16", "eval.apply_chat_template": "False",
          "eval.add_bos_token": "None", "eval.max_model_len": "4096", "eval.cpu_int4_w4a8": "False"}
    causes = {c["cause"]: c for c in known_causes(hf, vl)}
    assert causes["dtype"]["differs"] and causes["dtype"]["b"] == "bfloat16"
    assert not causes["chat template (lm-eval #1841, #2851)"]["differs"]
    assert not causes["W4A16 run as W4A8"]["differs"]


def test_the_report_lists_the_checks_cells_carry():
    from qllm.report.select import CellRun
    from qllm.report.tables import consistency_table

    def cell(tags, metrics, backend):
        return CellRun(run_id=backend, name="", status="finished", run_status="FINISHED", model="m", method="rtn",
                       bits="4", suite="s", tasks={"arc": SPEC}, metrics=metrics,
                       params={"eval.backend": backend}, tags=tags, start_time=0)

    checked = cell({"qllm.consistency": "disagree vs hf run h"},
                   {"consistency/arc/agreement": 0.9, "consistency/arc/delta": -0.1, "consistency/arc/ci_low": -0.15,
                    "consistency/arc/ci_high": -0.05, "consistency/arc/n_items": 100.0}, "vllm")
    t = consistency_table([cell({}, {}, "hf"), checked])
    assert len(t) == 1 and t.iloc[0]["cell"] == "rtn · w4 · vllm" and t.iloc[0]["verdict"] == "disagree"
    assert t.iloc[0]["agreement_pct"] == pytest.approx(90.0) and t.iloc[0]["versus"] == "hf run h"
