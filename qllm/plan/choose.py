"""The launch of each stage: the cheapest that fits within `plan.safety` of one device, or a refusal with the numbers.

evaluate, tried in this order (the first that fits is chosen):
  1 GPU (the configured backend)                      hf: dense weights + logits + KV; vllm: weights + 1 sequence KV
  vllm TP=k, k = 2, 4, ... <= GPUs per node           eval=vllm eval.tensor_parallel_size=k (every GPU computes)
  hf sharded over k GPUs                              launch.evaluate=accelerate (device_map: layers per GPU)
  DeepSpeed AutoTP k                                  launch.evaluate=deepspeed
  vllm TP=GPUs per node x PP=nodes                    launch.evaluate=vllm_multinode eval.pipeline_parallel_size=nodes
  CPU offload (plan.allow_offload=true only)          accelerate device_map with the rest in host RAM: slow
quantize: 1 GPU (llmcompressor's sequential pipeline: the model in host RAM, one decoder layer and its modifiers'
state on the GPU), or the CPU when there is no GPU. More ranks (torchrun) do not lower either figure in
llmcompressor 0.14 (every rank loads the whole model and accumulates full Hessians): they only speed GPTQ up, so the
planner never needs them to fit and says so.

A vLLM option fits when what it needs is within eval.gpu_memory_utilization of the device (it reserves that much).
A launch already configured (eval=vllm with eval.tensor_parallel_size / pipeline_parallel_size set) is kept when it
fits; otherwise the list above decides.
On a machine without a GPU the device is the host's RAM. The planner recommends; it never rewrites the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from . import memory as mem
from .gpus import Cluster
from .memory import Arch, Estimate, Workload, _gb

SAFETY = 0.9  # fraction of a device's memory a plan may use


@dataclass(frozen=True)
class StagePlan:
    stage: str  # quantize | evaluate
    launch: str  # what runs it: "1 GPU", "vllm TP=4", "CPU", ...
    devices: int  # how many devices it uses
    device: str  # "H100-80GB", "host RAM"
    capacity_gb: float  # usable memory of one device (safety fraction applied)
    per_device: Estimate  # the peak on each device
    fits: bool
    needs: tuple[str, ...] = ()  # overrides the config would need for this launch
    host: Optional[Estimate] = None  # host RAM (quantize on a GPU machine: the model lives there)
    host_capacity_gb: float = 0.0
    reserved_gb: Optional[float] = None  # vLLM: what it pre-allocates per GPU
    note: str = ""
    refusal: str = ""  # why nothing fits, with the numbers and what would

    @property
    def peak_gb(self) -> float:
        return self.per_device.total


@dataclass(frozen=True)
class Option:
    launch: str
    devices: int
    estimate: Estimate
    budget_gb: float  # what it may use on one device
    needs: tuple[str, ...] = ()
    reserved_gb: Optional[float] = None
    nodes: int = 1

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.budget_gb


@dataclass
class Context:
    """What options are made from: the model, the cell's workload, the devices, the plan settings."""

    model_name: str
    arch: Arch
    work: Workload
    cluster: Cluster
    safety: float = SAFETY
    allow_offload: bool = False
    vllm_schemes_ok: Optional[bool] = None  # whether vLLM's GPU kernels run this scheme (None: not known)
    eval_on_cpu: bool = False  # eval.device=cpu: the evaluate stage uses the host's RAM even where GPUs are
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_cap(self) -> float:
        return self.safety * self.cluster.gpu_memory_gb

    @property
    def host_cap(self) -> float:
        return self.safety * self.cluster.host_ram_gb

    @property
    def vllm_budget(self) -> float:
        return min(self.work.gpu_memory_utilization, 1.0) * self.cluster.gpu_memory_gb


def _powers_of_two(upto: int) -> list[int]:
    return [2 ** i for i in range(1, int(math.log2(upto)) + 1)] if upto >= 2 else []


def _tp_ok(arch: Arch, k: int) -> bool:
    return arch.heads % k == 0


# ---- evaluate ----


