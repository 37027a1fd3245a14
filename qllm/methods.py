"""Quantization methods: each maps (bits, settings) to an llmcompressor recipe, as plain data.

A method is one YAML in conf/method/ (naming its function here in `recipe:`) plus one small function below.
Recipes are dicts in llmcompressor's recipe format, so planning a cell needs no llmcompressor import, the recipe is
hashed into the cell key, and it is logged to MLflow exactly as it was applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .errors import QllmConfigError


@dataclass(frozen=True)
class Recipe:
    scheme: str  # human label, e.g. "W4A16 int g64 sym"
    modifiers: dict[str, Any]  # {ModifierName: kwargs}, applied in order by llmcompressor
    group_size: Optional[int] = None  # the group size that must divide every quantized layer's input width

    def as_llmcompressor(self) -> dict[str, Any]:
        return {"quant_stage": {"quant_modifiers": self.modifiers}}

    @property
    def quant(self) -> "Scheme":
        return scheme_of(self.modifiers)

    @property
    def schemes(self) -> list["Scheme"]:
        """Every scheme its layers may get: a planned `mixed` recipe's candidates (each must have a kernel on the
        backend), else its one scheme."""
        mixed = self.modifiers.get("QllmMixedPrecision")
        if mixed is None:
            return [self.quant]
        from .sensitivity.candidates import parse

        return [Scheme("int", c.bits, c.symmetric, c.group_size) for c in parse(list(mixed["candidates"]))]

    @property
    def tied_fused(self) -> bool:
        """Whether fused projections (q/k/v, gate/up) share one scheme: true of every single-scheme recipe."""
        mixed = self.modifiers.get("QllmMixedPrecision")
        return mixed is None or bool(mixed.get("tie_fused"))


@dataclass(frozen=True)
class Scheme:
    """What a checkpoint computes with, as an evaluation backend sees it (what decides which kernel can run it)."""

    weights: str = "dense"  # dense | int | float
    bits: Optional[int] = None
    symmetric: bool = True
    group_size: Optional[int] = None  # None: per-channel (or dense)
    activations: Optional[str] = None  # None: 16-bit activations | int8 | fp8 (dynamic per token)

    @property
    def family(self) -> str:
        """The row of a backend's support table: dense, W4A16 sym, W4A16 asym, W8A16 sym, W8A8 int8, W8A8 fp8..."""
        if self.weights == "dense":
            return "dense"
        if self.activations:
            return f"W{self.bits}A8 {self.activations}"
        return f"W{self.bits}A16 {'sym' if self.symmetric else 'asym'}"


# llmcompressor's preset scheme names used by the methods below -> the scheme they quantize to
_PRESETS = {"W8A8": Scheme("int", 8, True, None, "int8"), "FP8_DYNAMIC": Scheme("float", 8, True, None, "fp8"),
            "FP8": Scheme("float", 8, True, None, "fp8")}


def scheme_of(modifiers: dict[str, Any]) -> Scheme:
    """The scheme a recipe's last quantizing modifier applies (a preset name or a weights config group); one
    scheme per recipe (a recipe of several config groups is mixed precision: the first group's scheme; a planned
    `mixed` recipe: its narrowest candidate, the kernel every backend must have)."""
    found = Scheme()
    for name, kwargs in modifiers.items():
        if name == "QllmMixedPrecision":
            from .sensitivity.candidates import parse

            c = min(parse(kwargs["candidates"]), key=lambda c: (c.bits, c.group_size or 1 << 30))
            return Scheme("int", c.bits, c.symmetric, c.group_size)
        if kwargs.get("scheme") in _PRESETS:
            found = _PRESETS[kwargs["scheme"]]
        for group in (kwargs.get("config_groups") or {}).values():
            w = group["weights"]
            found = Scheme(w["type"], w["num_bits"], w["symmetric"], w.get("group_size"),
                           None if not group.get("input_activations") else
                           ("int8" if group["input_activations"]["type"] == "int" else "fp8"))
            break
    return found


def _int_weights(bits: int, group_size: Optional[int], symmetric: bool, actorder: Optional[str] = None) -> dict:
    w: dict[str, Any] = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False}
    if group_size:
        w.update(strategy="group", group_size=group_size)
    else:
        w.update(strategy="channel")
    if actorder:
        w["actorder"] = actorder
    return w


def _weight_only(bits: int, group_size: Optional[int], symmetric: bool, actorder: Optional[str] = None) -> dict:
    return {"group_0": {"targets": ["Linear"], "weights": _int_weights(bits, group_size, symmetric, actorder)}}


def _label(bits: int, group_size: Optional[int], symmetric: bool) -> str:
    return f"W{bits}A16 int {'g' + str(group_size) if group_size else 'per-channel'} {'sym' if symmetric else 'asym'}"


def none(bits: int, ignore: list[str]) -> Recipe:
    return Recipe(scheme="unquantized", modifiers={})


