"""Model size statistics (qllm.sizes) on real checkpoints: the tiny random Llama quantized by the quantize stage
(RTN and FP8 need no calibration data), its converted base model, and the converted SmolLM2-135M."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qllm.sources import models
from qllm.planning import compose_cell
from qllm.stages.quantize import quantize
from qllm.store.cache import checkpoint_dir
from qllm.measure import cost_metrics
from qllm.measure.sizes import checkpoint_stats, weights_in_memory

TINY = ["model=tiny-random-llama", "task=wikitext_offline"]
WIDE = ["model.arch.hidden_size=128", "model.arch.intermediate_size=256"]  # a tiny model that g128 divides


def _cell(cache_dir, data_dir, *overrides):
    return compose_cell([*TINY, f"cache_dir={cache_dir}", f"data_dir={data_dir}", *overrides])


def _quantized(cache_dir, data_dir, *overrides) -> dict:
    cell = _cell(cache_dir, data_dir, *overrides)
    quantize(cell)
    return checkpoint_stats(checkpoint_dir(cell))


def _base_dir(cache_dir, data_dir, *overrides) -> str:
    cell = _cell(cache_dir, data_dir, "method=none", *overrides)
    return models.prepare(cell.model, cell.data_dir, cell.cache_dir)


def _linear_shapes(hidden: int, inter: int, heads: int = 4, kv_heads: int = 2, layers: int = 2) -> list[tuple]:
    """(out, in) of every Linear of the tiny Llama but lm_head (which the recipes ignore; tied here anyway)."""
    hd = hidden // heads
    per_layer = [(hidden, hidden), (kv_heads * hd, hidden), (kv_heads * hd, hidden), (hidden, hidden),  # q k v o
                 (inter, hidden), (inter, hidden), (hidden, inter)]  # gate up down
    return per_layer * layers


def _dense_params(hidden: int, inter: int, vocab: int = 49152) -> int:
    """Parameters of the tiny Llama (tied embeddings: counted once): linears + 2 norms per layer + final norm."""
    return sum(o * i for o, i in _linear_shapes(hidden, inter)) + vocab * hidden + 2 * 2 * hidden + hidden


@pytest.fixture(scope="module")
def tiny(cache_dir, data_dir) -> dict:
    """Stats of the tiny model: baseline, RTN W4 and W8 (g32, its default group size) and FP8."""
    return {
        "base": checkpoint_stats(_base_dir(cache_dir, data_dir)),
        "w4": _quantized(cache_dir, data_dir, "method=rtn", "bits=4"),
        "w8": _quantized(cache_dir, data_dir, "method=rtn", "bits=8"),
        "fp8": _quantized(cache_dir, data_dir, "method=fp8", "bits=8"),
    }


def test_import_needs_no_torch():
    code = "import sys, qllm.measure.sizes; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_w4_g128_bits_per_weight(cache_dir, data_dir):
    """RTN W4 g128 sym with fp32 scales: 4 bits + 32/128 per weight for scales + the int64 weight_shape (2 values)
    per layer; no zero points (symmetric), no g_idx (no activation ordering)."""
    s = _quantized(cache_dir, data_dir, *WIDE, "method=rtn", "bits=4", "method.settings.group_size=128")
    shapes = _linear_shapes(128, 256)
    weights = sum(o * i for o, i in shapes)
    storage = sum(o * i // 2 + o * (i // 128) * 4 + 2 * 8 for o, i in shapes)
    assert s["quant_format"] == "pack-quantized" and s["weight_bits"] == 4 and s["params_exact"]
    assert s["quantized_layers"] == len(shapes) and s["quantized_params"] == weights
    assert 4 < s["bits_per_weight_quantized"] < 5
    assert s["bits_per_weight_quantized"] == pytest.approx(storage * 8 / weights, abs=1e-6)
    assert s["quant_scale_bytes"] == sum(o * (i // 128) * 4 for o, i in shapes)
    assert s["quant_zero_point_bytes"] == 0 and s["quant_g_idx_bytes"] == 0
    assert s["params"] == _dense_params(128, 256)
    # the embeddings stay fp32: the whole model is far above 4.25 bits, the quantized layers' share pulls it below 32
    assert s["bits_per_weight_quantized"] < s["bits_per_weight"] < 32
    assert s["tensor_bytes"] == s["quantized_weight_bytes"] + s["unquantized_bytes"]
    assert s["dtypes"] == {"float32": s["params"] - weights, "int4": weights}
    assert s["params"] == checkpoint_stats(_base_dir(cache_dir, data_dir, *WIDE))["params"]


def test_w4_asymmetric_zero_points(cache_dir, data_dir):
    """Asymmetric W4 g32 stores zero points packed 8 per int32 along the output dim: out/8 x in/32 int32s."""
    s = _quantized(cache_dir, data_dir, "method=rtn", "bits=4", "method.settings.symmetric=false")
    shapes = _linear_shapes(64, 128)
    zp = sum(-(-o * 4 // 32) * (i // 32) * 4 for o, i in shapes)
    storage = sum(o * i // 2 + o * (i // 32) * 4 + 2 * 8 for o, i in shapes) + zp
    assert s["quant_zero_point_bytes"] == zp
    assert s["bits_per_weight_quantized"] == pytest.approx(storage * 8 / sum(o * i for o, i in shapes), abs=1e-6)


def test_quantized_params_equal_base_params(tiny):
    base = tiny["base"]["params"]
    assert base == _dense_params(64, 128)
    for name in ("w4", "w8", "fp8"):
        assert tiny[name]["params"] == base, name
        assert tiny[name]["quantized_params"] == sum(o * i for o, i in _linear_shapes(64, 128)), name
        assert tiny[name]["tied_embeddings"] and tiny[name]["tied_duplicate_bytes"] == 0


def test_smaller_with_fewer_bits(tiny):
    w4, w8, base = tiny["w4"], tiny["w8"], tiny["base"]
    assert w4["tensor_bytes"] < w8["tensor_bytes"] < base["tensor_bytes"]
    assert w4["bytes_on_disk"] < w8["bytes_on_disk"] < base["bytes_on_disk"]
    assert w4["weight_bits"] == 4 and w8["weight_bits"] == 8
    # g32 fp32 scales: +1 bit per weight, + the weight_shape
    assert 5 < w4["bits_per_weight_quantized"] < 5.1 and 9 < w8["bits_per_weight_quantized"] < 9.1
    # the difference between them is exactly the packed values: 4 bits per quantized weight
    assert w8["tensor_bytes"] - w4["tensor_bytes"] == w4["quantized_params"] // 2


def test_fp8_per_channel(tiny):
    """FP8 dynamic: float8 e4m3 weights (1 byte) + one scale per output channel."""
    s = tiny["fp8"]
    shapes = _linear_shapes(64, 128)
    weights = sum(o * i for o, i in shapes)
    assert s["quant_format"] == "float-quantized" and s["weight_bits"] == 8
    assert s["dtypes"]["float8_e4m3fn"] == weights
    scale_bytes = s["quant_scale_bytes"]
    assert scale_bytes % sum(o for o, _ in shapes) == 0  # per channel: a whole number of bytes per output channel
    assert s["bits_per_weight_quantized"] == pytest.approx((weights + scale_bytes) * 8 / weights, abs=1e-9)
    assert 8 < s["bits_per_weight_quantized"] < 8 + 32 / 64 + 1e-9  # in >= 64, scales at most fp32
    assert s["activation_quant_bytes"] == 0  # dynamic activations: no stored input scales


def test_baseline_and_weights_in_memory(tiny, cache_dir, data_dir):
    import torch
    from transformers import AutoModelForCausalLM

    base = tiny["base"]
    assert base["bits_per_weight"] == 32 and base["bits_per_weight_quantized"] is None
    assert base["quantized_layers"] == 0 and base["dtypes"] == {"float32": base["params"]}
    assert base["tensor_bytes"] == 4 * base["params"] and base["bytes_on_disk"] > base["tensor_bytes"]

    model = AutoModelForCausalLM.from_pretrained(_base_dir(cache_dir, data_dir), dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one storage, counted once
    mem = weights_in_memory(model)
    assert mem["params"] == base["params"] == sum(p.numel() for p in model.parameters())
    assert mem["param_bytes"] == 4 * base["params"]
    assert mem["bytes"] == mem["param_bytes"] + mem["buffer_bytes"] and mem["buffer_bytes"] < 1024  # rotary inv_freq
    assert mem["bytes_by_device"] == {"cpu": mem["bytes"]} and mem["meta_tensors"] == 0
    metrics = cost_metrics.size(base, mem)  # the names the orchestrator logs
    assert metrics["size/params"] == base["params"] and "size/bits_per_weight_quantized" not in metrics
    assert metrics["size/weights_in_memory_gb"] == mem["bytes"] / 1e9
    json.dumps(base), json.dumps(mem)  # plain JSON for MLflow tags/artifacts


def test_smollm2_converted_params(cache_dir, data_dir):
    """SmolLM2-135M (tied embeddings): 30 x (q,o 576^2 + k,v 576x192 + 3 x 576x1536 + 2 norms) + 49152x576 + norm."""
    cell = compose_cell(["model=smollm2-135m-instruct", "method=none", "task=wikitext_offline",
                         f"cache_dir={cache_dir}", f"data_dir={data_dir}"])
    s = checkpoint_stats(models.prepare(cell.model, cell.data_dir, cell.cache_dir))
    layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    assert s["params"] == 30 * layer + 49152 * 576 + 576 == 134_515_008
    assert s["tied_embeddings"] and s["bits_per_weight"] == 32 and s["tensor_bytes"] == 4 * 134_515_008


def test_sharded_without_weight_shape(tiny, cache_dir, data_dir, tmp_path):
    """The W4 checkpoint split into two shards with an index, its weight_shape tensors dropped: the same counts,
    the dense shape then inferred from the packed shape x 8 values per int32 (flagged as not exact)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    src = checkpoint_dir(_cell(cache_dir, data_dir, "method=rtn", "bits=4"))
    tensors = {k: v for k, v in load_file(src / "model.safetensors").items() if not k.endswith(".weight_shape")}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / fname), metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    shutil.copy(src / "config.json", tmp_path / "config.json")
    s, w4 = checkpoint_stats(tmp_path), tiny["w4"]
    assert s["files"] == 2 and not s["params_exact"] and s["quant_shape_bytes"] == 0
    for k in ("params", "quantized_params", "quantized_layers", "dtypes"):
        assert s[k] == w4[k], k
    assert s["tensor_bytes"] == w4["tensor_bytes"] - w4["quant_shape_bytes"]
