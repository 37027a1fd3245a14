"""The full method × bits sweep on the tiny random model, through the real CLI, landing in a real MLflow store."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from conftest import mlflow_runs, run_qllm

TINY = ["model=tiny-random-llama", "profile.kl=false", "calibration=wikitext2-small", "task.tasks.arc_easy_offline.limit=4",
        "task.tasks.wikitext_offline.limit=1", "task.tasks.wikitext_offline.max_doc_tokens=128", "eval.log_samples=true"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir, data_dir):
    work = tmp_path_factory.mktemp("sweep")
    proc = run_qllm(["-m", "method=none,rtn,gptq,awq,smoothquant,fp8", "bits=4,8", *TINY], work, cache_dir, data_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc, mlflow_runs(work)


def test_sweep_has_nine_cells_and_three_skips_under_one_parent(sweep):
    _, runs = sweep
    parents = runs[runs["tags.qllm.kind"] == "sweep"]
    cells = runs[runs["tags.qllm.kind"] == "cell"]
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
    assert len(cells) == 12 and set(cells["tags.mlflow.parentRunId"]) == {parents.iloc[0]["run_id"]}

    done = cells[cells["tags.qllm.status"] == "finished"]
    assert len(done) == 9 and done["tags.qllm.cell_key"].nunique() == 9
    assert sorted(zip(done["params.method"], done["params.bits"])) == sorted(
        [("none", "none"), ("rtn", "4"), ("rtn", "8"), ("gptq", "4"), ("gptq", "8"), ("awq", "4"), ("awq", "8"),
         ("smoothquant", "8"), ("fp8", "8")])

    skipped = cells[cells["tags.qllm.status"] == "skipped"]
    reasons = sorted(skipped["tags.qllm.skip_reason"])
    assert len(skipped) == 3
    assert sum("'fp8' does not support bits=4" in r for r in reasons) == 1
    assert sum("'smoothquant' does not support bits=4" in r for r in reasons) == 1
    assert sum("same cell as run" in r and "method=none ignores bits" in r for r in reasons) == 1
    assert parents.iloc[0]["metrics.cells_finished"] == 9 and parents.iloc[0]["metrics.cells_skipped"] == 3


def test_every_cell_logs_metrics_params_and_artifacts(sweep):
    _, runs = sweep
    done = runs[runs["tags.qllm.status"] == "finished"]
    for col in ("metrics.arc_easy_offline/acc", "metrics.arc_easy_offline/acc_stderr", "metrics.arc_easy_offline/acc_norm",
                "metrics.wikitext_offline/word_perplexity", "metrics.wikitext_offline/token_perplexity"):
        assert done[col].notna().all(), col
    assert (done["metrics.arc_easy_offline/n_samples"] == 4).all() and (done["metrics.wikitext_offline/n_samples"] == 1).all()
    assert (done["params.arc_easy_offline.limit"] == "4").all() and (done["params.arc_easy_offline.num_fewshot"] == "0").all()
    assert done["params.version.lm_eval"].notna().all() and done["params.version.transformers"].notna().all()
    assert done["params.git_commit"].notna().all()
    quantized = done[done["params.method"] != "none"]
    assert quantized["params.version.llmcompressor"].notna().all()
    assert (quantized["metrics.size/checkpoint_mb"] > 0).all()
    assert quantized["tags.qllm.checkpoint_sha256"].str.len().eq(64).all()

    client = MlflowClient()
    for run_id, method in zip(done["run_id"], done["params.method"]):
        names = {a.path for a in client.list_artifacts(run_id)}
        assert {"config.yaml", "cell.json", "logs", "eval"} <= names, names
        if method != "none":  # the tiny checkpoints are under tracking.log_checkpoint_max_mb: logged whole
            assert {"recipe.yaml", "manifest.json", "checkpoint"} <= names, names
        evals = {a.path for a in client.list_artifacts(run_id, "eval")}
        assert "eval/results.json" in evals, evals
        for key in ("arc_easy_offline", "wikitext_offline"):
            assert {f"eval/per_sample_{key}.jsonl", f"eval/samples_{key}.jsonl"} <= evals, evals


def test_evaluated_weights_are_the_quantized_ones(sweep):
    _, runs = sweep
    done = runs[runs["tags.qllm.status"] == "finished"].set_index(["params.method", "params.bits"])
    fp = {k: json.loads(v) for k, v in done["tags.qllm.evaluated_weights"].items()}
    # 4-bit group-wise: at most 16 levels per group of 32; the dense baseline has (almost) all values distinct
    for m in ("rtn", "gptq", "awq"):
        assert fp[(m, "4")]["max_distinct_per_group"] <= 16
    assert fp[("none", "none")]["max_distinct_per_group"] > 100
    # W8A8 schemes quantize activations on the fly; weight-only ones and the baseline do not
    for k in (("smoothquant", "8"), ("fp8", "8")):
        assert fp[k]["activation_quant_rel_error"] > 1e-3
    for k in (("none", "none"), ("rtn", "4"), ("gptq", "8")):
        assert fp[k]["activation_quant_rel_error"] < 1e-5


def test_sizes_order_by_bits(sweep):
    _, runs = sweep
    done = runs[runs["tags.qllm.status"] == "finished"].set_index(["params.method", "params.bits"])
    size = done["metrics.size/checkpoint_mb"]
    assert size[("rtn", "4")] < size[("rtn", "8")]


def test_every_cell_has_size_and_memory_figures(sweep):
    """Issue 5: size and per-stage memory for every cell, baseline included, with relations that must hold."""
    _, runs = sweep
    done = runs[runs["tags.qllm.status"] == "finished"].set_index(["params.method", "params.bits"])
    for col in ("size/params", "size/bits_per_weight", "size/disk_gb", "size/weights_in_memory_gb",
                "mem/evaluate/peak_rss_gb", "mem/evaluate/load/peak_rss_gb", "mem/evaluate/evaluate/peak_rss_gb"):
        assert done[f"metrics.{col}"].notna().all(), col
    assert done["metrics.size/params"].nunique() == 1  # one model: the quantized ones keep every parameter
    disk = done["metrics.size/disk_gb"]
    for m in ("rtn", "gptq", "awq"):
        assert disk[(m, "4")] < disk[(m, "8")] < disk[("none", "none")], m
    bits = done["metrics.size/bits_per_weight_quantized"]
    assert bits.loc[("none", "none")] != bits.loc[("none", "none")]  # NaN: the baseline has no quantized layer
    assert (done["metrics.size/bits_per_weight"][("none", "none")]) == 32  # fp32
    for m in ("rtn", "gptq"):  # 4 or 8 bits per weight + one fp32 scale per 32 weights (+ a tiny weight_shape)
        assert 5.0 <= bits[(m, "4")] < 5.05 and 9.0 <= bits[(m, "8")] < 9.05, (m, bits[(m, "4")], bits[(m, "8")])
    # a stage's peak RSS exceeds the weights it loaded (as loaded: dense fp32 on the hf backend)
    assert (done["metrics.mem/evaluate/load/peak_rss_gb"] > done["metrics.size/weights_in_memory_gb"]).all()
    quantized = done.drop(index=("none", "none"))
    assert quantized["metrics.quantize/peak_rss_gb"].notna().all()  # the cost of making it, from its manifest
    assert (quantized["metrics.quantize/calibration_samples"] > 0).sum() == 5  # gptq, awq ×2 bits, smoothquant
    made_here = quantized[quantized["tags.qllm.quantize_reused"] == "false"]
    assert len(made_here) and made_here["metrics.mem/quantize/quantize/peak_rss_gb"].notna().all()
    client = MlflowClient()
    for run_id in done["run_id"]:
        files = {a.path for a in client.list_artifacts(run_id, "profile")}
        assert {"profile/profile_evaluate.json", "profile/memory_evaluate.csv", "profile/memory_evaluate.png"} <= files
