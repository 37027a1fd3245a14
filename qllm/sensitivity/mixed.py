"""`method=mixed`: the planned recipe (candidates + budget, no layer choices yet) and, in the quantize stage, the real
one: a GPTQModifier with one config group per chosen candidate, each targeting its layers by exact name, which
llmcompressor saves as one compressed-tensors checkpoint with per-layer schemes (transformers and vLLM load it)."""

from __future__ import annotations

import copy
from typing import Any

from .allocate import Allocation
from .candidates import Candidate, parse

MIXED = "QllmMixedPrecision"  # the planned recipe's placeholder modifier: resolved by the quantize stage, never run


def spec(recipe: dict) -> dict | None:
    """The mixed-precision spec of an llmcompressor-format recipe (None: not a mixed recipe)."""
    return (recipe.get("quant_stage", {}).get("quant_modifiers") or {}).get(MIXED)


def candidates(mixed: dict) -> list[Candidate]:
    return parse(list(mixed["candidates"]))


def resolve(recipe: dict, allocation: Allocation) -> dict:
    """The planned recipe with its placeholder replaced by the allocation's config groups."""
    from ..methods import _int_weights

    mods = copy.deepcopy(recipe["quant_stage"]["quant_modifiers"])
    mixed = mods.pop(MIXED)
    by_label = {c.label: c for c in candidates(mixed)}
    groups: dict[str, Any] = {}
    for label in sorted(set(allocation.choice.values())):
        c = by_label[label]
        layers = sorted(layer for layer, lb in allocation.choice.items() if lb == label)
        groups[f"group_{label.replace('-', '_')}"] = {
            "targets": layers, "weights": _int_weights(c.bits, c.group_size, c.symmetric, mixed.get("actorder"))}
    mods["GPTQModifier"] = {**mods["GPTQModifier"], "config_groups": groups}
    return {"quant_stage": {"quant_modifiers": mods}}
