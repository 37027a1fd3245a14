"""One linear layer quantized by one candidate, and the SQNR of its output on the calibration activations.

With H = mean over calibration tokens of x x^T (the layer input's second moment, what GPTQ calls the Hessian up to
a factor 2), the output Y = X W^T and its error E = X (W - Q)^T have ||Y||^2 = n tr(W H W^T) and
||E||^2 = n tr((W - Q) H (W - Q)^T): the SQNR needs H only, never the activations themselves, so one capture per
layer serves every candidate. Quantization is llmcompressor's own: its min-max weight observer for the scales, then
compressed-tensors' fake quantization (RTN) or llmcompressor's `quantize_weight` (GPTQ, the modifier's kernel).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .candidates import Candidate

SQNR_CAP_DB = 150.0  # float32 resolution: a layer left unquantized (or quantized losslessly) reads as this


def quant_args(c: Candidate, actorder: str | None = "static") -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    kw: dict[str, Any] = dict(num_bits=c.bits, type="int", symmetric=c.symmetric,
                              strategy="group" if c.group_size else "channel", group_size=c.group_size)
    if c.method == "gptq" and actorder:
        kw["actorder"] = actorder
    return QuantizationArgs(**kw)


def _qparams(weight: torch.Tensor, args: Any) -> dict[str, torch.Tensor]:
    from llmcompressor.observers import Observer

    observer = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)
    observer(weight)
    return observer.get_qparams()


@torch.no_grad()
def quantize(weight: torch.Tensor, hessian: torch.Tensor, c: Candidate, dampening_frac: float = 0.01,
             block_size: int = 128) -> torch.Tensor:
    """The candidate's quantize-dequantized copy of `weight` [out, in] (float32)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    w = weight.detach().to(torch.float32)
    args = quant_args(c)
    qp = _qparams(w, args)
    if c.method == "rtn":
        return fake_quantize(w, qp["scale"], qp["zero_point"], args)
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    # GPTQModifier passes H = 2/n sum x x^T (accumulate_hessian, then / num_samples); the factor cancels in GPTQ
    q, _, _ = quantize_weight(w.unsqueeze(0).clone(), (2 * hessian).unsqueeze(0).clone(), qp["scale"].unsqueeze(0),
                              qp["zero_point"].unsqueeze(0), None, args, blocksize=block_size,
                              percdamp=dampening_frac)
    return q[0]


@torch.no_grad()
def quantize_batch(weights: list[torch.Tensor], hessians: list[torch.Tensor], c: Candidate,
                   dampening_frac: float = 0.01, block_size: int = 128) -> list[torch.Tensor]:
    """`quantize` of several same-shape layers at once. GPTQ runs them as one batch through `quantize_weight` (as the
    modifier's `batched_quantization` does): its column loop is Python, so one call for a stack of layers costs
    about what one layer costs (measured: 30 layers of 576x576 in ~1.5 s instead of 30 x 1.3 s); each layer keeps
    its own Hessian and scales, so every result equals the one-layer call's."""
    if c.method != "gptq" or len(weights) == 1:
        return [quantize(w, h, c, dampening_frac, block_size) for w, h in zip(weights, hessians)]
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    args = quant_args(c)
    ws = [w.detach().to(torch.float32) for w in weights]
    qps = [_qparams(w, args) for w in ws]
    q, _, _ = quantize_weight(torch.stack(ws), torch.stack([2 * h for h in hessians]),
                              torch.stack([p["scale"] for p in qps]), torch.stack([p["zero_point"] for p in qps]),
                              None, args, blocksize=block_size, percdamp=dampening_frac)
    return list(q.unbind(0))


def output_power(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(W H W^T): the mean squared output per token, the SQNR's signal (the same for every candidate)."""
    w = weight.detach().to(torch.float32)
    return float(((w @ hessian) * w).sum(dtype=torch.float64))


def sqnr_db(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor,
            signal: float | None = None) -> float:
    """10 log10(||X W^T||^2 / ||X (W - Q)^T||^2) from H = mean x x^T; capped at SQNR_CAP_DB. float32 products with
    float64 sums: the error is formed first (W - Q), so its power is exact to float32 rounding even at 8 bits."""
    signal = output_power(weight, hessian) if signal is None else signal
    err = weight.detach().to(torch.float32) - quantized.to(torch.float32)
    noise = float(((err @ hessian) * err).sum(dtype=torch.float64))
    if noise <= signal * 10 ** (-SQNR_CAP_DB / 10):
        return SQNR_CAP_DB
    return min(SQNR_CAP_DB, 10 * math.log10(signal / noise))
