"""Cell keys are a contract with users' stores: a finished sweep must stay reusable when qllm's code changes.

tests/data/cell_keys_issue10.json holds the keys (cell, quant, task, speed keys and cache entry names) of a fixed set
of cells, computed by the code as it was before the reorganisation of issue 10. Planning the same overrides today
must give the same keys. The keys include the library versions and the absolute data_dir path (task configs name
their files), so both are pinned here: the versions to those recorded, data_dir to a fixed path (a link to the
data folder), so the test checks the hashing, not the machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import DATA_DIR

RECORD = json.loads((Path(__file__).parent / "data" / "cell_keys_issue10.json").read_text())


@pytest.fixture(scope="module")
def fixed_data_dir(data_dir) -> Path:
    fixed = Path(RECORD["data_dir"])
    fixed.parent.mkdir(parents=True, exist_ok=True)
    if not (fixed.is_symlink() and os.readlink(fixed) == str(DATA_DIR)):
        tmp = fixed.with_name(f".{fixed.name}.{os.getpid()}")  # replaced atomically: parallel test workers agree
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(DATA_DIR)
        os.replace(tmp, fixed)
    return fixed


@pytest.fixture(scope="module")
def plan(fixed_data_dir):
    from qllm import cell as cells
    from qllm.planning import compose_cell

    recorded = RECORD["versions"]
    original = cells.versions
    cells.versions = lambda names: {n: recorded[n] for n in names}
    try:
        yield lambda overrides: compose_cell([f"data_dir={fixed_data_dir}", "cache_dir=/qllm-key-contract-cache",
                                              *overrides])
    finally:
        cells.versions = original


# Changed on purpose, with the reason. Issue 11: cell.json sorted the recipe, so the stage applied SmoothQuant +
# GPTQ as GPTQ first, then smoothing over the quantized weights (checkpoints that generate garbage, under hf and vllm
# alike); the fixed recipe hashes its modifier order, so those checkpoints and their results are never reused.
CHANGED = {"tiny-smoothquant-w8": "issue 11: SmoothQuant ran after GPTQ"}


def _keys(plan, name: str) -> dict:
    from qllm.store import cache

    c = plan(RECORD["cells"][name]["overrides"])
    return {"key": c.key, "quant_key": c.quant_key, "task_keys": c.task_keys, "speed_key": c.speed_key,
            "checkpoint_dir": cache.checkpoint_dir(c).name if c.quantized else None,
            "eval_dirs": {t: cache.eval_dir(c, t).name for t in c.tasks}}


@pytest.mark.parametrize("name", sorted(set(RECORD["cells"]) - set(CHANGED)))
def test_keys_unchanged(plan, name):
    got, want = _keys(plan, name), RECORD["cells"][name]
    assert got == {k: want[k] for k in got}, name


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_keys_changed_on_purpose_change_every_key(plan, name):
    got, want = _keys(plan, name), RECORD["cells"][name]
    assert got["quant_key"] != want["quant_key"] and got["key"] != want["key"], CHANGED[name]
    assert not set(got["task_keys"].values()) & set(want["task_keys"].values())
    assert got["checkpoint_dir"] != want["checkpoint_dir"]


def test_the_stage_gets_the_modifiers_in_the_order_the_method_wrote_them(plan):
    from qllm.cell import Cell, hashed_recipe

    c = plan(RECORD["cells"]["tiny-smoothquant-w8"]["overrides"])
    order = list(Cell.from_json(c.to_json()).recipe["quant_stage"]["quant_modifiers"])
    assert order == ["SmoothQuantModifier", "GPTQModifier"]  # smooth first, then quantize the smoothed weights
    awq = {"quant_stage": {"quant_modifiers": {"AWQModifier": {}, "QuantizationModifier": {}}}}
    assert hashed_recipe(awq) == awq  # alphabetical anyway: the key it always had
    assert hashed_recipe(c.recipe)["quant_stage"]["modifier_order"] == order


def test_calibration_batch_size_enters_the_quant_key_only_when_set(plan):
    """batch 1 is what every earlier checkpoint was made with (llmcompressor's default): the same key as before the
    field existed (test_keys_unchanged); another batch size sums calibration statistics in another order."""
    one, default, sixteen = (plan(["method=gptq", *extra]) for extra in
                             (["calibration.batch_size=1"], [], ["calibration.batch_size=16"]))
    assert one.quant_key == default.quant_key != sixteen.quant_key
    assert sixteen.calibration["batch_size"] == 16


def test_calibration_autocast_enters_the_quant_key_only_when_set(plan):
    """Calibration in fp32 (no autocast) is how every earlier checkpoint was made; bf16 forwards pick other scales."""
    off, default, bf16 = (plan(["method=awq", *extra]) for extra in
                          (["calibration.autocast=null"], [], ["calibration.autocast=bfloat16"]))
    assert off.quant_key == default.quant_key != bf16.quant_key


def test_calibration_propagate_error_enters_the_quant_key_only_when_false(plan):
    """The second (propagation) pass is llmcompressor's default and how every earlier checkpoint was made."""
    on, default, off = (plan(["method=awq", *extra]) for extra in
                        (["calibration.propagate_error=true"], [], ["calibration.propagate_error=false"]))
    assert on.quant_key == default.quant_key != off.quant_key
    assert off.calibration["propagate_error"] is False


@pytest.mark.parametrize("name", ["default", "rtn-speed-log-samples", "tiny-none"])
def test_kl_settings_enter_no_key_of_a_cell(plan, name):
    """KL against the baseline is measured besides (like the memory profile): every `profile.kl*` setting leaves a
    cell's keys and cache entries as recorded; only the KL result's own key (and its reference's) follow them."""
    want = RECORD["cells"][name]
    variants = [["profile.kl=false"], ["profile.kl_docs=1"], ["profile.kl_doc_tokens=128"], ["profile.kl_top_k=16"]]
    cells = [plan([*want["overrides"], *extra]) for extra in [[], *variants]]
    for c in cells:
        assert (c.key, c.quant_key, c.task_keys, c.speed_key) == \
            (want["key"], want["quant_key"], want["task_keys"], want["speed_key"])
    default, off, *changed = cells
    assert default.profile["kl"] is True and default.kl_key and off.kl_key is None and off.kl_reference_key is None
    assert len({default.kl_key, *(c.kl_key for c in changed)}) == 1 + len(changed)
    assert len({default.kl_reference_key, *(c.kl_reference_key for c in changed)}) == 1 + len(changed)


def test_a_model_has_one_kl_reference_for_all_its_cells(plan):
    base, rtn, gptq = (plan(RECORD["cells"][n]["overrides"]) for n in ("tiny-none", "tiny-rtn-w4", "tiny-gptq-w4"))
    assert base.kl_reference_key == rtn.kl_reference_key == gptq.kl_reference_key
    assert len({base.kl_key, rtn.kl_key, gptq.kl_key}) == 3  # each cell's own result
    assert plan(RECORD["cells"]["default"]["overrides"]).kl_reference_key != base.kl_reference_key  # another model
