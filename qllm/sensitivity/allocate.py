"""Mixed precision: each layer's candidate under a budget of average stored bits per quantized weight.

Objective: minimise the summed noise-to-signal ratio of the layers' outputs, sum_l 10^(-SQNR_l / 10), the linear
form of SQNR. Why not the summed SQNR in dB (a log) or the minimum: every extra bit buys about 6 dB on any layer,
so a dB sum is nearly indifferent to where bits go, and a minimum spends everything on the single worst layer; the
summed noise power puts bits where the most noise is removed per bit, which is the layer-wise first-order model of
end-to-end damage (independent errors add up in the residual stream). Greedy: start every layer at its cheapest
candidate and repeatedly apply the upgrade (layer, dearer candidate) that removes the most noise per stored bit
among those that still fit, until none fits: the budget is never exceeded and no single upgrade is left that fits.
"""

from __future__ import annotations

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


def allocate(table: dict[str, dict[str, float]], params: dict[str, int], in_features: dict[str, int],
             candidates: list[Candidate], target_bits: float, scale_bits: int = SCALE_BITS) -> Allocation:
    """`table`: layer -> candidate label -> SQNR dB (every candidate measured for every layer); `scale_bits`: the
    model dtype's width (scales are stored in it). Costs are the checkpoint's stored bits, shape tensors included."""
    cands = {c.label: c for c in candidates}
    missing = [(layer, label) for layer in table for label in cands if label not in table[layer]]
    if missing:
        raise ValueError(f"the sensitivity table lacks {len(missing)} (layer, candidate) pairs, e.g. {missing[0]}")

    def cost(layer: str, label: str) -> float:
        return stored_bits(params[layer], in_features[layer], cands[label], scale_bits)

    total = sum(params[layer] for layer in table)
    budget = target_bits * total
    choice = {layer: min(cands, key=lambda lb, ly=layer: (cost(ly, lb), -table[ly][lb])) for layer in table}
    spent = sum(cost(layer, lb) for layer, lb in choice.items())
    if spent > budget + 1e-9:
        raise QllmConfigError(f"method.settings.target_bits={target_bits}: the cheapest candidates already need "
                              f"{spent / total:.3f} bits per weight; raise it or add a cheaper candidate")
    upgrades = 0
    while True:
        best: Optional[tuple[float, str, str, float]] = None
        for layer, cur in choice.items():
            c0, n0 = cost(layer, cur), nsr(table[layer][cur])
            for label in cands:
                extra = cost(layer, label) - c0
                gain = n0 - nsr(table[layer][label])
                if extra <= 0 or gain <= 0 or spent + extra > budget + 1e-9:
                    continue
                if best is None or gain / extra > best[0]:
                    best = (gain / extra, layer, label, extra)
        if best is None:
            break
        _, layer, label, extra = best
        choice[layer] = label
        spent += extra
        upgrades += 1
    counts: dict[str, int] = {}
    for label in choice.values():
        counts[label] = counts.get(label, 0) + 1
    return Allocation(choice=choice, target_bits=target_bits, avg_bits=spent / total,
                      objective=sum(nsr(table[ly][lb]) for ly, lb in choice.items()), upgrades=upgrades,
                      counts=dict(sorted(counts.items())))
