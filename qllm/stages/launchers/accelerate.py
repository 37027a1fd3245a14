"""`launch.evaluate=accelerate`: lm-eval's hf backend under `accelerate launch`, in one of two modes.

- `data_parallel`: `num_processes` ranks (one per GPU; on CPU, processes sharing the cores), each evaluating its
  share of the requests; lm-eval gathers them on the main rank (the per-item results equal one process's: tested).
  lm-eval splits requests only when it sees GPUs; on CPU the hf backend sets its ranks from accelerate's state
  (qllm/stages/backends/hf.py), which is what makes the same command work on a laptop.
- `sharded`: one process whose model is spread by transformers' device_map="auto" over every visible GPU, then host
  RAM (`max_cpu_memory_gb`), then disk (`offload_folder`) as the last resort: a model larger than one GPU.

The config files are under launch/accelerate/ (the command-line flags qllm adds win over them). The quantize stage
is not an accelerate job (llmcompressor distributes through torchrun: launch.quantize=torchrun). One machine only:
qllm starts a stage on its own machine and nothing on others (vllm_multinode spans nodes for evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from ...errors import QllmConfigError
from . import LaunchContext, LauncherConfig, no_gpu
from .torchrun import threads_per_rank

CONFIG_DIR = Path(__file__).resolve().parents[3] / "launch" / "accelerate"
MODES = ("data_parallel", "sharded")
# what the hf backend reads (set in the stage's environment, so launch_evaluate.sh carries it too)
DEVICE_MAP_ENV, MAX_CPU_ENV, OFFLOAD_ENV = "QLLM_HF_DEVICE_MAP", "QLLM_HF_MAX_CPU_MEMORY_GB", "QLLM_HF_OFFLOAD_DIR"


@dataclass
class AccelerateConfig(LauncherConfig):
    name: str = "accelerate"
    mode: str = "data_parallel"  # data_parallel | sharded
    num_processes: int = 2  # data_parallel: ranks on this machine (one per GPU)
    num_machines: int = 1  # 1 only: qllm starts a stage on one machine (more are refused at planning)
    machine_rank: int = 0
    main_process_ip: Optional[str] = None  # passed on as --main_process_ip (one machine needs none)
    config_file: Optional[str] = None  # null: launch/accelerate/<mode>.yaml
    cpu: Optional[bool] = None  # null: when this machine has no GPU
    max_cpu_memory_gb: Optional[float] = None  # sharded: host RAM the model may use before spilling to disk
    offload_folder: Optional[str] = None  # sharded: where weights that fit nowhere else go (null: no disk offload)


class AccelerateLauncher:
    name: ClassVar[str] = "accelerate"
    config: ClassVar[type] = AccelerateConfig

    def validate(self, settings: dict, stage: str, cfg: dict) -> None:
        if stage != "evaluate":
            raise QllmConfigError("launch.quantize=accelerate: llmcompressor distributes calibration through "
                                  "torchrun, not accelerate; use launch.quantize=torchrun (or local)")
        if cfg["eval"]["backend"] != "hf":
            raise QllmConfigError(f"launch.evaluate=accelerate runs lm-eval's hf backend; eval="
                                  f"{cfg['eval']['backend']} parallelises itself (eval.tensor_parallel_size ...)")
        if settings["mode"] not in MODES:
            raise QllmConfigError(f"launch.evaluate.mode={settings['mode']!r}; valid: {', '.join(MODES)}")
        for key in ("num_processes", "num_machines"):
            if settings[key] < 1:
                raise QllmConfigError(f"launch.evaluate.{key} must be >= 1; got {settings[key]}")
        if settings["num_machines"] > 1 or settings["machine_rank"] != 0:
            raise QllmConfigError(
                f"launch.evaluate.num_machines={settings['num_machines']} (machine_rank={settings['machine_rank']}): "
                "qllm starts the evaluate stage on one machine and nothing on the others, so accelerate would wait "
                "for machines that never join; valid: num_machines=1, machine_rank=0; for evaluation across "
                "nodes use launch.evaluate=vllm_multinode (eval=vllm on a Ray cluster), or launch.evaluate=deepspeed "
                "with a hostfile (DeepSpeed starts the other nodes)")
        if settings["mode"] == "sharded" and self.ranks(settings) != 1:
            raise QllmConfigError("launch.evaluate.mode=sharded is one process spread over the GPUs: keep "
                                  "num_processes=1 (data_parallel for several processes)")
        if self.ranks(settings) > 1 and cfg["profile"]["speed"]:
            raise QllmConfigError("profile.speed=true measures one process's speed; under data parallelism the ranks "
                                  "would share (and skew) it: measure speed with launch.evaluate=local")
        if settings["config_file"] and not Path(settings["config_file"]).is_file():
            raise QllmConfigError(f"launch.evaluate.config_file={settings['config_file']!r} does not exist")

    def command(self, settings: dict, module: str, args: list[str], ctx: LaunchContext) -> list[str]:
        config = settings["config_file"] or str(CONFIG_DIR / f"{settings['mode']}.yaml")
        cmd = [ctx.python, "-m", "accelerate.commands.launch", "--config_file", config,
               "--num_processes", str(settings["num_processes"]), "--num_machines", str(settings["num_machines"]),
               "--machine_rank", str(settings["machine_rank"]), "--main_process_port", str(ctx.port)]
        if settings["main_process_ip"]:
            cmd += ["--main_process_ip", settings["main_process_ip"]]
        if settings["mode"] == "data_parallel" and self.ranks(settings) > 1:
            cmd += ["--multi_gpu"]  # accelerate's torchrun-based launcher; on CPU with ACCELERATE_USE_CPU (env)
        elif self._cpu(settings):
            cmd += ["--cpu"]
        return cmd + ["-m", module, *args]

    @staticmethod
    def _cpu(settings: dict) -> bool:
        return settings["cpu"] if settings["cpu"] is not None else no_gpu()

    def env(self, settings: dict, ctx: LaunchContext) -> dict[str, str]:
        if settings["mode"] == "data_parallel":
            # accelerate's `--cpu` starts several CPU processes only through MPI (mpirun); its torchrun-based
            # launcher with ACCELERATE_USE_CPU gives the same MULTI_CPU (gloo) state without it
            cpu = {"ACCELERATE_USE_CPU": "1"} if self._cpu(settings) and self.ranks(settings) > 1 else {}
            return cpu | threads_per_rank(settings["num_processes"])
        env = {DEVICE_MAP_ENV: "auto"}
        if settings["max_cpu_memory_gb"] is not None:
            env[MAX_CPU_ENV] = str(settings["max_cpu_memory_gb"])
        if settings["offload_folder"]:
            env[OFFLOAD_ENV] = settings["offload_folder"]
        return env

    def ranks(self, settings: dict) -> int:
        return settings["num_processes"]  # one machine (validate); accelerate's --num_processes is the total anyway


LAUNCHER = AccelerateLauncher
