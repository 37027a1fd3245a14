"""The paper models' plans against hand arithmetic: weights = parameters × bytes, one decoder layer's Hessians =
Σ in² × 4 bytes, vLLM per GPU = weights / (TP × PP) + one max_model_len sequence of KV + workspace + overhead.

Every number below is recomputed here from the model's YAML shapes, not read back from the planner."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO
from qllm.plan import choose, gpus, memory
from qllm.plan.memory import Arch, Workload

GB = 1e9


def arch(name: str) -> Arch:
    m = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    return Arch.from_config(m["arch"], m["params_b"])


def work(method: str = "none", bits=None, **kw) -> Workload:
    calib = dict(calib_samples=64, calib_seq=512) if method in ("gptq", "awq", "smoothquant") else {}
    group = 128 if bits in (2, 3, 4) else None
    return Workload(method=method, bits=bits, dtype="bfloat16", group_size=group, **{**calib, **kw})


def ctx(name: str, w: Workload, spec: str, **kw) -> choose.Context:
    return choose.Context(name, arch(name), w, gpus.parse(spec), **kw)


# ---- the shapes ----


def test_parameter_counts_from_shapes_match_the_yaml():
    """Decoder Linears + embeddings + lm_head, from the shapes alone, against each model's params_b."""
    for name, params_b in (("llama-3.1-8b-instruct", 8.03), ("llama-3.1-70b-instruct", 70.6),
                           ("llama-3.1-405b-instruct", 406)):
        a = arch(name)
        h, i, L, v = a.hidden, a.intermediate, a.layers, a.vocab
        q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
        by_hand = L * (h * q + 2 * h * kv + q * h + 3 * h * i) + 2 * v * h
        assert by_hand == pytest.approx(params_b * 1e9, rel=0.005)
        assert a.linear_params == L * (h * q + 2 * h * kv + q * h + 3 * h * i)


# ---- llama-3.1-8b on 1×80 GB ----


def test_8b_bf16_weights_are_params_times_two_bytes():
    assert memory.dense_weights_gb(arch("llama-3.1-8b-instruct"), 2) == pytest.approx(8.03e9 * 2 / GB)  # 16.06


def test_8b_evaluate_hf_on_one_80gb_gpu():
    w = work(context=512, batch_size=8)
    plan = choose.plan_evaluate(ctx("llama-3.1-8b-instruct", w, "1xH100-80GB"))
    weights = 8.03e9 * 2 / GB
    logits = 2 * 8 * 512 * 128256 * 2 / GB  # lm_head output + log_softmax, bf16
    kv = 8 * 512 * (2 * 32 * 8 * 128 * 2) / GB
    act = 8 * 512 * (4 * 4096 + 3 * 14336) * 2 / GB
    assert plan.fits and plan.launch == "1 GPU (hf)" and plan.devices == 1
    assert plan.peak_gb == pytest.approx(weights + logits + kv + act + memory.CUDA_CONTEXT_GB)  # ~19.7
    assert plan.per_device.parts["logits"] == pytest.approx(logits)


