"""Peak memory of a cell's stages, per device, from the model's architecture and the cell's settings: pure arithmetic
(no torch), each estimate a named breakdown in GB (10^9 bytes).

What is modelled is what the code qllm runs holds at its peak (llmcompressor 0.14, transformers 5, lm-eval 0.4):

quantize (qllm.stages.quantize: the model is loaded on the CPU in model.dtype, then llmcompressor's oneshot)
  - weights: the whole model in host RAM, in model.dtype (the sequential pipeline onloads one decoder layer at a time
    to the GPU, when there is one);
  - calibration cache: the sequential pipeline's IntermediatesCache holds every calibration sample's decoder-layer
    inputs (num_samples x seq x hidden in model.dtype, plus the rotary position embeddings cos/sin), offloaded to the
    CPU (`sequential_offload_device`, default cpu); a layer's outputs replace its inputs batch by batch;
  - rewritten weights: the quantized Linears once more (the mmapped checkpoint's pages stay resident while
    llmcompressor and compressed-tensors write new values: measured, see rewritten_weights_gb);
  - GPTQ Hessians: one in_features^2 fp32 matrix per Linear of the current layer (q, k, v, o, gate, up, down), all
    alive until the layer is compressed; GPTQ workspace: the largest Linear's weight in fp32 twice (W, its act-order
    permutation) and two more in^2 fp32 matrices (H permuted, its inverse Cholesky factor);
  - AWQ cache: each mapping's parent inputs for every sample on the execution device (AWQModifier offload_device is
    None for dense models): attention input (hidden), o_proj input (heads x head_dim), MLP input (hidden), down_proj
    input (intermediate), plus the current mapping's fp16 outputs, a copy of its balance layers' weights, and the
    attention parent's replayed outputs (attention weights, heads x seq^2 a sample, and the causal mask);
  - runtime: python + torch + transformers + llmcompressor (+ tokenizer, dataset), measured (RUNTIME_GB);

evaluate, eval=hf (lm-eval's HFLM; compressed-tensors checkpoints are decompressed on load: dense weights)
  - weights: dense, in model.dtype, and for a quantized checkpoint its compressed tensors as well (measured: they
    stay resident beside the dense weights that decompression makes on the first forward);
  - logits: lm_head output and its log_softmax, both batch x context x vocab in model.dtype (lm-eval's softmax_dtype
    is None, transformers does not upcast);
  - KV cache: batch x (context + generated) tokens (transformers' DynamicCache, model.dtype);
  - activations: one layer's batch x context x (4 hidden + 3 intermediate).
evaluate, eval=vllm
  - weights at their stored bits (quantized Linears: bits/8 bytes a weight + group scales, or 1 byte for fp8/W8A8;
    embeddings, lm_head and norms in eval.dtype), divided over tensor x pipeline parallel ranks;
  - KV cache: vLLM needs at least one max_model_len sequence and pre-allocates gpu_memory_utilization x device
    memory (what it reserves is shown apart from what it needs);
  - workspace: a max_num_batched_tokens (8192) forward's activations and the sampler's logits, plus CUDA graphs and
    NCCL buffers (VLLM_GPU_OVERHEAD_GB, assumed, not measured here).

Prompt lengths are not known before lm-eval builds its requests: CONTEXT_TOKENS assumes a length per task type and
shot (perplexity tasks: their max_doc_tokens, else eval.max_length, else the model's context).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Measured on this machine (2-core CPU, torch 2.13 CPU wheel, transformers 5.17, llmcompressor 0.14, lm-eval 0.4):
# ru_maxrss of `python -c "import torch, transformers, llmcompressor"` is 0.55 GB and of `import torch, transformers,
# lm_eval.models.huggingface` 0.50 GB. The stage constants below add what every run of the stage holds besides the
# model (tokenizer, datasets, lm-eval's task objects, compressed-tensors' registries): fitted on the tiny model's
# measured peaks (see README "The memory planner" and tests/plan/test_measured.py).
RUNTIME_GB = {"quantize": 0.57, "evaluate": 0.59}
# Fitted on the tiny model (its weights and activations are ~0): what a quantize stage adds over its load phase,
# for every method (llmcompressor's session, observers, registries: tiny rtn +0.08 GB) and for calibrated ones
# (datasets/pyarrow, the tokenized calibration set, the traced model: tiny gptq +0.12 GB more).
QUANT_STATE_GB = 0.08
CALIB_STATE_GB = 0.12
VLLM_RUNTIME_GB = 2.5  # vLLM engine process on CPU (its own environment): assumed, not measured by the planner
CUDA_CONTEXT_GB = 0.5  # per GPU and process: CUDA context + cuBLAS workspaces (assumed)
VLLM_GPU_OVERHEAD_GB = 2.0  # per GPU: CUDA context, CUDA graphs, NCCL buffers (assumed)
VLLM_MAX_BATCHED_TOKENS = 8192
VLLM_MAX_SEQS = 256
# Assumed prompt tokens per task type: (base, per shot); generation tasks add their max_gen_toks.
CONTEXT_TOKENS = {"commonsense": (80, 60), "knowledge": (150, 120), "math": (150, 160), "hallucination": (400, 0),
                  "instruction_following": (200, 0), "dialogue": (1500, 0), "perplexity": (2048, 0)}
DEFAULT_GEN_TOKENS = {"math": 256, "instruction_following": 1280, "dialogue": 1024}


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer's shapes (config.json names in the comments)."""

    hidden: int  # hidden_size
    intermediate: int  # intermediate_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int  # head_dim (hidden / heads when absent)
    vocab: int  # vocab_size
    tied: bool = False  # tie_word_embeddings
    max_positions: int = 4096  # max_position_embeddings
    params_b: float = 0.0  # the model's parameter count in billions (0: from the shapes)

    @classmethod
    def from_config(cls, config: dict, params_b: float = 0.0) -> "Arch":
        c = dict(config.get("text_config") or config) if "hidden_size" not in config else dict(config)
        heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        return cls(hidden=hidden, intermediate=int(c["intermediate_size"]), layers=int(c["num_hidden_layers"]),
                   heads=heads, kv_heads=int(c.get("num_key_value_heads") or heads),
                   head_dim=int(c.get("head_dim") or hidden // heads), vocab=int(c["vocab_size"]),
                   tied=bool(c.get("tie_word_embeddings", False)),
                   max_positions=int(c.get("max_position_embeddings") or 4096), params_b=float(params_b or 0.0))

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of one decoder layer's Linears."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    @property
    def layer_linear_params(self) -> int:
        return sum(o * i for o, i in self.linear_shapes.values())

    @property
    def linear_params(self) -> int:
        """Parameters of all decoder Linears: what a method quantizes (lm_head is ignored)."""
        return self.layers * self.layer_linear_params

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> float:
        """The model's parameters: params_b when given, else linears + embeddings + norms."""
        if self.params_b > 0:
            return self.params_b * 1e9
        return self.linear_params + self.embedding_params + (2 * self.layers + 1) * self.hidden

    @property
    def other_params(self) -> float:
        """Parameters that stay in the model dtype (embeddings, lm_head, norms)."""
        return max(self.params - self.linear_params, 0.0)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class Workload:
    """What a cell asks of its stages, as far as memory goes."""

    method: str  # none | rtn | gptq | awq | smoothquant | fp8
    bits: Optional[int]  # None: the baseline
    dtype: str  # model.dtype
    group_size: Optional[int] = None
    symmetric: bool = True
    calib_samples: int = 0  # 0: no calibration data
    calib_seq: int = 0
    calib_batch: int = 1  # calibration.batch_size: samples per calibration forward
    backend: str = "hf"
    batch_size: int = 8
    context: int = 512  # longest assumed loglikelihood context of its tasks
    batch_tokens: int = 0  # largest batch x context of its tasks (0: batch_size x context)
    gen_tokens: int = 0  # longest generation of its tasks (0: none)
    max_model_len: int = 4096  # vLLM: the engine's context
    vllm_dtype: str = "bfloat16"
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gb: float = 1.0
    tp: int = 1  # vLLM: eval.tensor_parallel_size as configured
    pp: int = 1  # vLLM: eval.pipeline_parallel_size as configured
    sensitivity: bool = False  # the quantize stage measures a sensitivity table first (method=mixed, profile.sensitivity)

    @property
    def b(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 2)

    @property
    def quantized(self) -> bool:
        return self.method != "none" and bool(self.bits)

    @property
    def calibrated(self) -> bool:
        return self.calib_samples > 0

    @property
    def tokens(self) -> int:
        """Tokens in the largest evaluation batch."""
        return self.batch_tokens or self.batch_size * self.context

    def but(self, **changes) -> "Workload":
        return replace(self, **changes)


@dataclass(frozen=True)
class Estimate:
    """Memory of one stage on one device: a named breakdown in GB."""

    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def plus(self, **parts: float) -> "Estimate":
        merged = dict(self.parts)
        for k, v in parts.items():
            merged[k] = merged.get(k, 0.0) + v
        return Estimate(merged)

    def describe(self, top: int = 4) -> str:
        items = sorted(((k, v) for k, v in self.parts.items() if v >= 0.005), key=lambda kv: -kv[1])
        shown = " + ".join(f"{k} {_gb(v)}" for k, v in items[:top])
        rest = sum(v for _, v in items[top:])
        return shown + (f" + other {_gb(rest)}" if rest >= 0.005 else "")


def _gb(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


# ---- weights ----


def dense_weights_gb(arch: Arch, dtype_bytes: int) -> float:
    return arch.params * dtype_bytes / GB


def quantized_weights_gb(arch: Arch, w: Workload, other_bytes: int) -> float:
    """The checkpoint's weights as stored (what vLLM holds): quantized Linears at their bits plus scales, the rest in
    `other_bytes` per parameter."""
    if not w.quantized:
        return dense_weights_gb(arch, other_bytes)
    n = arch.linear_params
    if w.method in ("fp8", "smoothquant") or w.bits == 8 and w.group_size is None:
        per_weight = 1.0  # int8 / fp8, per-channel scales (negligible)
    else:
        per_weight = w.bits / 8
    groups = n / w.group_size if w.group_size else 0
    scales = groups * (other_bytes + (0 if w.symmetric else 1))  # a scale (+ a packed zero point) per group
    return (n * per_weight + scales + arch.other_params * other_bytes) / GB


# ---- quantize ----


def calibration_cache_gb(arch: Arch, w: Workload) -> float:
    """IntermediatesCache: every sample's decoder-layer input and its rotary cos/sin (a layer's outputs replace its
    inputs batch by batch: one copy)."""
    if not w.calibrated:
        return 0.0
    tokens = w.calib_samples * w.calib_seq
    return tokens * (arch.hidden + 2 * arch.head_dim) * w.b / GB


def rewritten_weights_gb(arch: Arch, w: Workload) -> float:
    """The quantized Linears' weights once more in host RAM. transformers maps a checkpoint whose dtype is the
    model's (safetensors mmap): the file's pages stay resident while llmcompressor writes the Linears (GPTQ, AWQ and
    SmoothQuant update them during calibration, compressed-tensors replaces them when saving), so their new values
    are private copies. Measured on SmolLM2 (fp32 from an fp32 file): rtn +0.41 GB at save, for 0.42 GB of
    Linear weights."""
    return arch.linear_params * w.b / GB if w.quantized else 0.0


GPTQ_METHODS = ("gptq", "smoothquant", "mixed")  # recipes with a GPTQModifier


def hessians_gb(arch: Arch, w: Workload) -> float:
    if w.method not in GPTQ_METHODS:
        return 0.0
    return sum(i * i for _, i in arch.linear_shapes.values()) * 4 / GB


def sensitivity_gb(arch: Arch, w: Workload) -> float:
    """qllm.sensitivity's capture: every layer's input second moment at once (float32; q/k/v and gate/up share one),
    plus one quantizer call's stacked copies of same-shape weights and moments (at most 2 GiB, or one layer's:
    qllm.sensitivity.analysis.batch_size)."""
    if not w.sensitivity:
        return 0.0
    h, q, i = arch.hidden, arch.heads * arch.head_dim, arch.intermediate
    moments = arch.layers * (2 * h * h + q * q + i * i) * 4
    one = max((3 * o * n + 2 * n * n) * 4 for o, n in arch.linear_shapes.values())
    return (moments + max(one, min(32 * one, 2 * 1024 ** 3))) / GB


def gptq_workspace_gb(arch: Arch, w: Workload) -> float:
    if w.method not in GPTQ_METHODS:
        return 0.0
    return max(2 * o * i * 4 + 2 * i * i * 4 for o, i in arch.linear_shapes.values()) / GB


def awq_cache_gb(arch: Arch, w: Workload) -> float:
    if w.method != "awq" or not w.calibrated:
        return 0.0
    tokens = w.calib_samples * w.calib_seq
    inputs = 2 * arch.hidden + arch.heads * arch.head_dim + arch.intermediate
    outputs = max(arch.hidden, arch.intermediate)  # the current mapping's outputs (fp16_outputs)
    balance = 2 * arch.hidden * arch.intermediate  # gate + up weights copied for the grid search
    # every cached sample's causal mask (seq^2, calibration runs eager attention) and, replaying the attention
    # parent, the live batch's attention weights (heads x seq^2): qllm runs that replay through SDPA
    # (compat.awq_sdpa_grid_search), which returns none. Under eager attention every call's weights stayed alive until
    # the list was built (measured on the tiny model, 64 vs 16 samples of 512 tokens: +6.7 MB a sample for
    # (4 heads + 1) x 512^2 x 4 B = 5.2 MB)
    attention = (w.calib_samples + w.calib_batch * arch.heads) * w.calib_seq ** 2
    return (tokens * (inputs + outputs) + balance + attention) * w.b / GB


def sample_activations_gb(arch: Arch, w: Workload) -> float:
    """One calibration batch (calibration.batch_size samples) through one decoder layer."""
    if not w.calibrated:
        return 0.0
    return w.calib_batch * w.calib_seq * (6 * arch.hidden + 3 * arch.intermediate + 2 * arch.heads * arch.head_dim) * w.b / GB


def quantize_host(arch: Arch, w: Workload, on_gpu: bool) -> Estimate:
    """Host RAM of the quantize stage: on a GPU machine the model and the calibration cache (one layer works on the
    GPU); on the CPU everything."""
    parts = {"runtime": RUNTIME_GB["quantize"] + QUANT_STATE_GB + (CALIB_STATE_GB if w.calibrated else 0.0),
             "weights": dense_weights_gb(arch, w.b), "rewritten weights": rewritten_weights_gb(arch, w),
             "calibration cache": calibration_cache_gb(arch, w)}
    parts["sensitivity moments"] = sensitivity_gb(arch, w)  # measured on the host, before calibration
    if not on_gpu:
        parts |= {"Hessians": hessians_gb(arch, w), "GPTQ workspace": gptq_workspace_gb(arch, w),
                  "AWQ cache": awq_cache_gb(arch, w), "activations": sample_activations_gb(arch, w)}
    return Estimate(parts)


def quantize_gpu(arch: Arch, w: Workload) -> Estimate:
    """One GPU of the quantize stage: the current decoder layer (onloaded), one calibration batch's activations, and the
    modifiers' state for that layer."""
    layer = arch.layer_linear_params * w.b / GB
    embed = arch.vocab * arch.hidden * w.b / GB  # the first subgraph onloads the embeddings
    return Estimate({"CUDA context": CUDA_CONTEXT_GB, "layer weights": max(layer, embed),
                     "activations": sample_activations_gb(arch, w), "Hessians": hessians_gb(arch, w),
                     "GPTQ workspace": gptq_workspace_gb(arch, w), "AWQ cache": awq_cache_gb(arch, w)})


# ---- evaluate ----


def logits_gb(arch: Arch, w: Workload, dtype_bytes: int) -> float:
    """lm_head output + its log_softmax for one batch of loglikelihood requests."""
    return 2 * w.tokens * arch.vocab * dtype_bytes / GB


def hf_kv_gb(arch: Arch, w: Workload) -> float:
    return (w.tokens + w.batch_size * w.gen_tokens) * arch.kv_bytes_per_token(w.b) / GB


def hf_activations_gb(arch: Arch, w: Workload) -> float:
    return w.tokens * (4 * arch.hidden + 3 * arch.intermediate) * w.b / GB


def evaluate_hf(arch: Arch, w: Workload, shards: int = 1, on_gpu: bool = False, tp: bool = False) -> Estimate:
    """One device of lm-eval's HF backend: the model split over `shards` devices (accelerate's device_map puts
    layers on each; DeepSpeed AutoTP (`tp`) splits every layer), logits on the last one."""
    parts = {"weights": dense_weights_gb(arch, w.b) / shards,
             "compressed weights": (quantized_weights_gb(arch, w, w.b) / shards if w.quantized else 0.0),
             "logits": logits_gb(arch, w, w.b),
             "KV cache": hf_kv_gb(arch, w) / shards, "activations": hf_activations_gb(arch, w) / (shards if tp else 1)}
    parts |= {"CUDA context": CUDA_CONTEXT_GB} if on_gpu else {"runtime": RUNTIME_GB["evaluate"]}
    return Estimate(parts)


def vllm_kv_per_gpu_gb(arch: Arch, w: Workload, tp: int, pp: int) -> float:
    """The KV cache vLLM needs at least: one max_model_len sequence (KV heads split over TP, replicated below one a
    rank; layers split over PP)."""
    b = DTYPE_BYTES.get(w.vllm_dtype, 2)
    kv_heads = max(arch.kv_heads / tp, 1)
    return w.max_model_len * 2 * (arch.layers / pp) * kv_heads * arch.head_dim * b / GB


def evaluate_vllm(arch: Arch, w: Workload, tp: int = 1, pp: int = 1, on_gpu: bool = True) -> Estimate:
    b = DTYPE_BYTES.get(w.vllm_dtype, 2)
    weights = quantized_weights_gb(arch, w, b) / (tp * pp)
    if not on_gpu:
        return Estimate({"runtime": VLLM_RUNTIME_GB, "weights": weights, "KV cache": w.cpu_kv_cache_gb})
    tokens = VLLM_MAX_BATCHED_TOKENS
    workspace = (tokens * (4 * arch.hidden + 3 * arch.intermediate / tp) * b
                 + VLLM_MAX_SEQS * arch.vocab * 4) / GB
    return Estimate({"weights": weights, "KV cache (1 sequence)": vllm_kv_per_gpu_gb(arch, w, tp, pp),
                     "workspace": workspace, "CUDA graphs + context": VLLM_GPU_OVERHEAD_GB})


# ---- from a cell's settings ----


def task_lengths(tasks: dict, max_length: Optional[int], arch: Arch, batch_size: int = 8) -> tuple[int, int, int]:
    """(longest assumed loglikelihood context, longest generation, largest batch in tokens) over a cell's task
    entries. A perplexity task with `limit` documents truncated to one window each batches at most `limit` windows."""
    cap = max_length or arch.max_positions
    context, gen, batch_tokens = 0, 0, 0
    for entry in tasks.values():
        kind = entry.get("type", "commonsense")
        base, per_shot = CONTEXT_TOKENS.get(kind, (512, 100))
        batch = batch_size
        if kind == "perplexity":
            n = entry.get("max_doc_tokens") or max_length or arch.max_positions
            if entry.get("max_doc_tokens") and entry.get("limit"):
                batch = min(batch_size, int(entry["limit"]))
        else:
            n = base + per_shot * int(entry.get("num_fewshot") or 0)
        n = min(n, cap)
        g = entry.get("max_gen_toks") or DEFAULT_GEN_TOKENS.get(kind, 0)
        context, gen, batch_tokens = max(context, n), max(gen, g), max(batch_tokens, batch * n)
    context = context or min(512, cap)
    return context, gen, batch_tokens or batch_size * context
