"""KL against the baseline in the evaluate stage, in-process on the tiny random Llama (its tasks' results put in the
cache first, so that only the KL work is left): the reference is made once per model and reused, a quantized cell's
KL is cached by its key, a failing measurement never fails the cell. Each test has a cache of its own, with the
converted tiny model linked in from the session's cache (converting it takes ~20 s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qllm.measure import kl
from qllm.planning import compose_cell
from qllm.records import CachedEval, TaskResult
from qllm.stages import evaluate, kl_measure
from qllm.store import cache

KL = ["profile.kl_docs=2", "profile.kl_doc_tokens=48", "profile.kl_top_k=16"]


@pytest.fixture(scope="module")
def converted(cache_dir, data_dir):
    """(the session's cache, holding the converted tiny model, and the model's dir)."""
    from qllm.sources.models import prepare

    cell = compose_cell([f"data_dir={data_dir}", f"cache_dir={cache_dir}", "model=tiny-random-llama"])
    return cache_dir, prepare(cell.model, cell.data_dir, cell.cache_dir)


def _cell(data_dir, cache_dir, *overrides, converted):
    if not (cache_dir / "models").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / "models").symlink_to(converted[0] / "models")
    cell = compose_cell([f"data_dir={data_dir}", f"cache_dir={cache_dir}", "model=tiny-random-llama",
                         "task=arc_easy_offline", "task.limit=2", "eval.device=cpu", *KL, *overrides])
    summary = TaskResult(lm_eval_task="arc_easy_offline", metrics={"acc_norm,none": 0.5}, num_fewshot=0,
                         n_samples={"effective": 2, "original": 2}, primary={"metric": "acc_norm", "value": 0.5},
                         score=50.0)
    cache.save_eval(cache.eval_dir(cell, "arc_easy_offline"),  # the task is done: KL is all that is left
                    CachedEval(summary=summary, task="arc_easy_offline").to_dict(), {})
    return cell


@pytest.fixture(scope="module")
def noised(tmp_path_factory, converted):
    """A perturbed copy of the tiny model as a checkpoint dir: what a quantized cell evaluates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = converted[1]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * p.std() * torch.randn_like(p))
    out = tmp_path_factory.mktemp("noised")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return str(out)