def test_8b_gptq_quantize_on_one_80gb_gpu():
    w = work("gptq", 4)
    plan = choose.plan_quantize(ctx("llama-3.1-8b-instruct", w, "1xH100-80GB"))
    hessians = 4 * (5 * 4096**2 + 4096**2 + 14336**2) / GB  # q k v gate up: in=4096; o: 4096; down: 14336
    workspace = (2 * 4096 * 14336 * 4 + 2 * 14336**2 * 4) / GB  # down_proj: W fp32 ×2, H perm + Hinv
    embed = 128256 * 4096 * 2 / GB  # the first subgraph onloads the embeddings (larger than a layer)
    act = 512 * (6 * 4096 + 3 * 14336 + 2 * 4096) * 2 / GB
    assert plan.fits and plan.launch == "1 GPU"
    assert plan.per_device.parts["Hessians"] == pytest.approx(hessians)  # 1.22 GB
    assert plan.peak_gb == pytest.approx(memory.CUDA_CONTEXT_GB + embed + act + hessians + workspace)
    # host RAM: the model, its Linears once more (rewritten beside the mmapped file), every sample's layer input
    # (hidden + rotary cos/sin)
    cache = 64 * 512 * (4096 + 2 * 128) * 2 / GB
    linear = 32 * (4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert plan.host.parts["weights"] == pytest.approx(16.06)
    assert plan.host.parts["rewritten weights"] == pytest.approx(linear * 2 / GB)  # 13.96 GB
    assert plan.host.parts["calibration cache"] == pytest.approx(cache)
    assert plan.host.total == pytest.approx(16.06 + linear * 2 / GB + cache + memory.RUNTIME_GB["quantize"]
                                            + memory.QUANT_STATE_GB + memory.CALIB_STATE_GB)


# ---- llama-3.1-70b on 8×80 GB ----


def test_70b_bf16_on_8x80_is_vllm_tp4():
    """141 GB of bf16 weights: TP=2 needs 70.6 GB + KV + workspace + 2 GB > 0.9 × 80 = 72 GB; TP=4 fits."""
    w = work(max_model_len=4096)
    c = ctx("llama-3.1-70b-instruct", w, "8xH100-80GB")
    plan = choose.plan_evaluate(c)
    weights = 70.6e9 * 2 / GB

    def need(tp):
        kv = 4096 * 2 * 80 * max(8 / tp, 1) * 128 * 2 / GB
        ws = (8192 * (4 * 8192 + 3 * 28672 / tp) * 2 + 256 * 128256 * 4) / GB
        return weights / tp + kv + ws + memory.VLLM_GPU_OVERHEAD_GB

    assert need(2) > 72 > need(4)
    assert plan.fits and plan.launch == "vllm TP=4" and plan.devices == 4
    assert plan.needs == ("eval=vllm", "eval.tensor_parallel_size=4")
    assert plan.peak_gb == pytest.approx(need(4))  # ~38.7 GB
    assert plan.reserved_gb == pytest.approx(0.9 * 80)


# ---- llama-3.1-405b ----


def test_405b_bf16_is_refused_on_one_8x80_node_with_the_numbers():
    w = work(max_model_len=4096)
    plan = choose.plan_evaluate(ctx("llama-3.1-405b-instruct", w, "8xH100-80GB"))
    assert 406e9 * 2 / GB == pytest.approx(812)  # what "~810 GB" is
    assert not plan.fits
    msg = plan.refusal
    assert msg.startswith("needs ~8")
    assert "for the bfloat16 baseline of llama-3.1-405b-instruct; this node has 8×80 GB" in msg
    assert "launch.evaluate=vllm_multinode on 2 nodes" in msg and "plan.gpus=2x8xH100-80GB" in msg
    assert "method=fp8" in msg


def test_405b_fp8_fits_8x80_with_vllm_tp8():
    w = work("fp8", 8, max_model_len=4096)
    plan = choose.plan_evaluate(ctx("llama-3.1-405b-instruct", w, "8xH100-80GB"))
    a = arch("llama-3.1-405b-instruct")
    linear = 126 * (16384 * 16384 * 2 + 2 * 16384 * 1024 + 3 * 16384 * 53248)
    weights = (linear * 1 + (406e9 - linear) * 2) / GB  # fp8 Linears; embeddings, lm_head in bf16: ~410 GB
    assert a.linear_params == linear
    kv = 4096 * 2 * 126 * 1 * 128 * 2 / GB  # 8 KV heads over TP=8: one per GPU
    ws = (8192 * (4 * 16384 + 3 * 53248 / 8) * 2 + 256 * 128256 * 4) / GB
    assert plan.fits and plan.launch == "vllm TP=8" and plan.devices == 8
    assert plan.peak_gb == pytest.approx(weights / 8 + kv + ws + memory.VLLM_GPU_OVERHEAD_GB)  # ~55 GB
    # TP=4 would need > 100 GB per GPU
    assert weights / 4 > 72


def test_405b_bf16_on_2x8x80_is_vllm_multinode_tp8_pp2():
    w = work(max_model_len=4096)
    plan = choose.plan_evaluate(ctx("llama-3.1-405b-instruct", w, "2x8xH100-80GB"))
    kv = 4096 * 2 * (126 / 2) * 1 * 128 * 2 / GB
    ws = (8192 * (4 * 16384 + 3 * 53248 / 8) * 2 + 256 * 128256 * 4) / GB
    assert plan.fits and plan.launch == "vllm_multinode TP=8 PP=2" and plan.devices == 16
    assert plan.needs == ("eval=vllm", "launch.evaluate=vllm_multinode", "eval.tensor_parallel_size=8",
                          "eval.pipeline_parallel_size=2")
    assert plan.peak_gb == pytest.approx(406e9 * 2 / GB / 16 + kv + ws + memory.VLLM_GPU_OVERHEAD_GB)  # ~54 GB


def test_405b_gptq_quantizes_on_one_gpu_with_the_model_in_host_ram():
    w = work("gptq", 4)
    plan = choose.plan_quantize(ctx("llama-3.1-405b-instruct", w, "8xH100-80GB"))
    hessians = 4 * (5 * 16384**2 + 16384**2 + 53248**2) / GB  # 17.8 GB of fp32 Hessians for one layer
    workspace = (2 * 16384 * 53248 * 4 + 2 * 53248**2 * 4) / GB  # down_proj: 29.7 GB
    layer = 126 and (16384 * 16384 * 2 + 2 * 16384 * 1024 + 3 * 16384 * 53248) * 2 / GB  # 6.4 GB
    act = 512 * (6 * 16384 + 3 * 53248 + 2 * 16384) * 2 / GB
    assert plan.fits and plan.launch == "1 GPU"
    assert plan.peak_gb == pytest.approx(memory.CUDA_CONTEXT_GB + layer + act + hessians + workspace)  # ~54.6
    assert plan.host.parts["weights"] == pytest.approx(812)
    assert plan.host.parts["rewritten weights"] == pytest.approx(401.65e9 * 2 / GB, rel=1e-3)
    assert 1600 < plan.host.total <= 0.9 * 3.2 * 640  # host RAM of a described node: a DGX's 3.2x its GPU memory
    assert "torchrun 8 would only speed GPTQ up" in plan.note


def test_405b_gptq_quantize_refused_when_the_host_cannot_hold_the_model():
    w = work("gptq", 4)
    plan = choose.plan_quantize(choose.Context("llama-3.1-405b-instruct", arch("llama-3.1-405b-instruct"), w,
                                               gpus.parse("8xH100-80GB", host_ram_gb=512)))
    assert not plan.fits
    # 812 GB of weights + 803 GB of rewritten Linears + 1.1 GB of calibration cache + 0.77 GB runtime
    assert "needs ~1617 GB of host RAM" in plan.refusal and "this node has 512 GB" in plan.refusal


def test_405b_w4_checkpoint_is_vllm_tp4_on_one_node():
    """W4 g128: 401.6 G Linear weights × 0.5 byte + a bf16 scale per 128 + 4.35 G other params × 2 = 215.8 GB."""
    w = work("gptq", 4, max_model_len=4096)
    plan = choose.plan_evaluate(ctx("llama-3.1-405b-instruct", w, "8xH100-80GB"))
    linear = arch("llama-3.1-405b-instruct").linear_params
    stored = (linear * 0.5 + linear / 128 * 2 + (406e9 - linear) * 2) / GB
    assert memory.quantized_weights_gb(arch("llama-3.1-405b-instruct"), w, 2) == pytest.approx(stored)
    assert plan.fits and plan.launch == "vllm TP=4"


def test_offload_is_opt_in():
    w = work()
    off = choose.plan_evaluate(ctx("llama-3.1-405b-instruct", w, "8xH100-80GB", allow_offload=True))
    assert off.fits and off.launch.startswith("CPU offload")
    assert off.per_device.parts["offloaded weights"] == pytest.approx(812 - 8 * 72)


def test_cpu_only_host_plans_in_ram():
    a = arch("smollm2-135m-instruct")
    w = Workload(method="gptq", bits=4, dtype="float32", group_size=64, calib_samples=64, calib_seq=512,
                 context=512)
    c = choose.Context("smollm2-135m-instruct", a, w, gpus.parse("cpu", host_ram_gb=24))
    q, e = choose.plan_quantize(c), choose.plan_evaluate(c)
    assert q.fits and e.fits and q.launch == e.launch == "CPU" and q.device == "host RAM"
    assert q.per_device.parts["weights"] == pytest.approx(0.135e9 * 4 / GB)


def test_a_configured_vllm_tp_that_fits_is_kept():
    w = work("gptq", 4, max_model_len=4096, backend="vllm", tp=8)
    plan = choose.plan_evaluate(ctx("llama-3.1-405b-instruct", w, "8xH100-80GB"))
    assert plan.fits and plan.launch == "vllm TP=8 (as configured)" and plan.needs == () and plan.devices == 8
    too_small = choose.plan_evaluate(ctx("llama-3.1-405b-instruct", w.but(tp=2), "8xH100-80GB"))
    assert too_small.launch == "vllm TP=4"  # TP=2 does not fit: the planner says what would


def test_a_refused_checkpoint_on_hf_says_the_need_is_the_dense_backends():
    """On a CPU node the closest launch may be vLLM's (compressed weights) while the cell runs on HF, which holds
    the dense weights beside the compressed ones: the refusal names whose need it states."""
    a, cpu = arch("llama-3.1-405b-instruct"), gpus.parse("cpu", host_ram_gb=25)
    plan = choose.plan_evaluate(choose.Context("llama-3.1-405b-instruct", a, work("gptq", 4), cpu))
    assert not plan.fits
    assert "gptq w4 checkpoint of llama-3.1-405b-instruct on eval=hf (dense weights beside the compressed ones)" \
        in plan.refusal
    stated = float(plan.refusal.removeprefix("needs ~").split(" GB")[0])
    dense = memory.dense_weights_gb(a, 2)
    assert dense < stated < dense * 1.5 and stated > 3 * plan.per_device.total  # the row shows vLLM's compressed
    baseline = choose.plan_evaluate(choose.Context("llama-3.1-405b-instruct", a, work(), cpu))
    assert "on eval=" not in baseline.refusal
