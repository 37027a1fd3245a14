"""The real default model (SmolLM2-135M-Instruct, Q4_1-derived weights) on real WikiText-2 text.

Perplexity must behave as quantization theory says: 8-bit RTN is nearly free, 2-bit RTN breaks the model, GPTQ beats
RTN at the same bits. And the evaluated model must be the quantized one.
"""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from conftest import mlflow_runs, run_qllm

pytestmark = pytest.mark.slow
# The first 6 WikiText-2 articles, 512 tokens each. GPTQ is compared with RTN at 3 bits, calibrated on 16 x 512 tokens
# from the last 22 articles: there the difference is large (measured on 10 articles: word perplexity 198.5 vs 387.5,
# base 32.0) and the GPTQ cell takes ~110 s on 2 cores. At 4 bits the two are within about 1% even with 64 x 512
# calibration tokens (10 articles: 46.48 vs 46.94, a GPTQ cell of ~300 s): too close to make a robust test.
PPL = ["model=smollm2-135m-instruct", "task=wikitext_offline", "task.tasks.wikitext_offline.limit=6",
       "task.tasks.wikitext_offline.max_doc_tokens=512", "calibration=wikitext2", "calibration.num_samples=16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir, data_dir):
    work = tmp_path_factory.mktemp("smollm2")
    for args in (["method=none"], ["-m", "method=rtn", "bits=2,3,8"], ["method=gptq", "bits=3"]):
        proc = run_qllm([*args, *PPL], work, cache_dir, data_dir, timeout=1200)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    df = mlflow_runs(work)
    df = df[df["tags.qllm.status"] == "finished"]
    return {(r["params.method"], r["params.bits"]): r for _, r in df.iterrows()}


def ppl(runs, method, bits):
    return runs[(method, bits)]["metrics.wikitext_offline/word_perplexity"]


def test_rtn8_is_within_3_percent_of_baseline(runs):
    base = ppl(runs, "none", "none")
    assert 10 < base < 200, base  # a working language model on WikiText (word perplexity)
    assert abs(ppl(runs, "rtn", "8") / base - 1) < 0.03


def test_rtn2_at_least_doubles_perplexity(runs):
    assert ppl(runs, "rtn", "2") >= 2 * ppl(runs, "none", "none")


def test_gptq3_clearly_beats_rtn3(runs):
    assert ppl(runs, "gptq", "3") <= 0.75 * ppl(runs, "rtn", "3")
    assert ppl(runs, "gptq", "3") > ppl(runs, "none", "none")  # 3-bit costs something, even with GPTQ


def test_token_perplexity_orders_like_word_perplexity(runs):
    tok = {k: r["metrics.wikitext_offline/token_perplexity"] for k, r in runs.items()}
    assert tok[("rtn", "8")] < tok[("rtn", "3")] < tok[("rtn", "2")]


def test_evaluated_checkpoint_is_the_quantized_one(runs):
    base = json.loads(runs[("none", "none")]["tags.qllm.evaluated_weights"])
    w2 = json.loads(runs[("rtn", "2")]["tags.qllm.evaluated_weights"])
    assert w2["group_size"] == 64 and w2["max_distinct_per_group"] <= 4  # the 2-bit grid, as lm-eval ran it
    assert base["max_distinct_per_group"] > 16  # Q4_1-derived, but not on a 64-wide 2-bit grid
    # and the checkpoint on disk is compressed-tensors, packed 2-bit with per-group scales
    ckpt = runs[("rtn", "2")]["tags.qllm.checkpoint_path"]
    with safe_open(f"{ckpt}/model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.down_proj.weight_packed" in keys and "model.layers.0.mlp.down_proj.weight_scale" in keys
    assert "model.layers.0.mlp.down_proj.weight" not in keys


def test_size_and_memory_of_the_real_model(runs):
    """Issue 5 on SmolLM2: fewer bits, fewer bytes on disk; the same parameters; a stage's peak RSS exceeds the
    weights it loaded (about 0.54 GB of fp32 weights as loaded)."""
    disk = {k: r["metrics.size/disk_gb"] for k, r in runs.items()}
    assert disk[("rtn", "2")] < disk[("rtn", "3")] < disk[("rtn", "8")] < disk[("none", "none")]
    assert len({r["metrics.size/params"] for r in runs.values()}) == 1
    assert runs[("none", "none")]["metrics.size/params"] > 1.3e8  # SmolLM2-135M
    for key, r in runs.items():
        loaded = r["metrics.size/weights_in_memory_gb"]
        assert 0.5 < loaded < 0.6, (key, loaded)  # dense fp32 after decompression, whatever the checkpoint
        assert r["metrics.mem/evaluate/load/peak_rss_gb"] > loaded, key
    for key in (("rtn", "3"), ("gptq", "3")):
        assert runs[key]["metrics.quantize/peak_rss_gb"] > runs[key]["metrics.size/weights_in_memory_gb"]


def test_kl_against_the_baseline_orders_like_the_damage(runs):
    """Issue 14 on SmolLM2: the quantized cells' KL from the baseline's stored reference grows as bits fall, top-1
    agreement falls, and GPTQ diverges less than RTN at 3 bits; the baseline logs no KL of its own."""
    kl = {k: r["metrics.kl/mean"] for k, r in runs.items() if k != ("none", "none")}
    top1 = {k: r["metrics.kl/top1_agreement"] for k, r in runs.items() if k != ("none", "none")}
    assert 0 < kl[("rtn", "8")] < kl[("rtn", "3")] < kl[("rtn", "2")], kl
    assert kl[("gptq", "3")] < kl[("rtn", "3")], kl
    assert top1[("rtn", "8")] > top1[("rtn", "3")] > top1[("rtn", "2")] and top1[("rtn", "8")] > 0.95, top1
    assert "metrics.kl/mean" not in runs[("none", "none")] or runs[("none", "none")]["metrics.kl/mean"] != \
        runs[("none", "none")]["metrics.kl/mean"]  # absent (NaN in the DataFrame)
