"""From verdicts to MT-Bench's numbers.

Single (FastChat's show_result --mode single): ratings of -1 (unparsed) are dropped and counted; `score` is the pooled
mean of every kept rating of both turns, `turn1`/`turn2` the means per turn, per category likewise. Its stderr is
the bootstrap standard deviation of the pooled mean with questions resampled (a question's two turns move together).

Pairwise against the baseline (show_result --mode pairwise-baseline): a (question, turn) is one match, judged in both
orders; a match with an unparsed verdict in either order is dropped (counted as `errors`); a tie in game 1, or games
that disagree, is a tie; else the winner of both. win / tie / loss are shares of the kept matches,
`win_rate_adjusted` = (win + tie / 2) / matches with a 95% percentile bootstrap CI (questions resampled);
`position_bias` = the share of kept matches whose verdict flips with the order, `first_shown_wins` = the share of
decisive single verdicts won by the answer shown first (0.5: no preference for a position).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np

from ..tasks.mt_bench import UNPARSED


def _by_question(values: dict[tuple[int, int], float]) -> list[list[float]]:
    grouped: dict[int, list[float]] = defaultdict(list)
    for (qid, _turn), v in sorted(values.items()):
        grouped[qid].append(v)
    return list(grouped.values())


def _bootstrap(groups: list[list[float]], iters: int, seed: int) -> Optional[np.ndarray]:
    """Pooled means of `iters` resamples of the groups (None with fewer than 2 groups or no iterations)."""
    if len(groups) < 2 or iters <= 0:
        return None
    rng = np.random.default_rng(seed)
    sums = np.array([sum(g) for g in groups])
    counts = np.array([len(g) for g in groups])
    idx = rng.integers(0, len(groups), size=(iters, len(groups)))
    return sums[idx].sum(axis=1) / np.maximum(counts[idx].sum(axis=1), 1)


def single(records: list[dict], iters: int = 1000, seed: int = 1234) -> dict:
    rated = {(r["question_id"], r["turn"]): float(r["score"]) for r in records
             if r["kind"] == "single" and r["score"] != UNPARSED}
    singles = [r for r in records if r["kind"] == "single"]
    out: dict = {"n_judgments": len(singles), "parse_failures": len(singles) - len(rated)}
    if not rated:
        return out
    out["score"] = float(np.mean(list(rated.values())))
    boots = _bootstrap(_by_question(rated), iters, seed)
    if boots is not None:
        out["score_stderr"] = float(boots.std(ddof=1))
    for turn in (1, 2):
        values = [v for (_q, t), v in rated.items() if t == turn]
        if values:
            out[f"turn{turn}"] = float(np.mean(values))
    cats: dict[str, list[float]] = defaultdict(list)
    category = {r["question_id"]: r["category"] for r in singles}
    for (qid, _t), v in rated.items():
        cats[category[qid]].append(v)
    out["categories"] = {c: {"score": float(np.mean(v)), "n": len(v)} for c, v in sorted(cats.items())}
    return out


def matches(records: list[dict]) -> list[dict]:
    """One row per (question, turn) judged in both orders: {question_id, category, turn, g1, g2, outcome}, outcome
    win | tie | loss (for the evaluated model) | error."""
    games: dict[tuple[int, int], dict] = {}
    for r in records:
        if r["kind"] == "pair":
            games.setdefault((r["question_id"], r["turn"]), {"question_id": r["question_id"],
                                                             "category": r["category"], "turn": r["turn"]})[
                "g1" if r["order"] == "AB" else "g2"] = r["winner"]
    rows = []
    for m in games.values():
        g1, g2 = m.get("g1", "error"), m.get("g2", "error")
        if "error" in (g1, g2):
            outcome = "error"
        elif g1 == "tie" or g1 != g2:
            outcome = "tie"
        else:
            outcome = "win" if g1 == "model_1" else "loss"
        rows.append({**m, "g1": g1, "g2": g2, "outcome": outcome})
    return rows


def pairwise(records: list[dict], iters: int = 1000, seed: int = 1234) -> dict:
    rows = matches(records)
    kept = [m for m in rows if m["outcome"] != "error"]
    out: dict = {"n_matches": len(kept), "errors": len(rows) - len(kept)}
    if not kept:
        return out
    n = len(kept)
    for outcome in ("win", "tie", "loss"):
        out[outcome] = sum(m["outcome"] == outcome for m in kept) / n
    out["win_rate_adjusted"] = out["win"] + out["tie"] / 2
    value = {(m["question_id"], m["turn"]): {"win": 1.0, "tie": 0.5, "loss": 0.0}[m["outcome"]] for m in kept}
    boots = _bootstrap(_by_question(value), iters, seed)
    if boots is not None:
        out["win_rate_adjusted_ci_lo"], out["win_rate_adjusted_ci_hi"] = (float(x) for x in
                                                                          np.percentile(boots, [2.5, 97.5]))
    out["position_bias"] = sum(m["g1"] != m["g2"] for m in kept) / n
    decisive = [(m["g1"], "model_1") for m in kept if m["g1"] != "tie"] + \
               [(m["g2"], "model_2") for m in kept if m["g2"] != "tie"]  # who was shown first in each game
    if decisive:
        out["first_shown_wins"] = sum(w == first for w, first in decisive) / len(decisive)
    cats: dict[str, list[float]] = defaultdict(list)
    for m in kept:
        cats[m["category"]].append(value[(m["question_id"], m["turn"])])
    out["categories"] = {c: {"win_rate_adjusted": float(np.mean(v)), "n": len(v)} for c, v in sorted(cats.items())}
    return out


def per_sample(records: list[dict], task: str) -> list[dict]:
    """Per (question, turn) rating, as the report pairs items across cells (`eval/per_sample_<task>.jsonl`): the
    rating, or None when it could not be parsed."""
    return [{"task": task, "doc_id": f"{r['question_id']}:{r['turn']}", "filter": "none",
             "score": None if r["score"] == UNPARSED else float(r["score"]), "category": r["category"],
             "question_id": r["question_id"], "turn": r["turn"]}
            for r in sorted((r for r in records if r["kind"] == "single"), key=lambda r: (r["question_id"], r["turn"]))]


def task_metrics(single_scores: dict, pair_scores: Optional[dict]) -> tuple[dict, dict]:
    """(metrics, subtasks) of the task's TaskResult, in lm-eval's key style ("score,none"): logged as
    `mt_bench/score`, `mt_bench/pairwise/win_rate_adjusted`, `mt_bench/<category>/score`, ..."""
    metrics = {f"{k},none": v for k, v in single_scores.items() if k != "categories"}
    subtasks: dict[str, dict] = defaultdict(dict)
    for c, v in single_scores.get("categories", {}).items():
        subtasks[c]["score"] = v["score"]
    if pair_scores is not None:
        metrics |= {f"pairwise/{k},none": v for k, v in pair_scores.items() if k != "categories"}
        for c, v in pair_scores.get("categories", {}).items():
            subtasks[c]["pairwise/win_rate_adjusted"] = v["win_rate_adjusted"]
    return metrics, dict(subtasks)
