"""eval=vllm end to end on the real default model (SmolLM2-135M-Instruct, Q4_1-derived weights) and real ARC-Easy /
GSM8K items: the same RTN W4A16 checkpoint through hf and vllm (`-m eval=hf,vllm`) in the vLLM environment built by
`make setup`. vLLM must run the checkpoint on its int4 kernel (not dequantized), agree with HF item by item, and time
it on those kernels."""

from __future__ import annotations

import json

import pytest

from conftest import mlflow_runs, run_qllm
from qllm.errors import QllmConfigError
from qllm.stages.backends import vllm

pytestmark = pytest.mark.slow

try:
    vllm.environment({"python": None})
    NO_ENV = ""
except QllmConfigError as e:
    NO_ENV = str(e)
HAS_AMX = "amx_tile" in vllm._cpu_flags()
ARGS = ["model=smollm2-135m-instruct", "task=backend_check", "task.tasks.arc_easy_offline.limit=30",
        "task.tasks.gsm8k_offline.limit=2", "task.tasks.gsm8k_offline.max_gen_toks=64", "profile.speed=true",
        "profile.speed_batch_sizes=[1,4]", "profile.speed_prompt_len=32", "profile.speed_output_len=8",
        "profile.speed_repeats=2", "eval.max_length=2048"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir, data_dir):
    if NO_ENV:
        pytest.skip(NO_ENV)
    work = tmp_path_factory.mktemp("vllm")
    proc = run_qllm(["-m", "method=rtn", "bits=4", "eval=hf,vllm", *ARGS], work, cache_dir, data_dir, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    df = mlflow_runs(work)
    cells = df[df["tags.qllm.kind"] == "cell"]
    assert set(cells["tags.qllm.status"]) == {"finished"}, cells[["tags.mlflow.runName", "tags.qllm.status"]]
    return {r["params.eval.backend"]: r for _, r in cells.iterrows()}, proc.stdout, work


def test_both_backends_evaluated_the_same_checkpoint_on_both_tasks(runs):
    by, _, _ = runs
    assert by["hf"]["tags.qllm.quant_key"] == by["vllm"]["tags.qllm.quant_key"]
    for r in by.values():
        assert r["metrics.arc_easy_offline/n_samples"] == 30 and r["metrics.gsm8k_offline/n_samples"] == 2
    assert by["vllm"]["tags.mlflow.runName"].startswith("smollm2-135m-instruct · rtn · w4 · vllm")
    # each cell keys and logs its own backend's library versions, from its own environment
    assert by["vllm"]["params.version.vllm"].endswith("+cpu")
    assert by["vllm"]["params.version.transformers"] != by["hf"]["params.version.transformers"]


def test_vllm_ran_the_checkpoint_on_its_int4_kernel(runs):
    by, _, _ = runs
    fp = json.loads(by["vllm"]["tags.qllm.evaluated_weights"])
    assert fp["engine"] == "vllm" and fp["quantization"] == "compressed-tensors"
    assert fp["linear_kernels"] == ["CompressedTensorsWNA16 / CPUWNA16LinearKernel"] and fp["low_bit_kernel"]
    assert not fp["w4a8"] and "int32" in fp["weight_dtypes"]  # int4 packed in int32 words, not dequantized floats
    # 30 layers x (qkv, o, gate_up, down)
    assert sum(fp["linear_layers"].values()) == 120
    # the weights as vLLM holds them are the packed ones: far below the dense bf16 size (~270 MB with embeddings)
    assert by["vllm"]["metrics.size/weights_in_memory_gb"] < 0.75 * by["hf"]["metrics.size/weights_in_memory_gb"]
    assert by["vllm"]["metrics.size/kv_cache_gb"] > 0


def test_vllm_agrees_with_hf_item_by_item(runs):
    by, out, _ = runs
    v = by["vllm"]
    assert v["tags.qllm.consistency"].startswith("agree within stderr vs hf run")
    assert v["metrics.consistency/arc_easy_offline/agreement"] >= 0.95
    assert v["metrics.consistency/arc_easy_offline/ci_low"] <= 0 <= v["metrics.consistency/arc_easy_offline/ci_high"]
    assert "backend consistency: hf" in out


def test_speed_is_measured_on_the_low_bit_kernels(runs):
    by, _, _ = runs
    v, h = by["vllm"], by["hf"]
    assert v["tags.qllm.speed_backend"] == "vllm (low-bit kernels)"
    assert "dense" in h["tags.qllm.speed_backend"]
    for b in (1, 4):
        assert v[f"metrics.speed/bs{b}/decode_tok_s"] > 0 and v[f"metrics.speed/bs{b}/ttft_ms"] > 0
    assert v["metrics.speed/bs4/decode_tok_s"] > v["metrics.speed/bs1/decode_tok_s"]  # batching pays on the engine
    assert v["metrics.speed/throughput_output_tok_s"] > v["metrics.speed/bs1/decode_tok_s"]


@pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX: vLLM-CPU runs W4A16 as W4A16 whatever "
                                        "VLLM_CPU_INT4_W4A8 says, and planning refuses eval.cpu_int4_w4a8=true")
def test_w4a8_mode_is_another_scheme_and_agrees_less_with_hf(runs, cache_dir, data_dir):
    by, _, work = runs
    proc = run_qllm(["method=rtn", "bits=4", "eval=vllm", "eval.cpu_int4_w4a8=true", *ARGS], work, cache_dir,
                    data_dir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = mlflow_runs(work)
    w4a8 = df[df["tags.mlflow.runName"].str.contains("vllm as W4A8", regex=False)].iloc[0]
    assert json.loads(w4a8["tags.qllm.evaluated_weights"])["w4a8"]
    assert w4a8["tags.qllm.cell_key"] != by["vllm"]["tags.qllm.cell_key"]
    assert w4a8["tags.qllm.consistency"].endswith(f"vs hf run {by['hf']['run_id']}")
    assert (w4a8["metrics.consistency/arc_easy_offline/agreement"]
            <= by["vllm"]["metrics.consistency/arc_easy_offline/agreement"])


def test_compare_backends_cli_says_the_same(runs):
    import subprocess
    import sys

    by, _, work = runs
    proc = subprocess.run([sys.executable, "-m", "qllm", "compare-backends", "--tracking-uri",
                           f"sqlite:///{work}/mlruns/mlflow.db", "--run-ids", by["hf"]["run_id"],
                           by["vllm"]["run_id"], "--no-log", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["verdict"] == "agree within stderr" and set(result["tasks"]) == {"arc_easy_offline", "gsm8k_offline"}
    arc = result["tasks"]["arc_easy_offline"]
    assert arc["agreement_basis"] == "answer" and arc["n_items"] == 30
    assert arc["agreement"] == by["vllm"]["metrics.consistency/arc_easy_offline/agreement"]
    assert {c["cause"] for c in result["known_causes"] if c["differs"]} >= {"dtype"}  # fp32 (hf) vs bf16 (vllm)
