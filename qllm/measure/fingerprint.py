"""Which weights a loaded model holds: evidence that the evaluated model is the quantized one."""

from __future__ import annotations

from typing import Any, Optional


def weight_fingerprint(model: Any, group_size: Optional[int]) -> dict:
    """Evidence of what was evaluated, taken from the first decoder MLP down-projection as the model runs it:
    - the most distinct weight values in any quantization group (or row): a b-bit integer grid allows at most 2**b,
      dense weights have about as many as the group is wide;
    - the relative change of the layer's output vs a plain matmul with those weights on a random input: non-zero
      only when activations are quantized on the fly (W8A8 schemes)."""
    import torch

    name, lin = next((n, m) for n, m in model.named_modules() if n.endswith("mlp.down_proj"))
    w = lin.weight.detach()
    groups = w.float().cpu().reshape(-1, group_size) if group_size else w.float().cpu()
    levels = max(len(torch.unique(g)) for g in groups[:256])
    x = torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    with torch.no_grad():
        dense = torch.nn.functional.linear(x, w, getattr(lin, "bias", None))
        act_err = ((lin(x) - dense).float().norm() / dense.float().norm()).item()
    return {
        "layer": name,
        "group_size": group_size,
        "group_width": groups.shape[1],
        "max_distinct_per_group": levels,
        "activation_quant_rel_error": act_err,
    }
