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


def _cfg(method: str = "gptq", backend: str = "hf", speed: bool = False, samples: int = 16) -> dict:
    return {"method": {"name": method, "bits_allowed": [] if method == "none" else [4, 8],
                       "calibrate": method in ("gptq", "awq", "smoothquant")},
            "calibration": {"num_samples": samples}, "eval": {"backend": backend}, "profile": {"speed": speed}}


def _gpus(monkeypatch, seen, device_node: bool = False) -> None:
    """What NVML counts (None: it cannot tell) and whether a GPU device node exists, as launchers.no_gpu reads them."""
    monkeypatch.setattr(launchers, "visible_gpus", lambda: seen)
    monkeypatch.setattr(launchers, "gpu_device_present", lambda environ=None: device_node)


@pytest.mark.parametrize("seen, device_node, none", [
    (0, True, True), (None, False, True),  # NVML counts none; NVML cannot tell and there is no GPU device: a CPU
    (None, True, False), (2, False, False),  # NVML cannot tell but a GPU device exists (AMD); NVML counts two
])
def test_no_gpu_takes_nvml_cannot_tell_for_no_gpu_only_without_a_gpu_device(monkeypatch, seen, device_node, none):
    _gpus(monkeypatch, seen, device_node)
    assert launchers.no_gpu() is none


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
    assert torchrun.ranks(_settings("torchrun", nproc_per_node=8)) == 8


@pytest.mark.parametrize("method, gpus, device_node, message", [
    ("smoothquant", 0, False, "cannot run method=smoothquant: measured on 2 CPU ranks"),
    ("rtn", 0, False, "cannot run method=rtn: no calibration"),
    ("awq", 0, True, "cannot run method=awq: llmcompressor 0.14's AWQ all-reduce asks torch.accelerator"),
    ("awq", None, False, "cannot run method=awq: llmcompressor 0.14's AWQ all-reduce asks torch.accelerator"),
])
def test_torchrun_refuses_what_llmcompressor_cannot_distribute(monkeypatch, method, gpus, device_node, message):
    _gpus(monkeypatch, gpus, device_node)
    with pytest.raises(QllmConfigError, match=message):
        launchers.get("torchrun").validate(_settings("torchrun"), "quantize", _cfg(method))


@pytest.mark.parametrize("gpus, device_node", [(8, False), (None, True)])  # None + a device: GPUs NVML cannot count
def test_torchrun_takes_gptq_anywhere_and_awq_where_there_are_gpus(monkeypatch, gpus, device_node):
    _gpus(monkeypatch, gpus, device_node)
    torchrun = launchers.get("torchrun")
    for method in ("gptq", "awq", "none"):  # none: the baseline has no quantize stage (a sweep keeps it)
        torchrun.validate(_settings("torchrun"), "quantize", _cfg(method))
    torchrun.validate(_settings("torchrun"), "quantize", _cfg("none", backend="vllm", speed=True))  # nor its eval
    with pytest.raises(QllmConfigError, match="eval=vllm starts its own workers"):
        torchrun.validate(_settings("torchrun"), "evaluate", _cfg(backend="vllm"))


@pytest.mark.parametrize("stage, instead", [
    ("quantize", "quantize on a single node"),
    ("evaluate", "for evaluation across nodes use launch.evaluate=vllm_multinode"),
])
def test_torchrun_refuses_several_nodes(stage, instead):
    """qllm starts a stage on one node: torchrun --nnodes=2 there would wait for a node nothing starts."""
    settings = _settings("torchrun", nnodes=2, node_rank=0, rdzv_endpoint="node-0:29500")
    with pytest.raises(QllmConfigError, match=rf"launch.{stage}.nnodes=2: qllm starts the stage on one node .*"
                                              rf"valid: launch.{stage}.nnodes=1; {instead}"):
        launchers.get("torchrun").validate(settings, stage, _cfg())
    with pytest.raises(QllmConfigError, match=r"node_rank=1 must be in \[0, nnodes=1\)"):
        launchers.get("torchrun").validate(_settings("torchrun", node_rank=1), stage, _cfg())


