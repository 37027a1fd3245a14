"""Narrow, version-guarded workarounds for defects in dependencies. Each says what, where and until when."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from typing import Any

from packaging.version import Version


def awq_cpu_pin_memory() -> bool:
    """llmcompressor <= 0.14: AWQ pins cached activations with `Tensor.pin_memory()`, which raises "Cannot access
    accelerator device when none is available" on a CPU-only machine. Pinning only speeds host-to-device copies, so
    without an accelerator it is safely skipped. Returns True when the patch was applied."""
    import torch

    if torch.accelerator.is_available():
        return False
    if Version(importlib.metadata.version("llmcompressor")) >= Version("0.15"):
        return False  # not known to be affected: let a newer release fail loudly if the defect remains
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None  # type: ignore[method-assign]
    return True


def _llmcompressor_below(version: str) -> bool:
    return Version(importlib.metadata.version("llmcompressor")) < Version(version)


DISABLE_ENV = "QLLM_COMPAT_OFF"  # comma-separated workaround names not to apply (to check a dependency still needs one)


def disabled(name: str) -> bool:
    return name in {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",")}


def awq_sdpa_grid_search(model: Any) -> bool:
    """llmcompressor <= 0.14: run AWQ's grid search through the attention the model was loaded with (SDPA), not the
    eager attention calibration forces.

    Defect (performance; modifiers/transform/awq/base.py `_apply_smoothing` inside `calibration_forward_context` ->
    `use_eager_attention`): eager attention is forced so that traced subgraphs always receive a 4D mask, but the grid
    search calls each mapping's parent module directly (`_run_samples`), n_grid + 1 times per mapping, and for the
    q/k/v mapping that parent is the attention block. Given the same cached 4D mask, SDPA computes the same attention
    (measured on SmolLM2, 64x512 calibration: every scale equal to one float32 rounding, |diff| <= 4e-6) about 4x
    faster on CPU; a layer's AWQ took 57 s instead of 72 s. Upstream note: in `_run_samples`, restore the model's own
    attention implementation (the cached kwargs carry a mask tensor). Applied only when the model was loaded with
    SDPA; disable with QLLM_COMPAT_OFF=awq_sdpa_grid_search. Returns True when the patch was applied."""
    name = "awq_sdpa_grid_search"
    config = getattr(model, "config", None)
    if disabled(name) or getattr(config, "_attn_implementation", None) != "sdpa" or not _llmcompressor_below("0.15"):
        return False
    from llmcompressor.modifiers.transform.awq import base as awq_base

    run_samples = getattr(awq_base.AWQModifier, "_qllm_original_run_samples", awq_base.AWQModifier._run_samples)

    def _run_samples(self: Any, module: Any) -> list:
        cfg = getattr(module, "config", None)
        if getattr(cfg, "_attn_implementation", None) != "eager":
            return run_samples(self, module)
        cfg._attn_implementation = "sdpa"  # the grid search's direct calls only; tracing stays eager
        try:
            return run_samples(self, module)
        finally:
            cfg._attn_implementation = "eager"

    awq_base.AWQModifier._qllm_original_run_samples = run_samples
    awq_base.AWQModifier._run_samples = _run_samples
    return True


GRAM_SCORED: list[str] = []  # the mappings awq_linear_loss_by_gram scored in this process (their smooth layers)


def awq_linear_loss_by_gram() -> bool:
    """llmcompressor <= 0.14: score AWQ's grid points for a mapping whose parent is its one balance Linear (Llama's
    up_proj -> down_proj; v_proj -> o_proj where the shapes allow it) from the inputs' Gram matrix, not by running the
    Linear over every calibration token again for each grid point.

    Defect (performance; modifiers/transform/awq/base.py `_compute_best_scale`): each grid point reruns the parent
    over all cached inputs X and takes the MSE against the unquantized outputs. For a Linear parent the outputs'
    difference is X (W_q - W)^T (the bias cancels), so the summed squared error is trace(dW H dW^T) with H = X^T X:
    H is summed once per mapping (tokens x in^2) and each grid point then costs out x in^2 instead of
    tokens x in x out. The grid, the scales, the quantization of W*s and the choice of the lowest loss stay the
    library's own code; only `_run_samples` (which returns the effective weight instead of outputs) and
    `_compute_loss` are replaced for such a mapping, during its grid search. Under calibration.autocast H is summed
    from the inputs in the autocast dtype, as the library's forwards would take them (measured: H within 6e-4 of
    float32's, relative; 0.44 vs 0.83 s per SmolLM2 down_proj); the loss itself is float32. Not applied with loss masks,
    across ranks (the library all-reduces its loss), or where H would be larger than the cached inputs. Upstream
    note: `_compute_best_scale` could take this path itself for Linear parents. Disable with
    QLLM_COMPAT_OFF=awq_linear_loss_by_gram. Returns True when the patch was applied."""
    name = "awq_linear_loss_by_gram"
    if disabled(name) or not _llmcompressor_below("0.15"):
        return False
    import torch
    from compressed_tensors.offload.dist_utils import is_distributed
    from llmcompressor.core import active_session
    from llmcompressor.modifiers.transform.awq import base as awq_base

    best_scale = getattr(awq_base.AWQModifier, "_qllm_original_compute_best_scale",
                         awq_base.AWQModifier._compute_best_scale)

    def _inputs(cache: Any) -> list:
        return [next(iter(batch.values())) for batch in cache]  # nn.Linear.forward(input): one kwarg per batch

    def _compute_best_scale(self: Any, mapping: Any, fp16_outputs: list, orig_layer_weights: dict) -> Any:
        parent = mapping.parent
        state = active_session().state
        if not (isinstance(parent, torch.nn.Linear) and list(mapping.balance_layers) == [parent]) \
                or (state is not None and state.loss_masks is not None) or is_distributed():
            return best_scale(self, mapping, fp16_outputs, orig_layer_weights)
        xs = _inputs(self._parent_args_cache[parent])
        tokens = sum(x.numel() // x.shape[-1] for x in xs)
        if parent.in_features > tokens:
            return best_scale(self, mapping, fp16_outputs, orig_layer_weights)
        device = parent.weight.device
        # under calibration.autocast the library's forwards take bf16/fp16 inputs: so does H's product (each
        # batch's product then summed in float32); else float32 throughout
        low = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else torch.float32
        with torch.autocast(device_type=device.type, enabled=False):
            gram = torch.zeros(parent.in_features, parent.in_features, dtype=torch.float32, device=device)
            for x in xs:
                x = x.reshape(-1, x.shape[-1]).to(device=device, dtype=low)
                gram += (x.T @ x).float()
        w0 = orig_layer_weights[parent].to(device=device, dtype=torch.float32)
        n = tokens * parent.out_features

        def loss(_fp16: list, effective: list) -> float:
            with torch.autocast(device_type=device.type, enabled=False):
                dw = effective[0].to(torch.float32) - w0
                return float(((dw @ gram) * dw).sum() / n)

        self._run_samples = lambda module: [module.weight.detach().clone()]  # instance attributes shadow the class
        self._compute_loss = loss
        try:
            scales = best_scale(self, mapping, fp16_outputs, orig_layer_weights)
        finally:
            del self._run_samples, self._compute_loss
        GRAM_SCORED.append(mapping.smooth_name)
        return scales

    awq_base.AWQModifier._qllm_original_compute_best_scale = best_scale
    awq_base.AWQModifier._compute_best_scale = _compute_best_scale
    return True


def calibration_shard(dataset: Any, rank: int, world_size: int) -> Any:
    """llmcompressor <= 0.14, several ranks: give each rank its own share of the calibration samples.

    Defect (datasets/utils.py, `format_calibration_data` -> `_make_sampler`): when every rank passes the same
    dataset, the sampler is built over a *partitioned copy* (`dataset.select(range(start, end))`) but the DataLoader
    iterates the full dataset with that sampler's indices 0..len(partition)-1, so every rank calibrates on the same
    first 1/world_size of the samples: half the data, counted twice (measured: 2 ranks saw 8 distinct samples of
    16; GPTQ's Hessians differed from one process's by up to 17%). Upstream note: build the DataLoader over the
    partitioned dataset, not the original. Handing each rank a different dataset skips the library's partitioning
    (`_is_dist_and_same_ds` is false), so the split is ours and equals the library's intended contiguous blocks.
    Applied for every version (harmless where fixed): the shares are the library's own `_get_partition_start_end`."""
    import math

    start = math.floor(len(dataset) * rank / world_size)
    end = math.floor(len(dataset) * (rank + 1) / world_size)
    return dataset.select(range(start, end))