@pytest.fixture
def counted(monkeypatch):
    """How many references were computed."""
    calls = []
    real = kl.reference
    monkeypatch.setattr(kl, "reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_baseline_stores_the_reference_once(tmp_path, data_dir, converted, counted):
    cell = _cell(data_dir, tmp_path / "cache", "method=none", converted=converted)
    first = evaluate.evaluate(cell, None, tmp_path / "out1")
    entry = cache.kl_reference_dir(cell)
    info = json.loads((entry / "reference.json").read_text())
    assert counted == [1] and first.kl is None  # a baseline logs nothing: its KL against itself is 0
    assert (info["n_docs"], info["n_tokens"], info["top_k"], info["model"]) == (2, 96, 16, cell.model["name"])
    mtime = (entry / cache.KL_REFERENCE).stat().st_mtime_ns
    again = evaluate.evaluate(cell, None, tmp_path / "out2")
    assert counted == [1] and again.device is None  # reused: nothing was loaded
    assert (entry / cache.KL_REFERENCE).stat().st_mtime_ns == mtime


def test_quantized_cell_reuses_the_reference_and_caches_its_kl(tmp_path, data_dir, converted, noised, counted,
                                                                 capsys):
    base = _cell(data_dir, tmp_path / "cache", "method=none", converted=converted)
    evaluate.evaluate(base, None, tmp_path / "base")
    q = _cell(data_dir, tmp_path / "cache", "method=rtn", "bits=4", converted=converted)
    assert q.kl_reference_key == base.kl_reference_key
    first = evaluate.evaluate(q, noised, tmp_path / "q1")
    assert counted == [1]  # the baseline's reference, not made again
    res = first.kl
    assert res and res["mean"] > 0 and res["p99"] >= res["mean"] and 0 < res["top1_agreement"] < 1
    assert res["n_tokens"] == 96 and res["key"] == q.kl_key and "log-sum inequality" in res["approximation"]
    assert not first.kl_reused and json.loads((cache.kl_dir(q) / "result.json").read_text())["kl"] == res
    again = evaluate.evaluate(q, noised, tmp_path / "q2")
    assert again.kl == res and again.kl_reused and again.device is None  # from the cache: nothing loaded
    assert "kl: reusing the measurement" in capsys.readouterr().out
    from qllm.cache import entries  # `qllm cache ls / gc` know both kinds (gc removes incomplete entries only)

    listed = {e.kind: e for e in entries(tmp_path / "cache", ("kl_reference", "kl"))}
    assert listed["kl_reference"].status == listed["kl"].status == "ok"
    assert listed["kl_reference"].label == "KL reference of tiny-random-llama (96 tokens)"
    assert listed["kl"].label == f"KL vs baseline of {q.name}"


def test_quantized_cell_makes_a_missing_reference_from_the_base_model(tmp_path, data_dir, converted, noised,
                                                                        counted):
    q = _cell(data_dir, tmp_path / "cache", "method=rtn", "bits=4", converted=converted)
    res = evaluate.evaluate(q, noised, tmp_path / "q").kl
    assert counted == [1] and kl_measure.has_reference(q) and res["mean"] > 0
    base = _cell(data_dir, tmp_path / "cache", "method=none", converted=converted)  # the baseline then finds it
    evaluate.evaluate(base, None, tmp_path / "base")
    assert counted == [1]


def test_a_failing_kl_does_not_fail_the_cell(tmp_path, data_dir, converted, noised, monkeypatch, capsys):
    q = _cell(data_dir, tmp_path / "cache", "method=rtn", "bits=4", converted=converted)

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(kl, "divergence", broken)
    result = evaluate.evaluate(q, noised, tmp_path / "q")
    assert result.kl is None and result.tasks["arc_easy_offline"].score == 50.0
    assert "kl: the measurement failed (RuntimeError: boom)" in capsys.readouterr().out
    assert not cache.kl_dir(q).exists()  # nothing cached: the next run measures again


def test_kl_is_measured_on_the_hf_backend_only(tmp_path, data_dir, capsys):
    cell = compose_cell([f"data_dir={data_dir}", f"cache_dir={tmp_path}", "model=tiny-random-llama"])
    assert kl_measure.wanted(cell, "hf") and not kl_measure.wanted(cell, "vllm")
    assert "kl: skipped (KL is measured on the HF backend only)" in capsys.readouterr().out
    off = compose_cell([f"data_dir={data_dir}", f"cache_dir={tmp_path}", "model=tiny-random-llama",
                        "profile.kl=false"])
    assert not kl_measure.wanted(off, "hf") and capsys.readouterr().out == ""


def test_the_run_logs_kl_metrics_and_kl_json(tmp_path):
    import mlflow

    from qllm.records import EvalResult
    from qllm.run import _log_kl

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        exp = mlflow.create_experiment("kl", artifact_location=(tmp_path / "artifacts").as_uri())
        kl_result = {"mean": 0.05, "p99": 0.4, "top1_agreement": 0.9, "n_tokens": 96, "approximation": kl.BOUND}
        with mlflow.start_run(experiment_id=exp) as run:
            assert _log_kl(EvalResult(kl=kl_result, kl_reused=True)) == {
                "kl/mean": 0.05, "kl/p99": 0.4, "kl/top1_agreement": 0.9}
            assert _log_kl(EvalResult()) == {} and _log_kl(EvalResult(kl={"mean": 1.0})) == {}  # malformed: nothing
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="kl.json",
                                                   dst_path=str(tmp_path / "downloaded"))
    finally:
        mlflow.set_tracking_uri(before)
    logged = json.loads(Path(path).read_text())
    assert logged["n_tokens"] == 96 and logged["reused"] is True and logged["approximation"] == kl.BOUND
