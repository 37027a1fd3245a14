"""`eval=hf`: lm-eval's HuggingFace backend (transformers), on CPU or one GPU.

transformers decompresses a compressed-tensors checkpoint to dense weights when it loads it: the scores are those of
the quantized weights, but memory and speed are those of a dense model ("dense" speed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

from ...errors import QllmConfigError
from ...methods import Scheme
from ..launchers import visible_gpus
from ..launchers.deepspeed import AUTOTP_ENV
from . import EvalBackendConfig

DEVICES = ("auto", "cpu", "cuda", "cuda:<index>", "mps")


@dataclass
class HFConfig(EvalBackendConfig):
    backend: str = "hf"
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N | mps


def _check_gpu(device: str, index: int) -> None:
    """eval.device=cuda[:N] on a machine without that GPU fails here, not after the quantize stage: NVML (the
    driver's library, no torch) says which GPUs this process sees, narrowed by CUDA_VISIBLE_DEVICES
    (launchers.visible_gpus)."""
    count = visible_gpus()
    if count is None:
        raise QllmConfigError(f"eval.device={device!r}, but no NVIDIA GPU is visible here (NVML cannot count any: "
                              "no NVIDIA driver here); valid here: auto, cpu")
    if index >= count:
        raise QllmConfigError(f"eval.device={device!r}, but this process sees {count} GPU(s): valid: auto, cpu"
                              + (", cuda, " + ", ".join(f"cuda:{i}" for i in range(count)) if count else ""))


class HFBackend:
    name: ClassVar[str] = "hf"
    config: ClassVar[type] = HFConfig
    speed_kind: ClassVar[str] = "dense"
    fuses_projections: ClassVar[bool] = False
    speed_note: ClassVar[str] = ("hf (dense weights: compressed-tensors checkpoints are decompressed on load; this is "
                                 "dense speed, not the speed of low-bit kernels)")
    speed_tag: ClassVar[str] = "dense (hf backend decompresses weights)"
    libraries: ClassVar[tuple[str, ...]] = ("torch", "transformers", "lm_eval", "compressed-tensors")

    def validate(self, settings: dict, model: dict, scheme: Scheme,
                 config: Callable[[], Optional[dict]]) -> None:
        """Every scheme runs (transformers decompresses it); only the device is checked."""
        device = settings["device"]
        base, _, index = device.partition(":")
        if base not in ("auto", "cpu", "cuda", "mps") or (index and (base != "cuda" or not index.isdigit())):
            raise QllmConfigError(f"eval.device={device!r} is not a device the hf backend knows; valid: "
                                  f"{', '.join(DEVICES)}")
        if base == "cuda":
            _check_gpu(device, int(index or 0))

    def versions(self, settings: dict) -> dict[str, str]:
        from ...cell import versions

        return versions(self.libraries)

    def python(self, settings: dict) -> Optional[str]:
        return None

    def env(self, settings: dict) -> dict[str, str]:
        return {}

    def device(self, settings: dict) -> str:
        import torch

        if settings["device"] == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return settings["device"]

    def load(self, settings: dict, model: dict, model_path: str, quantized: bool, seed: int) -> Any:
        import torch
        from lm_eval.models.huggingface import HFLM

        torch.manual_seed(seed)
        rev = model["revision"] if (model["source"] == "hub" and not quantized) else None
        if os.environ.get(AUTOTP_ENV):  # launch.evaluate=deepspeed autotp=true: one model split over the ranks
            from ._deepspeed_tp import load_autotp

            return load_autotp(model_path, tp_size=int(os.environ[AUTOTP_ENV]), dtype=model["dtype"],
                               revision=rev or "main", trust_remote_code=bool(model.get("trust_remote_code")),
                               batch_size=settings["batch_size"], max_length=settings.get("max_length"))
        lm = HFLM(
            pretrained=model_path,
            revision=rev or "main",
            dtype=model["dtype"],
            device=self.device(settings),
            batch_size=settings["batch_size"],
            max_length=settings.get("max_length"),
            trust_remote_code=bool(model.get("trust_remote_code")),
            **_sharding(),
        )
        _cpu_data_parallel(lm)
        return lm

    def tokenizer(self, lm: Any) -> Any:
        return lm.tokenizer

    def fingerprint(self, lm: Any, group_size: Optional[int]) -> dict:
        from ...measure.fingerprint import weight_fingerprint

        return weight_fingerprint(lm.model, group_size)

    def weights_in_memory(self, lm: Any) -> Optional[dict]:
        from ...measure.sizes import weights_in_memory

        return weights_in_memory(lm.model)

    def benchmark(self, lm: Any, speed: dict, seed: int) -> dict:
        from ...measure.speed import benchmark

        return benchmark(lm.model, lm.tokenizer, batch_sizes=tuple(speed["speed_batch_sizes"]),
                         prompt_len=speed["speed_prompt_len"], output_len=speed["speed_output_len"],
                         warmup=speed["speed_warmup"], repeats=speed["speed_repeats"], seed=seed,
                         note=self.speed_note)


def _sharding() -> dict:
    """launch.evaluate=accelerate mode=sharded (its environment): one process, the model spread by device_map=auto
    over the GPUs, then host RAM, then disk (lm-eval's `parallelize` and its memory/offload arguments)."""
    from ..launchers.accelerate import DEVICE_MAP_ENV, MAX_CPU_ENV, OFFLOAD_ENV

    if os.environ.get(DEVICE_MAP_ENV) != "auto":
        return {}
    out: dict = {"parallelize": True, "offload_folder": os.environ.get(OFFLOAD_ENV) or None}
    if os.environ.get(MAX_CPU_ENV):
        out["max_cpu_memory"] = f"{float(os.environ[MAX_CPU_ENV]):g}GB"
    return out


def _cpu_data_parallel(lm: Any) -> None:
    """lm-eval 0.4.13 splits requests across accelerate's processes only when it counts GPUs (huggingface.py: `elif
    gpus > 1`); on CPU every rank would evaluate everything. Its gather/barrier already go through the Accelerator
    it keeps, so giving it the ranks is all data parallelism needs there."""
    acc = getattr(lm, "accelerator", None)
    if acc is not None and acc.num_processes > 1 and lm.world_size == 1 and lm.device.type == "cpu":
        lm._rank, lm._world_size = acc.process_index, acc.num_processes


BACKEND = HFBackend
