"""method=mixed end to end in process on the tiny model: the planned recipe, the quantize stage's allocation, and the
saved checkpoint's per-layer schemes and stored bits read back from disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qllm.errors import QllmConfigError
from qllm.measure import sizes
from qllm.planning import compose_cell
from qllm.sensitivity import mixed

TINY = ["model=tiny-random-llama", "method=mixed", "bits=4", "calibration.num_samples=8",
        "calibration.max_seq_len=64"]


def test_the_planned_recipe_is_the_spec_and_in_the_quant_key() -> None:
    a = compose_cell(TINY + ["method.settings.target_bits=4.5"])
    b = compose_cell(TINY + ["method.settings.target_bits=4.6"])
    c = compose_cell(TINY + ["method.settings.candidates=[gptq-w4g64,gptq-w8g64]"])
    assert mixed.spec(a.recipe)["candidates"] == ["gptq-w4ch", "gptq-w4g64", "gptq-w8g64"]
    assert len({a.quant_key, b.quant_key, c.quant_key}) == 3
    assert a.scheme.startswith("mixed W4/W8")


@pytest.mark.parametrize("override, match", [
    ("method.settings.candidates=[rtn-w4g64,gptq-w8g64]", "not GPTQ"),
    ("method.settings.target_bits=3.9", "below the cheapest"),
    ("calibration.autocast=bfloat16", "autocast"),
])
def test_bad_mixed_cells_are_refused_at_planning(override: str, match: str) -> None:
    with pytest.raises(QllmConfigError, match=match):
        compose_cell(TINY + [override])


@pytest.mark.parametrize("tie, target", [(False, 4.6), (True, 4.3)])  # budgets that force a mix of the units
def test_the_checkpoint_has_the_allocation_per_layer(tie: bool, target: float, tmp_path: Path, data_dir: Path, monkeypatch) -> None:
    from qllm.sensitivity.allocate import fused_units
    from qllm.stages import quantize

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cell = compose_cell(TINY + ["method.settings.candidates=[gptq-w3g64,gptq-w4g64,gptq-w8g64]",
                                f"method.settings.target_bits={target}", f"method.settings.tie_fused={str(tie).lower()}",
                                f"cache_dir={tmp_path}", f"data_dir={data_dir}"])
    result = quantize.quantize(cell)
    alloc = result.manifest.allocation
    assert alloc and alloc["avg_bits"] <= target + 1e-9
    assert len(set(alloc["choice"].values())) >= 2, alloc["counts"]  # a real mix at this budget
    config = json.loads((Path(result.checkpoint) / "config.json").read_text())["quantization_config"]
    saved = {}
    for group in config["config_groups"].values():
        for layer in group["targets"]:
            saved[layer] = (group["weights"]["num_bits"], group["weights"]["group_size"])
    expected = {layer: (int(lb.split("-w")[1][0]), int(lb.split("g")[-1])) for layer, lb in alloc["choice"].items()}
    assert saved == expected
    if tie:  # what vLLM fuses got one scheme: q/k/v of a block, gate/up of a block
        units = [u for u in fused_units(sorted(saved)) if len(u) > 1]
        assert len(units) == 4 and all(len({saved[ly] for ly in u}) == 1 for u in units)
    stats = sizes.checkpoint_stats(result.checkpoint)
    # the allocation's bit count is the checkpoint's (values, scales, shape tensors)
    assert stats["bits_per_weight_quantized"] == pytest.approx(alloc["avg_bits"], abs=1e-3)
    assert result.manifest.applied_recipe["quant_stage"]["quant_modifiers"]["GPTQModifier"]["config_groups"]
