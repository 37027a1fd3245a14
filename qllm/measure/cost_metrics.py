"""What a cell costs, as MLflow metrics: memory per stage, model size, quantization cost, speed.

    mem/<stage>/<what>_gb            whole stage process (quantize, evaluate): peak_rss (process + children),
                                     cuda_max_allocated, cuda_max_reserved, device_used (NVML)
    mem/<stage>/<phase>/<what>_gb    one phase of it: load, quantize, save (quantize stage); load, evaluate,
                                     benchmark, kl_reference, kl (evaluate stage)
    mem/<stage>/rank<r>/<what>_gb    a stage run as several ranks (torchrun, accelerate): each rank's peaks;
    mem/<stage>/max_rank/<what>_gb   the largest of them (what one device must hold), mem/<stage>/ranks the count,
    mem/<stage>/ranks_total_rss_gb   and the ranks' RSS added up (what one host holds when they share it)
    size/...                         the evaluated checkpoint: params, bits per weight, bytes on disk / in memory
    quantize/...                     making the checkpoint (from its manifest: also when the checkpoint was reused)
    speed/bs<b>/<figure>             prefill/decode tokens/s, TTFT/TPOT ms: median, with _min/_max for the spread

The names are built by qllm.names (mem_metric, size_metric, quantize_metric, speed_metric).
"""

from __future__ import annotations

from typing import Any, Optional

from ..names import Tag, mem_metric, quantize_metric, size_metric, speed_metric
from ..records import Manifest

MEMORY_KEYS = ("peak_rss_gb", "cuda_max_allocated_gb", "cuda_max_reserved_gb", "device_used_gb")


def memory(profile: dict) -> dict[str, float]:
    stage = profile["stage"]
    out = {mem_metric(stage, k): profile[k] for k in MEMORY_KEYS if profile.get(k) is not None}
    for phase, info in profile.get("phases", {}).items():
        out.update({mem_metric(stage, k, phase): info[k] for k in MEMORY_KEYS if info.get(k) is not None})
        out[mem_metric(stage, "wall_s", phase)] = info["wall_s"]
    return out


def ranks(main: dict, others: list[dict]) -> dict[str, float]:
    """Per-rank peaks and their maximum, for a stage that ran as several ranks (`others`: ranks 1.. as
    profiling.rank_profiles reads them); nothing for a single process."""
    if not others:
        return {}
    stage = main["stage"]
    every = [main | {"rank": 0}, *others]
    out: dict[str, float] = {mem_metric(stage, "ranks"): len(every),
                             mem_metric(stage, "ranks_total_rss_gb"): sum(p["peak_rss_gb"] for p in every)}
    for k in MEMORY_KEYS:
        values = {p["rank"]: p[k] for p in every if p.get(k) is not None}
        out.update({mem_metric(stage, k, f"rank{r}"): v for r, v in values.items()})
        if values:
            out[mem_metric(stage, k, "max_rank")] = max(values.values())
    return out


def quantization(manifest: Manifest) -> dict[str, float]:
    """The cost of making the checkpoint, as recorded when it was made."""
    out = {quantize_metric("wall_s"): manifest.wall_s["quantize"],
           quantize_metric("total_wall_s"): manifest.wall_s["total"],
           quantize_metric("calibration_tokens"): manifest.calibration_tokens,
           quantize_metric("calibration_samples"): manifest.calibration_samples}
    for k in MEMORY_KEYS:
        values = [p[k] for p in manifest.profile.values() if p.get(k) is not None]
        if values:
            out[quantize_metric(k)] = max(values)
    return out


def size(stats: dict, in_memory: Optional[dict]) -> dict[str, float]:
    out = {
        size_metric("params"): stats["params"],
        size_metric("quantized_params"): stats.get("quantized_params", 0),
        size_metric("bits_per_weight"): stats["bits_per_weight"],
        size_metric("tensor_gb"): stats["tensor_bytes"] / 1e9,
        size_metric("disk_gb"): stats["bytes_on_disk"] / 1e9,
        size_metric("checkpoint_mb"): stats["bytes_on_disk"] / 2**20,
    }
    if stats.get("bits_per_weight_quantized") is not None:
        out[size_metric("bits_per_weight_quantized")] = stats["bits_per_weight_quantized"]
    if in_memory:
        out[size_metric("weights_in_memory_gb")] = in_memory["bytes"] / 1e9
        # a serving engine (vLLM) also says what KV cache it allocated and how much its process tree holds
        for key, name in (("kv_cache_bytes", "kv_cache_gb"), ("rss_tree_bytes", "engine_rss_tree_gb")):
            if in_memory.get(key) is not None:
                out[size_metric(name)] = in_memory[key] / 1e9
    return out


def speed(result: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for bs, figures in result["per_batch"].items():
        for name, stats in figures.items():
            if not isinstance(stats, dict) or "median" not in stats:
                continue
            out[speed_metric(name, bs)] = stats["median"]
            out[speed_metric(f"{name}_min", bs)] = stats["min"]
            out[speed_metric(f"{name}_max", bs)] = stats["max"]
    for key in ("decode_bound_tok_s", "decode_fraction_of_bound", "decode_fraction_of_measured_bound"):
        if result.get(key) is not None:
            out[speed_metric(key)] = result[key]
    for key in ("requests_s", "output_tok_s", "total_tok_s"):  # many requests at once (engine backends)
        if (result.get("throughput") or {}).get(key) is not None:
            out[speed_metric(f"throughput_{key}")] = result["throughput"][key]
    bw = result.get("bandwidth") or {}
    for key in ("spec_gbs", "measured_gbs"):
        if bw.get(key) is not None:
            out[speed_metric(f"bandwidth_{key}")] = bw[key]
    return out


def speed_tags(result: dict) -> dict[str, Any]:
    dev = result.get("device") or {}
    return {Tag.SPEED_BACKEND: result.get("backend", ""), Tag.SPEED_DEVICE: dev.get("name", ""),
            Tag.SPEED_BANDWIDTH_USED: (result.get("bandwidth") or {}).get("used", "")}
