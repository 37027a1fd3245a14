"""From lm-eval's result dict to what qllm keeps per task: metrics (of the task or group), subtask metrics, sample
counts, a 0-100 score, per-sample correctness (for stratified analyses) and scores by difficulty bucket.

Pure functions over lm-eval's plain dicts: no model, no lm-eval import.
"""

from __future__ import annotations

from statistics import fmean
from typing import Any, Callable, Optional

from ..records import TaskResult

_NOT_METRICS = {"alias", "name", "sample_len", " ", "samples"}


def primary_key(metric: str) -> str:
    """lm-eval's result key of a primary metric: "acc" -> "acc,none"; "exact_match,strict-match" stays."""
    return metric if "," in metric else f"{metric},none"


def numeric_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def score(value: Optional[float], higher_is_better: bool) -> Optional[float]:
    """The common 0-100 scale: 100 x a [0, 1] metric where higher is better; None for perplexities and the like."""
    if value is None or not higher_is_better or not 0.0 <= value <= 1.0:
        return None
    return 100.0 * value


def summarize_task(res: dict, top: str, entry: dict) -> TaskResult:
    """One qllm task entry's summary out of one simple_evaluate call on task-or-group `top`."""
    groups = res.get("groups", {})
    metrics = dict(groups.get(top) or res["results"].get(top) or {})
    leaves = list(res["n-samples"])
    # leaf tasks and intermediate groups (MMLU's categories); lm-eval names inline members "parent::child"
    parts = {**res["results"], **{g: m for g, m in groups.items() if g != top}}
    subtasks = {name.split("::")[-1]: numeric_metrics(m) for name, m in parts.items()
                if name != top and (name in leaves or name in groups)}
    effective = sum(res["n-samples"][n]["effective"] for n in leaves)
    original = sum(res["n-samples"][n]["original"] for n in leaves)
    value = metrics.get(primary_key(entry["metric"]))
    if value is None and subtasks:  # a group without that aggregate: size-weighted mean of its subtasks
        pk = primary_key(entry["metric"])
        sized = [(m[pk], res["n-samples"][n]["effective"]) for n, m in subtasks.items() if pk in m]
        if sized:
            value = sum(v * w for v, w in sized) / sum(w for _, w in sized)
            metrics[pk] = value
    return TaskResult(
        lm_eval_task=top, metrics=metrics, subtasks=subtasks,
        n_samples={"effective": effective, "original": original}, num_fewshot=entry["num_fewshot"],
        primary={"metric": entry["metric"], "value": value},
        score=score(value if isinstance(value, (int, float)) else None, entry["higher_is_better"]),
    )


def per_sample_records(res: dict, difficulty: Callable[[dict], Any] | str | None) -> list[dict]:
    """Per-sample correctness of every leaf task: doc id, filter, the sample's metric values, difficulty label."""
    out = []
    for leaf, samples in (res.get("samples") or {}).items():
        names = {k.split(",")[0] for k in res["results"].get(leaf, {}) if "," in k and "_stderr" not in k}
        for s in samples:
            values = {m: s[m] for m in names if isinstance(s.get(m), (int, float, bool))}
            rec = {"task": leaf, "doc_id": s.get("doc_id"), "filter": s.get("filter", "none"), **values,
                   "pred": prediction(s.get("filtered_resps"))}
            if difficulty is not None:
                rec["difficulty"] = difficulty(s["doc"]) if callable(difficulty) else difficulty
            out.append(rec)
    return out


def prediction(filtered: Any) -> Any:
    """What the model answered, comparable across backends: the chosen option's index for multiple choice (highest
    log-likelihood, lm-eval's `acc` choice), the extracted answer for generation, None otherwise (perplexity)."""
    if isinstance(filtered, (list, tuple)) and len(filtered) == 1 and not isinstance(filtered[0], (list, tuple)):
        filtered = filtered[0]
    if isinstance(filtered, str):
        return filtered
    if isinstance(filtered, (list, tuple)) and len(filtered) > 1 and all(
            isinstance(x, (list, tuple)) and x and isinstance(x[0], (int, float)) for x in filtered):
        lls = [float(x[0]) for x in filtered]
        return lls.index(max(lls))
    return None


def by_difficulty(records: list[dict], metric: str) -> dict[str, dict[str, float]]:
    """Mean of the primary metric per difficulty label (on the primary metric's filter): {label: {mean, n}}."""
    name, _, filt = primary_key(metric).partition(",")
    buckets: dict[str, list[float]] = {}
    for r in records:
        if "difficulty" in r and r["filter"] == filt and name in r:
            buckets.setdefault(str(r["difficulty"]), []).append(float(r[name]))
    return {label: {"mean": fmean(v), "n": float(len(v))} for label, v in sorted(buckets.items())}


def suite_score(per_task: dict[str, TaskResult]) -> dict[str, float]:
    """Macro average of the per-task 0-100 scores (each task weighs the same; tasks without a score are left out)."""
    scores = [t.score for t in per_task.values() if t.score is not None]
    return {"score_macro": fmean(scores), "n_tasks_scored": float(len(scores))} if scores else {}
