"""MLflow names for what a cell costs: memory per stage, model size, quantization cost, speed.

    mem/<stage>/<what>_gb            whole stage process (quantize, evaluate): peak_rss (process + children),
                                     cuda_max_allocated, cuda_max_reserved, device_used (NVML)
    mem/<stage>/<phase>/<what>_gb    one phase of it: load, quantize, save (quantize stage); load, evaluate,
                                     benchmark (evaluate stage)
    size/...                         the evaluated checkpoint: params, bits per weight, bytes on disk / in memory
    quantize/...                     making the checkpoint (from its manifest: also when the checkpoint was reused)
    speed/bs<b>/<figure>             prefill/decode tokens/s, TTFT/TPOT ms: median, with _min/_max for the spread
"""

from __future__ import annotations

from typing import Any, Optional

MEMORY_KEYS = ("peak_rss_gb", "cuda_max_allocated_gb", "cuda_max_reserved_gb", "device_used_gb")


def memory(profile: dict) -> dict[str, float]:
    stage = profile["stage"]
    out = {f"mem/{stage}/{k}": profile[k] for k in MEMORY_KEYS if profile.get(k) is not None}
    for phase, info in profile.get("phases", {}).items():
        out.update({f"mem/{stage}/{phase}/{k}": info[k] for k in MEMORY_KEYS if info.get(k) is not None})
        out[f"mem/{stage}/{phase}/wall_s"] = info["wall_s"]
    return out


def quantization(manifest: dict) -> dict[str, float]:
    """The cost of making the checkpoint, as recorded when it was made."""
    out = {"quantize/wall_s": manifest["wall_s"]["quantize"], "quantize/total_wall_s": manifest["wall_s"]["total"],
           "quantize/calibration_tokens": manifest["calibration_tokens"]}
    if "calibration_samples" in manifest:
        out["quantize/calibration_samples"] = manifest["calibration_samples"]
    phases = manifest.get("profile") or {}
    for k in MEMORY_KEYS:
        values = [p[k] for p in phases.values() if p.get(k) is not None]
        if values:
            out[f"quantize/{k}"] = max(values)
    return out


def size(stats: dict, in_memory: Optional[dict]) -> dict[str, float]:
    out = {
        "size/params": stats["params"],
        "size/quantized_params": stats.get("quantized_params", 0),
        "size/bits_per_weight": stats["bits_per_weight"],
        "size/tensor_gb": stats["tensor_bytes"] / 1e9,
        "size/disk_gb": stats["bytes_on_disk"] / 1e9,
        "size/checkpoint_mb": stats["bytes_on_disk"] / 2**20,
    }
    if stats.get("bits_per_weight_quantized") is not None:
        out["size/bits_per_weight_quantized"] = stats["bits_per_weight_quantized"]
    if in_memory:
        out["size/weights_in_memory_gb"] = in_memory["bytes"] / 1e9
    return out


def speed(result: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for bs, figures in result["per_batch"].items():
        for name, stats in figures.items():
            if not isinstance(stats, dict) or "median" not in stats:
                continue
            out[f"speed/bs{bs}/{name}"] = stats["median"]
            out[f"speed/bs{bs}/{name}_min"] = stats["min"]
            out[f"speed/bs{bs}/{name}_max"] = stats["max"]
    for key in ("decode_bound_tok_s", "decode_fraction_of_bound", "decode_fraction_of_measured_bound"):
        if result.get(key) is not None:
            out[f"speed/{key}"] = result[key]
    bw = result.get("bandwidth") or {}
    for key in ("spec_gbs", "measured_gbs"):
        if bw.get(key) is not None:
            out[f"speed/bandwidth_{key}"] = bw[key]
    return out


def speed_tags(result: dict) -> dict[str, Any]:
    dev = result.get("device") or {}
    return {"qllm.speed_backend": result.get("backend", ""), "qllm.speed_device": dev.get("name", ""),
            "qllm.speed_bandwidth_used": (result.get("bandwidth") or {}).get("used", "")}
