"""`launch.<stage>=torchrun`: the stage as `nproc_per_node` ranks per node under PyTorch's elastic launcher
(`python -m torch.distributed.run`), rendezvous on the cell's free port.

Quantize: llmcompressor 0.14's own distributed calibration. Each rank calibrates on its share of the calibration
samples; GPTQ reduces every Hessian to the rank that owns the layer, which quantizes it and broadcasts the result
(modifiers/gptq/base.py). What 0.14 supports is `SUPPORT` below, checked at planning: measured on this CPU with 2
gloo ranks (tests/e2e/test_distributed.py), read from the library's sources otherwise.
Evaluate (eval=hf): lm-eval's data parallelism (it reads the ranks from the environment, as under accelerate).
One node only: qllm's orchestrator starts a stage on its own node and nothing on the others (vllm_multinode spans
nodes for evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from ...errors import QllmConfigError
from . import LaunchContext, LauncherConfig, no_gpu

# method -> (runs under torchrun, why). "gpu" = only where the stage has an accelerator.
SUPPORT: dict[str, tuple[str, str]] = {
    "gptq": ("yes", "Hessians reduced across ranks (each rank calibrates its share of the samples); with qllm's two "
                    "fixes (stages/compat.py) the checkpoint equals one process's exactly (measured, 2 CPU ranks)"),
    "awq": ("gpu", "llmcompressor 0.14's AWQ all-reduce asks torch.accelerator for a device: it fails on a CPU-only "
                   "machine ('NoneType' object has no attribute 'type'); on GPUs it runs (not measured here)"),
    "smoothquant": ("no", "measured on 2 CPU ranks with llmcompressor 0.14: the smoothing scales differ from one "
                          "process's (k_proj weights off by up to 2.5): refused until that is understood"),
    "rtn": ("no", "no calibration: nothing to split across ranks (one process does it in seconds)"),
    "fp8": ("no", "no calibration: nothing to split across ranks (one process does it in seconds)"),
}


@dataclass
class TorchrunConfig(LauncherConfig):
    name: str = "torchrun"
    nproc_per_node: int = 2
    nnodes: int = 1  # 1 only: qllm starts a stage on one node (more are refused at planning)
    node_rank: int = 0
    rdzv_backend: str = "c10d"
    rdzv_endpoint: Optional[str] = None  # host:port to meet at; null: 127.0.0.1 and the cell's free port
    max_restarts: int = 0  # a failed rank fails the stage (and the cell); no elastic restarts


class TorchrunLauncher:
    name: ClassVar[str] = "torchrun"
    config: ClassVar[type] = TorchrunConfig

    def validate(self, settings: dict, stage: str, cfg: dict) -> None:
        for key in ("nproc_per_node", "nnodes"):
            if settings[key] < 1:
                raise QllmConfigError(f"launch.{stage}.{key} must be >= 1; got {settings[key]}")
        if settings["nnodes"] > 1:
            raise QllmConfigError(_multinode_refusal(stage, settings["nnodes"]))
        if not 0 <= settings["node_rank"] < settings["nnodes"]:
            raise QllmConfigError(f"launch.{stage}.node_rank={settings['node_rank']} must be in "
                                  f"[0, nnodes={settings['nnodes']})")
        if stage == "quantize":
            if cfg["method"].get("bits_allowed"):  # the baseline has no quantize stage
                self._validate_quantize(settings, cfg)
            return
        if cfg["eval"]["backend"] != "hf":
            raise QllmConfigError(f"launch.evaluate=torchrun runs lm-eval's hf backend (data parallel); "
                                  f"eval={cfg['eval']['backend']} starts its own workers: use "
                                  f"eval.tensor_parallel_size / eval.data_parallel_size (or launch.evaluate="
                                  "vllm_multinode) with launch.evaluate=local")
        if self.ranks(settings) > 1 and cfg["profile"]["speed"]:
            raise QllmConfigError(f"profile.speed=true measures one process's speed; launch.evaluate=torchrun runs "
                                  f"{self.ranks(settings)} ranks, which would share (and skew) it: measure speed "
                                  "with launch.evaluate=local, or set profile.speed=false")

    def _validate_quantize(self, settings: dict, cfg: dict) -> None:
        method = cfg["method"]["name"]
        runs, why = SUPPORT.get(method, ("no", "not known to llmcompressor's distributed path"))
        if runs == "gpu" and no_gpu():
            runs = "no"
        if runs == "no":
            ok = ", ".join(m for m, (r, _) in SUPPORT.items() if r == "yes")
            raise QllmConfigError(f"launch.quantize=torchrun cannot run method={method}: {why}. Methods it runs "
                                  f"here: {ok}; use launch.quantize=local for {method}")
        ranks = self.ranks(settings)
        samples = cfg["calibration"]["num_samples"] if cfg["method"].get("calibrate") else None
        if samples is not None and samples < ranks:  # each rank calibrates on its own share: none for some
            raise QllmConfigError(f"calibration.num_samples={samples} is fewer than the {ranks} ranks of "
                                  "launch.quantize=torchrun: each rank calibrates on its own share of the samples, "
                                  f"and a rank with none cannot take part; valid: calibration.num_samples >= {ranks}, "
                                  f"or launch.quantize.nproc_per_node <= {samples}")

    def command(self, settings: dict, module: str, args: list[str], ctx: LaunchContext) -> list[str]:
        endpoint = settings["rdzv_endpoint"] or f"127.0.0.1:{ctx.port}"
        return [ctx.python, "-m", "torch.distributed.run", f"--nproc_per_node={settings['nproc_per_node']}",
                f"--nnodes={settings['nnodes']}", f"--node_rank={settings['node_rank']}",
                f"--rdzv_backend={settings['rdzv_backend']}", f"--rdzv_endpoint={endpoint}",
                f"--max_restarts={settings['max_restarts']}", "-m", module, *args]

    def env(self, settings: dict, ctx: LaunchContext) -> dict[str, str]:
        return threads_per_rank(settings["nproc_per_node"])

    def ranks(self, settings: dict) -> int:
        return settings["nproc_per_node"] * settings["nnodes"]


def _multinode_refusal(stage: str, nnodes: int) -> str:
    """Why nnodes > 1 is refused: torchrun needs the same launch run on every node, and qllm's orchestrator starts a
    stage on its own node only (under SLURM, every node would run its own orchestrator, each its own cell)."""
    instead = ("quantize on a single node (more ranks there only speed GPTQ up; every rank holds the whole model)"
               if stage == "quantize" else "for evaluation across nodes use launch.evaluate=vllm_multinode (eval=vllm "
               "on a Ray cluster), or launch.evaluate=deepspeed with a hostfile (DeepSpeed starts the other nodes)")
    return (f"launch.{stage}.nnodes={nnodes}: qllm starts the stage on one node and nothing on the others, so torchrun "
            f"would wait for nodes that never join; valid: launch.{stage}.nnodes=1; {instead}")


def threads_per_rank(nproc: int) -> dict[str, str]:
    """OMP threads per rank: this node's cores shared by its ranks (torchrun's default of 1 leaves cores idle when
    there are more cores than ranks; too many threads per rank oversubscribe them). A user's OMP_NUM_THREADS wins."""
    import os

    if os.environ.get("OMP_NUM_THREADS"):
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, nproc)))}


LAUNCHER = TorchrunLauncher
