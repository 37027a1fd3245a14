"""KL in the report: the summary's kl_mean / kl_top1_agreement columns and the proxies table (Spearman ρ of KL and
of perplexity deltas with the tasks' deltas across quantized cells), from cells built in memory (no MLflow)."""

from __future__ import annotations

import pandas as pd
import pytest

from qllm.report.build import compose, summary_view
from qllm.report.select import CellRun, TaskSpec
from qllm.report.tables import analyze

TASKS = {"arc_x": TaskSpec("arc_x", "commonsense", "acc_norm", ("20", "0", "", "", "False", "hf")),
         "wiki": TaskSpec("wiki", "perplexity", "word_perplexity", ("2", "0", "", "", "False", "hf"))}
# (method, bits): (score, word perplexity, kl/mean, kl/top1_agreement)
CELLS = {("none", "none"): (60.0, 20.0, None, None), ("rtn", "8"): (58.0, 20.5, 0.01, 0.98),
         ("gptq", "4"): (52.0, 23.0, 0.08, 0.90), ("rtn", "4"): (40.0, 30.0, 0.30, 0.75),
         ("rtn", "3"): (30.0, 45.0, 0.90, 0.55)}


def _cell(method, bits, keep=CELLS):
    score, ppl, kl_mean, top1 = keep[(method, bits)]
    metrics = {"arc_x/acc_norm": score / 100, "arc_x/acc_norm_stderr": 0.03, "arc_x/score": score,
               "wiki/word_perplexity": ppl}
    if kl_mean is not None:
        metrics |= {"kl/mean": kl_mean, "kl/p99": 5 * kl_mean, "kl/top1_agreement": top1}
    return CellRun(run_id=f"{method}{bits}", name=f"toy · {method} · {bits}", status="finished", run_status="FINISHED",
                   model="toy", method=method, bits=bits, suite="mini", tasks=TASKS, metrics=metrics,
                   params={"model.dtype": "bfloat16"}, tags={}, start_time=0)


def test_summary_has_kl_beside_recovery():
    an = analyze([_cell(*k) for k in CELLS])
    s = an.summary.set_index("run_id")
    assert s.loc["rtn4", "kl_mean"] == 0.30 and s.loc["rtn4", "kl_top1_agreement"] == 0.75
    assert pd.isna(s.loc["nonenone", "kl_mean"])  # the baseline has none
    view = summary_view(an).set_index("cell")
    assert list(view.columns[-3:]) == ["sig. worse tasks", "KL (nats)", "top-1 agree"]
    assert view.loc["rtn · w4", "KL (nats)"] == "0.3000" and view.loc["rtn · w4", "top-1 agree"] == "75.0%"


def test_kl_and_perplexity_deltas_rank_the_accuracy_lost():
    px = analyze([_cell(*k) for k in CELLS]).proxies.set_index("proxy")
    # KL 0.01 < 0.08 < 0.30 < 0.90 while the arc_x delta falls -2 > -8 > -20 > -30: perfectly anti-ordered
    assert px.loc["kl/mean", "n"] == 4 and px.loc["kl/mean", "spearman_rho"] == pytest.approx(-1.0)
    assert px.loc["wiki Δ", "n"] == 4 and px.loc["wiki Δ", "spearman_rho"] == pytest.approx(-1.0)
    assert set(px["task"]) == {"arc_x"} and not px["note"].any()


def test_too_few_cells_are_said_and_no_kl_row_without_kl():
    two = analyze([_cell("none", "none"), _cell("rtn", "4"), _cell("rtn", "3")]).proxies.set_index("proxy")
    assert two.loc["kl/mean", "n"] == 2 and two.loc["kl/mean", "spearman_rho"] is None
    assert two.loc["kl/mean", "note"] == "too few cells (2 < 3)"
    no_kl = {k: (*v[:2], None, None) for k, v in CELLS.items()}  # runs from before KL was measured
    an = analyze([_cell(*k, keep=no_kl) for k in no_kl])
    assert list(an.proxies["proxy"]) == ["wiki Δ"] and "KL (nats)" not in summary_view(an).columns


def test_the_report_states_the_correlations(tmp_path):
    an = analyze([_cell(*k) for k in CELLS])
    md = compose(an, "t", [], [], tmp_path).markdown(tmp_path)
    assert "Do KL and perplexity predict the accuracy lost?" in md
    assert "| kl/mean | arc_x | 4 | -1.00 |" in md and "**KL** = mean over the tokens" in md
