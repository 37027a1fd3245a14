"""One calibration forward of the unquantized model: each quantizable linear layer's input second moment."""

from __future__ import annotations

import re
from typing import Any, Iterable

import torch


def quantizable_layers(model: Any, ignore: Iterable[str]) -> dict[str, torch.nn.Linear]:
    """The linear layers a recipe with this `ignore` list quantizes (names as in the checkpoint: model.layers.0...)."""
    patterns = list(ignore)

    def ignored(name: str) -> bool:
        for p in patterns:
            if p.startswith("re:") and re.match(p[3:], name):
                return True
            if name == p or name.endswith("." + p) or name.split(".")[-1] == p:
                return True
        return False

    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not ignored(n)}


@torch.no_grad()
def second_moments(model: Any, layers: dict[str, torch.nn.Linear], samples: Iterable[dict],
                   progress: Any = None) -> dict[str, torch.Tensor]:
    """{layer: mean over calibration tokens of x x^T} (float32): GPTQModifier's Hessian (accumulate_hessian sums
    2 x x^T in float32) divided by 2 n, accumulated in place (`addmm_`: no scaled copy per call, the same
    arithmetic); layers that read the same input (q/k/v, gate/up) share one matrix."""
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    shared: dict[str, str] = {}  # layer -> the layer whose matrix it shares (same input tensor in a forward)
    seen: dict[int, tuple[str, torch.Tensor]] = {}  # holds the tensor: an id is unique only while it lives

    def hook(name: str):
        def f(module: torch.nn.Linear, args: tuple, _out: Any) -> None:
            x = args[0]
            key = id(x)
            if key in seen and seen[key][0] != name:
                shared.setdefault(name, seen[key][0])
                return
            seen[key] = (name, x)
            if name not in sums:
                sums[name] = torch.zeros(module.in_features, module.in_features, dtype=torch.float32)
                tokens[name] = 0
            flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
            tokens[name] += flat.shape[0]
            sums[name].addmm_(flat.T, flat)
        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        for sample in samples:
            seen.clear()
            ids = torch.tensor([sample["input_ids"]])
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            if progress is not None:
                progress()
    finally:
        for h in handles:
            h.remove()
    out = {n: s / tokens[n] for n, s in sums.items()}
    for name, source in shared.items():
        out[name] = out[source]
    return out
