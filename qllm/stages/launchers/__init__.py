"""Stage launchers: the command line and environment that start one stage (quantize, evaluate) of one cell.

A launcher is one module here plus one YAML in conf/launch/ (`launch.quantize=<name>`, `launch.evaluate=<name>`):

    qllm/stages/launchers/<name>.py  a config dataclass (subclass of LauncherConfig) and a class implementing
                                     Launcher, exported as `LAUNCHER`
    conf/launch/<name>.yaml          `defaults: [<name>_schema, _self_]` and the settings' defaults

A launcher only builds the command. What every launcher needs is done once, by qllm.stages.runner: the stage runs
in its own process group; Ctrl-C, SIGTERM or `timeout_s` end the whole group; output is streamed and kept as a log;
a free rendezvous port is chosen per cell (`{port}` in a command, MASTER_PORT in the environment); ranks other than
the main one write no results (qllm.stages.process).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Protocol, runtime_checkable

from omegaconf import MISSING

from ... import plugins


@dataclass
class LauncherConfig:
    """Settings every launcher has."""

    name: str = MISSING
    timeout_s: Optional[float] = None  # end the stage (its whole process group) after this many seconds


@dataclass(frozen=True)
class LaunchContext:
    """What a launcher may put into a command: the interpreter running qllm, the cell's free rendezvous port, the
    stage's working dir."""

    python: str
    port: int
    workdir: Path


@runtime_checkable
class Launcher(Protocol):
    name: ClassVar[str]
    config: ClassVar[type[LauncherConfig]]

    def validate(self, settings: dict, stage: str, cfg: dict) -> None:
        """Planning: refuse settings that cannot launch this stage of this cell (QllmConfigError naming the key and
        what is valid). `cfg` is the cell's resolved config (model, method, eval, ...): a launcher may refuse a
        method its library cannot distribute, or a backend it cannot start."""

    def command(self, settings: dict, module: str, args: list[str], ctx: LaunchContext) -> list[str]:
        """The command line that runs `python -m <module> <args>` under this launcher."""

    def env(self, settings: dict, ctx: LaunchContext) -> dict[str, str]:
        """Environment variables to add for the stage."""

    def ranks(self, settings: dict) -> int:
        """How many processes (ranks) the stage runs as."""


def visible_gpus() -> Optional[int]:
    """NVIDIA GPUs this process may use, without importing torch (planning stays light): NVML's device count,
    narrowed by CUDA_VISIBLE_DEVICES; None when NVML cannot tell (no driver library: a CPU machine, a login node,
    another vendor's GPUs)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception:  # noqa: BLE001 (NVMLError subclasses, or no pynvml)
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"]))
    return count


GPU_DEVICE_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")  # NVIDIA, AMD (ROCm), WSL


def gpu_device_present(environ: Optional[dict] = None) -> bool:
    """Whether a GPU device node exists and CUDA_VISIBLE_DEVICES does not hide every GPU: what still tells a machine
    with GPUs NVML cannot count (another vendor's) from one without any. No torch import."""
    environ = os.environ if environ is None else environ
    if environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return any(os.path.exists(p) for p in GPU_DEVICE_NODES)


def no_gpu() -> bool:
    """This machine has no GPU for a stage: NVML counts none visible, or NVML cannot tell and there is no GPU device
    node either. (`not visible_gpus()` would take None, "NVML cannot tell", for no GPU: wrong on AMD GPUs.)"""
    seen = visible_gpus()
    return seen == 0 or (seen is None and not gpu_device_present())


def names() -> list[str]:
    """The launchers there are (`launch.<stage>=<name>`)."""
    return plugins.names(sys.modules[__name__])


def get(name: str) -> Launcher:
    """The launcher called `name`, or a QllmConfigError listing the ones there are."""
    return plugins.load(sys.modules[__name__], name, "LAUNCHER", "stage launcher")
