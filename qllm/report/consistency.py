"""Backend consistency: the same checkpoint and tasks evaluated by two backends (hf and vllm), item by item.

For each task both runs evaluated: per-item agreement (the same option chosen for multiple choice, the same
extracted answer for generation; the same correctness where a run predates recorded answers), the score delta
(b - a) with a paired 95% CI (normal approximation over the per-item differences), and a verdict: "agree within
stderr" when the CI holds 0, else "disagree". The known causes of HF/vLLM gaps (lm-eval #2676 BOS, #2851 / #1841
chat templates, #3150 degenerate generations; dtype; context length) are checked on the two cells' settings and
listed with each result, so a disagreement comes with its likely explanation.

`qllm compare-backends --run-ids A B` compares two runs; a cell that finishes with the same quantization (quant key)
as a finished cell of another backend is compared with it automatically (`-m eval=hf,vllm`): the result goes to the
later run's metrics (`consistency/<task>/...`), its tag `qllm.consistency` and `consistency.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from typing import Any, Optional

from mlflow.tracking import MlflowClient

from ..names import Kind, Status, Tag
from .select import Store, TaskSpec, cell_from_run, default_uri

Z95 = 1.959963984540054


def _answers(records: list[dict], spec: TaskSpec) -> dict[tuple, tuple[Any, float]]:
    """(leaf task, doc id) -> (the answer, the primary metric's per-item value), on the primary metric's filter."""
    name, filt = spec.sample_field
    return {(r.get("task"), r.get("doc_id")): (r.get("pred"), float(r[name])) for r in records
            if r.get("filter", "none") == filt and isinstance(r.get(name), (int, float))}


def compare_items(a: list[dict], b: list[dict], spec: TaskSpec) -> dict[str, Any]:
    """Agreement and the paired score delta (b - a) of two runs' per-sample records of one task."""
    ia, ib = _answers(a, spec), _answers(b, spec)
    keys = sorted(set(ia) & set(ib), key=str)
    n = len(keys)
    if not n:
        return {"n_items": 0, "verdict": "no common items"}
    by_answer = all(ia[k][0] is not None and ib[k][0] is not None for k in keys)
    same = [ia[k][0] == ib[k][0] if by_answer else ia[k][1] == ib[k][1] for k in keys]
    d = [ib[k][1] - ia[k][1] for k in keys]
    mean = statistics.fmean(d)
    se = statistics.stdev(d) / math.sqrt(n) if n > 1 else 0.0
    lo, hi = mean - Z95 * se, mean + Z95 * se
    return {
        "n_items": n, "agreement": sum(same) / n, "n_disagree": n - sum(same),
        "agreement_basis": "answer" if by_answer else "correctness (a run without recorded answers)",
        "score_a": statistics.fmean(ia[k][1] for k in keys), "score_b": statistics.fmean(ib[k][1] for k in keys),
        "delta": mean, "delta_se": se, "ci_low": lo, "ci_high": hi,
        "verdict": "agree within stderr" if lo <= 0.0 <= hi else "disagree",
        "disagreeing_items": [list(k) for k, s in zip(keys, same) if not s][:50],
    }


def _setting(params: dict[str, str], *keys: str) -> str:
    for k in keys:
        if params.get(k) not in (None, "", "None"):
            return params[k]
    return "default"


def known_causes(pa: dict[str, str], pb: dict[str, str]) -> list[dict[str, Any]]:
    """The settings behind known HF/vLLM gaps, on both sides, and whether they differ."""
    rows = [
        ("dtype", _setting(pa, "eval.dtype", "model.dtype"), _setting(pb, "eval.dtype", "model.dtype")),
        ("BOS token (lm-eval #2676)", _setting(pa, "eval.add_bos_token"), _setting(pb, "eval.add_bos_token")),
        ("chat template (lm-eval #1841, #2851)", _setting(pa, "eval.apply_chat_template"),
         _setting(pb, "eval.apply_chat_template")),
        ("max length", _setting(pa, "eval.max_length", "eval.max_model_len"),
         _setting(pb, "eval.max_length", "eval.max_model_len")),
        ("W4A16 run as W4A8", pa.get("eval.cpu_int4_w4a8", "False"), pb.get("eval.cpu_int4_w4a8", "False")),
    ]
    return [{"cause": c, "a": va, "b": vb, "differs": va != vb} for c, va, vb in rows]


def compare_runs(store: Store, run_a: str, run_b: str) -> dict[str, Any]:
    """Every task the two cell runs share, compared item by item (a: usually hf, b: vllm)."""
    ca, cb = (cell_from_run(store.client.get_run(r)) for r in (run_a, run_b))
    if ca.tags.get(Tag.QUANT_KEY) != cb.tags.get(Tag.QUANT_KEY):
        raise SystemExit(f"runs {run_a} and {run_b} evaluated different checkpoints (quant keys "
                         f"{ca.tags.get(Tag.QUANT_KEY)} vs {cb.tags.get(Tag.QUANT_KEY)}): nothing to compare")
    tasks = {}
    for key, spec in ca.tasks.items():
        other = cb.tasks.get(key)
        if other is None or other.settings[:-1] != spec.settings[:-1]:  # the same task settings, any backend
            continue
        sa, sb = store.per_sample(ca.source_run_id, key), store.per_sample(cb.source_run_id, key)
        if sa and sb:
            tasks[key] = {"metric": spec.metric, **compare_items(sa, sb, spec)}
    causes = known_causes(ca.params, cb.params)
    verdicts = {t: r["verdict"] for t, r in tasks.items()}
    return {"a": {"run_id": run_a, "name": ca.name, "backend": ca.params.get("eval.backend", "hf")},
            "b": {"run_id": run_b, "name": cb.name, "backend": cb.params.get("eval.backend", "hf")},
            "tasks": tasks, "known_causes": causes,
            "verdict": ("disagree" if "disagree" in verdicts.values() else "agree within stderr") if tasks
            else "no common per-sample results",
            "differing_settings": [c["cause"] for c in causes if c["differs"]]}


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    out = {}
    for task, r in result["tasks"].items():
        for k in ("agreement", "delta", "ci_low", "ci_high", "n_items"):
            if isinstance(r.get(k), (int, float)):
                out[f"consistency/{task}/{k}"] = float(r[k])
    return out


def log(client: MlflowClient, run_id: str, result: dict[str, Any]) -> None:
    """The comparison on run `run_id`: metrics, tag qllm.consistency, consistency.json."""
    for k, v in metrics_of(result).items():
        client.log_metric(run_id, k, v)
    other = result["a"] if result["b"]["run_id"] == run_id else result["b"]
    client.set_tag(run_id, Tag.CONSISTENCY, f"{result['verdict']} vs {other['backend']} run {other['run_id']}")
    client.log_dict(run_id, result, "consistency.json")


def twin_runs(store: Store, quant_key: str, backend: str) -> list[str]:
    """Finished cell runs of the same checkpoint evaluated by another backend, latest first."""
    runs = store.search(f"tags.`{Tag.KIND}` = '{Kind.CELL}' and tags.`{Tag.QUANT_KEY}` = '{quant_key}' and "
                        f"tags.`{Tag.STATUS}` = '{Status.FINISHED}'")
    return [r.info.run_id for r in sorted(runs, key=lambda r: -(r.info.start_time or 0))
            if r.data.params.get("eval.backend", "hf") != backend]


def check_against_twins(tracking_uri: str, experiment: str, run_id: str, quant_key: str,
                        backend: str) -> Optional[dict]:
    """The automatic check after a cell: compare it with the latest finished run of another backend."""
    store = Store(tracking_uri, experiment)
    try:
        twins = twin_runs(store, quant_key, backend)
        if not twins:
            return None
        a, b = (twins[0], run_id) if backend != "hf" else (run_id, twins[0])  # hf first when it is one of them
        result = compare_runs(store, a, b)
        if result["tasks"]:
            log(store.client, run_id, result)
        return result
    finally:
        store.close()


def render(result: dict[str, Any]) -> str:
    a, b = result["a"], result["b"]
    lines = [f"{a['backend']} ({a['run_id']}) vs {b['backend']} ({b['run_id']}): {result['verdict']}"]
    for task, r in result["tasks"].items():
        if not r["n_items"]:
            lines.append(f"  {task}: no common items")
            continue
        lines.append(f"  {task} ({r['metric']}, {r['n_items']} items): agreement {100 * r['agreement']:.1f}% "
                     f"({r['agreement_basis']}), {a['backend']} {r['score_a']:.4f} vs {b['backend']} "
                     f"{r['score_b']:.4f}, delta {r['delta']:+.4f} [95% CI {r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
                     f": {r['verdict']}")
    for c in result["known_causes"]:
        lines.append(f"  {'DIFFERS' if c['differs'] else 'same   '} {c['cause']}: {c['a']} vs {c['b']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="qllm compare-backends",
                                description="the same checkpoint through two backends: per-item agreement, paired "
                                            "score delta, verdict (logged to run B)")
    p.add_argument("--run-ids", nargs=2, required=True, metavar=("A", "B"))
    p.add_argument("--tracking-uri", default=None, help="default: the local store (mlruns/ here)")
    p.add_argument("--experiment", default="qllm")
    p.add_argument("--no-log", action="store_true", help="print only; log nothing to MLflow")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = p.parse_args(argv)
    store = Store(args.tracking_uri or default_uri(), args.experiment)
    try:
        result = compare_runs(store, *args.run_ids)
        if not args.no_log and result["tasks"]:
            log(store.client, args.run_ids[1], result)
    finally:
        store.close()
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0 if result["verdict"] == "agree within stderr" else 1
