"""`launch.evaluate=deepspeed`: the evaluate stage under DeepSpeed's launcher, with the HF model split across the
GPUs by DeepSpeed's inference engine (AutoTP) when `autotp=true`: models whose dense weights exceed one GPU.

    {python} -m deepspeed.launcher.runner --num_gpus N --master_port {port} --no_local_rank
        [--num_nodes M --hostfile H --launcher slurm|pdsh|openmpi|...] --module qllm.stages.evaluate <args>

(On one node with CUDA_VISIBLE_DEVICES set, `--include localhost:<its first N ids>` instead of `--num_gpus N`,
which would make DeepSpeed take GPUs 0..N-1 whatever CUDA_VISIBLE_DEVICES says.)

(`python -m deepspeed.launcher.runner` is the `deepspeed` command run by qllm's interpreter: the ranks start in the
same environment.) With `autotp`, the N×M ranks hold one model together (tensor parallelism): each runs every
lm-eval request and rank 0 alone writes results (qllm.stages.process.is_main); the evaluate stage loads the model
through `qllm.stages.backends._deepspeed_tp`. Quantize is refused: llmcompressor has no DeepSpeed path (torchrun
runs its distributed GPTQ). Not run here: there is no GPU on the machine this was written on; the command lines are
tested as composed (tests/stages/test_launcher_deepspeed.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar, Optional

from ...errors import QllmConfigError
from . import LaunchContext, LauncherConfig, gpu_device_present
from . import visible_gpus as _gpus_visible  # noqa: F401 (tests patch it here)

AUTOTP_ENV = "QLLM_AUTOTP"  # the evaluate stage's hf backend loads through _deepspeed_tp.load_autotp when set

MULTINODE = ("pdsh", "slurm", "openmpi", "mvapich", "mpich", "impi")  # deepspeed --launcher choices


@dataclass
class DeepSpeedConfig(LauncherConfig):
    name: str = "deepspeed"
    nproc: int = 1  # GPUs (ranks) per node: deepspeed --num_gpus (or the first nproc of CUDA_VISIBLE_DEVICES)
    num_nodes: int = 1  # nodes: deepspeed --num_nodes (> 1 needs hostfile)
    hostfile: Optional[str] = None  # MPI-style hostfile ("node-0 slots=8" per line): deepspeed --hostfile
    multinode_launcher: str = "slurm"  # how deepspeed reaches the other nodes: deepspeed --launcher
    master_addr: Optional[str] = None  # deepspeed --master_addr (null: deepspeed infers it)
    # evaluate with eval=hf: split the model across all ranks with deepspeed.init_inference (AutoTP)
    autotp: bool = True


class DeepSpeedLauncher:
    name: ClassVar[str] = "deepspeed"
    config: ClassVar[type] = DeepSpeedConfig

    def validate(self, settings: dict, stage: str, cfg: dict) -> None:
        if stage == "quantize":
            raise QllmConfigError(
                "launch.quantize=deepspeed: llmcompressor has no DeepSpeed path (its oneshot quantizes on one "
                "process, or distributed under torchrun); use launch.quantize=torchrun (or local), and deepspeed "
                "for launch.evaluate")
        for key in ("nproc", "num_nodes"):
            if settings[key] < 1:
                raise QllmConfigError(f"launch.{stage}.{key} must be >= 1; got {settings[key]}")
        if settings["multinode_launcher"] not in MULTINODE:
            raise QllmConfigError(f"launch.{stage}.multinode_launcher={settings['multinode_launcher']!r}; valid: "
                                  f"{', '.join(MULTINODE)}")
        if settings["num_nodes"] > 1 and not settings["hostfile"]:
            raise QllmConfigError(f"launch.{stage}.num_nodes={settings['num_nodes']} needs launch.{stage}.hostfile "
                                  "(an MPI-style hostfile: one 'node-name slots=<GPUs>' line per node)")
        if settings["hostfile"] and not os.path.isfile(settings["hostfile"]):
            raise QllmConfigError(f"launch.{stage}.hostfile={settings['hostfile']!r} is not a file")
        ev = cfg.get("eval") or {}
        backend = ev.get("backend", "hf")
        if stage == "evaluate" and backend != "hf":
            hint = (" (vLLM parallelizes itself: eval.tensor_parallel_size / pipeline_parallel_size, and "
                    "launch.evaluate=vllm_multinode across nodes)") if backend == "vllm" else ""
            raise QllmConfigError(f"launch.evaluate=deepspeed runs the hf backend (DeepSpeed AutoTP over "
                                  f"transformers); this cell has eval={backend}{hint}; valid: eval=hf")
        device = str(ev.get("device", "auto"))
        if device == "cpu" or device.startswith("mps"):
            raise QllmConfigError(f"launch.{stage}=deepspeed splits the model across GPUs (AutoTP); eval.device="
                                  f"{device} runs on no GPU; valid: eval.device=auto or cuda (or launch.{stage}=local "
                                  "for CPU)")
        ids = _visible_ids() if _single_node(settings) else None
        if ids and not all(i.isdigit() for i in ids):
            raise QllmConfigError(f"CUDA_VISIBLE_DEVICES={','.join(ids)!r} does not name GPUs by index (UUIDs, MIG "
                                  f"ids); launch.{stage}=deepspeed hands them to DeepSpeed, which takes indices "
                                  "(--include localhost:<ids>); valid: CUDA_VISIBLE_DEVICES as GPU indices (0,1,2,3)")
        if ids and len(ids) < settings["nproc"]:
            raise QllmConfigError(f"launch.{stage}.nproc={settings['nproc']}: DeepSpeed tensor parallelism needs one "
                                  f"GPU per rank, and CUDA_VISIBLE_DEVICES={','.join(ids)!r} lists {len(ids)}; valid: "
                                  f"nproc <= {len(ids)}")
        if settings["num_nodes"] == 1:
            seen = _gpus_visible()
            if seen is not None and seen < settings["nproc"]:
                raise QllmConfigError(
                    f"launch.{stage}.nproc={settings['nproc']}: DeepSpeed tensor parallelism needs one GPU per rank, "
                    f"and this machine shows {seen} (NVML" + (", CUDA_VISIBLE_DEVICES" if
                                                             "CUDA_VISIBLE_DEVICES" in os.environ else "") + ")"
                    + ("; plan on the GPU node, or use launch.evaluate=local" if seen == 0 else
                       f"; valid: nproc <= {seen}"))
            # seen None: no NVML here (a login node, another vendor): the job's node decides; the stage fails there

    def command(self, settings: dict, module: str, args: list[str], ctx: LaunchContext) -> list[str]:
        ids = _visible_ids() if _single_node(settings) else None
        # DeepSpeed drops CUDA_VISIBLE_DEVICES when --num_gpus is given: on one node, name the GPUs it lists instead
        gpus = ["--include", "localhost:" + ",".join(ids[:settings["nproc"]])] if ids else \
            ["--num_gpus", str(settings["nproc"])]
        cmd = [ctx.python, "-m", "deepspeed.launcher.runner", *gpus, "--master_port", str(ctx.port), "--no_local_rank"]
        if settings["num_nodes"] > 1 or settings["hostfile"]:
            cmd += ["--num_nodes", str(settings["num_nodes"]), "--hostfile", str(settings["hostfile"]),
                    "--launcher", settings["multinode_launcher"]]
        if settings["master_addr"]:
            cmd += ["--master_addr", settings["master_addr"]]
        return cmd + ["--module", module, *args]

    def env(self, settings: dict, ctx: LaunchContext) -> dict[str, str]:
        # QLLM_AUTOTP: the evaluate stage (eval=hf) loads through _deepspeed_tp.load_autotp with this many ranks;
        # DS_ACCELERATOR=cuda: DeepSpeed skips its accelerator detection (and its warning on nodes it misreads)
        env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda")}
        if settings["autotp"]:
            env[AUTOTP_ENV] = str(self.ranks(settings))
        return env

    def ranks(self, settings: dict) -> int:
        return settings["nproc"] * settings["num_nodes"]


def _single_node(settings: dict) -> bool:
    """DeepSpeed launches on this node alone (no hostfile): the case in which it reads CUDA_VISIBLE_DEVICES."""
    return settings["num_nodes"] == 1 and not settings["hostfile"]


def _visible_ids() -> Optional[list[str]]:
    """The GPU ids CUDA_VISIBLE_DEVICES lists, or None when it lists none (unset: every GPU, for --num_gpus)."""
    ids = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip() not in ("", "-1")]
    return ids or None


def quiet_env(environ: Optional[dict] = None) -> dict[str, str]:
    """Environment that keeps DeepSpeed's import-time accelerator warning ("Setting accelerator to CPU ...", printed on
    stdout by every process that imports deepspeed, e.g. through accelerate when transformers saves a model) away on a
    machine without GPUs: DS_ACCELERATOR=cpu, which is what DeepSpeed would pick anyway. Nothing where a GPU device
    node exists (DeepSpeed then finds CUDA itself, silently) or DS_ACCELERATOR is already set. No torch import. The
    runner adds it to every stage's environment, whatever the launcher."""
    environ = os.environ if environ is None else environ
    if "DS_ACCELERATOR" in environ or gpu_device_present(environ):
        return {}
    return {"DS_ACCELERATOR": "cpu"}


LAUNCHER = DeepSpeedLauncher
