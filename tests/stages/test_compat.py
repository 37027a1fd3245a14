"""compat.py's AWQ grid-search patches: what they switch, when they stay off, and that the checkpoint they give equals
the unpatched one; and oneshot's propagate_error=false for AWQ (the tiny random model, in process, through
llmcompressor's own oneshot)."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
import torch

from qllm.methods import awq
from qllm.stages import compat

awq_base = pytest.importorskip("llmcompressor.modifiers.transform.awq.base")


@pytest.fixture
def restore_awq(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo the class patch after the test (monkeypatch restores what it saw first)."""
    monkeypatch.setattr(awq_base.AWQModifier, "_run_samples", awq_base.AWQModifier._run_samples)
    monkeypatch.setattr(awq_base.AWQModifier, "_qllm_original_run_samples", None, raising=False)
    monkeypatch.delattr(awq_base.AWQModifier, "_qllm_original_run_samples")


def _model(attn: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation=attn))


def test_disabled_by_env(monkeypatch: pytest.MonkeyPatch, restore_awq: None) -> None:
    monkeypatch.setenv(compat.DISABLE_ENV, "something_else, awq_sdpa_grid_search")
    assert compat.disabled("awq_sdpa_grid_search") and not compat.disabled("awq_cpu_pin_memory")
    assert compat.awq_sdpa_grid_search(_model("sdpa")) is False


def test_only_for_a_model_loaded_with_sdpa(restore_awq: None) -> None:
    original = awq_base.AWQModifier._run_samples
    assert compat.awq_sdpa_grid_search(_model("eager")) is False
    assert awq_base.AWQModifier._run_samples is original


def test_grid_search_calls_see_sdpa_and_tracing_keeps_eager(monkeypatch: pytest.MonkeyPatch,
                                                            restore_awq: None) -> None:
    seen = []
    monkeypatch.setattr(awq_base.AWQModifier, "_run_samples",
                        lambda self, module: seen.append(getattr(getattr(module, "config", None),
                                                                 "_attn_implementation", None)) or [])
    assert compat.awq_sdpa_grid_search(_model("sdpa")) is True
    assert compat.awq_sdpa_grid_search(_model("sdpa")) is True  # twice: still one level of wrapping
    attention = torch.nn.Module()
    attention.config = types.SimpleNamespace(_attn_implementation="eager")  # as calibration_forward_context sets it
    awq_base.AWQModifier._run_samples(None, attention)
    awq_base.AWQModifier._run_samples(None, torch.nn.Linear(2, 2))  # an MLP parent: no config, untouched
    assert seen == ["sdpa", None]
    assert attention.config._attn_implementation == "eager"  # restored for the traced subgraphs


def _awq_tiny(source: str, patched: bool, hook: Any = None, **oneshot_args: Any) -> dict[str, torch.Tensor]:
    import datasets
    import yaml
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, model.config.vocab_size, (8, 64), generator=g).tolist()
    ds = datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * 64] * 8})
    compat.awq_cpu_pin_memory()
    if patched:
        assert compat.awq_sdpa_grid_search(model)
    if hook is not None:
        hook(model)
    recipe = awq(4, ["lm_head"], 32, n_grid=6).as_llmcompressor()
    oneshot(model=model, tokenizer=AutoTokenizer.from_pretrained(source), dataset=ds, num_calibration_samples=8,
            recipe=yaml.safe_dump(recipe, sort_keys=False), max_seq_length=64, **oneshot_args)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_patched_awq_checkpoint_equals_unpatched(tmp_path: Path, restore_awq: None) -> None:
    """Same data, same grid: the same scales (to float32 rounding: SDPA and eager sum in different orders)."""
    from qllm.planning import compose_cell
    from qllm.sources import models

    cell = compose_cell(["model=tiny-random-llama"])
    source = models.prepare(cell.model, cell.data_dir, str(tmp_path))
    plain, fast = _awq_tiny(source, patched=False), _awq_tiny(source, patched=True)
    assert plain.keys() == fast.keys()
    scales = [k for k in plain if k.endswith("weight_scale")]
    assert scales, "no quantized layers"
    for k in plain:
        if plain[k].is_floating_point():
            torch.testing.assert_close(fast[k], plain[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.fixture
def restore_best_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(awq_base.AWQModifier, "_compute_best_scale", awq_base.AWQModifier._compute_best_scale)
    monkeypatch.setattr(awq_base.AWQModifier, "_qllm_original_compute_best_scale", None, raising=False)
    monkeypatch.delattr(awq_base.AWQModifier, "_qllm_original_compute_best_scale")


def test_gram_loss_checkpoint_equals_the_library_grid_search(tmp_path: Path, restore_awq: None,
                                                             restore_best_scale: None, monkeypatch) -> None:
    """The down_proj mappings scored by trace(dW H dW^T) choose the scales the library's forwards choose: the same
    checkpoint (to float32 rounding), and those mappings really were scored that way."""
    from qllm.planning import compose_cell
    from qllm.sources import models

    cell = compose_cell(["model=tiny-random-llama"])
    source = models.prepare(cell.model, cell.data_dir, str(tmp_path))
    plain = _awq_tiny(source, patched=True)
    assert compat.awq_linear_loss_by_gram() and compat.awq_linear_loss_by_gram()  # twice: one level of wrapping
    monkeypatch.setattr(compat, "GRAM_SCORED", [])
    fast = _awq_tiny(source, patched=True)
    # the tiny model's 2 layers: up_proj -> down_proj each (v_proj -> o_proj too where the shapes allow it)
    assert sum(name.endswith("up_proj") for name in compat.GRAM_SCORED) == 2, compat.GRAM_SCORED
    for k in plain:
        if plain[k].is_floating_point():
            torch.testing.assert_close(fast[k], plain[k], rtol=1e-4, atol=1e-6, msg=k)


def test_awq_without_the_propagation_pass_gives_the_same_checkpoint(tmp_path: Path, restore_awq: None) -> None:
    """calibration.propagate_error=false: each decoder layer runs once per sample instead of twice, and the
    checkpoint is the same (AWQ's smoothing is an equivalence transform; quantization is off during calibration)."""
    from qllm.planning import compose_cell
    from qllm.sources import models

    cell = compose_cell(["model=tiny-random-llama"])
    source = models.prepare(cell.model, cell.data_dir, str(tmp_path))
    calls = {True: 0, False: 0}

    def counter(propagate: bool):  # forwards of the first layer's attention block (the grid search runs it too)
        def hook(model):
            def count(*_):
                calls[propagate] += 1
            model.model.layers[0].self_attn.q_proj.register_forward_hook(count)
        return hook

    two = _awq_tiny(source, patched=True, hook=counter(True), propagate_error=True)
    one = _awq_tiny(source, patched=True, hook=counter(False), propagate_error=False)
    assert calls[True] - calls[False] == 8, calls  # one propagation forward per calibration sample saved
    for k in two:
        if two[k].is_floating_point():
            torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-6, msg=k)
