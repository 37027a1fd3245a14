"""A planned Cell's memory plan: its workload, its architecture, the devices, and a StagePlan per stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..errors import QllmConfigError
from . import choose, gpus
from .choose import StagePlan
from .gpus import Cluster
from .memory import Arch, Workload, task_lengths


@dataclass(frozen=True)
class PlanSettings:
    """The `plan:` config block (qllm.config.PlanConfig) as the planner reads it."""

    gpus: Optional[str] = None
    host_ram_gb: Optional[float] = None
    safety: float = choose.SAFETY
    allow_offload: bool = False
    enforce: bool = True

    @classmethod
    def of(cls, plan_cfg: Any) -> "PlanSettings":
        d = dict(plan_cfg or {})
        known = {k: d[k] for k in ("gpus", "host_ram_gb", "safety", "allow_offload", "enforce") if k in d}
        s = cls(**known)
        if not 0 < s.safety <= 1:
            raise QllmConfigError(f"plan.safety must be in (0, 1] (the fraction of a device a plan may use); got "
                                  f"{s.safety}")
        return s

    def cluster(self) -> Cluster:
        return gpus.cluster({"gpus": self.gpus, "host_ram_gb": self.host_ram_gb})


@dataclass(frozen=True)
class CellPlan:
    name: str
    model: str
    cluster: Cluster
    stages: tuple[StagePlan, ...]
    assumptions: str = ""  # e.g. the assumed context length

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    @property
    def refusal(self) -> str:
        """Why the cell cannot run here (empty when it fits)."""
        return "; ".join(f"{s.stage}: {s.refusal}" for s in self.stages if not s.fits)

    def line(self) -> str:
        """One line per cell: what `qllm run` prints before the cell starts."""
        parts = []
        for s in self.stages:
            per = f"{s.peak_gb:.1f} GB" if s.devices == 1 else f"{s.peak_gb:.1f} GB × {s.devices}"
            where = f"on {s.device}" + (f", host {s.host.total:.1f} GB" if s.host is not None else "")
            parts.append(f"{s.stage} {s.launch}: {per} {where}" + ("" if s.fits else " (does not fit)")
                         + (f" [needs {' '.join(s.needs)}]" if s.needs else ""))
        return f"plan {self.name}: " + "; ".join(parts) + f" ({self.cluster.describe()})"


def arch_of(model: dict, data_dir: str = "", cache_dir: str = "") -> Arch:
    """The model's shapes: its config.json when on disk (qllm.sources.models.hf_config), else the YAML's `arch`."""
    config: Optional[dict] = None
    try:
        from ..sources import models

        config = models.hf_config(model, data_dir, cache_dir)
    except (QllmConfigError, OSError, KeyError):
        config = dict(model.get("arch") or {}) or None
    if not config:
        raise QllmConfigError(f"model '{model.get('name')}': no config.json and no `arch` to plan its memory from")
    try:
        return Arch.from_config(config, model.get("params_b") or 0.0)
    except KeyError as e:
        raise QllmConfigError(f"model '{model.get('name')}': its architecture lacks {e} (needed to plan memory)")


def _symmetric(recipe: dict) -> bool:
    if not recipe:
        return True
    from ..methods import scheme_of

    return scheme_of(recipe["quant_stage"]["quant_modifiers"]).symmetric


def workload_of(cell: Any, arch: Arch) -> Workload:
    ev = dict(cell.eval)
    batch = int(ev.get("batch_size") or 1)
    context, gen, batch_tokens = task_lengths(cell.tasks, ev.get("max_length"), arch, batch)
    calib = cell.calibration or {}
    return Workload(
        method=cell.method, bits=cell.bits, dtype=cell.model["dtype"], group_size=cell.group_size,
        symmetric=_symmetric(cell.recipe), calib_samples=int(calib.get("num_samples") or 0),
        calib_seq=int(calib.get("max_seq_len") or 0), calib_batch=int(calib.get("batch_size") or 1),
        backend=ev.get("backend", "hf"),
        batch_size=batch, context=context, gen_tokens=gen, batch_tokens=batch_tokens,
        max_model_len=int(ev.get("max_length") or ev.get("max_model_len") or arch.max_positions),
        vllm_dtype=ev.get("dtype") if ev.get("backend") == "vllm" and ev.get("dtype") else "bfloat16",
        gpu_memory_utilization=float(ev.get("gpu_memory_utilization") or 0.9),
        cpu_kv_cache_gb=float(ev.get("cpu_kv_cache_gb") or 1),
        tp=int(ev.get("tensor_parallel_size") or 1), pp=int(ev.get("pipeline_parallel_size") or 1),
        sensitivity=cell.method == "mixed" or bool(getattr(cell, "sensitivity", None)),
    )


def _vllm_runs(cell: Any) -> Optional[bool]:
    """Whether vLLM's GPU kernels run this cell's scheme (its SUPPORT table), None when that cannot be told."""
    try:
        from ..methods import Scheme, scheme_of
        from ..stages.backends.vllm import supported

        scheme = scheme_of(cell.recipe["quant_stage"]["quant_modifiers"]) if cell.recipe else Scheme()
        return supported("cuda", scheme)[0]
    except Exception:  # noqa: BLE001 - the table moved or changed: no opinion
        return None


def plan_cell_memory(cell: Any, settings: Optional[PlanSettings] = None, cluster: Optional[Cluster] = None,
                     arch: Optional[Arch] = None) -> CellPlan:
    """The memory plan of a planned Cell on `cluster` (default: what `settings` describe, else what this machine
    has)."""
    settings = settings or PlanSettings()
    cluster = cluster or settings.cluster()
    arch = arch or arch_of(cell.model, cell.data_dir, cell.cache_dir)
    work = workload_of(cell, arch)
    ctx = choose.Context(cell.model["name"], arch, work, cluster, settings.safety, settings.allow_offload,
                         _vllm_runs(cell), eval_on_cpu=cell.eval.get("device") == "cpu")
    stages = tuple(s for s in (choose.plan_quantize(ctx), choose.plan_evaluate(ctx)) if s is not None)
    assumed = f"eval context ~{work.context} tokens" + (f" + {work.gen_tokens} generated" if work.gen_tokens else "")
    return CellPlan(name=cell.name, model=cell.model["name"], cluster=cluster, stages=stages, assumptions=assumed)
