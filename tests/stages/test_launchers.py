"""The launcher seam: a launcher builds a stage's command and environment from its typed config; the registry finds
launchers by module name."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from qllm.errors import QllmConfigError
from qllm.stages import launchers
from qllm.stages.launchers import LaunchContext, Launcher, LauncherConfig


def test_every_launcher_implements_the_protocol_with_a_typed_config():
    assert launchers.names() == ["accelerate", "deepspeed", "local", "torchrun", "vllm_multinode"]
    for name in launchers.names():
        launcher = launchers.get(name)
        assert isinstance(launcher, Launcher) and launcher.name == name
        assert issubclass(launcher.config, LauncherConfig) and launcher.config().name == name
        assert (Path(__file__).parents[2] / "conf" / "launch" / f"{name}.yaml").is_file()


def test_local_command_fills_only_its_placeholders():
    local = launchers.get("local")
    ctx = LaunchContext(python="/venv/bin/python", port=29577, workdir=Path("/w"))
    settings = {"name": "local", "prefix": ["{python}", "-c", "print({'a': 1})", "--port={port}"], "nproc": 1,
                "timeout_s": None}
    assert local.command(settings, "qllm.stages.evaluate", ["--cell", "c.json"], ctx) == [
        "/venv/bin/python", "-c", "print({'a': 1})", "--port=29577", "-m", "qllm.stages.evaluate", "--cell", "c.json"]
    assert local.env(settings, ctx) == {} and local.ranks(settings) == 1
    assert local.ranks({**settings, "nproc": 4}) == 4


@pytest.mark.parametrize("settings, message", [
    ({"prefix": [], "nproc": 1}, "launch prefix is empty"),
    ({"prefix": ["{python}"], "nproc": 0}, "launch nproc must be >= 1; got 0"),
])
def test_local_refuses_what_cannot_launch(settings, message):
    with pytest.raises(QllmConfigError, match=message):
        launchers.get("local").validate({"name": "local", "timeout_s": None, **settings}, "evaluate", {})


def test_common_settings_are_in_the_base_config():
    assert [f.name for f in fields(LauncherConfig)] == ["name", "timeout_s"]


# ---- torchrun and accelerate: the composed commands and what planning refuses ----

CTX = LaunchContext(python="/venv/bin/python", port=29581, workdir=Path("/w"))


def _cfg(method: str = "gptq", backend: str = "hf", speed: bool = False) -> dict:
    return {"method": {"name": method, "bits_allowed": [] if method == "none" else [4, 8]},
            "eval": {"backend": backend}, "profile": {"speed": speed}}


def _settings(name: str, **changes) -> dict:
    from omegaconf import OmegaConf

    return {**OmegaConf.to_container(OmegaConf.structured(launchers.get(name).config)), **changes}


def test_torchrun_command_meets_on_the_cells_port():
    torchrun = launchers.get("torchrun")
    settings = _settings("torchrun", nproc_per_node=4)
    assert torchrun.command(settings, "qllm.stages.quantize", ["--cell", "c.json"], CTX) == [
        "/venv/bin/python", "-m", "torch.distributed.run", "--nproc_per_node=4", "--nnodes=1", "--node_rank=0",
        "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:29581", "--max_restarts=0",
        "-m", "qllm.stages.quantize", "--cell", "c.json"]
    assert torchrun.ranks(_settings("torchrun", nproc_per_node=8, nnodes=2, rdzv_endpoint="n1:29500")) == 16


@pytest.mark.parametrize("method, gpus, message", [
    ("smoothquant", 0, "cannot run method=smoothquant: measured on 2 CPU ranks"),
    ("rtn", 0, "cannot run method=rtn: no calibration"),
    ("awq", None, "cannot run method=awq: llmcompressor 0.14's AWQ all-reduce asks torch.accelerator"),
])
def test_torchrun_refuses_what_llmcompressor_cannot_distribute(monkeypatch, method, gpus, message):
    from qllm.stages.launchers import torchrun

    monkeypatch.setattr(torchrun, "visible_gpus", lambda: gpus)
    with pytest.raises(QllmConfigError, match=message):
        torchrun.LAUNCHER().validate(_settings("torchrun"), "quantize", _cfg(method))


def test_torchrun_takes_gptq_anywhere_and_awq_where_there_are_gpus(monkeypatch):
    from qllm.stages.launchers import torchrun

    monkeypatch.setattr(torchrun, "visible_gpus", lambda: 8)
    for method in ("gptq", "awq", "none"):  # none: the baseline has no quantize stage (a sweep keeps it)
        torchrun.LAUNCHER().validate(_settings("torchrun"), "quantize", _cfg(method))
    with pytest.raises(QllmConfigError, match="needs launch.quantize.rdzv_endpoint"):
        torchrun.LAUNCHER().validate(_settings("torchrun", nnodes=2), "quantize", _cfg())
    with pytest.raises(QllmConfigError, match="eval=vllm starts its own workers"):
        torchrun.LAUNCHER().validate(_settings("torchrun"), "evaluate", _cfg(backend="vllm"))


def test_accelerate_data_parallel_on_cpu_and_gpus(monkeypatch):
    from qllm.stages.launchers import accelerate

    acc = accelerate.LAUNCHER()
    settings = _settings("accelerate", num_processes=2)
    monkeypatch.setattr(accelerate, "visible_gpus", lambda: None)  # a CPU machine
    cmd = acc.command(settings, "qllm.stages.evaluate", ["--cell", "c.json"], CTX)
    assert cmd[:3] == ["/venv/bin/python", "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1].endswith("launch/accelerate/data_parallel.yaml")
    assert "--multi_gpu" in cmd and "--main_process_port" in cmd and cmd[cmd.index("--main_process_port") + 1] == "29581"
    assert acc.env(settings, CTX)["ACCELERATE_USE_CPU"] == "1"  # accelerate's torchrun path, gloo on CPU
    monkeypatch.setattr(accelerate, "visible_gpus", lambda: 8)
    assert "ACCELERATE_USE_CPU" not in acc.env(settings, CTX)


def test_accelerate_sharded_is_one_process_with_device_map(monkeypatch):
    from qllm.stages.launchers import accelerate

    acc = accelerate.LAUNCHER()
    monkeypatch.setattr(accelerate, "visible_gpus", lambda: 4)
    settings = _settings("accelerate", mode="sharded", num_processes=1, max_cpu_memory_gb=200,
                         offload_folder="/scratch/off")
    cmd = acc.command(settings, "qllm.stages.evaluate", [], CTX)
    assert "--multi_gpu" not in cmd and "--cpu" not in cmd and cmd[cmd.index("--num_processes") + 1] == "1"
    assert acc.env(settings, CTX) == {"QLLM_HF_DEVICE_MAP": "auto", "QLLM_HF_MAX_CPU_MEMORY_GB": "200",
                                      "QLLM_HF_OFFLOAD_DIR": "/scratch/off"}
    with pytest.raises(QllmConfigError, match="keep num_processes=1"):
        acc.validate({**settings, "num_processes": 2}, "evaluate", _cfg())


@pytest.mark.parametrize("stage, cfg, changes, message", [
    ("quantize", _cfg(), {}, "use launch.quantize=torchrun"),
    ("evaluate", _cfg(backend="vllm"), {}, "eval=vllm parallelises itself"),
    ("evaluate", _cfg(speed=True), {}, "profile.speed=true measures one process"),
    ("evaluate", _cfg(), {"mode": "pipeline"}, "valid: data_parallel, sharded"),
])
def test_accelerate_refuses(stage, cfg, changes, message):
    with pytest.raises(QllmConfigError, match=message):
        launchers.get("accelerate").validate(_settings("accelerate", **changes), stage, cfg)
