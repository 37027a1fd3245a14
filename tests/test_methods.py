"""Each method's recipe, as data: the scheme llmcompressor gets for each method × bits, and every conf/method YAML
naming a function whose settings are its keyword arguments."""

from __future__ import annotations

import inspect

import pytest
from hydra.utils import get_method
from omegaconf import OmegaConf

from qllm import methods
from qllm.config import CONF_DIR


def test_weight_only_methods():
    rtn = methods.rtn(4, ["lm_head"], 64)
    w = rtn.modifiers["QuantizationModifier"]["config_groups"]["group_0"]["weights"]
    assert w == {"num_bits": 4, "type": "int", "symmetric": True, "dynamic": False, "strategy": "group",
                 "group_size": 64}
    assert rtn.scheme == "W4A16 int g64 sym" and rtn.group_size == 64
    assert rtn.as_llmcompressor() == {"quant_stage": {"quant_modifiers": rtn.modifiers}}
    gptq = methods.gptq(3, [], None)
    g = gptq.modifiers["GPTQModifier"]
    assert g["config_groups"]["group_0"]["weights"]["strategy"] == "channel" and gptq.scheme.endswith("per-channel sym")
    assert g["config_groups"]["group_0"]["weights"]["actorder"] == "static" and g["dampening_frac"] == 0.01
    awq = methods.awq(4, ["lm_head"], 128)
    assert list(awq.modifiers) == ["AWQModifier", "QuantizationModifier"]  # scaling first, then the scheme
    assert awq.modifiers["QuantizationModifier"]["config_groups"]["group_0"]["weights"]["symmetric"] is False


def test_awq_grid_too_small_for_the_library_is_refused():
    from qllm.errors import QllmConfigError

    assert methods.awq(4, [], 64, n_grid=3).modifiers["AWQModifier"]["n_grid"] == 3
    with pytest.raises(QllmConfigError, match="n_grid=2: AWQ needs >= 3 grid points with duo_scaling=True"):
        methods.awq(4, [], 64, n_grid=2)
    assert methods.awq(4, [], 64, n_grid=2, duo_scaling=False).modifiers["AWQModifier"]["n_grid"] == 2


def test_activation_methods():
    sq = methods.smoothquant(8, ["lm_head"])
    assert list(sq.modifiers) == ["SmoothQuantModifier", "GPTQModifier"] and sq.modifiers["GPTQModifier"]["scheme"] \
        == "W8A8" and sq.group_size is None
    assert methods.fp8(8, ["lm_head"]).modifiers["QuantizationModifier"]["scheme"] == "FP8_DYNAMIC"
    assert methods.none(4, []).modifiers == {}


@pytest.mark.parametrize("yaml", sorted((CONF_DIR / "method").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_method_yaml_names_a_function_taking_its_settings(yaml):
    cfg = OmegaConf.to_container(OmegaConf.load(yaml))
    fn = get_method(cfg["recipe"])
    params = set(inspect.signature(fn).parameters)
    assert {"bits", "ignore"} <= params and set(cfg["settings"]) <= params, (yaml.stem, cfg["settings"], params)
    assert cfg["name"] == yaml.stem and fn.__name__ == yaml.stem