def gptq_broadcast_unshared_cpu_modules() -> bool:
    """llmcompressor <= 0.14, several ranks, a model held in each rank's own CPU memory (no offloading): broadcast
    every quantized module's parameters from the rank that quantized it.

    Defect (utils/dist.py `broadcast_qparams_and_cleanup(skip_cpu=True)`): modules whose execution device is the CPU
    are not broadcast, which is right when compressed-tensors' distributed CPU offload keeps them in memory shared by
    the ranks, and wrong for a plain CPU model: later layers then calibrate on other ranks' layers left unquantized
    (measured: 1.5% of layer-2 weights one quantization step off a single process's). Upstream note: decide by
    whether the module's storage is shared, not by its device. Returns True when the patch was applied."""
    import functools

    import torch

    if torch.accelerator.is_available() or not _llmcompressor_below("0.15"):
        return False
    from llmcompressor.modifiers.gptq import base as gptq_base
    from llmcompressor.modifiers.quantization.quantization import base as quant_base

    dist_utils = importlib.import_module("llmcompressor.utils.dist")  # the package re-exports torch.distributed
    fixed = functools.partial(dist_utils.broadcast_qparams_and_cleanup, skip_cpu=False)
    gptq_base.broadcast_qparams_and_cleanup = fixed
    quant_base.broadcast_qparams_and_cleanup = fixed
    return True


def init_distributed() -> str:
    """Join the stage's process group (ranks started by torchrun/accelerate): compressed-tensors' `init_dist` where
    there is an accelerator (nccl/xccl, device per local rank); gloo on a CPU-only machine, where `init_dist` fails
    (`torch.accelerator.current_accelerator()` is None there). Returns the backend."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_backend()
    if torch.accelerator.is_available():
        from compressed_tensors.distributed import init_dist

        init_dist()
    else:
        dist.init_process_group(backend="gloo", init_method="env://")
    return dist.get_backend()