def evaluate_options(ctx: Context) -> list[Option]:
    a, w, c = ctx.arch, ctx.work, ctx.cluster
    if not c.has_gpu or ctx.eval_on_cpu:
        est = mem.evaluate_vllm(a, w, on_gpu=False) if w.backend == "vllm" else mem.evaluate_hf(a, w)
        opts = [Option("CPU", 1, est, ctx.host_cap)]
        if w.backend != "vllm" and w.quantized:  # vLLM-CPU keeps the quantized weights as stored
            opts.append(Option("CPU (vllm)", 1, mem.evaluate_vllm(a, w, on_gpu=False), ctx.host_cap, ("eval=vllm",)))
        return opts
    g = c.gpus_per_node
    vllm_ok = ctx.vllm_schemes_ok is not False
    to_vllm = () if w.backend == "vllm" else ("eval=vllm",)
    opts: list[Option] = []
    if w.backend == "vllm":
        opts.append(Option("1 GPU (vllm)", 1, mem.evaluate_vllm(a, w), ctx.vllm_budget,
                           reserved_gb=ctx.vllm_budget))
    else:
        opts.append(Option("1 GPU (hf)", 1, mem.evaluate_hf(a, w, on_gpu=True), ctx.gpu_cap))
        if vllm_ok:  # a quantized checkpoint at its stored bits may fit where its dense form does not
            opts.append(Option("1 GPU (vllm)", 1, mem.evaluate_vllm(a, w), ctx.vllm_budget, to_vllm,
                               reserved_gb=ctx.vllm_budget))
    if vllm_ok:
        for k in _powers_of_two(g):
            if _tp_ok(a, k):
                opts.append(Option(f"vllm TP={k}", k, mem.evaluate_vllm(a, w, tp=k), ctx.vllm_budget,
                                   to_vllm + (f"eval.tensor_parallel_size={k}",), reserved_gb=ctx.vllm_budget))
    for k in range(2, g + 1):
        opts.append(Option(f"hf sharded ×{k}", k, mem.evaluate_hf(a, w.but(backend="hf"), shards=k, on_gpu=True),
                           ctx.gpu_cap, ("eval=hf", "launch.evaluate=accelerate") if w.backend != "hf"
                           else ("launch.evaluate=accelerate",)))
    for k in _powers_of_two(g):
        if _tp_ok(a, k):
            opts.append(Option(f"deepspeed AutoTP={k}", k,
                               mem.evaluate_hf(a, w.but(backend="hf"), shards=k, on_gpu=True, tp=True), ctx.gpu_cap,
                               ("eval=hf", "launch.evaluate=deepspeed") if w.backend != "hf"
                               else ("launch.evaluate=deepspeed",)))
    if vllm_ok and c.nodes > 1 and _tp_ok(a, g):
        opts.append(Option(f"vllm_multinode TP={g} PP={c.nodes}", c.total_gpus,
                           mem.evaluate_vllm(a, w, tp=g, pp=c.nodes), ctx.vllm_budget,
                           to_vllm + ("launch.evaluate=vllm_multinode", f"eval.tensor_parallel_size={g}",
                                      f"eval.pipeline_parallel_size={c.nodes}"),
                           reserved_gb=ctx.vllm_budget, nodes=c.nodes))
    return opts


def _offload(ctx: Context) -> Option:
    """accelerate's device_map with max_memory: what does not fit on the node's GPUs stays in host RAM."""
    a, w = ctx.arch, ctx.work.but(backend="hf")
    full = mem.evaluate_hf(a, w)
    on_gpus = ctx.cluster.gpus_per_node * ctx.gpu_cap
    rest = max(full.parts["weights"] - on_gpus, 0.0)
    est = Estimate({"runtime": mem.RUNTIME_GB["evaluate"], "offloaded weights": rest})
    return Option("CPU offload (accelerate device_map)", ctx.cluster.gpus_per_node, est, ctx.host_cap,
                  ("launch.evaluate=accelerate", "plan.allow_offload=true"))


def _configured(ctx: Context) -> Optional[Option]:
    """eval=vllm with a tensor/pipeline parallel size already set: that launch, when this cluster has the GPUs."""
    a, w, c = ctx.arch, ctx.work, ctx.cluster
    if w.backend != "vllm" or (w.tp, w.pp) == (1, 1) or not c.has_gpu or ctx.eval_on_cpu:
        return None
    if w.tp > c.gpus_per_node or w.pp > c.nodes:
        return None
    return Option(f"vllm TP={w.tp}" + (f" PP={w.pp}" if w.pp > 1 else "") + " (as configured)", w.tp * w.pp,
                  mem.evaluate_vllm(a, w, tp=w.tp, pp=w.pp), ctx.vllm_budget, reserved_gb=ctx.vllm_budget,
                  nodes=w.pp)