def rtn(bits: int, ignore: list[str], group_size: Optional[int], symmetric: bool = True) -> Recipe:
    mod = {"ignore": list(ignore), "config_groups": _weight_only(bits, group_size, symmetric)}
    return Recipe(_label(bits, group_size, symmetric), {"QuantizationModifier": mod}, group_size)


def gptq(bits: int, ignore: list[str], group_size: Optional[int], symmetric: bool = True,
         actorder: Optional[str] = "static", dampening_frac: float = 0.01, block_size: int = 128) -> Recipe:
    weights = _weight_only(bits, group_size, symmetric, actorder)
    mod = {"ignore": list(ignore), "config_groups": weights, "dampening_frac": dampening_frac, "block_size": block_size}
    return Recipe(_label(bits, group_size, symmetric), {"GPTQModifier": mod}, group_size)


def awq(bits: int, ignore: list[str], group_size: Optional[int], symmetric: bool = False, n_grid: int = 20,
        duo_scaling: bool = True) -> Recipe:
    # llmcompressor's grid: n_grid ratios, or n_grid - 1 of them (ratio k / (n_grid - 2)) with duo scaling
    if n_grid < (3 if duo_scaling else 2):
        raise QllmConfigError(f"method.settings.n_grid={n_grid}: AWQ needs >= {3 if duo_scaling else 2} grid points "
                              f"with duo_scaling={duo_scaling} (llmcompressor divides by n_grid - "
                              f"{2 if duo_scaling else 1}); 20 is the library's default, 6 the fast setting")
    # In llmcompressor 0.14 AWQ only rescales; the QuantizationModifier after it sets the scheme and quantizes.
    modifiers = {
        "AWQModifier": {"n_grid": n_grid, "duo_scaling": duo_scaling},
        "QuantizationModifier": {"ignore": list(ignore), "config_groups": _weight_only(bits, group_size, symmetric)},
    }
    return Recipe(_label(bits, group_size, symmetric), modifiers, group_size)


def smoothquant(bits: int, ignore: list[str], smoothing_strength: float = 0.8, dampening_frac: float = 0.01) -> Recipe:
    modifiers = {
        "SmoothQuantModifier": {"smoothing_strength": smoothing_strength},
        "GPTQModifier": {"ignore": list(ignore), "targets": ["Linear"], "scheme": "W8A8", "dampening_frac": dampening_frac},
    }
    return Recipe("W8A8 int8 (per-channel weights, dynamic per-token activations)", modifiers)


def fp8(bits: int, ignore: list[str]) -> Recipe:
    mod = {"ignore": list(ignore), "targets": ["Linear"], "scheme": "FP8_DYNAMIC"}
    return Recipe("W8A8 fp8 e4m3 (per-channel weights, dynamic per-token activations)", {"QuantizationModifier": mod})


def mixed(bits: int, ignore: list[str], target_bits: float = 4.5,
          candidates: Optional[list[str]] = None, actorder: Optional[str] = "static", dampening_frac: float = 0.01,
          block_size: int = 128, tie_fused: bool = False) -> Recipe:
    """Per-layer (bits, group size) chosen by qllm.sensitivity from each layer's measured SQNR, under an average of
    `target_bits` stored bits per quantized weight; GPTQ quantizes every layer at its choice. The layers' choices
    are made in the quantize stage (they need the model): the recipe planned here is the spec, in the quant key.
    `tie_fused`: one choice for each block's q/k/v and gate/up (vLLM fuses them into one layer of one scheme); in the
    spec only when set, so the keys of untied cells stay as they were."""
    import math

    from .sensitivity.candidates import parse

    cands = parse(list(candidates or ["gptq-w4ch", "gptq-w4g64", "gptq-w8g64"]))
    other = [c.label for c in cands if c.method != "gptq"]
    if other:
        raise QllmConfigError(f"method=mixed: candidates {', '.join(other)} are not GPTQ; one GPTQModifier quantizes "
                              "every layer at its chosen width, so every candidate must be gptq-w<bits>g<group>")
    cheapest = min(c.bits_per_weight(1 << 14) for c in cands)
    if target_bits < cheapest:
        raise QllmConfigError(f"method.settings.target_bits={target_bits}: below the cheapest candidate's "
                              f"~{cheapest:.2f} bits per weight; valid: >= that")
    groups = [c.group_size for c in cands if c.group_size]
    spec = {"candidates": [c.label for c in cands], "target_bits": float(target_bits), "objective": "summed_nsr",
            "actorder": actorder, **({"tie_fused": True} if tie_fused else {})}
    gptq = {"ignore": list(ignore), "dampening_frac": dampening_frac, "block_size": block_size}
    widths = "/".join(f"W{b}" for b in sorted({c.bits for c in cands}))
    return Recipe(f"mixed {widths} int (<= {target_bits:g} bits/weight, per-layer by SQNR)",
                  {"QllmMixedPrecision": spec, "GPTQModifier": gptq}, math.lcm(*groups) if groups else None)
