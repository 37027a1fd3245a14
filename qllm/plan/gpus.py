"""The devices a plan is made for: the GPUs this machine sees (NVML), the ones it is told (`plan.gpus=8xH100-80GB`),
or, with no GPU, the host's RAM (psutil).

Syntax of `plan.gpus`: `[NODESx]GPUSxNAME-MEMGB`, e.g. `1xA100-40GB`, `8xH100-80GB`, `2x8xH100-80GB` (two nodes of
eight), or `cpu` (no GPU: the host's RAM is the device). GB are 10^9 bytes. Imports no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from ..errors import QllmConfigError

GB = 1e9
EXAMPLES = "1xA100-40GB, 8xH100-80GB, 2x8xH100-80GB (2 nodes x 8 GPUs), cpu"
_SPEC = re.compile(r"^(?:(?P<nodes>\d+)x)?(?P<gpus>\d+)x(?P<name>[A-Za-z][A-Za-z0-9_.]*)-(?P<mem>\d+(?:\.\d+)?)GB$",
                   re.IGNORECASE)
# A node described by plan.gpus without plan.host_ram_gb: assume this many times its total GPU memory of host RAM
# (a DGX H100 has 2 TB for 640 GB of GPU memory; plan.host_ram_gb=... for another node).
HOST_RAM_PER_GPU_MEMORY = 3.2


@dataclass(frozen=True)
class Cluster:
    """Identical nodes, each with `gpus_per_node` GPUs of `gpu_memory_gb` (0 GPUs: the host's RAM is the device)."""

    nodes: int
    gpus_per_node: int
    gpu_name: str  # "H100", or "CPU" when there is no GPU
    gpu_memory_gb: float  # per GPU
    host_ram_gb: float  # per node
    source: str  # where this came from: "plan.gpus=...", "NVML", "no GPU (psutil)"

    @property
    def has_gpu(self) -> bool:
        return self.gpus_per_node > 0

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def gpu_label(self) -> str:
        return f"{self.gpu_name}-{self.gpu_memory_gb:g}GB"

    def describe(self) -> str:
        if not self.has_gpu:
            return f"no GPU: host RAM {self.host_ram_gb:.0f} GB ({self.source})"
        node = f"{self.gpus_per_node}×{self.gpu_memory_gb:g} GB {self.gpu_name}"
        return (f"{self.nodes} nodes of {node}" if self.nodes > 1 else node) + \
            f", host RAM {self.host_ram_gb:.0f} GB per node ({self.source})"


def parse(spec: str, host_ram_gb: Optional[float] = None) -> Cluster:
    """`plan.gpus` as a Cluster, or a QllmConfigError listing valid examples."""
    text = str(spec).strip()
    if text.lower() == "cpu":
        return Cluster(1, 0, "CPU", 0.0, host_ram_gb or _host_ram_gb(), "plan.gpus=cpu")
    m = _SPEC.match(text)
    nodes = int(m["nodes"] or 1) if m else 0
    gpus = int(m["gpus"]) if m else 0
    mem = float(m["mem"]) if m else 0.0
    if not m or nodes < 1 or gpus < 1 or mem <= 0:
        raise QllmConfigError(f"plan.gpus={spec!r} is not a device description; valid: [NODESx]GPUSxNAME-MEMGB, "
                              f"e.g. {EXAMPLES}; or null (the GPUs this machine sees)")
    ram = host_ram_gb if host_ram_gb else HOST_RAM_PER_GPU_MEMORY * gpus * mem
    return Cluster(nodes, gpus, m["name"], mem, ram, f"plan.gpus={text}")


def _host_ram_gb() -> float:
    import psutil

    return psutil.virtual_memory().total / GB


def discover(host_ram_gb: Optional[float] = None) -> Cluster:
    """The GPUs this process sees (NVML, narrowed by CUDA_VISIBLE_DEVICES), else the host's RAM as the device."""
    import os

    ram = host_ram_gb or _host_ram_gb()
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        indices = list(range(count))
        if visible is not None:
            wanted = [v.strip() for v in visible.split(",") if v.strip()]
            indices = [int(v) for v in wanted if v.isdigit() and int(v) < count] if all(
                v.isdigit() for v in wanted) else indices[:len(wanted)]
        if not indices:
            raise RuntimeError("no visible GPU")
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        mems = [pynvml.nvmlDeviceGetMemoryInfo(h).total / GB for h in handles]
        name = pynvml.nvmlDeviceGetName(handles[0])
        name = name.decode() if isinstance(name, bytes) else str(name)
        short = re.sub(r"^NVIDIA\s+", "", name).split()[0] if name else "GPU"
        return Cluster(1, len(handles), short, round(min(mems), 1), ram, f"NVML: {len(handles)}× {name}")
    except Exception:  # no NVML library, no driver, no GPU: the host is the device
        return Cluster(1, 0, "CPU", 0.0, ram, "no GPU seen (NVML), host RAM from psutil")


def cluster(plan_cfg: Optional[dict]) -> Cluster:
    """The cluster a `plan:` config block describes (plan.gpus, plan.host_ram_gb)."""
    plan_cfg = plan_cfg or {}
    ram = plan_cfg.get("host_ram_gb")
    if ram is not None and ram <= 0:
        raise QllmConfigError(f"plan.host_ram_gb must be > 0 or null (this host's, or {HOST_RAM_PER_GPU_MEMORY:g}× "
                              f"the GPU memory of a node given by plan.gpus); got {ram}")
    spec = plan_cfg.get("gpus")
    return parse(spec, ram) if spec else discover(ram)
