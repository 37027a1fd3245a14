"""The real default model (SmolLM2-135M-Instruct) on real WikiText-2 calibration text, its first two blocks: every
layer's SQNR orders as quantization theory says (8 bits >> 4 > 3; GPTQ above RTN at the same width). The end-to-end
check runs (its rows are recorded); on two blocks and 2 x 256 tokens the single-layer perplexity deltas are within
noise, so only their presence is asserted here (the full-model check is in `qllm sensitivity`'s output)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

CANDIDATES = ["rtn-w3g64", "rtn-w4g64", "gptq-w4g64", "gptq-w8g64"]


@pytest.fixture(scope="module")
def table(data_dir, cache_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qllm.planning import compose_cell
    from qllm.sensitivity import analysis
    from qllm.sources.models import prepare
    from qllm.stages.calibration import calibration_dataset

    cell = compose_cell(["method=gptq", "bits=4", f"data_dir={data_dir}", f"cache_dir={cache_dir}",
                         "calibration.num_samples=8"])
    source = prepare(cell.model, cell.data_dir, cell.cache_dir)
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    # blocks 0 and 1 only (the rest ignored): 14 layers, ~1 min on 2 cores
    settings = analysis.Settings.of({"candidates": CANDIDATES, "reference": "rtn-w3g64", "e2e_layers": 2,
                                     "e2e_docs": 2, "e2e_doc_tokens": 256,
                                     "ignore": ["lm_head", r"re:model\.layers\.([2-9]|[1-9][0-9])\..*"]})
    ds = calibration_dataset(cell.calibration, tok, cell.data_dir)
    return analysis.load_or_measure(model, tok, cell.model, cell.calibration, cell.data_dir, cell.cache_dir,
                                    settings, ds)


def test_two_blocks_are_measured(table) -> None:
    assert len(table.sqnr) == 14 and all(k.startswith(("model.layers.0.", "model.layers.1.")) for k in table.sqnr)


def test_sqnr_orders_by_width_and_method_on_every_layer(table) -> None:
    for layer, row in table.sqnr.items():
        assert row["gptq-w8g64"] > row["gptq-w4g64"] + 15, (layer, row)
        assert row["rtn-w4g64"] > row["rtn-w3g64"] + 3, (layer, row)
        assert row["gptq-w4g64"] > row["rtn-w4g64"], (layer, row)


def test_the_end_to_end_check_quantizes_the_chosen_layers(table) -> None:
    e = table.e2e
    assert len(e["rows"]) == 4 and {r["group"] for r in e["rows"]} == {"most", "least"}
    assert all(r["ppl"] > 0 for r in e["rows"]) and e["baseline_ppl"] > 1
