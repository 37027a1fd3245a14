"""The report's tables, as pandas DataFrames: cells, per task (vs the baseline), summary, difficulty, correlations
(perplexity as a proxy for accuracy) and proxies (KL and perplexity deltas as predictors of the tasks' deltas).

Every number on the task table is on the task's reported scale: the 0-100 score (`<task>/score`, 100 × the primary
metric) when the task has one, else the primary metric itself (perplexity, lower is better).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from . import stats
from .select import EVALUATED, CellRun, Store, TaskSpec
from ..names import KL_MEAN, KL_TOP1_AGREEMENT, Tag

SPEED_KEY = "speed/bs1/decode_tok_s"
RSS_KEY = "mem/evaluate/peak_rss_gb"
RATING = "rating (1-10)"  # the unit of a dialogue task's value (MT-Bench's judge)
TASK_COLUMNS = ["model", "cell", "method", "bits", "task", "type", "metric", "unit", "higher_is_better", "limit",
                "shots", "value", "value_se", "ci_lo", "ci_hi", "raw", "raw_stderr", "baseline", "baseline_se",
                "delta", "delta_se", "delta_lo", "delta_hi", "significant", "recovery_pct", "n_pairs", "lost",
                "gained", "lost_pct", "gained_pct", "flips_pct", "mcnemar_p", "paired_delta", "paired_lo",
                "paired_hi", "paired_significant", "run_id", "source_run_id", "baseline_run_id", "baseline_from"]


@dataclass
class Analysis:
    cells: pd.DataFrame
    tasks: pd.DataFrame
    summary: pd.DataFrame
    difficulty: pd.DataFrame
    correlations: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    evaluated: list[CellRun] = field(default_factory=list)
    not_evaluated: list[CellRun] = field(default_factory=list)
    proxies: pd.DataFrame = field(default_factory=pd.DataFrame)


def _num(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def task_value(cell: CellRun, spec: TaskSpec) -> tuple[Optional[float], Optional[float], Optional[float],
                                                       Optional[float], bool]:
    """(value, value_se, raw metric, raw stderr, scored): the 0-100 score and its stderr (× 100) when the task has
    a score, else the raw primary metric."""
    raw = _num(cell.metrics.get(f"{spec.key}/{spec.metric_key}"))
    raw_se = _num(cell.metrics.get(f"{spec.key}/{spec.metric_key}_stderr"))
    if spec.type == "dialogue":  # MT-Bench: `<task>/score` is the judge's 1-10 rating, its own scale
        return raw, raw_se, raw, raw_se, False
    score = _num(cell.metrics.get(f"{spec.key}/score"))
    if score is not None:
        return score, (100.0 * raw_se if raw_se is not None else None), raw, raw_se, True
    return raw, raw_se, raw, raw_se, False


def size_gb(cell: CellRun) -> tuple[Optional[float], str]:
    """The model's size: `size/disk_gb` when logged, else an estimate from `model.params_b` (dtype bytes per
    parameter for the baseline, bits / 8 for a quantized cell)."""
    disk = _num(cell.metrics.get("size/disk_gb"))
    if disk is not None:
        return disk, "size/disk_gb"
    try:
        params_b = float(cell.params.get("model.params_b", "nan"))
    except ValueError:
        return None, "unknown"
    if not math.isfinite(params_b):
        return None, "unknown"
    if cell.is_baseline or cell.bits_value is None:
        per = 4.0 if "32" in cell.params.get("model.dtype", "") else 2.0
        return params_b * per, f"estimate: params_b × {per:g} B"
    return params_b * cell.bits_value / 8.0, "estimate: params_b × bits / 8"


def pair_samples(base: list[dict], quant: list[dict], spec: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """The primary metric of the items both runs have, paired by (leaf task, doc id, filter)."""
    name, filt = spec.sample_field

    def index(records):
        return {(r.get("task"), r.get("doc_id"), r.get("filter", "none")): float(r[name]) for r in records
                if r.get("filter", "none") == filt and isinstance(r.get(name), (int, float))}

    b, q = index(base), index(quant)
    keys = sorted(set(b) & set(q), key=str)
    return np.array([b[k] for k in keys]), np.array([q[k] for k in keys])


class BaselineFinder:
    """The same model's baseline for a task, with the same task settings: from the selection first, else the latest
    finished one in the experiment."""

    def __init__(self, store: Optional[Store], selected: list[CellRun]):
        self.store, self.selected = store, [c for c in selected if c.is_baseline and c.status in EVALUATED]
        self._experiment: dict[str, list[CellRun]] = {}

    @staticmethod
    def _matches(b: CellRun, model: str, spec: TaskSpec) -> bool:
        other = b.tasks.get(spec.key)
        return (b.model == model and other is not None and other.settings == spec.settings
                and other.metric == spec.metric and f"{spec.key}/{spec.metric_key}" in b.metrics)

    def find(self, model: str, spec: TaskSpec) -> tuple[Optional[CellRun], str]:
        for b in sorted(self.selected, key=lambda c: (c.status != "finished", -c.start_time)):
            if self._matches(b, model, spec):
                return b, "selection"
        if self.store is not None:
            if model not in self._experiment:
                self._experiment[model] = self.store.baselines(model)
            for b in self._experiment[model]:
                if self._matches(b, model, spec):
                    return b, "experiment"
        return None, ""


def consistency_table(cells: list[CellRun]) -> pd.DataFrame:
    """The backend consistency checks the cells carry (qllm.report.consistency): one row per cell and task."""
    rows = []
    for c in cells:
        verdict = c.tags.get(Tag.CONSISTENCY)
        if not verdict:
            continue
        for key in c.tasks:
            pre = f"consistency/{key}/"
            if f"{pre}agreement" not in c.metrics:
                continue
            lo, hi = c.metrics.get(f"{pre}ci_low"), c.metrics.get(f"{pre}ci_high")
            rows.append({"model": c.model, "cell": c.label, "task": key, "n": int(c.metrics.get(f"{pre}n_items", 0)),
                         "agreement_pct": 100.0 * c.metrics[f"{pre}agreement"], "delta": c.metrics.get(f"{pre}delta"),
                         "ci_lo": lo, "ci_hi": hi,
                         "verdict": "agree within stderr" if lo is not None and lo <= 0 <= (hi or 0) else "disagree",
                         "versus": verdict.split(" vs ", 1)[-1], "run_id": c.run_id})
    return pd.DataFrame(rows)


def cells_table(cells: list[CellRun]) -> pd.DataFrame:
    rows = []
    for c in cells:
        size, src = size_gb(c)
        rows.append({"model": c.model, "cell": c.label, "method": c.method, "bits": c.bits, "suite": c.suite,
                     "status": c.status, "run_status": c.run_status, "note": c.note,
                     "suite_score": _num(c.metrics.get("suite/score_macro")), "size_gb": size, "size_source": src,
                     "decode_tok_s": _num(c.metrics.get(SPEED_KEY)), "peak_rss_gb": _num(c.metrics.get(RSS_KEY)),
                     "run_name": c.name, "run_id": c.run_id, "source_run_id": c.source_run_id,
                     "sweep_id": c.sweep_id, "cell_key": c.cell_key, "duplicates": ",".join(c.duplicates)})
    return pd.DataFrame(rows)


def analyze(cells: list[CellRun], store: Optional[Store] = None, keep_tasks: Optional[set] = None,
            n_boot: int = 2000, seed: int = 0) -> Analysis:
    evaluated = [c for c in cells if c.status in EVALUATED]
    not_evaluated = [c for c in cells if c.status not in EVALUATED]
    finder = BaselineFinder(store, cells)
    missing: list[str] = []
    rows, diff_rows = [], []
    no_baseline: dict[tuple, set] = {}
    no_samples: set = set()
    no_recovery: set = set()

    for c in evaluated:
        for key, spec in c.tasks.items():
            if keep_tasks is not None and key not in keep_tasks:
                continue
            value, value_se, raw, raw_se, scored = task_value(c, spec)
            lo, hi = stats.ci95(value, value_se)
            row = {"model": c.model, "cell": c.label, "method": c.method, "bits": c.bits, "task": key,
                   "type": spec.type, "metric": spec.metric, "unit": "score (0-100)" if scored else
                   RATING if spec.type == "dialogue" else spec.metric_key,
                   "higher_is_better": spec.higher_is_better, "limit": spec.settings[0], "shots": spec.settings[1],
                   "value": value, "value_se": value_se, "ci_lo": lo, "ci_hi": hi, "raw": raw, "raw_stderr": raw_se,
                   "run_id": c.run_id, "source_run_id": c.source_run_id}
            if value is None:
                missing.append(f"{c.full_label}: no metric `{key}/{spec.metric_key}` logged")
            base, where = (None, "") if c.is_baseline else finder.find(c.model, spec)
            if c.is_baseline:
                row.update(baseline=value, baseline_se=value_se,
                           recovery_pct=stats.recovery(value, value, spec.higher_is_better),
                           baseline_run_id=c.run_id, baseline_from="itself")
            elif base is None:
                no_baseline.setdefault((c.model, key, spec.settings[:2]), set()).add(c.label)
            else:
                bval, bse, *_ = task_value(base, base.tasks[key])
                row.update(baseline=bval, baseline_se=bse, baseline_run_id=base.run_id, baseline_from=where,
                           recovery_pct=stats.recovery(value, bval, spec.higher_is_better),
                           **stats.delta_ci(value, value_se, bval, bse))
                if row["recovery_pct"] is None and value is not None and bval is not None:
                    no_recovery.add((c.model, key, bval))
                row.update(_paired(store, c, base, spec, scored, n_boot, seed, no_samples))
                diff_rows.extend(_difficulty(c, base, spec))
            rows.append(row)

    for (model, key, (limit, shots)), labels in sorted(no_baseline.items()):
        missing.append(f"no baseline (method=none) for model {model} on {key} with limit={limit}, shots={shots}: "
                       f"no delta or recovery for {', '.join(sorted(labels))}")
    for model, key, bval in sorted(no_recovery):
        missing.append(f"{model} on {key}: the baseline's value is {bval:g}: recovery % undefined (deltas stand)")
    for label, key in sorted(no_samples):
        missing.append(f"{label} on {key}: no per-sample file (eval/per_sample_{key}.jsonl) on one side: "
                       "no paired test or flips")
    if len(evaluated) <= 1:
        missing.append("a single evaluated cell: nothing to compare it with" if evaluated else
                       "no evaluated cell" if cells else "no cell matches the selection")
    for c in not_evaluated:
        missing.append(f"{c.status} cell {c.name or c.full_label} ({c.run_id}){': ' + c.note if c.note else ''}")

    tasks = pd.DataFrame(rows, columns=TASK_COLUMNS)
    summary = summary_table(evaluated, tasks)
    return Analysis(cells=cells_table(cells), tasks=tasks, summary=summary, difficulty=pd.DataFrame(diff_rows),
                    correlations=correlations(tasks), missing=missing, evaluated=evaluated,
                    not_evaluated=not_evaluated, proxies=proxy_correlations(summary, tasks))


def _paired(store: Optional[Store], c: CellRun, base: CellRun, spec: TaskSpec, scored: bool, n_boot: int, seed: int,
            no_samples: set) -> dict:
    if store is None:
        return {}
    qs, bs = store.per_sample(c.source_run_id, spec.key), store.per_sample(base.source_run_id, spec.key)
    if not qs or not bs:
        if spec.higher_is_better:  # perplexity per-sample files carry no per-item value anyway
            no_samples.add((c.full_label, spec.key))
        return {}
    b, q = pair_samples(bs, qs, spec)
    if b.size == 0:
        return {}
    scale = 100.0 if scored else 1.0
    mean, lo, hi = stats.paired_bootstrap(b, q, n_boot=n_boot, seed=seed)
    out = {"n_pairs": int(b.size), "paired_delta": scale * mean, "paired_lo": scale * lo, "paired_hi": scale * hi}
    if stats.is_binary(b) and stats.is_binary(q):
        f = stats.flips(b, q)
        out.update({k: f[k] for k in ("lost", "gained", "lost_pct", "gained_pct", "flips_pct")})
        out["mcnemar_p"] = stats.mcnemar_exact(f["lost"], f["gained"])
        out["paired_significant"] = out["mcnemar_p"] < 0.05
    else:
        out["paired_significant"] = not (lo <= 0.0 <= hi)
    return out


def _difficulty(c: CellRun, base: CellRun, spec: TaskSpec) -> list[dict]:
    """Quantization cost per difficulty bucket: baseline − quantized on the primary metric, in points (× 100)."""
    prefix, suffix = f"{spec.key}/difficulty/", f"/{spec.metric_key}"
    rows = []
    for k, v in c.metrics.items():
        if not (k.startswith(prefix) and k.endswith(suffix)):
            continue
        label = k[len(prefix):-len(suffix)]
        b = base.metrics.get(k)
        if b is None:
            continue
        n = c.metrics.get(f"{prefix}{label}/n")
        rows.append({"model": c.model, "cell": c.label, "method": c.method, "bits": c.bits, "task": spec.key,
                     "type": spec.type, "bucket": label, "n": n, "baseline": 100.0 * b, "value": 100.0 * v,
                     "cost_points": 100.0 * (b - v), "run_id": c.run_id, "baseline_run_id": base.run_id})
    return rows


def summary_table(evaluated: list[CellRun], tasks: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluated cell: size, suite score, recovery over its scored tasks (mean and worst), perplexity
    recovery, how many tasks are significantly worse than the baseline, KL against the baseline (quantized cells on
    the hf backend), speed and memory when measured."""
    rows = []
    for c in evaluated:
        t = tasks[tasks["run_id"] == c.run_id] if len(tasks) else tasks
        scored = t[t["higher_is_better"].astype(bool)] if len(t) else t  # 0-100 scores and MT-Bench's rating
        ppl = t[~t["higher_is_better"].astype(bool)] if len(t) else t
        rec = scored["recovery_pct"].dropna() if len(scored) else pd.Series(dtype=float)
        prec = ppl["recovery_pct"].dropna() if len(ppl) else pd.Series(dtype=float)
        worse = 0
        if len(t) and not c.is_baseline:
            sig = t["significant"].astype("boolean").fillna(False).astype(bool)
            worse = int(((t["delta"].astype(float) * np.where(t["higher_is_better"].astype(bool), 1, -1) < 0)
                         & sig).sum())
        size, src = size_gb(c)
        rows.append({"model": c.model, "cell": c.label, "method": c.method, "bits": c.bits, "suite": c.suite,
                     "size_gb": size, "size_source": src, "suite_score": _num(c.metrics.get("suite/score_macro")),
                     "mean_recovery_pct": float(rec.mean()) if len(rec) else None,
                     "worst_recovery_pct": float(rec.min()) if len(rec) else None,
                     "ppl_recovery_pct": float(prec.mean()) if len(prec) else None,
                     "n_tasks": int(len(t)), "n_significantly_worse": worse,
                     "kl_mean": _num(c.metrics.get(KL_MEAN)),
                     "kl_top1_agreement": _num(c.metrics.get(KL_TOP1_AGREEMENT)),
                     "decode_tok_s": _num(c.metrics.get(SPEED_KEY)), "peak_rss_gb": _num(c.metrics.get(RSS_KEY)),
                     "status": c.status, "run_id": c.run_id})
    return pd.DataFrame(rows)


