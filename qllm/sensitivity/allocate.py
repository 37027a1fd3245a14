"""Mixed precision: each layer's candidate under a budget of average stored bits per quantized weight.

Objective: minimise the summed noise-to-signal ratio of the layers' outputs, sum_l 10^(-SQNR_l / 10), the linear
form of SQNR. Why not the summed SQNR in dB (a log) or the minimum: every extra bit buys about 6 dB on any layer,
so a dB sum is nearly indifferent to where bits go, and a minimum spends everything on the single worst layer; the
summed noise power puts bits where the most noise is removed per bit, which is the layer-wise first-order model of
end-to-end damage (independent errors add up in the residual stream). Greedy: start every layer at its cheapest
candidate and repeatedly apply the upgrade (layer, dearer candidate) that removes the most noise per stored bit
among those that still fit, until none fits: the budget is never exceeded and no single upgrade is left that fits.
With `units`, layers are allocated together (one candidate for all of a unit: its costs and noise summed), as vLLM
needs for the projections it fuses into one layer (q/k/v -> qkv_proj, gate/up -> gate_up_proj).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Optional

from ..errors import QllmConfigError
from .candidates import SCALE_BITS, SHAPE_BITS, Candidate


def nsr(sqnr_db: float) -> float:
    return 10 ** (-sqnr_db / 10)


def stored_bits(params: int, in_features: int, c: Candidate, scale_bits: int = SCALE_BITS) -> float:
    """What one layer at candidate `c` stores, in bits (what size/bits_per_weight_quantized adds up)."""
    return params * c.bits_per_weight(in_features, scale_bits) + SHAPE_BITS


@dataclass
class Allocation:
    choice: dict[str, str]  # layer -> candidate label
    target_bits: float
    avg_bits: float  # stored bits per quantized weight (params-weighted), as size/bits_per_weight_quantized
    objective: float  # summed noise-to-signal ratio of the choice (lower is better)
    upgrades: int
    counts: dict[str, int] = field(default_factory=dict)  # candidate label -> layers

    def to_dict(self) -> dict:
        return asdict(self)


# the projections vLLM fuses into one layer (its Llama-family packed_modules_mapping); they must share one scheme
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fused_units(layers: list[str]) -> list[list[str]]:
    """`layers` grouped as vLLM fuses them: a block's q/k/v together, its gate/up together, every other alone."""
    part = {short: fused for fused, shorts in FUSED.items() for short in shorts}
    units: dict[str, list[str]] = {}
    for layer in layers:
        m = re.fullmatch(r"(.*)\.([^.]+)", layer)
        key = f"{m.group(1)}.{part[m.group(2)]}" if m and m.group(2) in part else layer
        units.setdefault(key, []).append(layer)
    return list(units.values())


def allocate(table: dict[str, dict[str, float]], params: dict[str, int], in_features: dict[str, int],
             candidates: list[Candidate], target_bits: float, scale_bits: int = SCALE_BITS,
             units: Optional[list[list[str]]] = None) -> Allocation:
    """`table`: layer -> candidate label -> SQNR dB (every candidate measured for every layer); `scale_bits`: the
    model dtype's width (scales are stored in it); `units`: layers that take one candidate together (default: each
    layer alone). Costs are the checkpoint's stored bits, shape tensors included."""
    cands = {c.label: c for c in candidates}
    missing = [(layer, label) for layer in table for label in cands if label not in table[layer]]
    if missing:
        raise ValueError(f"the sensitivity table lacks {len(missing)} (layer, candidate) pairs, e.g. {missing[0]}")
    units = [list(u) for u in units] if units is not None else [[layer] for layer in table]
    if sorted(ly for u in units for ly in u) != sorted(table):
        raise ValueError("the allocation units must cover every layer of the table exactly once")

    def cost(u: int, label: str) -> float:
        return sum(stored_bits(params[ly], in_features[ly], cands[label], scale_bits) for ly in units[u])

    def noise(u: int, label: str) -> float:
        return sum(nsr(table[ly][label]) for ly in units[u])

    total = sum(params[layer] for layer in table)
    budget = target_bits * total
    choice = {u: min(cands, key=lambda lb, u=u: (cost(u, lb), noise(u, lb))) for u in range(len(units))}
    spent = sum(cost(u, lb) for u, lb in choice.items())
    if spent > budget + 1e-9:
        raise QllmConfigError(f"method.settings.target_bits={target_bits}: the cheapest candidates already need "
                              f"{spent / total:.3f} bits per weight; raise it or add a cheaper candidate")
    upgrades = 0
    while True:
        best: Optional[tuple[float, int, str, float]] = None
        for u, cur in choice.items():
            c0, n0 = cost(u, cur), noise(u, cur)
            for label in cands:
                extra = cost(u, label) - c0
                gain = n0 - noise(u, label)
                if extra <= 0 or gain <= 0 or spent + extra > budget + 1e-9:
                    continue
                if best is None or gain / extra > best[0]:
                    best = (gain / extra, u, label, extra)
        if best is None:
            break
        _, u, label, extra = best
        choice[u] = label
        spent += extra
        upgrades += 1
    per_layer = {ly: choice[u] for u in range(len(units)) for ly in units[u]}
    per_layer = {ly: per_layer[ly] for ly in table}  # the table's order
    counts: dict[str, int] = {}
    for label in per_layer.values():
        counts[label] = counts.get(label, 0) + 1
    return Allocation(choice=per_layer, target_bits=target_bits, avg_bits=spent / total,
                      objective=sum(nsr(table[ly][lb]) for ly, lb in per_layer.items()), upgrades=upgrades,
                      counts=dict(sorted(counts.items())))
