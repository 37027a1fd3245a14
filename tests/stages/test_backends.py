"""The evaluation-backend seam, and the HF backend behind it on the tiny random model (in-process): the LM it loads,
what it says about the weights it holds, its speed benchmark, what it contributes to the cell key."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from qllm.methods import Scheme
from qllm.errors import QllmConfigError
from qllm.planning import compose_cell
from qllm.stages import backends
from qllm.stages.backends import EvalBackend, EvalBackendConfig


def test_every_backend_implements_the_protocol_with_a_typed_config():
    assert backends.names() == ["hf", "vllm"]
    for name in backends.names():
        b = backends.get(name)
        assert isinstance(b, EvalBackend) and b.name == name and b.speed_kind in ("dense", "low-bit kernels")
        assert issubclass(b.config, EvalBackendConfig) and b.config().backend == name
        assert b.libraries and all(isinstance(lib, str) for lib in b.libraries)
        assert (Path(__file__).parents[2] / "conf" / "eval" / f"{name}.yaml").is_file()


def test_hf_settings_are_exactly_the_ones_cell_keys_were_made_of():
    """Every field of the hf config enters the key; these are the keys `eval` had before the backend seam."""
    names = {f.name for f in fields(backends.get("hf").config)}
    assert names == {"backend", "device", "batch_size", "max_length", "log_samples", "apply_chat_template",
                     "bootstrap_iters", "seed"}
    settings = {n: None for n in names} | {"backend": "hf"}
    assert backends.key_settings(settings) == settings


@pytest.mark.parametrize("device, ok", [("auto", True), ("cpu", True), ("mps", True), ("tpu", False),
                                        ("cuda:x", False), ("cpu:0", False)])
def test_hf_devices(device, ok):
    hf = backends.get("hf")
    if ok:
        hf.validate({"device": device}, {}, Scheme(), lambda: None)
    else:
        with pytest.raises(QllmConfigError, match="valid: auto, cpu, cuda, cuda:<index>, mps"):
            hf.validate({"device": device}, {}, Scheme(), lambda: None)


def _gpus() -> int:
    import pynvml

    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError:
        return 0


def test_a_gpu_that_is_not_there_is_refused_at_planning():
    """eval.device=cuda without a GPU used to fail in the evaluate stage, after the quantization."""
    hf, n = backends.get("hf"), _gpus()
    with pytest.raises(QllmConfigError, match=f"eval.device='cuda:{n}', but"):
        hf.validate({"device": f"cuda:{n}"}, {}, Scheme(), lambda: None)
    if n == 0:
        with pytest.raises(QllmConfigError, match="no NVIDIA GPU is visible here .*valid here: auto, cpu"):
            hf.validate({"device": "cuda"}, {}, Scheme(), lambda: None)
    else:
        hf.validate({"device": "cuda"}, {}, Scheme(), lambda: None)


@pytest.mark.parametrize("seen, device, message", [
    (None, "cuda", r"eval.device='cuda', but no NVIDIA GPU is visible here .*valid here: auto, cpu"),
    (0, "cuda", r"eval.device='cuda', but this process sees 0 GPU\(s\): valid: auto, cpu$"),
    (2, "cuda:2", r"eval.device='cuda:2', but this process sees 2 GPU\(s\): valid: auto, cpu, cuda, cuda:0, cuda:1"),
])
def test_hf_counts_gpus_as_the_launchers_do(monkeypatch, seen, device, message):
    """launchers.visible_gpus (NVML narrowed by CUDA_VISIBLE_DEVICES) is the one GPU count planning uses."""
    from qllm.stages.backends import hf

    monkeypatch.setattr(hf, "visible_gpus", lambda: seen)
    with pytest.raises(QllmConfigError, match=message):
        backends.get("hf").validate({"device": device}, {}, Scheme(), lambda: None)
    if seen:
        backends.get("hf").validate({"device": f"cuda:{seen - 1}"}, {}, Scheme(), lambda: None)


def test_hf_backend_loads_fingerprints_and_times_the_model(data_dir, cache_dir):
    from qllm.sources.models import prepare

    cell = compose_cell([f"data_dir={data_dir}", f"cache_dir={cache_dir}", "model=tiny-random-llama", "method=none",
                         "eval.device=cpu", "eval.batch_size=2"])
    hf = backends.get("hf")
    lm = hf.load(cell.eval, cell.model, prepare(cell.model, cell.data_dir, cell.cache_dir), False, cell.seed)
    assert lm.batch_size == 2 and hf.device(cell.eval) == "cpu" and hf.tokenizer(lm) is lm.tokenizer
    fp = hf.fingerprint(lm, 32)
    assert fp["layer"].endswith("mlp.down_proj") and fp["max_distinct_per_group"] > 16  # dense random weights
    assert fp["activation_quant_rel_error"] < 1e-5
    mem = hf.weights_in_memory(lm)
    assert mem["bytes"] == mem["param_bytes"] + mem["buffer_bytes"] and mem["params"] > 3e6
    speed = hf.benchmark(lm, {**cell.profile, "speed_batch_sizes": [1], "speed_prompt_len": 8,
                              "speed_output_len": 3, "speed_repeats": 1, "speed_warmup": 0}, seed=0)
    assert speed["backend"] == hf.speed_note and "dense" in speed["backend"]
    assert speed["per_batch"]["1"]["decode_tok_s"]["median"] > 0
