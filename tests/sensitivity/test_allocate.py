"""The greedy allocation: never over budget, spends it until no upgrade fits, bits where the noise is."""

from __future__ import annotations

import random

import pytest

from qllm.errors import QllmConfigError
from qllm.sensitivity.allocate import allocate, nsr, stored_bits
from qllm.sensitivity.candidates import Candidate

CANDS = [Candidate("gptq", 3, 64), Candidate("gptq", 4, 64), Candidate("gptq", 8, 64)]


def _table(n_layers: int, seed: int) -> tuple[dict, dict, dict]:
    rnd = random.Random(seed)
    table, params, width = {}, {}, {}
    for i in range(n_layers):
        base = rnd.uniform(10, 25)  # a layer's 3-bit SQNR; each bit adds ~6 dB
        table[f"l{i}"] = {"gptq-w3g64": base, "gptq-w4g64": base + rnd.uniform(5, 7),
                          "gptq-w8g64": base + rnd.uniform(28, 31)}
        width[f"l{i}"] = rnd.choice([64, 128, 256])
        params[f"l{i}"] = width[f"l{i}"] * rnd.choice([64, 128, 192])
    return table, params, width


def _cost(choice: dict, params: dict, width: dict) -> float:
    by = {c.label: c for c in CANDS}
    return sum(stored_bits(params[ly], width[ly], by[lb]) for ly, lb in choice.items())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [3.3, 4.25, 4.5, 5.0])
def test_never_over_budget_and_no_upgrade_left_that_fits(seed: int, target: float) -> None:
    table, params, width = _table(40, seed)
    a = allocate(table, params, width, CANDS, target)
    total = sum(params.values())
    spent = _cost(a.choice, params, width)
    assert spent <= target * total + 1e-6
    assert a.avg_bits == pytest.approx(spent / total)
    left = target * total - spent
    by = {c.label: c for c in CANDS}
    for ly, cur in a.choice.items():
        for c in CANDS:
            extra = stored_bits(params[ly], width[ly], c) - stored_bits(params[ly], width[ly], by[cur])
            if extra > 0 and table[ly][c.label] > table[ly][cur]:
                assert extra > left + 1e-6, f"{ly}: {cur} -> {c.label} fits ({extra} <= {left}) but was not taken"


def test_more_budget_never_more_noise() -> None:
    table, params, width = _table(40, 7)
    objectives = [allocate(table, params, width, CANDS, t).objective for t in (3.3, 3.6, 4.0, 4.3, 4.6, 5.5, 8.3)]
    assert objectives == sorted(objectives, reverse=True)


def test_the_noisiest_layer_is_upgraded_first() -> None:
    """Equal sizes, one layer far noisier: a budget for one upgrade goes to it."""
    table = {f"l{i}": {"gptq-w3g64": 20.0, "gptq-w4g64": 26.0, "gptq-w8g64": 50.0} for i in range(5)}
    table["l2"] = {"gptq-w3g64": 8.0, "gptq-w4g64": 14.0, "gptq-w8g64": 38.0}
    params = {k: 64 * 64 for k in table}
    width = {k: 64 for k in table}
    start = 5 * stored_bits(64 * 64, 64, CANDS[0])
    one_step = start + stored_bits(64 * 64, 64, CANDS[1]) - stored_bits(64 * 64, 64, CANDS[0])  # one layer 3 -> 4
    a = allocate(table, params, width, CANDS, one_step / (5 * 64 * 64) + 1e-9)
    assert a.choice["l2"] == "gptq-w4g64" and list(a.choice.values()).count("gptq-w3g64") == 4
    assert a.objective == pytest.approx(4 * nsr(20.0) + nsr(14.0))


def test_a_budget_below_the_cheapest_candidate_is_refused() -> None:
    table, params, width = _table(5, 0)
    with pytest.raises(QllmConfigError, match="cheapest candidates already need"):
        allocate(table, params, width, CANDS, 3.0)


def test_fused_units_group_what_vllm_fuses() -> None:
    from qllm.sensitivity.allocate import fused_units

    layers = [f"model.layers.{b}.{p}" for b in (0, 1) for p in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")]
    units = fused_units(layers)
    assert len(units) == 2 * 4  # per block: qkv, o, gate_up, down
    assert ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
            "model.layers.1.self_attn.v_proj"] in units
    assert ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"] in units
    assert ["model.layers.0.mlp.down_proj"] in units


@pytest.mark.parametrize("seed", range(3))
def test_tied_units_take_one_candidate_and_stay_in_budget(seed: int) -> None:
    table, params, width = _table(40, seed)
    units = [[f"l{i}", f"l{i + 1}", f"l{i + 2}"] for i in range(0, 39, 3)] + [["l39"]]
    tied = allocate(table, params, width, CANDS, 4.5, units=units)
    assert all(len({tied.choice[ly] for ly in u}) == 1 for u in units)
    assert _cost(tied.choice, params, width) <= 4.5 * sum(params.values()) + 1e-6
    free = allocate(table, params, width, CANDS, 4.5)
    assert free.objective <= tied.objective + 1e-12  # a constraint can only cost noise
    with pytest.raises(ValueError, match="cover every layer"):
        allocate(table, params, width, CANDS, 4.5, units=units[:-1])
