"""A planned Cell's memory plan, and the hook in qllm.run that prints it and refuses a cell that cannot fit."""

from __future__ import annotations

import pytest

from qllm import run
from qllm.errors import QllmConfigError
from qllm.plan import PlanSettings, gpus, plan_cell_memory
from qllm.planning import compose_config, plan_cell


def cell_of(*overrides: str, cache_dir: str = "/nonexistent-qllm-cache"):
    cfg = compose_config([*overrides, "data_dir=/nonexistent-data", f"cache_dir={cache_dir}"])
    return cfg, plan_cell(cfg, check_sources=False)


def test_hub_models_plan_offline_from_their_yaml_arch():
    _, cell = cell_of("model=llama-3.1-405b-instruct", "method=none")
    plan = plan_cell_memory(cell, cluster=gpus.parse("8xH100-80GB"))
    assert not plan.fits and "vllm_multinode" in plan.refusal


def test_check_sources_false_keeps_the_cell_keys():
    from conftest import DATA_DIR

    if not (DATA_DIR / "arc_easy").is_dir():
        pytest.skip("benchmark data absent")
    cfg = compose_config(["model=tiny-random-llama", "method=gptq", f"data_dir={DATA_DIR}"])
    assert plan_cell(cfg, check_sources=False) == plan_cell(cfg)


@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "tiny-random-llama", "stories260k"])
@pytest.mark.parametrize("method", ["none", "rtn", "gptq", "awq", "smoothquant", "fp8"])
def test_cpu_models_fit_a_24gb_host_without_gpu(model, method):
    if model == "stories260k" and method in ("awq",):
        pytest.skip("per-channel model: AWQ needs a group size here")
    bits = ["bits=8"] if method in ("smoothquant", "fp8") else []
    _, cell = cell_of(f"model={model}", f"method={method}", *bits)
    plan = plan_cell_memory(cell, cluster=gpus.parse("cpu", host_ram_gb=24))
    assert plan.fits, plan.refusal
    assert all(s.device == "host RAM" and s.launch == "CPU" for s in plan.stages)
    assert all(s.peak_gb < 4 for s in plan.stages)


def test_this_machine_plans_the_default_cell_as_fitting():
    """plan.gpus unset: what this machine has (here: no GPU, its RAM)."""
    _, cell = cell_of()
    plan = plan_cell_memory(cell, PlanSettings())
    assert plan.fits, plan.refusal


def test_run_prints_the_plan_and_refuses_when_enforced(capsys):
    cfg, cell = cell_of("model=llama-3.1-405b-instruct", "method=none", "plan.gpus=8xH100-80GB")
    with pytest.raises(QllmConfigError) as e:
        run._plan_memory(cfg, cell)
    out = capsys.readouterr().out
    assert out.startswith("[qllm] plan llama-3.1-405b-instruct · none · bfloat16: evaluate")
    assert "memory plan: evaluate: needs ~8" in str(e.value) and "plan.enforce=false" in str(e.value)
    cfg, cell = cell_of("model=llama-3.1-405b-instruct", "method=none", "plan.gpus=8xH100-80GB",
                        "plan.enforce=false")
    run._plan_memory(cfg, cell)  # printed, not refused
    assert "(does not fit)" in capsys.readouterr().out


def test_the_plan_line_names_launch_and_devices():
    cfg, cell = cell_of("model=llama-3.1-70b-instruct", "method=none", "plan.gpus=8xH100-80GB")
    line = plan_cell_memory(cell, PlanSettings.of(cfg.plan)).line()
    assert "evaluate vllm TP=4:" in line and "× 4 on H100-80GB" in line and "[needs eval=vllm" in line


def test_bad_safety_is_refused():
    with pytest.raises(QllmConfigError, match="plan.safety"):
        PlanSettings.of({"safety": 1.5})
