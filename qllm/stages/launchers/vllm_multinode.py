"""`launch.evaluate=vllm_multinode`: the evaluate stage of an `eval=vllm` cell on a Ray cluster that spans the nodes of
the SLURM allocation, so that one vLLM engine runs TP×PP workers over several nodes
(`eval.distributed_executor_backend=ray`): e.g. Llama-3.1-405B bf16 on 2×8 GPUs with eval.tensor_parallel_size=8,
eval.pipeline_parallel_size=2.

The command is launch/ray_slurm.sh: Ray head on the first node, workers on the others (each an `srun --overlap`
step), a wait until every node joined (`ray_start_timeout_s`), the stage on the head with RAY_ADDRESS, and `ray stop`
on every node when the stage ends, fails, or is sent SIGTERM (SLURM's time limit, qllm's timeout_s). Ray is the
distributed engine; qllm schedules nothing. The stage runs under the vLLM environment's python (runner.evaluate
passes it); `ray` is the one beside it unless `ray` says otherwise.

Not run here (no SLURM cluster or GPUs on the machine this was written on): tests/stages/test_launcher_vllm_multinode
checks the command, the script's syntax, and its order of events under stub scontrol/srun/ray executables.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from ...errors import QllmConfigError
from . import LaunchContext, LauncherConfig

SCRIPT = Path(__file__).resolve().parents[3] / "launch" / "ray_slurm.sh"


@dataclass
class VLLMMultinodeConfig(LauncherConfig):
    name: str = "vllm_multinode"
    nodes: Optional[int] = None  # nodes of the Ray cluster (null: every node of the allocation)
    gpus_per_node: Optional[int] = None  # GPUs each node gives Ray (null: what Ray detects)
    ray_port: Optional[int] = None  # the Ray head's port (null: the cell's rendezvous port, {port})
    ray_start_timeout_s: float = 600.0  # until every node has joined the cluster
    ray: Optional[str] = None  # the ray executable (null: the one beside the stage's python)


class VLLMMultinodeLauncher:
    name: ClassVar[str] = "vllm_multinode"
    config: ClassVar[type] = VLLMMultinodeConfig

    def validate(self, settings: dict, stage: str, cfg: dict) -> None:
        if stage != "evaluate":
            raise QllmConfigError(f"launch.{stage}=vllm_multinode runs the evaluate stage only (a vLLM engine over a "
                                  f"Ray cluster); valid for launch.{stage}: local, torchrun")
        for key in ("nodes", "gpus_per_node", "ray_port"):
            if settings[key] is not None and settings[key] < 1:
                raise QllmConfigError(f"launch.evaluate.{key} must be >= 1 or null; got {settings[key]}")
        if settings["ray_start_timeout_s"] <= 0:
            raise QllmConfigError(f"launch.evaluate.ray_start_timeout_s must be > 0; got "
                                  f"{settings['ray_start_timeout_s']}")
        ev = cfg.get("eval") or {}
        if ev.get("backend") != "vllm":
            raise QllmConfigError(f"launch.evaluate=vllm_multinode starts a vLLM engine over Ray; this cell has "
                                  f"eval={ev.get('backend')}; valid: eval=vllm (for hf across GPUs: "
                                  "launch.evaluate=deepspeed or accelerate)")
        if ev.get("distributed_executor_backend") != "ray":
            raise QllmConfigError("launch.evaluate=vllm_multinode needs eval.distributed_executor_backend=ray (vLLM "
                                  "places its workers on the Ray cluster this launcher starts); got "
                                  f"{ev.get('distributed_executor_backend')!r}")
        if ev.get("device") == "cpu":
            raise QllmConfigError("launch.evaluate=vllm_multinode is for GPU nodes; eval.device=cpu; valid: auto, cuda")
        tp, pp = int(ev.get("tensor_parallel_size", 1)), int(ev.get("pipeline_parallel_size", 1))
        if settings["nodes"] and settings["gpus_per_node"]:
            gpus = settings["nodes"] * settings["gpus_per_node"]
            if tp * pp > gpus:
                raise QllmConfigError(
                    f"eval.tensor_parallel_size × eval.pipeline_parallel_size = {tp} × {pp} = {tp * pp} GPUs, more "
                    f"than launch.evaluate.nodes × gpus_per_node = {settings['nodes']} × "
                    f"{settings['gpus_per_node']} = {gpus}")
        if os.environ.get("SLURM_JOB_NUM_NODES") and settings["nodes"] and \
                int(os.environ["SLURM_JOB_NUM_NODES"]) < settings["nodes"]:
            raise QllmConfigError(f"launch.evaluate.nodes={settings['nodes']}, but this SLURM job has "
                                  f"{os.environ['SLURM_JOB_NUM_NODES']} node(s) (hydra.launcher.nodes)")

    def command(self, settings: dict, module: str, args: list[str], ctx: LaunchContext) -> list[str]:
        ray = settings["ray"] or str(Path(ctx.python).parent / "ray")
        cmd = ["bash", str(SCRIPT), "--port", str(settings["ray_port"] or ctx.port), "--ray", ray,
               "--timeout", str(math.ceil(settings["ray_start_timeout_s"]))]  # whole seconds: bash counts them
        if settings["nodes"]:
            cmd += ["--nodes", str(settings["nodes"])]
        if settings["gpus_per_node"]:
            cmd += ["--gpus-per-node", str(settings["gpus_per_node"])]
        return cmd + ["--", ctx.python, "-m", module, *args]

    def env(self, settings: dict, ctx: LaunchContext) -> dict[str, str]:
        return {}

    def ranks(self, settings: dict) -> int:
        return 1  # one driver process (vLLM's workers are Ray actors, not qllm ranks)


LAUNCHER = VLLMMultinodeLauncher