def plan_evaluate(ctx: Context) -> StagePlan:
    """The configured launch when it fits (vLLM with TP/PP set), else the first option that fits."""
    opts = evaluate_options(ctx)
    configured = _configured(ctx)
    if configured is not None and configured.fits:
        return _stage("evaluate", ctx, configured, True)
    chosen = next((o for o in opts if o.fits and o.nodes <= ctx.cluster.nodes), None)
    if chosen is None and ctx.allow_offload and ctx.cluster.has_gpu and _offload(ctx).fits:
        chosen = _offload(ctx)
    if chosen is not None:
        return _stage("evaluate", ctx, chosen, True)
    smallest = min(opts, key=lambda o: o.estimate.total / o.budget_gb)
    return _stage("evaluate", ctx, smallest, False, refusal=_evaluate_refusal(ctx, opts))


def _total_need(ctx: Context) -> float:
    """The whole model's evaluation need on one (imaginary) device: how the refusal states the size."""
    a, w = ctx.arch, ctx.work
    gpu = ctx.cluster.has_gpu and not ctx.eval_on_cpu
    if w.backend == "vllm":
        return mem.evaluate_vllm(a, w, on_gpu=gpu).total
    return mem.evaluate_hf(a, w, on_gpu=gpu).total


def _evaluate_refusal(ctx: Context, opts: list[Option]) -> str:
    a, w, c = ctx.arch, ctx.work, ctx.cluster
    what = f"the {w.dtype} baseline" if not w.quantized else f"the {w.method} w{w.bits} checkpoint"
    # the table's row shows the closest launch, which may be vLLM's: say whose need this is
    dense = (f" on eval={w.backend} (dense weights beside the compressed ones)"
             if w.quantized and w.backend != "vllm" else "")
    have = (f"{c.nodes}×{c.gpus_per_node}×{c.gpu_memory_gb:g} GB" if c.nodes > 1 else
            f"{c.gpus_per_node}×{c.gpu_memory_gb:g} GB") if c.has_gpu else f"{_gb(c.host_ram_gb)} GB of RAM, no GPU"
    where = "these nodes have" if c.nodes > 1 else "this node has"
    ways = []
    if c.has_gpu:
        g = c.gpus_per_node
        for n in range(c.nodes + 1, 65):
            o = mem.evaluate_vllm(a, w, tp=g, pp=n)
            if o.total <= ctx.vllm_budget and _tp_ok(a, g):
                ways.append(f"launch.evaluate=vllm_multinode on {n} nodes (plan.gpus={n}x{g}x{c.gpu_label}: "
                            f"~{_gb(o.total)} GB per GPU at TP={g} PP={n})")
                break
    for method, bits in (("fp8", 8), ("gptq", 4)):
        if (w.method, w.bits) == (method, bits):
            continue
        alt = Context(ctx.model_name, a, w.but(method=method, bits=bits, group_size=128 if bits == 4 else None),
                      c, ctx.safety, ctx.allow_offload)
        fit = next((o for o in evaluate_options(alt) if o.fits and o.nodes <= c.nodes), None)
        if fit is not None:
            ways.append(f"method={method}" + (f" bits={bits}" if method != "fp8" else "")
                        + f" ({fit.launch}: ~{_gb(fit.estimate.total)} GB per device)")
    if c.has_gpu and not ctx.allow_offload and _offload(ctx).fits:
        ways.append(f"plan.allow_offload=true (CPU offload: host RAM {_gb(c.host_ram_gb)} GB holds the rest; slow)")
    on_cpu = not c.has_gpu or ctx.eval_on_cpu
    if on_cpu and w.batch_size > 1:
        smaller = mem.evaluate_hf(a, w.but(batch_size=1, batch_tokens=w.context))
        if smaller.total <= ctx.host_cap:
            ways.append("eval.batch_size=1")
    if not c.has_gpu and not ways:
        ways.append("a GPU node (size one with plan.gpus=8xH100-80GB)")
    return (f"needs ~{_gb(_total_need(ctx))} GB for {what} of {ctx.model_name}{dense}; {where} {have}"
            + (f": use {' or '.join(ways)}" if ways else ": no launch qllm knows fits it"))


