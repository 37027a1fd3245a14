"""From a selection of runs to the report folder (report.md, report.html, CSVs, plots) and a report run in MLflow."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd

from ..names import Kind, Tag
from . import mt_bench, plots
from .render import Doc, fmt
from .select import Store, apply_filters, dedupe
from .tables import Analysis, analyze, consistency_table

FORMULAS = [
    "**score**: the task's 0-100 score (100 × its primary metric); tasks without one (perplexity) show the metric.",
    "**delta** = quantized − baseline, where the baseline is the same model with `method=none` and the same task "
    "settings (limit, shots, caps, chat template): from the selection, else the latest finished one in the experiment.",
    "**recovery %** = 100 × score / baseline score; for perplexity (lower is better) 100 × baseline ppl / ppl.",
    "**95% CI** = value ± 1.96 × stderr (lm-eval's stderr × 100 on the score scale); the delta's CI uses "
    "sqrt(se_q² + se_b²), as if the two were independent (conservative: both see the same items). "
    "**ns**: the delta's CI contains 0 (not significant).",
    "**paired**: items matched by (leaf task, doc id, filter) in `eval/per_sample_<task>.jsonl`; paired Δ = mean "
    "per-item difference with a 95% percentile bootstrap CI (items resampled); for 0/1 metrics the exact McNemar "
    "test: p = min(1, 2 · P(X ≤ min(lost, gained))), X ~ Binomial(lost + gained, ½).",
    "**flips**: lost = share of items right at baseline and wrong quantized, gained = the reverse; flips = lost + "
    "gained.",
    "**Spearman ρ**: rank correlation across cells (ties share their mean rank); p from the t approximation.",
    "**KL** = mean over the tokens of the first WikiText-2 test documents of KL(baseline || quantized) of the "
    "next-token distributions, in nats (`kl/mean`; hf backend only), from the baseline's top-k log-probabilities: "
    "a lower bound of the exact KL, low by the tail's own KL; **top-1** = share of tokens whose most likely next token "
    "is the baseline's (`kl/top1_agreement`).",
]


@dataclass
class Report:
    out: Path
    analysis: Analysis
    run_id: Optional[str]
    covered: list[str]


def _pct(v) -> str:
    return "" if v is None or pd.isna(v) else f"{v:.1f}%"


def _ci(lo, hi) -> str:
    return "" if lo is None or pd.isna(lo) else f"[{fmt(lo)}, {fmt(hi)}]"


def _sig(v) -> str:
    return "n/a" if v is None or pd.isna(v) else ("yes" if bool(v) else "ns")


def summary_view(an: Analysis) -> pd.DataFrame:
    """The summary as it reads: one row per cell, one column per task with value (recovery %, ns when the delta
    is not significant)."""
    t = an.tasks
    rows = []
    has_kl = len(an.summary) > 0 and an.summary["kl_mean"].notna().any()
    for _, s in an.summary.iterrows():
        row = {"model": s["model"], "cell": s["cell"], "size GB": fmt(s["size_gb"]) + (
            "*" if str(s["size_source"]).startswith("estimate") else "")}
        for _, r in t[t["run_id"] == s["run_id"]].iterrows():
            txt = fmt(r["value"])
            if r["method"] != "none" and not pd.isna(r.get("recovery_pct")):
                txt += f" ({_pct(r['recovery_pct'])}{', ns' if r.get('significant') is False else ''})"
            row[r["task"]] = txt
        row.update({"suite score": fmt(s["suite_score"]), "mean recovery": _pct(s["mean_recovery_pct"]),
                    "worst recovery": _pct(s["worst_recovery_pct"]), "sig. worse tasks": s["n_significantly_worse"]})
        if has_kl:  # beside recovery: what accuracy deltas can hide
            row.update({"KL (nats)": fmt(s["kl_mean"], 4),
                        "top-1 agree": "" if pd.isna(s["kl_top1_agreement"]) else _pct(100 * s["kl_top1_agreement"])})
        rows.append(row)
    return pd.DataFrame(rows)


def task_view(t: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "model": t["model"], "cell": t["cell"], "value": t["value"].map(fmt),
        "95% CI": [_ci(a, b) for a, b in zip(t["ci_lo"], t["ci_hi"])], "baseline": t["baseline"].map(fmt),
        "Δ": t["delta"].map(fmt), "Δ 95% CI": [_ci(a, b) for a, b in zip(t["delta_lo"], t["delta_hi"])],
        "sig.": [("" if m == "none" else _sig(s)) for m, s in zip(t["method"], t["significant"])],
        "recovery": t["recovery_pct"].map(_pct),
        "paired Δ [95% CI]": [("" if pd.isna(d) else f"{fmt(d)} {_ci(a, b)}")
                              for d, a, b in zip(t["paired_delta"], t["paired_lo"], t["paired_hi"])],
        "McNemar p": t["mcnemar_p"].map(lambda v: "" if pd.isna(v) else f"{v:.3g}"),
        "lost": t["lost_pct"].map(_pct), "gained": t["gained_pct"].map(_pct),
        "n pairs": t["n_pairs"].map(lambda v: "" if pd.isna(v) else str(int(v))),
    })


def compose(an: Analysis, title: str, intro: list[str], figures, out: Path, store: Optional[Store] = None) -> Doc:
    doc = Doc(title)
    for line in intro:
        doc.p(line, "note")
    doc.h("What is missing")
    if an.missing:
        doc.ul(an.missing, "missing")
    else:
        doc.p("Nothing: every selected cell was evaluated and has a baseline.")
    doc.h("Summary")
    doc.p("Each task: value (recovery % vs the same model's baseline; **ns**: the delta's 95% CI contains 0). "
          "Size: `size/disk_gb` (* estimated from the parameter count). KL: mean KL(baseline || quantized) per token "
          "on WikiText-2, top-1 agree: share of tokens with the baseline's most likely next token (where measured).")
    doc.table(summary_view(an))
    doc.h("Per task")
    for task, t in an.tasks.groupby("task", sort=False):
        r0 = t.iloc[0]
        unit = ("0-100 score" if r0["unit"].startswith("score") else "the judge's 1-10 rating"
                if r0["unit"].startswith("rating") else "lower is better")
        doc.h(f"{task} ({r0['type']}; primary metric {r0['metric']}, {unit}; limit {r0['limit']}, "
              f"{r0['shots']} shots)", 3)
        doc.table(task_view(t))
    doc.h("Plots")
    for section, files, notes in figures:
        doc.h(section, 3)
        for name, caption in files:
            doc.img(out / "plots" / name, caption)
        for n in notes:
            doc.p(f"Note: {n}", "note")
    if len(an.difficulty):
        doc.h("Difficulty buckets")
        d = an.difficulty
        doc.table(pd.DataFrame({"model": d["model"], "cell": d["cell"], "task": d["task"], "bucket": d["bucket"],
                                "n": d["n"].map(lambda v: "" if pd.isna(v) else str(int(v))),
                                "baseline": d["baseline"].map(fmt), "quantized": d["value"].map(fmt),
                                "cost (points)": d["cost_points"].map(fmt)}))
    if len(an.correlations):
        doc.h("Is perplexity a proxy? (Spearman rank correlation)")
        c = an.correlations
        doc.table(pd.DataFrame({"across": c["kind"].map({"values": "cells (ppl vs score)",
                                                         "recovery": "quantized cells (recoveries)"}),
                                "perplexity task": c["perplexity_task"], "task": c["task"], "n": c["n"],
                                "ρ": c["spearman_rho"].map(fmt),
                                "p": c["p_value"].map(lambda v: "" if v is None or pd.isna(v) else f"{v:.3g}")}))
    if len(an.proxies):
        doc.h("Do KL and perplexity predict the accuracy lost? (Spearman, across quantized cells)")
        doc.p("ρ between each proxy (`kl/mean`, or a perplexity task's delta vs the baseline) and each scored task's "
              "delta (quantized − baseline), over the quantized cells that have both; negative: the more divergence, "
              "the more accuracy lost. Perplexity as a proxy for accuracy after quantization: arXiv 2402.16775; KL: "
              "\"Accuracy is not all you need\" (NeurIPS 2024).")
        px = an.proxies
        doc.table(pd.DataFrame({"proxy": px["proxy"], "task Δ": px["task"], "n": px["n"],
                                "ρ": [r["note"] or fmt(r["spearman_rho"]) for _, r in px.iterrows()],
                                "p": px["p_value"].map(lambda v: "" if v is None or pd.isna(v) else f"{v:.3g}")}))
    _sensitivity(doc, store, an, out)
    for key, table, note, files in mt_bench.section(an, out / "plots"):
        doc.h(f"MT-Bench: {key} (single-answer rating and the pairwise verdict vs the baseline)")
        doc.p("Single: the judge rates each answer 1-10 (FastChat's single-v1 / single-math-v1 prompts, with GPT-4 "
              "reference answers for math, reasoning and coding); score = pooled mean of both turns' kept ratings, "
              "95% CI = ± 1.96 × bootstrap stderr (questions resampled); Δ = paired mean difference per (question, "
              "turn) vs the baseline's ratings by the same judge. Pairwise: each answer against the same model's "
              "method=none answer, judged in both orders; orders that disagree count as a tie; adjusted win rate = "
              "(win + tie/2) / matches, 0.5 = no difference; position bias = share of matches whose verdict flips "
              "with the order. Unparsed verdicts are counted, never scored.")
        doc.table(table)
        doc.p(note, "note")
        for name, caption in files:
            doc.img(out / "plots" / name, caption)
    checks = consistency_table(an.evaluated)
    if len(checks):
        doc.h("Backend consistency (the same checkpoint through two backends)")
        doc.p("Per item: the same option chosen (multiple choice) or the same extracted answer (generation); delta = "
              "this cell's score − the other backend's on the same items, with a paired 95% CI; known causes of "
              "gaps (dtype, BOS, chat template, max length, W4A8) are in each run's consistency.json.")
        doc.table(pd.DataFrame({"model": checks["model"], "cell": checks["cell"], "task": checks["task"],
                                "n": checks["n"].map(str), "agreement %": checks["agreement_pct"].map(fmt),
                                "delta": checks["delta"].map(lambda v: f"{v:+.4f}"),
                                "95% CI": [f"[{lo:+.4f}, {hi:+.4f}]" for lo, hi in zip(checks["ci_lo"],
                                                                                   checks["ci_hi"])],
                                "verdict": checks["verdict"], "versus": checks["versus"]}))
    doc.h("Cells")
    cells = an.cells
    doc.table(cells[["model", "cell", "suite", "status", "note", "run_name", "run_id"]] if len(cells) else cells)
    doc.h("How the numbers are computed")
    doc.ul(FORMULAS)
    return doc


def _sensitivity(doc: Doc, store: Optional[Store], an: Analysis, out: Path) -> None:
    """Where quantization hurts: each sensitivity table the cells logged (heatmap, summary), mixed allocations."""
    if store is None:
        return
    from . import sensitivity

    tables, allocations = sensitivity.section(an.evaluated, store, out / "plots")
    if not tables and not len(allocations):
        return
    doc.h("Where quantization hurts: per-layer sensitivity")
    doc.p("SQNR (dB) of each linear layer's output with only that layer quantized by a candidate, on the calibration "
          "activations (qllm.sensitivity): lower is more sensitive. End to end: perplexity with only one layer "
          "quantized, for the most and least sensitive layers.")
    for t in tables:
        doc.p(f"Table {t['key']} (cells: {', '.join(t['cells'])}):")
        doc.ul(t["summary"].splitlines())
        if t["heatmap"]:
            doc.img(out / "plots" / t["heatmap"], "per-layer SQNR: blocks down, projections across, one panel per "
                                                  "candidate (darker: more damage)")
    if len(allocations):
        doc.h("Mixed precision: the allocations", 3)
        doc.p("Each layer's candidate chosen greedily to minimise the summed noise-to-signal ratio under the budget "
              "of stored bits per quantized weight (scales and shape tensors counted, as size/bits_per_weight_"
              "quantized counts them).")
        doc.table(allocations.assign(avg_bits=allocations["avg_bits"].map(lambda v: f"{v:.3f}"),
                                     **{"summed NSR": allocations["summed NSR"].map(lambda v: f"{v:.4g}")}))


def build_report(tracking_uri: Optional[str] = None, experiment: str = "qllm", sweep_ids: Iterable[str] = (),
                 run_ids: Iterable[str] = (), models=None, methods=None, bits=None, tasks=None,
                 out: Optional[Path] = None, log: bool = True, n_boot: int = 2000, title: Optional[str] = None
                 ) -> Report:
    from .select import _as_list

    sweep_ids, run_ids = _as_list(sweep_ids), _as_list(run_ids)
    out = Path(out or Path("reports") / time.strftime("%Y%m%d-%H%M%S")).absolute()
    (out / "plots").mkdir(parents=True, exist_ok=True)
    store = Store(tracking_uri, experiment)
    try:
        selected = store.cells(sweep_ids, run_ids)
        cells, keep_tasks = apply_filters(selected, models, methods, bits, tasks)
        cells = dedupe(cells)
        an = analyze(cells, store, keep_tasks, n_boot=n_boot)
        sweeps = sorted({c.sweep_id for c in cells if c.sweep_id})
        scope = (f"sweep {sweeps[0]}" if len(sweeps) == 1 and not run_ids else
                 f"{len(run_ids)} run(s)" if run_ids else
                 ", ".join(f"sweep {s}" for s in sweep_ids) if sweep_ids else f"experiment {experiment}")
        filters = {k: _as_list(v) for k, v in (("model", models), ("method", methods), ("bits", bits),
                                                ("task", tasks)) if v}
        intro = [f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from `{store.display_uri}` (experiment "
                 f"`{experiment}`)"
                 + (f", filters {filters}" if filters else "") + ".",
                 f"{len(an.evaluated)} evaluated cell(s), {len(an.not_evaluated)} not evaluated; "
                 f"{sum(len(c.duplicates) for c in cells)} duplicate run(s) of the same cells left out."]
        figures = plots.make_all(an, out / "plots")
        doc = compose(an, title or f"qllm report: {scope}", intro, figures, out, store)
        (out / "report.md").write_text(doc.markdown(out))
        (out / "report.html").write_text(doc.html())
        for name in ("cells", "tasks", "summary", "difficulty", "correlations", "proxies"):
            getattr(an, name).to_csv(out / f"{name}.csv", index=False)
        covered = [c.run_id for c in cells]
        (out / "covered_runs.json").write_text(json.dumps(
            [{"run_id": c.run_id, "run_name": c.name, "status": c.status, "source_run_id": c.source_run_id,
              "duplicates": c.duplicates, "sweep_id": c.sweep_id} for c in cells], indent=2))
        run_id = _log(store, an, out, scope, sweeps, sweep_ids, run_ids, filters, covered) if log else None
    finally:
        store.close()
    return Report(out=out, analysis=an, run_id=run_id, covered=covered)


def _log(store: Store, an: Analysis, out: Path, scope: str, sweeps: list[str], sweep_ids, run_ids, filters,
         covered: list[str]) -> str:
    """The report as an MLflow run (`qllm.kind=report`): nested under the sweep's parent run when it covers one
    sweep, tagged with the runs it covers (`qllm.report_runs`, truncated; all of them in covered_runs.json)."""
    client = store.client
    tags = {Tag.KIND: Kind.REPORT.value, Tag.REPORT_RUNS: ",".join(covered)[:5000],
            Tag.REPORT_N_RUNS: str(len(covered)), Tag.REPORT_DIR: str(out),
            Tag.NOTE: f"qllm report over {scope}: {len(an.evaluated)} evaluated cell(s). Open the "
                                   "artifact `report.html` (self-contained) or `report.md`; the covered runs are in "
                                   "`covered_runs.json`.\n\nMissing:\n" + "\n".join(f"- {m}" for m in an.missing)}
    if len(sweeps) == 1:
        tags[Tag.SWEEP_ID] = sweeps[0]
        parent = store.sweep_parent(sweeps[0])
        # not under a sweep still running: its end counts every child without a qllm.status as a lost cell
        if parent is not None and parent.info.status != "RUNNING":
            tags[Tag.PARENT_RUN_ID] = parent.info.run_id
    run = client.create_run(store.experiment_id, run_name=f"report · {scope}", tags=tags)
    rid = run.info.run_id
    params = {"sweep_ids": ",".join(sweep_ids) or "-", "run_ids": ",".join(run_ids)[:500] or "-",
              **{f"filter.{k}": ",".join(v) for k, v in filters.items()}}
    for k, v in params.items():
        client.log_param(rid, k, v)
    s = an.summary
    metrics = {"report/n_cells_evaluated": len(an.evaluated), "report/n_cells_not_evaluated": len(an.not_evaluated),
               "report/n_missing": len(an.missing)}
    if len(s) and s["mean_recovery_pct"].notna().any():
        q = s[s["method"] != "none"]
        if q["mean_recovery_pct"].notna().any():
            metrics["report/mean_recovery_pct"] = float(q["mean_recovery_pct"].mean())
    for k, v in metrics.items():
        client.log_metric(rid, k, v)
    client.log_artifacts(rid, str(out))
    client.set_terminated(rid, "FINISHED")
    return rid
