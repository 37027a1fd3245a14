"""The report (python -m qllm.report) over a fixture MLflow store written through MLflow's API with known values:
its numbers against hand-computed ones, and reports of a single run / missing baselines / failed cells rendering."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from qllm.report import build_report, stats
from qllm.report.__main__ import main as report_main

# Model toy-a, suite "mini": arc_x (0/1 acc_norm, 20 items, 2 difficulty buckets) + wiki (word perplexity).
# (score, stderr of acc_norm, perplexity, disk GB, items answered right)
TOY_A = {
    ("none", "none"): (60.0, 0.03, 20.0, 2.0, set(range(12))),
    ("rtn", "4"): (40.0, 0.04, 30.0, 0.6, set(range(6)) | {12, 13}),  # lost 6, gained 2
    ("rtn", "8"): (55.0, 0.04, 21.0, 1.1, set(range(10)) | {12}),  # lost 2, gained 1
    ("gptq", "4"): (50.0, 0.04, 24.0, 0.6, set(range(10))),  # lost 2, gained 0
    ("gptq", "8"): (65.0, 0.04, 20.5, 1.1, set(range(13))),  # lost 0, gained 1 (evaluated in sweep S0, reused in S1)
}
DIFFICULTY = {("none", "none"): (0.8, 0.4), ("rtn", "4"): (0.6, 0.2), ("gptq", "4"): (0.7, 0.3)}  # (easy, challenge)
COSTS = {("none", "none"): (30.0, 3.0), ("rtn", "4"): (35.0, 1.5), ("gptq", "4"): (33.0, 1.4)}  # tok/s, peak RSS GB


def _params(model, method, bits, tasks, params_b="1.0"):
    p = {"model": model, "model.params_b": params_b, "model.dtype": "bfloat16", "method": method, "bits": bits,
         "scheme": "none" if method == "none" else f"W{bits}A16", "group_size": "none" if method == "none" else "128",
         "task": "mini" if "wiki" in tasks else "arc_only", "tasks": ",".join(tasks),
         "eval.apply_chat_template": "False"}
    for t in tasks:
        arc = t == "arc_x"
        p.update({f"{t}.type": "commonsense" if arc else "perplexity", f"{t}.metric": "acc_norm" if arc else
                  "word_perplexity", f"{t}.num_fewshot": "0", f"{t}.limit": "20" if arc else "2"})
    return p


class Fixture:
    def __init__(self, root: Path):
        self.uri = f"sqlite:///{root}/mlruns/mlflow.db"
        (root / "mlruns").mkdir(parents=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.exp = self.client.create_experiment("qllm", artifact_location=(root / "mlruns" / "artifacts").as_uri())
        self.ids: dict = {}
        self.t = int(time.time() * 1000) - 3_600_000  # an hour ago

    def run(self, name, params, metrics, tags, status="FINISHED", parent=None, samples=None):
        self.t += 1000
        tags = {"qllm.kind": "cell", **tags, **({"mlflow.parentRunId": parent} if parent else {})}
        r = self.client.create_run(self.exp, run_name=name, tags=tags, start_time=self.t)
        from mlflow.entities import Metric, Param

        self.client.log_batch(r.info.run_id, metrics=[Metric(k, float(v), self.t, 0) for k, v in metrics.items()],
                              params=[Param(k, str(v)) for k, v in params.items()])
        for task, lines in (samples or {}).items():
            self.client.log_text(r.info.run_id, "\n".join(json.dumps(x) for x in lines) + "\n",
                                 f"eval/per_sample_{task}.jsonl")
        self.client.set_terminated(r.info.run_id, status, end_time=self.t + 500)
        return r.info.run_id

    def sweep(self, sweep_id, running=False):
        self.t += 1000
        r = self.client.create_run(self.exp, run_name=f"sweep {sweep_id}", start_time=self.t,
                                   tags={"qllm.kind": "sweep", "qllm.sweep_id": sweep_id})
        if not running:
            self.client.set_terminated(r.info.run_id, "FINISHED", end_time=self.t + 60_000)
        return r.info.run_id


def toy_metrics(key):
    score, se, ppl, disk, _ = TOY_A[key]
    m = {"arc_x/acc_norm": score / 100, "arc_x/acc_norm_stderr": se, "arc_x/score": score, "arc_x/n_samples": 20,
         "wiki/word_perplexity": ppl, "wiki/n_samples": 2, "suite/score_macro": score, "size/disk_gb": disk}
    if key in DIFFICULTY:
        e, c = DIFFICULTY[key]
        m.update({"arc_x/difficulty/easy/acc_norm": e, "arc_x/difficulty/easy/n": 10,
                  "arc_x/difficulty/challenge/acc_norm": c, "arc_x/difficulty/challenge/n": 10})
    if key in COSTS:
        m.update({"speed/bs1/decode_tok_s": COSTS[key][0], "mem/evaluate/peak_rss_gb": COSTS[key][1]})
    return m


def toy_samples(key):
    right = TOY_A[key][4]
    arc = [{"task": "arc_x", "doc_id": i, "filter": "none", "acc": float(i in right), "acc_norm": float(i in right),
            "difficulty": "easy" if i < 10 else "challenge"} for i in range(20)]
    return {"arc_x": arc, "wiki": [{"task": "wiki", "doc_id": i, "filter": "none"} for i in range(2)]}


def name(model, method, bits, suite="mini"):
    return f"{model} · {method} · {'w' + bits if bits != 'none' else 'bfloat16'} · {suite}"


def build_store(root: Path) -> Fixture:
    """Sweep S0: gptq w8 of toy-a finished. Sweep S1: toy-a baseline, rtn/gptq × 4/8 (gptq w8 reused from S0), a
    failed awq w4, an invalid fp8 w4 (skipped), and toy-b gptq w4 with no baseline anywhere."""
    f = Fixture(root)
    tasks = ["arc_x", "wiki"]
    p0 = f.sweep("S0")
    f.ids["S0_parent"] = p0
    f.ids[("gptq", "8", "S0")] = f.run(name("toy-a", "gptq", "8"), _params("toy-a", "gptq", "8", tasks),
                                       toy_metrics(("gptq", "8")), {"qllm.status": "finished", "qllm.sweep_id": "S0",
                                                                    "qllm.cell_key": "k-gptq8"}, parent=p0,
                                       samples=toy_samples(("gptq", "8")))
    p1 = f.sweep("S1")
    f.ids["S1_parent"] = p1
    for key in [("none", "none"), ("rtn", "4"), ("rtn", "8"), ("gptq", "4")]:
        f.ids[key] = f.run(name("toy-a", *key), _params("toy-a", *key, tasks), toy_metrics(key),
                           {"qllm.status": "finished", "qllm.sweep_id": "S1", "qllm.cell_key": f"k-{key[0]}{key[1]}"},
                           parent=p1, samples=toy_samples(key))
    f.ids[("gptq", "8")] = f.run(name("toy-a", "gptq", "8"), _params("toy-a", "gptq", "8", tasks),
                                 toy_metrics(("gptq", "8")),
                                 {"qllm.status": "reused", "qllm.sweep_id": "S1", "qllm.cell_key": "k-gptq8",
                                  "qllm.reused_run_id": f.ids[("gptq", "8", "S0")],
                                  "qllm.skip_reason": "already evaluated"}, parent=p1)
    f.ids[("awq", "4")] = f.run(name("toy-a", "awq", "4"), _params("toy-a", "awq", "4", tasks), {},
                                {"qllm.status": "failed", "qllm.sweep_id": "S1", "qllm.cell_key": "k-awq4",
                                 "qllm.error": "CUDA out of memory while quantizing"}, status="FAILED", parent=p1)
    f.ids[("fp8", "4")] = f.run(name("toy-a", "fp8", "4"), {"model": "toy-a", "method": "fp8", "bits": "4",
                                                            "task": "mini"},
                                {}, {"qllm.status": "skipped", "qllm.sweep_id": "S1",
                                     "qllm.skip_reason": "method 'fp8' does not support bits=4"}, parent=p1)
    f.ids["b"] = f.run(name("toy-b", "gptq", "4", "arc_only"), _params("toy-b", "gptq", "4", ["arc_x"], "3.0"),
                       {"arc_x/acc_norm": 0.7, "arc_x/acc_norm_stderr": 0.04, "arc_x/score": 70.0,
                        "suite/score_macro": 70.0}, {"qllm.status": "finished", "qllm.sweep_id": "S1",
                                                     "qllm.cell_key": "k-b-gptq4"}, parent=p1)
    return f


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Fixture:
    return build_store(tmp_path_factory.mktemp("report-store"))


@pytest.fixture(scope="module")
def sweep_report(store, tmp_path_factory):
    return build_report(tracking_uri=store.uri, sweep_ids=["S1"], out=tmp_path_factory.mktemp("rep") / "s1",
                        n_boot=500)


def _row(rep, key, task="arc_x", model="toy-a"):
    t = rep.analysis.tasks
    return t[(t["model"] == model) & (t["method"] == key[0]) & (t["bits"] == key[1]) & (t["task"] == task)].iloc[0]


def test_recovery_and_delta_against_hand_computed(sweep_report):
    for key, (score, se, ppl, *_ ) in TOY_A.items():
        r = _row(sweep_report, key)
        assert r["value"] == pytest.approx(score) and r["baseline"] == pytest.approx(60.0)
        assert r["recovery_pct"] == pytest.approx(100 * score / 60.0)
        p = _row(sweep_report, key, "wiki")
        assert p["value"] == pytest.approx(ppl) and p["recovery_pct"] == pytest.approx(100 * 20.0 / ppl)
        if key[0] != "none":
            assert r["delta"] == pytest.approx(score - 60.0) and p["delta"] == pytest.approx(ppl - 20.0)
    assert _row(sweep_report, ("rtn", "4"))["recovery_pct"] == pytest.approx(66.6667, abs=1e-3)
    assert _row(sweep_report, ("gptq", "8"), "wiki")["recovery_pct"] == pytest.approx(97.561, abs=1e-3)


def test_confidence_intervals_and_significance(sweep_report):
    # delta se = sqrt(3² + 4²) = 5 points, CI = delta ± 1.96 × 5
    half = 1.959964 * 5.0
    expect = {("rtn", "4"): True, ("gptq", "4"): True, ("rtn", "8"): False, ("gptq", "8"): False}
    for key, sig in expect.items():
        r = _row(sweep_report, key)
        d = TOY_A[key][0] - 60.0
        assert r["delta_lo"] == pytest.approx(d - half, abs=1e-4) and r["delta_hi"] == pytest.approx(d + half, abs=1e-4)
        assert bool(r["significant"]) is sig, key
        assert r["ci_lo"] == pytest.approx(TOY_A[key][0] - 1.959964 * 4.0, abs=1e-4)
    assert pd.isna(_row(sweep_report, ("rtn", "4"), "wiki")["significant"])  # no perplexity stderr: n/a
    summary = sweep_report.analysis.summary.set_index(["model", "method", "bits"])
    assert summary.loc[("toy-a", "rtn", "4"), "n_significantly_worse"] == 1
    assert summary.loc[("toy-a", "gptq", "8"), "n_significantly_worse"] == 0


def test_flips_and_mcnemar(sweep_report):
    # (lost, gained) vs the baseline's 12 right answers of 20; gptq w8 is a reused cell: samples of its S0 run
    expect = {("rtn", "4"): (6, 2, 74 / 256), ("rtn", "8"): (2, 1, 1.0), ("gptq", "4"): (2, 0, 0.5),
              ("gptq", "8"): (0, 1, 1.0)}
    for key, (lost, gained, p) in expect.items():
        r = _row(sweep_report, key)
        assert (r["lost"], r["gained"], r["n_pairs"]) == (lost, gained, 20), key
        assert r["lost_pct"] == pytest.approx(100 * lost / 20) and r["gained_pct"] == pytest.approx(100 * gained / 20)
        assert r["flips_pct"] == pytest.approx(100 * (lost + gained) / 20)
        assert r["mcnemar_p"] == pytest.approx(p)
        assert r["paired_delta"] == pytest.approx(100 * (gained - lost) / 20)
        assert r["paired_lo"] <= r["paired_delta"] <= r["paired_hi"]


def test_mcnemar_exact_on_hand_built_tables():
    assert stats.mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert stats.mcnemar_exact(6, 2) == pytest.approx(2 * (1 + 8 + 28) / 256)
    assert stats.mcnemar_exact(0, 0) == 1.0 and stats.mcnemar_exact(3, 3) == 1.0
    from scipy.stats import binomtest

    for b, c in [(7, 19), (30, 12), (1, 9)]:
        assert stats.mcnemar_exact(b, c) == pytest.approx(binomtest(min(b, c), b + c, 0.5).pvalue)


def test_spearman_ppl_vs_accuracy(sweep_report):
    cor = sweep_report.analysis.correlations.set_index("kind")
    # ppl ranks (base, gptq8, rtn8, gptq4, rtn4) = 1..5, accuracy ranks 4, 5, 3, 2, 1: Σd² = 38, ρ = 1 − 6·38/120
    assert cor.loc["values", "n"] == 5 and cor.loc["values", "spearman_rho"] == pytest.approx(-0.9)
    # recoveries of the quantized cells: ppl (66.7, 95.2, 83.3, 97.6) vs acc (66.7, 91.7, 83.3, 108.3): same order
    assert cor.loc["recovery", "n"] == 4 and cor.loc["recovery", "spearman_rho"] == pytest.approx(1.0)
    assert stats.spearman([1, 2, 2, 3], [1, 3, 2, 4])[0] == pytest.approx(0.9486833, abs=1e-6)  # ties: mean ranks


def test_pareto_front_and_sizes(sweep_report):
    t = sweep_report.analysis.summary.set_index(["model", "method", "bits"])
    assert t.loc[("toy-b", "gptq", "4"), "size_gb"] == pytest.approx(1.5)  # estimated: 3.0 B params × 4 / 8
    assert t.loc[("toy-a", "none", "none"), "size_gb"] == pytest.approx(2.0)
    sizes, scores = [2.0, 0.6, 1.1, 0.6, 1.1, 1.5], [60, 40, 55, 50, 65, 70]
    assert stats.pareto_front(sizes, scores) == [3, 4, 5]  # gptq4, gptq8, the larger model's w4 beats the base
    assert stats.pareto_front([1, 2, 3], [10.0, 5.0, 20.0], higher_is_better=False) == [0, 1]


def test_difficulty_costs(sweep_report):
    d = sweep_report.analysis.difficulty.set_index(["method", "bits", "bucket"])
    assert d.loc[("rtn", "4", "easy"), "cost_points"] == pytest.approx(20.0)
    assert d.loc[("gptq", "4", "challenge"), "cost_points"] == pytest.approx(10.0)
    assert d.loc[("rtn", "4", "easy"), "n"] == 10


def test_sweep_report_renders_and_says_what_is_missing(sweep_report, store):
    out = sweep_report.out
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, html):
        assert "no baseline (method=none) for model toy-b" in text
        assert "failed cell" in text and "CUDA out of memory" in text
        assert "skipped cell" in text and "does not support bits=4" in text
        assert "recovery %" in text
    assert html.count("data:image/png;base64,") >= 5 and "<img" in html
    for png in ("accuracy_vs_bits.png", "iso_memory.png", "ppl_vs_accuracy.png", "difficulty_toy-a.png", "flips.png",
                "cost.png"):
        assert (out / "plots" / png).stat().st_size > 5000, png
        assert f"plots/{png}" in md
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 8 and set(cells["status"]) == {"finished", "reused", "failed", "skipped"}
    assert (out / "tasks.csv").exists() and (out / "summary.csv").exists()
    # the report run: kind report, nested under the sweep's parent, linking the runs it covers
    run = store.client.get_run(sweep_report.run_id)
    assert run.data.tags["qllm.kind"] == "report" and run.data.tags["mlflow.parentRunId"] == store.ids["S1_parent"]
    assert set(run.data.tags["qllm.report_runs"].split(",")) == set(sweep_report.covered)
    assert store.ids[("gptq", "8")] in sweep_report.covered
    arts = {a.path for a in store.client.list_artifacts(sweep_report.run_id)}
    assert {"report.md", "report.html", "cells.csv", "covered_runs.json", "plots"} <= arts


def test_dedupe_prefers_finished_and_baseline_from_outside_the_selection(store, tmp_path):
    rep = build_report(tracking_uri=store.uri, methods=["gptq"], out=tmp_path / "gptq", log=False, n_boot=200)
    an = rep.analysis
    gptq8 = [c for c in an.evaluated if c.model == "toy-a" and c.bits == "8"]
    assert len(gptq8) == 1 and gptq8[0].status == "finished" and gptq8[0].duplicates == [store.ids[("gptq", "8")]]
    r = _row(rep, ("gptq", "4"))
    assert r["baseline_from"] == "experiment" and r["baseline_run_id"] == store.ids[("none", "none")]
    assert r["recovery_pct"] == pytest.approx(100 * 50 / 60) and r["lost"] == 2
    assert rep.run_id is None


def test_single_run_report_renders(store, tmp_path, capsys):
    out = tmp_path / "single"
    assert report_main(["--tracking-uri", store.uri, "--run-ids", store.ids[("none", "none")], "--out", str(out),
                        "--bootstrap", "100"]) == 0
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "a single evaluated cell: nothing to compare it with" in md and "nothing to compare" in html
    assert "accuracy vs bits: no quantized cell" in md  # skipped plots say why
    assert "MLflow run" in capsys.readouterr().out


def test_only_failed_cells_render(store, tmp_path):
    rep = build_report(tracking_uri=store.uri, sweep_ids=["S1"], methods=["awq", "fp8"], out=tmp_path / "failed",
                       log=False)
    md = (rep.out / "report.md").read_text()
    assert "no evaluated cell" in md and "CUDA out of memory" in md and (rep.out / "report.html").exists()
    assert math.isnan(float("nan"))


def test_report_of_a_running_sweep_is_not_nested_under_it(store, tmp_path):
    """The sweep's end counts every child run without a qllm.status as a lost cell: no report run under it yet."""
    parent = store.sweep("S2", running=True)
    store.run(name("toy-a", "rtn", "4"), _params("toy-a", "rtn", "4", ["arc_x", "wiki"]), toy_metrics(("rtn", "4")),
              {"qllm.status": "finished", "qllm.sweep_id": "S2", "qllm.cell_key": "k-rtn4-s2"}, parent=parent)
    rep = build_report(tracking_uri=store.uri, sweep_ids=["S2"], out=tmp_path / "s2", n_boot=100)
    tags = store.client.get_run(rep.run_id).data.tags
    assert tags["qllm.sweep_id"] == "S2" and "mlflow.parentRunId" not in tags
    assert _row(rep, ("rtn", "4"))["baseline_from"] == "experiment"  # S1's baseline, same task settings