# ---- quantize ----


def plan_quantize(ctx: Context) -> Optional[StagePlan]:
    a, w, c = ctx.arch, ctx.work, ctx.cluster
    if not w.quantized:
        return None
    if not c.has_gpu:
        est = mem.quantize_host(a, w, on_gpu=False)
        opt = Option("CPU", 1, est, ctx.host_cap)
        return _stage("quantize", ctx, opt, opt.fits, refusal="" if opt.fits else _quantize_refusal(ctx, est, None))
    host = mem.quantize_host(a, w, on_gpu=True)
    gpu = mem.quantize_gpu(a, w)
    opt = Option("1 GPU", 1, gpu, ctx.gpu_cap)
    ok = opt.fits and host.total <= ctx.host_cap
    note = ""
    if w.method in ("gptq", "smoothquant") and c.gpus_per_node > 1 and ok:
        note = (f"torchrun {c.gpus_per_node} would only speed GPTQ up (each rank holds the model: "
                f"~{c.gpus_per_node * host.parts['weights']:.0f} GB of host RAM)")
    return _stage("quantize", ctx, opt, ok, host=host, note=note,
                  refusal="" if ok else _quantize_refusal(ctx, host, gpu))


def _max_samples(ctx: Context, on_gpu: bool) -> int:
    """The largest calibration.num_samples that fits (0: none does)."""
    lo, hi = 0, ctx.work.calib_samples
    while lo < hi:
        mid = (lo + hi + 1) // 2
        w = ctx.work.but(calib_samples=mid)
        host = mem.quantize_host(ctx.arch, w, on_gpu)
        ok = host.total <= ctx.host_cap and (not on_gpu or mem.quantize_gpu(ctx.arch, w).total <= ctx.gpu_cap)
        lo, hi = (mid, hi) if ok else (lo, mid - 1)
    return lo


def _quantize_refusal(ctx: Context, host: Estimate, gpu: Optional[Estimate]) -> str:
    c, w = ctx.cluster, ctx.work
    what = f"{w.method} w{w.bits} of {ctx.model_name}"
    parts = []
    if host.total > ctx.host_cap:
        parts.append(f"needs ~{_gb(host.total)} GB of host RAM ({host.describe(3)}); this node has "
                     f"{_gb(c.host_ram_gb)} GB")
    if gpu is not None and gpu.total > ctx.gpu_cap:
        parts.append(f"needs ~{_gb(gpu.total)} GB on one GPU for a decoder layer ({gpu.describe(3)}); this node's "
                     f"GPUs have {c.gpu_memory_gb:g} GB")
    ways = []
    if w.calibrated:
        n = _max_samples(ctx, gpu is not None)
        if 0 < n < w.calib_samples:
            ways.append(f"calibration.num_samples={n}")
    if host.total > ctx.host_cap:
        ways.append(f"a node with >= {_gb(host.total / ctx.safety)} GB of RAM (plan.host_ram_gb=...)")
    if w.method != "fp8" and (gpu is None or gpu.total > ctx.gpu_cap):
        alt = w.but(method="fp8", bits=8, calib_samples=0, calib_seq=0)
        fits = mem.quantize_host(ctx.arch, alt, gpu is not None).total <= ctx.host_cap and (
            gpu is None or mem.quantize_gpu(ctx.arch, alt).total <= ctx.gpu_cap)
        if fits:
            ways.append("method=fp8 (no calibration)")
    return f"{what}: " + "; ".join(parts) + (f": use {' or '.join(ways)}" if ways else "")


def _stage(stage: str, ctx: Context, opt: Option, fits: bool, host: Optional[Estimate] = None, note: str = "",
           refusal: str = "") -> StagePlan:
    c = ctx.cluster
    device = c.gpu_label if c.has_gpu and not opt.launch.startswith("CPU") else "host RAM"
    cap = opt.budget_gb
    return StagePlan(stage=stage, launch=opt.launch, devices=opt.devices, device=device, capacity_gb=cap,
                     per_device=opt.estimate, fits=fits, needs=opt.needs, host=host,
                     host_capacity_gb=ctx.host_cap if host is not None else 0.0, reserved_gb=opt.reserved_gb,
                     note=note, refusal=refusal)