def test_torchrun_evaluate_refuses_speed_with_several_ranks():
    torchrun = launchers.get("torchrun")
    with pytest.raises(QllmConfigError, match="profile.speed=true measures one process's speed; launch.evaluate="
                                              "torchrun runs 2 ranks"):
        torchrun.validate(_settings("torchrun", nproc_per_node=2), "evaluate", _cfg(speed=True))
    torchrun.validate(_settings("torchrun", nproc_per_node=1), "evaluate", _cfg(speed=True))  # one rank: its speed
    torchrun.validate(_settings("torchrun", nproc_per_node=2), "evaluate", _cfg())


def test_torchrun_quantize_refuses_fewer_calibration_samples_than_ranks(monkeypatch):
    """Each rank calibrates on its own share of the samples (compat.calibration_shard): with fewer samples than
    ranks, some rank would get none."""
    _gpus(monkeypatch, 8)
    torchrun = launchers.get("torchrun")
    with pytest.raises(QllmConfigError, match=r"calibration.num_samples=3 is fewer than the 4 ranks .*valid: "
                                              r"calibration.num_samples >= 4, or launch.quantize.nproc_per_node <= 3"):
        torchrun.validate(_settings("torchrun", nproc_per_node=4), "quantize", _cfg(samples=3))
    torchrun.validate(_settings("torchrun", nproc_per_node=4), "quantize", _cfg(samples=4))


def test_accelerate_data_parallel_on_cpu_and_gpus(monkeypatch):
    from qllm.stages.launchers import accelerate

    acc = accelerate.LAUNCHER()
    settings = _settings("accelerate", num_processes=2)
    _gpus(monkeypatch, None)  # a CPU machine: no NVML, no GPU device
    cmd = acc.command(settings, "qllm.stages.evaluate", ["--cell", "c.json"], CTX)
    assert cmd[:3] == ["/venv/bin/python", "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1].endswith("launch/accelerate/data_parallel.yaml")
    assert "--multi_gpu" in cmd and "--main_process_port" in cmd and cmd[cmd.index("--main_process_port") + 1] == "29581"
    assert acc.env(settings, CTX)["ACCELERATE_USE_CPU"] == "1"  # accelerate's torchrun path, gloo on CPU
    _gpus(monkeypatch, 8)
    assert "ACCELERATE_USE_CPU" not in acc.env(settings, CTX)
    _gpus(monkeypatch, None, device_node=True)  # GPUs NVML cannot count (AMD): not a CPU machine
    assert "ACCELERATE_USE_CPU" not in acc.env(settings, CTX)
    assert "--cpu" not in acc.command(_settings("accelerate", num_processes=1), "m", [], CTX)


def test_accelerate_command_is_one_machines(monkeypatch):
    """--num_processes is accelerate's total across machines: on the one machine qllm launches it is the ranks."""
    from qllm.stages.launchers import accelerate

    _gpus(monkeypatch, 8)
    acc, settings = accelerate.LAUNCHER(), _settings("accelerate", num_processes=8)
    assert acc.command(settings, "qllm.stages.evaluate", ["--cell", "c.json"], CTX) == [
        "/venv/bin/python", "-m", "accelerate.commands.launch", "--config_file", str(accelerate.CONFIG_DIR /
                                                                                    "data_parallel.yaml"),
        "--num_processes", "8", "--num_machines", "1", "--machine_rank", "0", "--main_process_port", "29581",
        "--multi_gpu", "-m", "qllm.stages.evaluate", "--cell", "c.json"]
    assert acc.ranks(settings) == 8
    acc.validate(settings, "evaluate", _cfg())


@pytest.mark.parametrize("changes", [{"num_machines": 2}, {"num_machines": 2, "machine_rank": 1},
                                     {"machine_rank": 1}])
def test_accelerate_refuses_several_machines(changes):
    with pytest.raises(QllmConfigError, match=r"qllm starts the evaluate stage on one machine .*valid: num_machines=1, "
                                              r"machine_rank=0; for evaluation across nodes use launch.evaluate="
                                              "vllm_multinode"):
        launchers.get("accelerate").validate(_settings("accelerate", **changes), "evaluate", _cfg())


def test_accelerate_sharded_is_one_process_with_device_map(monkeypatch):
    from qllm.stages.launchers import accelerate

    acc = accelerate.LAUNCHER()
    _gpus(monkeypatch, 4)
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