def correlations(tasks: pd.DataFrame) -> pd.DataFrame:
    """Spearman ρ between each perplexity task and each scored task across the evaluated cells (`values`), and
    between their recoveries across the quantized cells (`recovery`): is perplexity a proxy for accuracy?"""
    if not len(tasks):
        return pd.DataFrame()
    rows = []
    ppl_tasks = sorted(tasks.loc[~tasks["higher_is_better"].astype(bool), "task"].unique())
    acc_tasks = sorted(tasks.loc[tasks["unit"] == "score (0-100)", "task"].unique())
    for p in ppl_tasks:
        pv = tasks[tasks["task"] == p].set_index("run_id")
        for a in acc_tasks:
            av = tasks[tasks["task"] == a].set_index("run_id")
            common = pv.index.intersection(av.index)
            for kind, col, sub in (("values", "value", common),
                                   ("recovery", "recovery_pct",
                                    [r for r in common if pv.loc[r, "method"] != "none"])):
                x, y = pv.loc[list(sub), col].astype(float), av.loc[list(sub), col].astype(float)
                ok = x.notna() & y.notna()
                rho, pval = stats.spearman(x[ok].values, y[ok].values)
                rows.append({"kind": kind, "perplexity_task": p, "task": a, "n": int(ok.sum()), "spearman_rho": rho,
                             "p_value": pval})
    return pd.DataFrame(rows)


