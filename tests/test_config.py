"""The command line's overrides: stage-launcher shorthand, typo checks against the chosen backend's and launchers'
own config classes, and the typed groups composing."""

from __future__ import annotations

import pytest

from qllm import config
from qllm.errors import QllmConfigError
from qllm.planning import compose_config


def test_launcher_shorthand_becomes_hydras_package_override():
    assert config.rewrite_overrides(["launch.evaluate=local", "launch.quantize=local,local", "bits=4"]) == [
        "launch@launch.evaluate=local", "launch@launch.quantize=local,local", "bits=4"]
    assert config.rewrite_overrides(["launch=local"]) == ["launch@launch.quantize=local", "launch@launch.evaluate=local"]
    assert config.rewrite_overrides(["launch.evaluate.timeout_s=60"]) == ["launch.evaluate.timeout_s=60"]
    with pytest.raises(QllmConfigError, match="sweep the stages' launchers separately"):
        config.rewrite_overrides(["launch=local,local"])


def test_each_stage_gets_its_own_launcher_config():
    cfg = compose_config(["launch.evaluate.timeout_s=60", "launch.quantize.prefix=['{python}',-X,dev]"])
    assert cfg.launch.evaluate.name == cfg.launch.quantize.name == "local"
    assert cfg.launch.evaluate.timeout_s == 60 and cfg.launch.quantize.timeout_s is None
    assert list(cfg.launch.quantize.prefix) == ["{python}", "-X", "dev"] and list(cfg.launch.evaluate.prefix) == [
        "{python}"]


@pytest.mark.parametrize("override, message", [
    ("eval.devic=cpu", "unknown config key 'eval.devic': no 'devic' at 'eval'; valid keys there: backend, "
                       "batch_size, max_length, log_samples, apply_chat_template, bootstrap_iters, seed, device"),
    ("launch.evaluate.prefx=[x]", "no 'prefx' at 'launch.evaluate'; valid keys there: name, timeout_s, prefix, nproc"),
    ("launch.prefix=[x]", "no 'prefix' at 'launch'; valid keys there: quantize, evaluate"),
    ("launch.evaluate.timeout=5", "no 'timeout' at 'launch.evaluate'"),
])
def test_typos_name_the_valid_keys_of_the_chosen_backend_and_launcher(override, message):
    with pytest.raises(QllmConfigError) as e:
        config.check_override_keys([override])
    assert message in str(e.value)


def test_group_selections_and_hydra_keys_pass_the_key_check():
    config.check_override_keys(["eval=hf", "launch@launch.evaluate=local", "hydra/launcher=joblib", "+x.y=1",
                                "eval.device=cpu", "launch.evaluate.nproc=2"])


def test_unknown_backend_or_launcher_lists_the_valid_ones():
    from qllm.stages import backends, launchers

    with pytest.raises(QllmConfigError, match="unknown evaluation backend 'vllm2'; valid: hf"):
        backends.get("vllm2")
    with pytest.raises(QllmConfigError, match="unknown stage launcher 'slurmrun'; valid: accelerate, deepspeed, local, torchrun, vllm_multinode"):
        launchers.get("slurmrun")


def test_default_choices_are_read_from_config_yaml():
    assert config._default_choices() == {"model": "smollm2-135m-instruct", "method": "gptq", "task": "quick",
                                              "calibration": "wikitext2", "eval": "hf", "tracking": "local",
                                              "judge": "openai", "launch.quantize": "local", "launch.evaluate": "local"}


def test_model_name_from_a_path():
    assert config._model_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen2.5-0.5B-Instruct"
    assert config._model_name("/data/models/my finetune/") == "my-finetune"
