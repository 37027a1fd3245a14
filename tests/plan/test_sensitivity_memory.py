"""The planner's term for the sensitivity capture (method=mixed, profile.sensitivity), against hand arithmetic."""

from __future__ import annotations

import pytest

from qllm.plan import memory
from qllm.plan.memory import GB, Arch, Workload

# Llama-3.1-8B: hidden 4096, 32 heads x 128, 8 KV heads, intermediate 14336, 32 layers
LLAMA8B = Arch.from_config({"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                            "intermediate_size": 14336, "num_hidden_layers": 32, "vocab_size": 128256})


def test_moments_of_every_layer_plus_one_quantizer_call() -> None:
    w = Workload(method="mixed", bits=4, dtype="bfloat16", sensitivity=True)
    h, i = 4096, 14336
    moments = 32 * (3 * h * h + i * i) * 4  # q/k/v share one input, gate/up another; o reads 32 x 128 = 4096
    one = (3 * h * i + 2 * i * i) * 4  # down_proj: the largest stacked weight + moment; one layer (> 2 GiB)
    assert memory.sensitivity_gb(LLAMA8B, w) == pytest.approx((moments + one) / GB)
    assert 35 < memory.sensitivity_gb(LLAMA8B, w) < 36


def test_no_term_without_a_table_and_mixed_counts_its_gptq_hessians() -> None:
    plain = Workload(method="gptq", bits=4, dtype="bfloat16")
    assert memory.sensitivity_gb(LLAMA8B, plain) == 0.0
    mixed = Workload(method="mixed", bits=4, dtype="bfloat16", sensitivity=True)
    assert memory.hessians_gb(LLAMA8B, mixed) == memory.hessians_gb(LLAMA8B, plain) > 0
    assert "sensitivity moments" in memory.quantize_host(LLAMA8B, mixed, on_gpu=True).parts
