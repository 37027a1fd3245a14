"""Speed benchmark of a loaded causal LM: prefill and decode throughput, TTFT, TPOT, and decode vs the memory bound.

`benchmark(model, tokenizer, ...)` measures the model where the caller loaded it (CPU or one CUDA device) with a manual
greedy loop under `torch.inference_mode()` -- not `generate()`, whose logits processing, stopping criteria and cache
bookkeeping are not the model's cost:

- prefill: one forward pass over a batch of `prompt_len` random token ids (seeded, no padding) with `use_cache=True`;
  TTFT = prefill + picking the first token (argmax of the last position's logits);
- decode: `output_len - 1` single-token forward steps that reuse the KV cache, greedy;
  TPOT = decode time / (output_len - 1).

Warm-up runs come first and are not counted (they pay one-off costs: allocator growth, kernel selection, lazy weight
decompression); then `repeats` timed runs, reported as median, min, max and relative spread ((max - min) / median).
On CUDA every timed region is bracketed by `torch.cuda.synchronize()`.

Decode at batch 1 streams every weight once per token, so `bandwidth / weight bytes` bounds its tokens/s. The weight
bytes are those of the parameters as loaded: on the HF backend a compressed-tensors checkpoint is decompressed to dense
weights, so both the speed and the bound are dense ones. The bandwidth is taken from a spec-sheet table when the GPU is
known, else measured with a large device-to-device copy (see `measure_bandwidth`).
"""

from __future__ import annotations

import inspect
import os
import platform
import re
import statistics
import time
from typing import Any, Iterable, Optional, Protocol

BACKEND_NOTE = ("hf (dense weights: compressed-tensors checkpoints are decompressed on load; this is dense speed, "
                "not the speed of low-bit kernels)")

# Peak memory bandwidth in GB/s (10^9 bytes/s) from NVIDIA's product spec sheets. Matched in order against
# torch.cuda.get_device_name(): the more specific names first (an "H100 NVL" is also an "H100").
SPEC_BANDWIDTH_GBS: tuple[tuple[str, str, float], ...] = (
    (r"H200", "H200", 4800.0),
    (r"H100.*NVL", "H100 NVL", 3900.0),
    (r"H100.*PCIE", "H100 PCIe", 2000.0),
    (r"H100", "H100 SXM", 3350.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"A100.*80GB.*PCIE|A100.*PCIE.*80GB", "A100 PCIe 80GB", 1935.0),
    (r"A100.*80GB", "A100 SXM 80GB", 2039.0),
    (r"A100", "A100 40GB", 1555.0),
    (r"L40S", "L40S", 864.0),
    (r"\bL4\b", "L4", 300.0),
    (r"A10G", "A10G", 600.0),
    (r"RTX 4090", "RTX 4090", 1008.0),
    (r"\bV100\b", "V100", 900.0),  # not V100S (1134 GB/s)
)


def spec_bandwidth(device_name: str) -> tuple[str, float] | None:
    """(the spec-table entry, GB/s) for a CUDA device name, or None when the device is not in the table."""
    for pattern, label, gbs in SPEC_BANDWIDTH_GBS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return label, gbs
    return None


