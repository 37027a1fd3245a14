"""`launch.<stage>=local`: the stage as one local process, `prefix + ["-m", module, *args]`.

`prefix` is a command line whose `{python}` is the interpreter running qllm and `{port}` the cell's free rendezvous
port, so a hand-written launch needs no new module:
`launch.evaluate.prefix="['{python}',-m,torch.distributed.run,--nproc_per_node=2,'--master_port={port}']"`
(say how many processes that starts with `launch.evaluate.nproc`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...errors import QllmConfigError
from . import LaunchContext, LauncherConfig


@dataclass
class LocalConfig(LauncherConfig):
    name: str = "local"
    prefix: list[str] = field(default_factory=lambda: ["{python}"])
    nproc: int = 1  # processes the prefix starts (ranks), for the main-rank rules


class LocalLauncher:
    name: ClassVar[str] = "local"
    config: ClassVar[type] = LocalConfig

    def validate(self, settings: dict, stage: str, cfg: dict) -> None:
        if not settings["prefix"]:
            raise QllmConfigError("launch prefix is empty; it starts the stage's interpreter, e.g. ['{python}']")
        if settings["nproc"] < 1:
            raise QllmConfigError(f"launch nproc must be >= 1; got {settings['nproc']}")

    def command(self, settings: dict, module: str, args: list[str], ctx: LaunchContext) -> list[str]:
        # only these two placeholders: any other brace in a prefix (a `python -c` script) stays as it is
        return [p.replace("{python}", ctx.python).replace("{port}", str(ctx.port)) for p in settings["prefix"]] \
            + ["-m", module, *args]

    def env(self, settings: dict, ctx: LaunchContext) -> dict[str, str]:
        return {}

    def ranks(self, settings: dict) -> int:
        return settings["nproc"]


LAUNCHER = LocalLauncher
