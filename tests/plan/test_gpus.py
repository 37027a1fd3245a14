"""`plan.gpus`: the device description a plan is made for (valid forms and malformed ones), and discovery."""

from __future__ import annotations

import pytest

from qllm.errors import QllmConfigError
from qllm.plan import gpus


@pytest.mark.parametrize("spec, nodes, per_node, name, mem", [
    ("8xH100-80GB", 1, 8, "H100", 80.0),
    ("1xA100-40GB", 1, 1, "A100", 40.0),
    ("2x8xH100-80GB", 2, 8, "H100", 80.0),
    ("4xL40S-48GB", 1, 4, "L40S", 48.0),
    ("8xh200-141gb", 1, 8, "h200", 141.0),
    ("1xRTX4090-24GB", 1, 1, "RTX4090", 24.0),
])
def test_valid_descriptions(spec, nodes, per_node, name, mem):
    c = gpus.parse(spec)
    assert (c.nodes, c.gpus_per_node, c.gpu_name, c.gpu_memory_gb) == (nodes, per_node, name, mem)
    assert c.total_gpus == nodes * per_node
    # a described node without plan.host_ram_gb: 3.2x its GPU memory of host RAM, a DGX's ratio (gpus.py)
    assert c.host_ram_gb == pytest.approx(3.2 * per_node * mem)


def test_host_ram_can_be_given():
    assert gpus.parse("8xH100-80GB", host_ram_gb=2048).host_ram_gb == 2048


def test_cpu_means_no_gpu():
    c = gpus.parse("cpu", host_ram_gb=24)
    assert not c.has_gpu and c.total_gpus == 0 and c.host_ram_gb == 24


@pytest.mark.parametrize("spec", ["8xH100", "H100-80GB", "0xH100-80GB", "8x-80GB", "8*H100-80GB", "2x8xH100-80",
                                  "8xH100-0GB", "0x8xH100-80GB", "eight H100s", ""])
def test_malformed_descriptions_list_valid_examples(spec):
    with pytest.raises(QllmConfigError) as e:
        gpus.parse(spec)
    msg = str(e.value)
    assert f"plan.gpus={spec!r}" in msg
    for example in ("1xA100-40GB", "8xH100-80GB", "2x8xH100-80GB", "cpu"):
        assert example in msg


def test_discovery_without_nvml_is_the_host(monkeypatch):
    """No NVIDIA driver (this machine): the device is the host's RAM."""
    import pynvml

    def no_driver():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    c = gpus.discover()
    assert not c.has_gpu and c.host_ram_gb > 0 and "no GPU" in c.source


def test_discovery_reads_nvml(monkeypatch):
    import pynvml

    class Mem:
        total = 80 * 10**9

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 4)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: i)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h: Mem())
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: "NVIDIA H100 80GB HBM3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    c = gpus.discover(host_ram_gb=1000)
    assert (c.gpus_per_node, c.gpu_name, c.gpu_memory_gb, c.host_ram_gb) == (2, "H100", 80.0, 1000)


def test_cluster_from_the_plan_block():
    assert gpus.cluster({"gpus": "2x8xH100-80GB", "host_ram_gb": None}).nodes == 2
    with pytest.raises(QllmConfigError, match="plan.host_ram_gb"):
        gpus.cluster({"gpus": "8xH100-80GB", "host_ram_gb": -1})