def _torch():
    import torch

    return torch


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _host_memory_bytes(available: bool = False) -> int | None:
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES" if available else "SC_PHYS_PAGES")
        return int(pages * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def device_info(device: Any = None) -> dict:
    """Name, kind (cpu/cuda), index, total memory and library versions of a device (default: CUDA if available)."""
    torch = _torch()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    info: dict[str, Any] = {"kind": device.type, "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(name=torch.cuda.get_device_name(index), index=index,
                    total_memory_gb=round(props.total_memory / 1e9, 2),
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
    else:
        total = _host_memory_bytes()
        info.update(name=_cpu_name(), index=None, total_memory_gb=round(total / 1e9, 2) if total else None,
                    threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    return info


def _sync(device) -> None:
    if device.type == "cuda":
        _torch().cuda.synchronize(device)


def measure_bandwidth(device: Any = None, nbytes: int | None = None, repeats: int = 5) -> dict:
    """Achievable memory bandwidth: copy one large buffer into another on the device, (read + write bytes) / time,
    best of `repeats` after one warm-up copy. Buffer: 1 GiB on CUDA (at most a tenth of the free memory), 256 MiB
    on CPU (at most a sixteenth of the available host memory) -- well above the last-level caches."""
    torch = _torch()
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if nbytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = min(1 << 30, free // 10)
        else:
            avail = _host_memory_bytes(available=True)
            nbytes = min(256 << 20, avail // 16) if avail else 256 << 20
    n = max(int(nbytes) // 4, 1 << 16)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: page faults, allocator
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    moved = 2 * n * 4
    del src, dst
    return {"gbs": moved / best / 1e9, "buffer_bytes": n * 4, "repeats": repeats,
            "method": f"{'device-to-device' if device.type == 'cuda' else 'host'} tensor copy, "
                      "(read + write bytes) / time, best of repeats"}


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters as loaded (tied weights counted once; buffers such as rotary tables left out)."""
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


def _stats(values: list[float]) -> dict:
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    return {"median": med, "min": lo, "max": hi, "rel_spread": (hi - lo) / med if med else None,
            "n": len(values)}


def _model_device(model: Any):
    torch = _torch()
    dev = getattr(model, "device", None)
    if dev is None:
        dev = next(model.parameters()).device
    return torch.device(dev)


def _vocab_size(model: Any, tokenizer: Any) -> int:
    rows = model.get_input_embeddings().weight.shape[0]
    try:
        return min(rows, len(tokenizer)) if tokenizer is not None else rows
    except TypeError:
        return rows


def _one_run(model, input_ids, output_len: int, device, extra: dict) -> dict:
    """One prefill + (output_len - 1) decode steps; times in seconds."""
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True, **extra)
    _sync(device)
    t_prefill = time.perf_counter()
    next_tok = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
    _sync(device)
    t_first = time.perf_counter()
    past = out.past_key_values
    del out
    steps = output_len - 1
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=next_tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        next_tok = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
    _sync(device)
    t2 = time.perf_counter()
    del past
    return {"prefill_s": t_prefill - t0, "ttft_s": t_first - t0, "decode_s": t2 - t1, "steps": steps}


def _check(model: Any, batch_sizes: list[int], prompt_len: int, output_len: int, warmup: int, repeats: int) -> None:
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes}")
    if prompt_len < 1 or output_len < 2 or repeats < 1 or warmup < 0:
        raise ValueError("need prompt_len >= 1, output_len >= 2 (one prefill token + at least one decode step), "
                         f"repeats >= 1, warmup >= 0; got {prompt_len=}, {output_len=}, {repeats=}, {warmup=}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos and prompt_len + output_len > max_pos:
        raise ValueError(f"prompt_len + output_len = {prompt_len + output_len} exceeds the model's "
                         f"max_position_embeddings ({max_pos})")


def _time_batches(model: Any, vocab: int, device: Any, extra: dict, batch_sizes: list[int], prompt_len: int,
                  output_len: int, warmup: int, repeats: int, seed: int) -> dict[str, dict]:
    """Per batch size: the timed runs' figures, each as {median, min, max, rel_spread, n}."""
    torch = _torch()
    per_batch: dict[str, dict] = {}
    steps = output_len - 1
    with torch.inference_mode():
        for b in batch_sizes:
            gen = torch.Generator().manual_seed(seed + b)
            ids = torch.randint(0, vocab, (b, prompt_len), generator=gen).to(device)
            for _ in range(warmup):
                _one_run(model, ids, output_len, device, extra)
            runs = [_one_run(model, ids, output_len, device, extra) for _ in range(repeats)]
            per_batch[str(b)] = _figures(b, prompt_len, steps, runs)
    return per_batch


def _figures(b: int, prompt_len: int, steps: int, runs: list[dict]) -> dict[str, dict]:
    """One batch size's figures from its timed runs ({prefill_s, ttft_s, decode_s} each)."""
    return {
        "prefill_tok_s": _stats([b * prompt_len / r["prefill_s"] for r in runs]),
        "decode_tok_s": _stats([b * steps / r["decode_s"] for r in runs]),
        "prefill_ms": _stats([1e3 * r["prefill_s"] for r in runs]),
        "ttft_ms": _stats([1e3 * r["ttft_s"] for r in runs]),
        "decode_ms": _stats([1e3 * r["decode_s"] for r in runs]),
        "tpot_ms": _stats([1e3 * r["decode_s"] / steps for r in runs]),
    }


def _bound(device: Any, dev_info: dict, wbytes: int, decode_bs1: float | None, measure_bw: bool) -> dict:
    """The batch-1 decode bound (bandwidth / weight bytes) and how close the measured decode comes to it."""
    spec = spec_bandwidth(dev_info["name"]) if device.type == "cuda" else None
    measured = measure_bandwidth(device) if measure_bw else None
    bandwidth = {
        "spec_gbs": spec[1] if spec else None,
        "spec_source": f"spec sheet ({spec[0]})" if spec else None,
        "measured_gbs": measured["gbs"] if measured else None,
        "measured_method": measured["method"] if measured else None,
        "measured_buffer_bytes": measured["buffer_bytes"] if measured else None,
        "used": "spec" if spec else ("measured" if measured else None),
    }
    used_gbs = bandwidth["spec_gbs"] if spec else bandwidth["measured_gbs"]
    bound = used_gbs * 1e9 / wbytes if used_gbs else None
    measured_bound = measured["gbs"] * 1e9 / wbytes if measured else None
    return {
        "bandwidth": bandwidth,
        "decode_bound_tok_s": bound,
        "decode_fraction_of_bound": decode_bs1 / bound if (decode_bs1 and bound) else None,
        "decode_fraction_of_measured_bound": decode_bs1 / measured_bound if (decode_bs1 and measured_bound) else None,
        "bound_note": ("batch-1 decode reads every weight once per token: bound tok/s = bandwidth / weight_bytes "
                       "(KV-cache and activation traffic ignored, so the true bound is a little lower); fraction = "
                       "measured batch-1 decode tok/s / bound, against the "
                       + (f"{bandwidth['used']} bandwidth" if bandwidth["used"] else "-- (no bandwidth)")
                       + ("" if decode_bs1 else "; batch 1 was not run, so no fraction")),
    }


def benchmark(model: Any, tokenizer: Any, *, batch_sizes: Iterable[int] = (1,), prompt_len: int = 128,
              output_len: int = 32, warmup: int = 1, repeats: int = 3, seed: int = 0,
              measure_bw: bool = True, note: str = BACKEND_NOTE) -> dict:
    """Prefill/decode speed of `model` on the device it was loaded on; a JSON-serializable dict (see module doc).

    per_batch[str(B)] holds, each as {median, min, max, rel_spread, n} over the timed runs:
    prefill_tok_s (B * prompt_len / prefill time), decode_tok_s (B * (output_len - 1) / decode time),
    prefill_ms, ttft_ms (prefill + first token pick), decode_ms, tpot_ms (decode time / (output_len - 1)).
    `note` says what kind of speed this is (the backend's: dense, or low-bit kernels).
    """
    batch_sizes = [int(b) for b in batch_sizes]
    _check(model, batch_sizes, prompt_len, output_len, warmup, repeats)
    device = _model_device(model)
    # Serving engines compute logits only for the last prompt position; full-prompt logits (B x L x vocab) would
    # charge prefill with a projection and an allocation that are not part of producing the first token.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    was_training = model.training
    model.eval()
    try:
        per_batch = _time_batches(model, _vocab_size(model, tokenizer), device, extra, batch_sizes, prompt_len,
                                  output_len, warmup, repeats, seed)
    finally:
        model.train(was_training)
    return _result(note, device, per_batch, weight_bytes(model), measure_bw, {
        "batch_sizes": batch_sizes, "prompt_len": prompt_len, "output_len": output_len, "warmup": warmup,
        "repeats": repeats, "seed": seed, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "prefill_logits": "last position only" if extra else "all positions",
        "loop": "manual greedy loop with KV cache under torch.inference_mode (not generate())",
        "timer": "time.perf_counter" + (", torch.cuda.synchronize around every timed region"
                                         if device.type == "cuda" else "")})


def _result(note: str, device: Any, per_batch: dict, wbytes: int, measure_bw: bool, settings: dict,
            **extra: Any) -> dict:
    """The benchmark's record: what it measured, where, how, and decode at batch 1 vs the bandwidth bound."""
    dev_info = device_info(device)
    decode_bs1 = per_batch["1"]["decode_tok_s"]["median"] if "1" in per_batch else None
    return {"backend": note, "device": dev_info,
            "settings": {**settings, "decode_steps": settings["output_len"] - 1},
            "per_batch": per_batch, **extra, "weight_bytes": wbytes,
            **_bound(device, dev_info, wbytes, decode_bs1, measure_bw)}


class Engine(Protocol):
    """A serving engine as benchmark_engine drives it: greedy generation of exactly `output_len` tokens for a batch
    of prompts (token ids), returning the wall time."""

    vocab: int
    device: str
    loop: str  # how it generates, for the record

    def generate(self, prompts: list[list[int]], output_len: int) -> float: ...


def benchmark_engine(engine: Engine, *, batch_sizes: Iterable[int] = (1,), prompt_len: int = 128,
                     output_len: int = 32, warmup: int = 1, repeats: int = 3, seed: int = 0, note: str,
                     weight_bytes: int, dtype: str, throughput_requests: Optional[int] = None,
                     measure_bw: bool = True) -> dict:
    """The same figures as `benchmark`, through an engine that only generates whole requests (vLLM): per run,
    TTFT = the time of a batch generating 1 token (prefill + first token; prefill_* are the same time), decode =
    the time of the same shapes generating `output_len` tokens minus TTFT, TPOT = decode / (output_len - 1). Each run
    gets fresh random prompts (seeded), so a prefix cache never serves one. Plus a throughput point as vLLM's own
    benchmark defines it: `throughput_requests` requests submitted at once (default 4 x the largest batch, at least
    16), requests/s, output tokens/s and total (prompt + output) tokens/s."""
    import random

    batch_sizes = [int(b) for b in batch_sizes]
    _check(None, batch_sizes, prompt_len, output_len, warmup, repeats)
    rng = random.Random(seed)

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(engine.vocab) for _ in range(prompt_len)] for _ in range(n)]

    steps, per_batch = output_len - 1, {}
    for b in batch_sizes:
        for _ in range(warmup):
            engine.generate(prompts(b), 1)
            engine.generate(prompts(b), output_len)
        runs = []
        for _ in range(repeats):
            first = engine.generate(prompts(b), 1)
            full = engine.generate(prompts(b), output_len)
            runs.append({"prefill_s": first, "ttft_s": first, "decode_s": max(full - first, 1e-9)})
        per_batch[str(b)] = _figures(b, prompt_len, steps, runs)
    n = throughput_requests or max(16, 4 * max(batch_sizes))
    elapsed = engine.generate(prompts(n), output_len)
    throughput = {"requests": n, "prompt_len": prompt_len, "output_len": output_len, "elapsed_s": elapsed,
                  "requests_s": n / elapsed, "output_tok_s": n * output_len / elapsed,
                  "total_tok_s": n * (prompt_len + output_len) / elapsed}
    return _result(note, _torch().device(engine.device), per_batch, weight_bytes, measure_bw, {
        "batch_sizes": batch_sizes, "prompt_len": prompt_len, "output_len": output_len, "warmup": warmup,
        "repeats": repeats, "seed": seed, "dtype": dtype, "loop": engine.loop,
        "timer": "time.perf_counter around whole generate calls (the engine synchronises itself)",
        "decode": "time(prompt + output_len tokens) - time(prompt + 1 token), same shapes"}, throughput=throughput)