MIN_CELLS = 3  # fewer quantized cells than this: no correlation is stated


def proxy_correlations(summary: pd.DataFrame, tasks: pd.DataFrame) -> pd.DataFrame:
    """Do cheap measures predict the accuracy lost? Spearman ρ across the quantized cells between each proxy and each
    scored task's delta (quantized − baseline): KL against the baseline (`kl/mean`), and each perplexity task's
    delta (the perplexity-as-proxy question of arXiv 2402.16775, extended to KL). Expected negative: more KL or more
    perplexity, lower score. With fewer than MIN_CELLS cells having both, ρ is not given and `note` says so."""
    if not len(tasks) or not len(summary):
        return pd.DataFrame()
    quant = tasks[(tasks["method"] != "none") & tasks["delta"].notna()]
    kl = summary.set_index("run_id")["kl_mean"].dropna()
    proxies = {KL_MEAN: kl} if len(kl) else {}  # runs from before KL was measured: no KL row at all
    for p in sorted(quant.loc[~quant["higher_is_better"].astype(bool), "task"].unique()):
        proxies[f"{p} Δ"] = quant[quant["task"] == p].set_index("run_id")["delta"].astype(float)
    rows = []
    for a in sorted(quant.loc[quant["unit"] == "score (0-100)", "task"].unique()):
        target = quant[quant["task"] == a].set_index("run_id")["delta"].astype(float)
        for name, proxy in proxies.items():
            common = proxy.index.intersection(target.index)
            rho, pval = stats.spearman(proxy[common].values, target[common].values) if len(common) >= MIN_CELLS \
                else (None, None)
            note = (f"too few cells ({len(common)} < {MIN_CELLS})" if len(common) < MIN_CELLS else
                    "constant values: ρ undefined" if rho is None else "")
            rows.append({"proxy": name, "task": a, "n": int(len(common)), "spearman_rho": rho, "p_value": pval,
                         "note": note})
    return pd.DataFrame(rows, columns=["proxy", "task", "n", "spearman_rho", "p_value", "note"])
