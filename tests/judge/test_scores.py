"""Single and pairwise numbers from verdicts: FastChat's rules (unparsed ratings dropped and counted, a tie or
disagreeing orders are a tie), the adjusted win rate and its CI, position bias."""

from __future__ import annotations

import pytest

from qllm.judge import scores


def _single(qid, turn, score, cat="writing"):
    return {"kind": "single", "question_id": qid, "turn": turn, "score": score, "category": cat}


def _pair(qid, turn, order, winner, cat="writing"):
    return {"kind": "pair", "question_id": qid, "turn": turn, "order": order, "winner": winner, "category": cat}


def test_single_pools_kept_ratings_and_counts_failures():
    recs = [_single(1, 1, 8.0), _single(1, 2, 6.0), _single(2, 1, -1), _single(2, 2, 4.0, "math"),
            _single(3, 1, 10.0, "math"), _single(3, 2, -1, "math")]
    s = scores.single(recs, iters=200, seed=0)
    assert s["n_judgments"] == 6 and s["parse_failures"] == 2
    assert s["score"] == pytest.approx((8 + 6 + 4 + 10) / 4)  # pooled over both turns, -1 dropped
    assert s["turn1"] == pytest.approx(9.0) and s["turn2"] == pytest.approx(5.0)
    assert s["categories"] == {"math": {"score": 7.0, "n": 2}, "writing": {"score": 7.0, "n": 2}}
    assert s["score_stderr"] > 0
    per = scores.per_sample(recs, "mt_bench")
    assert [r["doc_id"] for r in per] == ["1:1", "1:2", "2:1", "2:2", "3:1", "3:2"]
    assert per[2]["score"] is None  # unparsed: never scored


def test_all_unparsed_gives_no_score():
    s = scores.single([_single(1, 1, -1), _single(1, 2, -1)])
    assert "score" not in s and s["parse_failures"] == 2


def test_pairwise_tie_rule_and_position_bias():
    recs = [
        _pair(1, 1, "AB", "model_1"), _pair(1, 1, "BA", "model_1"),  # both orders agree: win
        _pair(1, 2, "AB", "model_2"), _pair(1, 2, "BA", "model_2"),  # both agree on the baseline: loss
        _pair(2, 1, "AB", "model_1"), _pair(2, 1, "BA", "model_2"),  # the first shown wins each time: tie
        _pair(2, 2, "AB", "tie"), _pair(2, 2, "BA", "model_1"),  # game 1 a tie: tie
        _pair(3, 1, "AB", "error"), _pair(3, 1, "BA", "model_1"),  # unparsed in one order: dropped
    ]
    p = scores.pairwise(recs, iters=500, seed=0)
    assert p["n_matches"] == 4 and p["errors"] == 1
    assert (p["win"], p["tie"], p["loss"]) == (0.25, 0.5, 0.25)
    assert p["win_rate_adjusted"] == pytest.approx(0.5)
    assert p["position_bias"] == pytest.approx(2 / 4)  # (2,1) and (2,2) change with the order
    # decisive games: (1,1) g1 m1 (first shown: m1) yes, g2 m1 (first: m2) no; (1,2) no, yes; (2,1) yes, yes;
    # (2,2) g2 m1 (first: m2) no
    assert p["first_shown_wins"] == pytest.approx(4 / 7)
    assert p["win_rate_adjusted_ci_lo"] <= 0.5 <= p["win_rate_adjusted_ci_hi"]


def test_pairwise_metrics_names():
    single = scores.single([_single(1, 1, 8.0), _single(1, 2, 6.0)])
    pair = scores.pairwise([_pair(1, 1, "AB", "model_1"), _pair(1, 1, "BA", "model_1")])
    metrics, subtasks = scores.task_metrics(single, pair)
    assert metrics["score,none"] == 7.0 and metrics["pairwise/win_rate_adjusted,none"] == 1.0
    assert subtasks == {"writing": {"score": 7.0, "pairwise/win_rate_adjusted": 1.0}}
